"""The window mode's decode step through the fused CPU kernel (``_kernels/decode_window.cpp``).

One token (``Lq == Lk == 1``, causal) continuing a state, without autograd, float32 or float64 inputs on
the CPU: per head the kernel absorbs the key leaving the window into the far state, writes the new key
into its slot (and into a free sink), and reads the far state, the window and the sinks, in one pass
over the state (``MATH.md`` section 6). Every other call takes :func:`sata._paths.window.window_attention`,
which computes the same thing; both are tested against the oracle.

A decode loop pays this module's Python on every token: what depends only on the call's shapes and
settings (applicability, the kernel plan, ``taylor_mix`` and ``recentre`` as per-head arrays) is worked
out once and cached in the call's ``Spec``.
"""

from __future__ import annotations

import torch

from .. import _kernels
from ..basis import get_basis
from ..features import _split_scale
from .kernel import _remember, available
from ..budget import check_budget, format_bytes
from ..hybrid import Hybrid
from ..state import ExactKeys, SATAState

_NO_PLAN = object()  # cached verdict: the kernel does not serve this configuration
_PLANS: dict = {}    # (spec, window, sinks, re-centred) -> _Plan or _NO_PLAN, bounded like the other kernel caches


class _Plan:
    """The kernel plan of one configuration and its per-head ``alpha`` / ``beta`` arrays for float settings."""

    def __init__(self, spec, hybrid: Hybrid):
        sq, sk = _split_scale(spec.scale)
        basis = get_basis(spec.d_key, spec.n_taylor, "cpu", spec.compute_dtype)
        self.kernel = _kernels.WindowDecodePlan(
            _kernels.load(), spec.batch * spec.n_kv_heads, spec.group, spec.d_key, spec.d_value, basis,
            spec.compute_dtype, sq, sk, spec.state_dtype, spec.n_kv_heads, hybrid.window, hybrid.sinks,
            hybrid.recentre is not None,
        )
        self.spec = spec
        self.out_shape = (*spec.batch_shape, spec.n_q_heads, 1, spec.d_value)
        self.no_exact = ExactKeys.empty((spec.batch, spec.n_kv_heads), 0, 0, spec.d_key, spec.d_value,
                                        spec.state_dtype, "cpu")   # W = S = 0: nothing to read
        self._per_head: dict = {}
        # a step that keeps the passed state allocates a copy of it
        itemsize = torch.empty((), dtype=spec.state_dtype).element_size()
        copy_bytes = spec.batch * spec.n_kv_heads * (
            spec.feature_dim * (spec.d_value + 1) + (hybrid.window + hybrid.sinks) * (spec.d_key + spec.d_value)
        ) * itemsize
        check_budget(copy_bytes, f"sata_attention: a decode step with window={hybrid.window}, sinks={hybrid.sinks} "
                     f"copies the state ({format_bytes(copy_bytes)})", "Pass inplace=True to update the state in place.")

    def per_head(self, value, fill: float = 0.0) -> torch.Tensor:
        """``alpha`` or ``beta`` as a contiguous ``[Hq]`` tensor in the compute dtype (floats cached)."""
        spec = self.spec
        if isinstance(value, torch.Tensor):
            return value.detach().to(spec.compute_dtype).expand(spec.n_q_heads).contiguous()
        t = self._per_head.get(value)
        if t is None:
            t = self._per_head[value] = torch.full((spec.n_q_heads,), fill if value is None else value,
                                                   dtype=spec.compute_dtype)
        return t


def decode_step(query, key, value, spec, hybrid: Hybrid, is_causal: bool, key_padding_mask, state, return_state: bool,
                inplace: bool):
    """One window-mode decode step through the kernel, or ``None`` where the kernel does not serve the call.

    Args:
        query: ``[..., Hq, 1, E]``; key: ``[..., Hkv, 1, E]``; value: ``[..., Hkv, 1, Ev]``;
        spec, hybrid: the call's validated shapes and window-mode settings;
        key_padding_mask: ``[..., 1]`` bool or None; state: the state to continue (required);
        inplace: update ``state``'s far state, window and sink buffers in place (only with ``return_state``).

    Returns:
        ``y [..., Hq, 1, Ev]``, or ``(y, state)`` with ``return_state``; ``None``: take the PyTorch path.
    """
    if not (is_causal and spec.len_q == 1 and spec.len_k == 1) or state is None or (
            state.window, state.sinks) != (hybrid.window, hybrid.sinks):
        return None  # the PyTorch path serves it (and explains a mismatched state)
    key_ = (spec, hybrid.window, hybrid.sinks, hybrid.recentre is not None)
    plan = _PLANS.get(key_)
    if plan is None:
        plan = _remember(_PLANS, key_, _Plan(spec, hybrid) if _applies(spec) else _NO_PLAN)
    if plan is _NO_PLAN:
        return None
    exact = plan.no_exact if state.exact is None else state.exact
    centre = state.key_centre
    sd = spec.state_dtype
    if not all(t.dtype is sd for t in (exact.win_k, exact.win_v, exact.sink_k, exact.sink_v)):
        return None  # buffers in another dtype than the state's: the PyTorch path converts them
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (
            query, key, value, state.kv, exact.win_k, exact.win_v, exact.sink_k, exact.sink_v, centre,
            hybrid.taylor_mix if isinstance(hybrid.taylor_mix, torch.Tensor) else None,
            hybrid.recentre if isinstance(hybrid.recentre, torch.Tensor) else None)):
        return None
    if centre is not None and (centre.dtype is not sd or not centre.is_contiguous()):
        centre = centre.to(sd).contiguous()
    if not query.is_contiguous():
        query = query.contiguous()
    if not key.is_contiguous():
        key = key.contiguous()
    if not value.is_contiguous():
        value = value.contiguous()
    keep = None if key_padding_mask is None else (~key_padding_mask).to(torch.uint8).reshape(spec.batch).contiguous()
    S_in = state._fmajor()                                                     # [..., Hkv, F, D]
    if inplace and return_state:
        if S_in is None:  # a state in another layout (e.g. loaded from a file): from now on in the kernel's
            S_in = state.kv.mT.contiguous()
        S_out = S_in
        if not all(t.is_contiguous() for t in exact.tensors()):
            exact = exact.map(torch.Tensor.contiguous)
    else:  # the passed state stays valid: the step writes copies
        if S_in is None:
            S_in = state.kv.mT.contiguous()
        S_out, exact = torch.empty_like(S_in), exact.map(_contiguous_copy)
    y = torch.empty(plan.out_shape, dtype=spec.compute_dtype)                  # [..., Hq, 1, Ev]
    plan.kernel(query, key, value, keep, S_in, S_out, y, exact, centre, plan.per_head(hybrid.recentre),
                plan.per_head(hybrid.taylor_mix), state.n_tokens)
    if not return_state:
        return y
    return y, SATAState._unchecked(None, spec.n_taylor, spec.d_key, spec.d_value, spec.scale, state.n_tokens + 1,
                                   kvT=S_out, window=hybrid.window, sinks=hybrid.sinks,
                                   exact=None if state.exact is None else exact, key_centre=state.key_centre)


def _contiguous_copy(t: torch.Tensor) -> torch.Tensor:
    return t.clone(memory_format=torch.contiguous_format)


def _applies(spec) -> bool:
    """CPU, float32 or float64 inputs (the kernel computes in the input dtype), a supported state dtype, a compiler."""
    return (spec.device.type == "cpu" and spec.dtype in (torch.float32, torch.float64)
            and _kernels.supports(spec.compute_dtype, spec.state_dtype) and available())
