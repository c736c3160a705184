"""Symmetry-aware Taylor attention: the functional op, a drop-in beside SDPA, and its dispatch.

One call: :func:`sata_attention` validates (``sata._checks``), :func:`select_path` names the path
that runs it, :data:`PATHS` holds the paths (``sata._paths``: one module each), and the path's
state comes back as a :class:`SATAState`. Beside the public functions (``__all__``) this module
holds that dispatch, :func:`force_path` (the hook tests and benchmarks use to pin a path) and
:func:`cache_sizes`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch

from . import _kernels
from ._checks import _SPEC_CACHE, Spec, check_inputs, refuse_inplace
from ._paths import kernel
from ._paths.kernel import usable
from ._paths.chunked import chunked
from ._paths.parallel import parallel
from ._paths.quadratic import quadratic
from ._paths.recurrent import recurrent
from ._paths.run import needs_grad, torch_path
from ._paths.tuning import DEFAULT, Tuning
from ._paths.window_call import window_call
from .hybrid import check_hybrid
from .state import SATAState

__all__ = ["accumulate_state", "sata_attention"]

# the default weight of the Taylor part: its identity tells a decode loop that nothing needs checking
_DEFAULT_MIX = 1.0


def sata_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, n_taylor: int = 3, is_causal: bool = False,
    scale: float | None = None, enable_gqa: bool = False, key_padding_mask: torch.Tensor | None = None,
    state: SATAState | None = None, return_state: bool = False, inplace: bool = False, window: int = 0,
    sinks: int = 0, taylor_mix: float | torch.Tensor = _DEFAULT_MIX, recentre: float | torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, SATAState]:
    r"""Attention with ``exp`` replaced by its Taylor series truncated to ``n_taylor`` terms.

    .. math::
        y_i = \frac{\sum_j T_P(s_{ij})\, v_j}{\sum_j T_P(s_{ij})},\qquad
        T_P(s) = \sum_{p<P} \frac{s^p}{p!},\qquad s_{ij} = \mathrm{scale}\; q_i \cdot k_j

    computed at constant cost per token through the packed symmetric features ``phi`` with
    ``<phi(q), phi(k)> = T_P(scale q.k)``. Same layout as :func:`torch.nn.functional.scaled_dot_product_attention`.

    Args:
        query (torch.Tensor): ``[..., Hq, Lq, E]``.
        key (torch.Tensor): ``[..., Hkv, Lk, E]``.
        value (torch.Tensor): ``[..., Hkv, Lk, Ev]``.
        n_taylor (int): number of Taylor terms ``P`` (degrees ``0..P-1``). Default: ``3``,
            the most terms every head size up to 64 affords; odd ``P`` keeps every weight
            ``T_P(s) > 0``. Features per head: ``D = C(E + P - 1, P - 1)``.
        is_causal (bool): query ``i`` attends to the keys in ``state`` and to the passed keys at positions
            ``<= i``; requires ``Lq == Lk``. Default: ``False`` (every query attends to the state and all passed keys).
        scale (float, optional): score scale. Default: ``1 / sqrt(E)``.
        enable_gqa (bool): grouped-query attention, ``Hq`` a multiple of ``Hkv``; query head ``h``
            uses key/value head ``h // (Hq // Hkv)``, one state per key/value head. Default: ``False``.
        key_padding_mask (torch.Tensor, optional): ``[..., Lk]`` bool, ``True`` = ignore that key
            (``nn.MultiheadAttention``'s convention). A masked key changes neither output nor state.
        state (SATAState, optional): keys seen before this call. Never modified (unless ``inplace``).
        return_state (bool): also return the state after this call. Default: ``False``.
        inplace (bool): write the new state into ``state.kv`` instead of a new tensor, for serving
            loops that drop the old state anyway (no allocation per token; about a third less memory
            traffic). The returned state shares that tensor (in the window mode, its window and sink
            buffers too), and ``state`` itself is advanced (its ``n_tokens`` too): both then hold the
            state after this call. Needs ``state`` and ``return_state=True``; not allowed under autograd (inputs,
            ``state`` or ``taylor_mix`` / ``recentre`` tensors requiring grad). Default: ``False`` (the
            passed-in state stays valid).
        window (int): each query also attends *exactly* (softmax weights ``exp``) to the ``window``
            most recent positions, itself included (non-causal: ``|i - j| < window``); the Taylor state
            holds only the keys further back. ``window >= L`` is exact softmax attention. Default: ``0``.
        sinks (int): and exactly to the first ``sinks`` kept keys of the stream (across calls; padded
            keys do not count, so each row of a left-padded batch gets its own first keys). Default: ``0``.
        taylor_mix (float | torch.Tensor): ``beta >= 0``, scalar or per query head ``[Hq]``, the weight of
            the Taylor part beside the exact keys in the shared normaliser; differentiable. ``0`` is a
            sliding window with sinks. Default: ``1.0`` (no effect without a window or sinks).
        recentre (float | torch.Tensor, optional): ``alpha``, scalar or ``[Hq]``: expand the series of
            query ``i`` around ``c_i = mu_i - alpha sd_i``, the mean and standard deviation of its scores
            over the keys in the Taylor part, read from the same state (the mean needs ``n_taylor >= 2``,
            the deviation ``n_taylor >= 3``, and so does a tensor that requires grad under autograd);
            differentiable. Default: ``None``, the series around 0.

            With any of these (``MATH.md`` section 6), for query ``i`` with exact keys ``E_i`` and
            Taylor keys ``F_i``, ``m_i = max(max_{E_i} s_ij, c_i)`` (``c_i`` left out where ``F_i`` is empty
            or ``beta = 0``; ``m_i`` cancels, it keeps the exponentials in range):
            ``y_i = (sum_{E_i} e^{s_ij - m_i} v_j + beta e^{c_i - m_i} sum_{F_i} T_P(s_ij - c_i) v_j) / (same with 1)``.
            The state then also keeps the window's and the sinks' keys and values
            (``SATAState.exact``, in the state's dtype): memory per head
            ``D (Ev + 1) + (window + sinks)(E + Ev)`` floats, still constant per token.

    Returns:
        ``[..., Hq, Lq, Ev]`` in the input dtype, or ``(output, state)`` with ``return_state=True``.
        States accumulate in float32 (float64 for float64 inputs, or when ``state`` is float64).

    Notes:
        A query whose normaliser ``sum_j T_P(s_ij)`` is not positive (no keys, or, for even ``P`` only, strongly
        negative scores) gets a zero output, never Inf or NaN. NaN/Inf in unmasked inputs propagate to outputs
        and states that depend on them, as in SDPA (to later tokens too: they enter the state); masked keys are ignored.

    Examples::
        >>> q, k, v = (torch.randn(2, 8, 1024, 16) for _ in range(3))
        >>> y, st = sata.sata_attention(q, k, v, n_taylor=3, is_causal=True, return_state=True)
        >>> q1, k1, v1 = (torch.randn(2, 8, 1, 16) for _ in range(3))       # one more token
        >>> y1, st = sata.sata_attention(q1, k1, v1, n_taylor=3, is_causal=True, state=st, return_state=True)
    """
    if torch.compiler.is_compiling():  # opaque to torch.compile: run eagerly behind a graph break
        return _eager_attention(query, key, value, n_taylor=n_taylor, is_causal=is_causal, scale=scale,
                                enable_gqa=enable_gqa, key_padding_mask=key_padding_mask, state=state,
                                return_state=return_state, inplace=inplace, window=window, sinks=sinks,
                                taylor_mix=taylor_mix, recentre=recentre)
    spec = check_inputs("sata_attention", query, key, value, n_taylor=n_taylor, is_causal=is_causal, scale=scale,
                        enable_gqa=enable_gqa, key_padding_mask=key_padding_mask, state=state)
    if inplace and (state is None or not return_state):
        refuse_inplace(state, return_state)
    if window or sinks or window is None or sinks is None or recentre is not None or taylor_mix is not _DEFAULT_MIX or _windowed(state):  # the window mode, MATH.md section 6 (the plain defaults skip this test in a decode loop)
        hybrid = check_hybrid("sata_attention", window=window, sinks=sinks, taylor_mix=taylor_mix, recentre=recentre,
                              n_taylor=spec.n_taylor, n_q_heads=spec.n_q_heads, device=spec.device)
        if not hybrid.plain or _windowed(state):
            out = window_call(query, key, value, spec, hybrid, is_causal, key_padding_mask, state, return_state,
                              inplace, _TUNING.get().kernels)
            return _advanced(state, out) if inplace else out
    grad = needs_grad(query, key, value, state)
    if inplace and grad:
        refuse_inplace(state, return_state)
    out = _attention(query, key, value, spec, key_padding_mask, state, return_state, inplace, grad)
    return _advanced(state, out) if inplace else out


def _advanced(state: SATAState, out: tuple[torch.Tensor, SATAState]) -> tuple[torch.Tensor, SATAState]:
    """``inplace=True``: the passed state's tensors now hold the state after the call, so its token count moves
    with them (a caller who keeps using that object continues the stream: in the window mode the count picks the
    ring's slot, and a stale one read the wrong window silently)."""
    state.__dict__["n_tokens"] = out[1].n_tokens
    return out


@torch.compiler.disable
def _eager_attention(*args, **kwargs):
    return sata_attention(*args, **kwargs)


@torch.compiler.disable
def accumulate_state(
    key: torch.Tensor, value: torch.Tensor, *, n_taylor: int = 3, scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None, state: SATAState | None = None, window: int = 0, sinks: int = 0,
) -> SATAState:
    r"""Absorb keys and values into a state without reading it: ``S + phi(K)^T [V, 1]``.

    The state of a segment, for building a context without computing outputs, or for
    combining segments processed elsewhere (states of disjoint segments add).

    Args:
        key (torch.Tensor): ``[..., Hkv, Lk, E]``.
        value (torch.Tensor): ``[..., Hkv, Lk, Ev]``.
        n_taylor, scale, key_padding_mask, window, sinks: as in :func:`sata_attention`.
        state (SATAState, optional): state to continue; never modified.

    Returns:
        :class:`SATAState` with ``kv [..., Hkv, D, Ev + 1]``; gradients flow to key, value and state.
    """
    query = key[..., :0, :]
    spec = check_inputs("accumulate_state", query, key, value, n_taylor=n_taylor, is_causal=False, scale=scale,
                        enable_gqa=False, key_padding_mask=key_padding_mask, state=state)
    if window or sinks or window is None or sinks is None or _windowed(state):
        hybrid = check_hybrid("accumulate_state", window=window, sinks=sinks, taylor_mix=1.0, recentre=None,
                              n_taylor=spec.n_taylor, n_q_heads=spec.n_q_heads, device=spec.device)
        return window_call(query, key, value, spec, hybrid, False, key_padding_mask, state, True)[1]
    return _attention(query, key, value, spec, key_padding_mask, state, True, False, needs_grad(key, value, state))[1]


def _windowed(state: SATAState | None) -> bool:
    """A state of the window mode's stream: exact keys, or keys centred by a key centre (which the plain path
    would silently drop)."""
    return state is not None and (state.exact is not None or state.key_centre is not None)


# ---------------------------------------------------------------------------- dispatch
PATHS = {
    "decode_kernel": kernel.decode,
    "prefill_kernel": kernel.prefill,
    "quadratic": torch_path(quadratic),
    "recurrent": torch_path(recurrent),
    "chunked": torch_path(chunked),
    "parallel": torch_path(parallel),
}
"""Every path by name; each computes the same attention (``sata._paths`` documents the signature)."""

# the paths that compute only one of causal / non-causal attention
_CAUSALITY = {"recurrent": True, "chunked": True, "parallel": False}


def select_path(spec: Spec, grad: bool, returns_state: bool, kernels: bool) -> str:
    """The name of the path that runs a validated call (a key of :data:`PATHS`); the first row that applies.

    ==============  ===========================================  ==============================================
    path            runs when                                    why
    ==============  ===========================================  ==============================================
    decode_kernel   kernels, no grad, ``Lq = Lk = 1``            one fused pass over the state per token
    quadratic       no state returned, ``Lq > 1``, scores        short inputs next to ``D``: ``T_P`` on the
                    cost less than features                      scores beats building features
    prefill_kernel  kernels, no grad                             fused chunked prefill / build-then-read
    recurrent       causal, ``Lq <= 1``                          one token: no chunk to form
    chunked         causal                                       PyTorch: autograd, CUDA, no compiler
    parallel        non-causal                                   PyTorch: the state of all keys, then reads
    ==============  ===========================================  ==============================================

    Args:
        spec: the validated call (shapes, dtypes, device, causality).
        grad: autograd will differentiate the call (the kernels have no backward).
        returns_state: the caller asked for the state (the scores give none).
        kernels: the fused CPU kernels can serve this call shape (``sata._paths.kernel.usable``).
    """
    fused = kernels and not grad
    if fused and spec.len_q == 1 and spec.len_k == 1:
        return "decode_kernel"
    if not returns_state and spec.len_q > 1 and _quadratic_cheaper(spec):
        return "quadratic"
    if fused:
        return "prefill_kernel"
    if spec.is_causal:
        return "recurrent" if spec.len_q <= 1 else "chunked"
    return "parallel"


def _quadratic_cheaper(spec: Spec) -> bool:
    """Scores cost ``Lq Lk (E + F + P)`` (half for causal); features ``(Lq + Lk) D F``."""
    F = spec.d_value + 1
    pairs = spec.len_q * spec.len_k / (2 if spec.is_causal else 1)
    return pairs * (spec.d_key + F + spec.n_taylor) <= (spec.len_q + spec.len_k) * spec.feature_dim * F


_TUNING: ContextVar[Tuning] = ContextVar("sata_tuning", default=DEFAULT)


@contextlib.contextmanager
def force_path(
    path: str | None = None, *, kernels: bool = True, chunk_size: int | None = None, block_size: int | None = None,
    block_bytes: int | None = None, segment_bytes: int | None = None,
) -> Iterator[Tuning]:
    """Run the calls of a ``with`` block through one path, or with the kernels off or other sizes.

    The supported hook for tests and benchmarks (not part of the public API): it changes how
    :func:`sata_attention` and :func:`accumulate_state` compute, never what. It applies to the
    current thread / context; a nested ``force_path`` replaces the outer one.

    Args:
        path: a name of :data:`PATHS`, or ``None`` to let :func:`select_path` choose. A call the
            path cannot compute raises ``ValueError`` (e.g. ``'parallel'`` with ``is_causal=True``,
            a kernel path under autograd).
        kernels: ``False`` = as if no compiler were available: every call takes a PyTorch path,
            and the chunked path does not run its blocks through the kernel.
        chunk_size: tokens per chunk of the chunked path.
        block_size: tokens per block of the PyTorch paths.
        block_bytes: working set of one block of a PyTorch path (``1``: one chunk per block).
        segment_bytes: converted inputs of one kernel call (small: many segments).

    Example::
        >>> with sata.ops.force_path("chunked", kernels=False, chunk_size=8):
        ...     y = sata.sata_attention(q, k, v, is_causal=True)
    """
    if path is not None and path not in PATHS:
        raise ValueError(f"force_path: unknown path {path!r}; choose one of {sorted(PATHS)} or None")
    sizes = dict(chunk_size=chunk_size, block_size=block_size, block_bytes=block_bytes, segment_bytes=segment_bytes)
    for name, value in sizes.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"force_path: {name} must be a positive int or None, got {value!r}")
    tuning = Tuning(path, kernels, chunk_size, block_size, block_bytes or DEFAULT.block_bytes,
                    segment_bytes or DEFAULT.segment_bytes)
    token = _TUNING.set(tuning)
    try:
        yield tuning
    finally:
        _TUNING.reset(token)


def cache_sizes() -> dict[str, int]:
    """Entries in the caches kept per call shape (for tests and monitoring): validated shapes, kernel
    verdicts, decode plans and prefill plans. Each is bounded, however many shapes a server sees."""
    return {"specs": len(_SPEC_CACHE), **kernel.cache_sizes()}


def _attention(query, key, value, spec: Spec, mask, state, return_state: bool, inplace: bool, grad: bool):
    """Run the call's path; with ``return_state``, ``(output, new state)``."""
    tuning = _TUNING.get()
    kernels = tuning.kernels and usable(spec)
    path = tuning.path
    if path is None:
        path = select_path(spec, grad, return_state, kernels)
    else:
        _check_forced(path, spec, grad, kernels)
    out, kvT = PATHS[path](query, key, value, spec, mask, state, return_state, inplace, tuning)
    if not return_state:
        return out
    return out, _new_state(kvT, spec, state, inplace)


def _new_state(kvT, spec: Spec, state: SATAState | None, inplace: bool) -> SATAState:
    """The state after the call from the path's contiguous ``[..., Hkv, F, D]`` result (``None``: no
    keys at all), written into ``state.kv`` with ``inplace``. The F-major tensor is kept so that no
    ``kv`` view is made until someone reads it (a decode loop never does)."""
    n_tokens = spec.len_k if state is None else state.n_tokens + spec.len_k
    if inplace and kvT is not state._fmajor():  # the path did not write into the state itself
        with torch.no_grad():
            state.kv.copy_(kvT.mT)
        return SATAState._unchecked(state.kv, spec.n_taylor, spec.d_key, spec.d_value, spec.scale, n_tokens)
    if kvT is None:
        kvT = torch.zeros(*spec.batch_shape, spec.n_kv_heads, spec.d_value + 1, spec.feature_dim,
                          dtype=spec.state_dtype, device=spec.device)             # [..., Hkv, F, D]
    return SATAState._unchecked(None, spec.n_taylor, spec.d_key, spec.d_value, spec.scale, n_tokens, kvT=kvT)


def _check_forced(path: str, spec: Spec, grad: bool, kernels: bool) -> None:
    """A path pinned by :func:`force_path` can compute this call, or ``ValueError`` says why not."""
    if _CAUSALITY.get(path, spec.is_causal) != spec.is_causal:
        raise ValueError(f"path={path!r} does not compute {'causal' if spec.is_causal else 'non-causal'} attention")
    if path in ("decode_kernel", "prefill_kernel"):
        if grad:
            raise ValueError(f"path={path!r} has no backward pass; call it under torch.no_grad()")
        if not kernels:
            raise ValueError(f"path={path!r}: the fused kernels cannot serve this call (kernels: {_kernels.status()})")
    if path == "decode_kernel" and not spec.len_q == spec.len_k == 1:
        raise ValueError(f"path='decode_kernel' computes one token (Lq = Lk = 1), got Lq={spec.len_q}, Lk={spec.len_k}")
