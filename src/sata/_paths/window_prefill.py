"""The window mode's causal prefill through the fused CPU kernel (``_kernels/prefill_window.cpp``).

A causal call of more than one token (``MATH.md`` section 6), without autograd, on the CPU (float32 or float64
inputs; half inputs computed in float32, as every path computes them): per head and chunk of queries the kernel reads the far state and the chunk's far keys in the series around
each query's centre, the band of window keys and the sinks through ``exp``, and absorbs the chunk's far keys, in
one pass. :func:`sata._paths.window.window_attention` builds the extended stream and the window and sinks after the
call (:func:`sata._paths.window.stream`) and takes its PyTorch path wherever :func:`serves` says no; both are tested
against the oracle.
"""

from __future__ import annotations

import functools

import torch

from .. import _kernels
from ..basis import get_basis
from ..features import _split_scale
from ..hybrid import Hybrid
from ..state import ExactKeys
from .kernel import available
from .window_kernel import head_params


# the most window positions and sinks the kernel takes: it visits every window position of a chunk's band and
# keeps a row of scores per exact key (windows beyond this are near-softmax calls: the PyTorch path)
MAX_EXACT = 4096


def serves(spec, hybrid: Hybrid, q, k, v, far, exact: ExactKeys, key_centre, *far_qk) -> bool:
    """CPU, a compute and state dtype the kernel supports (float32 / float64; half inputs computed in float32, as
    the PyTorch path does), a compiler, at most :data:`MAX_EXACT` window positions and sinks, and no autograd
    graph to record."""
    if not (spec.device.type == "cpu" and hybrid.window + hybrid.sinks <= MAX_EXACT
            and _kernels.supports(spec.compute_dtype, spec.state_dtype) and available()):
        return False
    if not torch.is_grad_enabled():
        return True
    return not any(isinstance(t, torch.Tensor) and t.requires_grad for t in (
        q, k, v, far, *exact.tensors(), key_centre, hybrid.taylor_mix, hybrid.recentre, *far_qk))


@functools.lru_cache(maxsize=64)
def _plan(Hkv: int, G: int, d: int, Ev: int, n_taylor: int, scale: float, dtype: torch.dtype,
          state_dtype: torch.dtype, window: int, sinks: int, recentre: bool) -> _kernels.WindowPrefillPlan:
    basis = get_basis(d, n_taylor, torch.device("cpu"), dtype)
    return _kernels.WindowPrefillPlan(_kernels.load(), Hkv, G, d, Ev, basis, dtype, *_split_scale(scale), state_dtype,
                                      window, sinks, recentre)


def prefill(q, k, v, win_k, win_v, ext_f, new_exact: ExactKeys, far, n_tokens: int, spec, hybrid: Hybrid, key_centre,
            far_qk=None):
    """The window mode's causal call through the kernel.

    Args:
        q: ``[B, Hkv, g, L, E]``; k: ``[B, Hkv, L, E]``; v: ``[B, Hkv, L, Ev]``; win_k, win_v: ``[B, Hkv, W, E | Ev]``
            the state's window, oldest first, and ext_f ``[B, W + L]`` bool the flags of the extended stream
            (:func:`sata._paths.window.stream`); new_exact: the window and sinks after the call;
        far: the far state ``[B, Hkv, F, D]`` or None (not modified);
        n_tokens: positions before the call; key_centre: ``[B, Hkv, E]`` or None;
        far_qk: ``(q', k')`` shaped like ``q``, ``k``, the far part's own queries and keys, or None (as
            :func:`sata._paths.window.window_attention`).

    Returns:
        ``y [B, Hkv, g, L, Ev]`` and the far state after the call ``[B, Hkv, F, D]``.
    """
    B, Hkv, g, L, E = q.shape
    cd, sd, Ev, W, S_ = spec.compute_dtype, spec.state_dtype, spec.d_value, hybrid.window, hybrid.sinks
    plan = _plan(Hkv, g, E, Ev, spec.n_taylor, spec.scale, cd, sd, W, S_, hybrid.recentre is not None)
    N = B * Hkv
    flat = lambda t, *shape: t.to(cd).contiguous().view(*shape)                # no copy for contiguous inputs in T
    S = torch.zeros(B, Hkv, Ev + 1, spec.feature_dim, dtype=sd) if far is None else \
        far.to(sd).clone(memory_format=torch.contiguous_format)                  # [B, Hkv, F, D], ours to update
    y = torch.empty(B, Hkv, g, L, Ev, dtype=cd)                                  # [B, Hkv, g, L, Ev]
    plan(flat(q, N, g, L, E), flat(win_k, N, W, E), flat(win_v, N, W, Ev), flat(k, N, L, E), flat(v, N, L, Ev),
         ext_f.to(torch.uint8).contiguous(), flat(new_exact.sink_k, N, S_, E), flat(new_exact.sink_v, N, S_, Ev),
         new_exact.sink_pos.contiguous(), None if key_centre is None else flat(key_centre, N, E),
         *head_params(hybrid, spec), S.view(N, Ev + 1, spec.feature_dim), y.view(N, g, L, Ev), n_tokens,
         *((None, None) if far_qk is None else (flat(far_qk[0], N, g, L, E), flat(far_qk[1], N, L, E))))
    return y.to(spec.dtype), S
