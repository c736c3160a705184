"""The window mode's decode step through the fused CPU kernel (``_kernels/decode_window.cpp``).

One token (``Lq == Lk == 1``, causal) continuing a state, without autograd, on the CPU (float32 or float64
inputs; half inputs computed in float32, as every path computes them): per head the kernel absorbs the key leaving the window into the far state, writes the new key
into its slot (and into a free sink), and reads the far state, the window and the sinks, in one pass
over the state (``MATH.md`` section 6). Every other call takes :func:`sata._paths.window.window_attention`,
which computes the same thing; both are tested against the oracle.

A decode loop pays this module's Python on every token: what depends only on the call's shapes and
settings (applicability, the kernel plan, ``taylor_mix`` and ``recentre`` as per-head arrays) is worked
out once per call shape and cached beside the other kernel caches (``sata._paths.kernel``).
"""

from __future__ import annotations

import torch

from .. import _kernels
from .._kernels import IN_PLACE
from ..basis import get_basis
from ..features import _split_scale
from .centre import _FIXED, stream_centre
from .kernel import _remember, available, step_inputs
from ..budget import check_budget, format_bytes
from ..hybrid import Hybrid
from ..state import ExactKeys, SATAState

_NO_PLAN = object()  # cached verdict: the kernel does not serve this configuration
_PLANS: dict = {}    # (spec, window, sinks, re-centred) -> _Plan or _NO_PLAN, bounded like the other kernel caches


class _Plan:
    """The kernel plan of one configuration, and its per-head ``alpha`` / ``beta`` arrays for plain-number settings."""

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
        self.out_like_query = spec.d_key == spec.d_value   # then the output has the query's shape
        self.no_exact = ExactKeys.empty((spec.batch, spec.n_kv_heads), 0, 0, spec.d_key, spec.d_value,
                                        spec.state_dtype, "cpu")   # W = S = 0: nothing to read
        self._params: dict = {}
        self._last: tuple = (None, None)   # (hybrid, its params): settings as plain numbers, reused
        # the buffers this configuration keeps (and a step that keeps the passed state copies)
        itemsize = torch.empty((), dtype=spec.state_dtype).element_size()
        state_bytes = spec.batch * spec.n_kv_heads * (
            spec.feature_dim * (spec.d_value + 1) + (hybrid.window + hybrid.sinks) * (spec.d_key + spec.d_value)
        ) * itemsize
        check_budget(state_bytes, f"sata_attention: a decode step with window={hybrid.window}, sinks={hybrid.sinks} "
                     f"and its state ({format_bytes(state_bytes)})", "Use a smaller window, fewer sinks or a smaller batch.")

    def params(self, hybrid: Hybrid) -> tuple[torch.Tensor, torch.Tensor]:
        """``alpha`` and ``beta`` as contiguous ``[Hq]`` tensors in the compute dtype (plain numbers: cached)."""
        if hybrid is self._last[0]:  # a decode loop: the same validated settings every step
            return self._last[1]
        alpha, beta = hybrid.recentre, hybrid.taylor_mix
        if isinstance(alpha, torch.Tensor) or isinstance(beta, torch.Tensor):
            return head_params(hybrid, self.spec)
        pair = self._params.get((alpha, beta))
        if pair is None:
            pair = self._params[(alpha, beta)] = head_params(hybrid, self.spec)
        self._last = (hybrid, pair)
        return pair


def head_params(hybrid: Hybrid, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """``alpha`` (0 without recentre) and ``beta`` as contiguous ``[Hq]`` tensors in the compute dtype, as the
    window kernels read them."""
    return tuple(x.detach().to(spec.compute_dtype).expand(spec.n_q_heads).contiguous()
                 if isinstance(x, torch.Tensor) else
                 torch.full((spec.n_q_heads,), 0.0 if x is None else x, dtype=spec.compute_dtype)
                 for x in (hybrid.recentre, hybrid.taylor_mix))


def decode_step(query, key, value, spec, hybrid: Hybrid, is_causal: bool, key_padding_mask, state, return_state: bool,
                inplace: bool, far_qk=None):
    """One window-mode decode step through the kernel, or ``None`` where the kernel does not serve the call.

    Args:
        query: ``[..., Hq, 1, E]``; key: ``[..., Hkv, 1, E]``; value: ``[..., Hkv, 1, Ev]``;
        spec, hybrid: the call's validated shapes and window-mode settings;
        key_padding_mask: ``[..., 1]`` bool or None; state: the state to continue (required);
        inplace: update ``state``'s far state, window and sink buffers in place (only with ``return_state``);
        far_qk: ``(q' [..., Hq, 1, E], k' [..., Hkv, E])``, the far part's own query and its version of the key
            the step absorbs (the leaving window slot's, or the new key's without a window), or None.

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
    if plan is _NO_PLAN or (torch.is_grad_enabled() and (needs_graph(query, key, value, state, hybrid) or (
            far_qk is not None and any(t.requires_grad for t in far_qk)))):
        return None
    in_place = inplace and return_state
    exact = plan.no_exact if state.exact is None else state.exact
    ready = _ready(exact, spec.state_dtype, copy=not in_place)
    if ready is None:
        return None  # buffers in another dtype than the state's: the PyTorch path converts them
    exact, pointers, source = ready
    S_in = state._fmajor()                                                     # [..., Hkv, F, D]
    copied = S_in is None
    if copied:  # a state in another layout (e.g. loaded from a file): from now on in the kernel's
        S_in = state.kv.mT.contiguous()
    S_out = S_in if in_place else torch.empty_like(S_in)
    centre = state.key_centre
    if centre is not None and not getattr(centre, _FIXED, False):  # re-estimated while the Taylor part is empty
        kept = torch.ones(spec.batch, 1, dtype=torch.bool) if key_padding_mask is None else \
            ~key_padding_mask.reshape(spec.batch, 1)
        centre = stream_centre(state, key.reshape(spec.batch, spec.n_kv_heads, 1, spec.d_key), kept, in_place)
        # the state's own tensor where it holds the centre (in place, or fixed now: the mark stays on it)
        centre = state.key_centre if in_place or getattr(state.key_centre, _FIXED, False) else \
            centre.reshape(state.key_centre.shape)
    kept_centre = centre                                                       # the new state's
    if centre is not None and (centre.dtype is not spec.state_dtype or not centre.is_contiguous()):
        centre = centre.to(spec.state_dtype).contiguous()
    query, key, value = step_inputs(query, key, value, spec.compute_dtype)
    keep = None if key_padding_mask is None else (~key_padding_mask).to(torch.uint8).reshape(spec.batch).contiguous()
    # the output: like the query when it has the query's shape (the cheapest allocation)
    y = torch.empty_like(query) if plan.out_like_query else query.new_empty(plan.out_shape)   # [..., Hq, 1, Ev]
    far = (0, 0)
    if far_qk is not None:
        far_qk = tuple(t.to(spec.compute_dtype).contiguous() for t in far_qk)   # kept alive through the call
        far = tuple(t.data_ptr() for t in far_qk)
    plan.kernel(query, key, value, keep, S_in, S_out, y, pointers, centre, *plan.params(hybrid), state.n_tokens,
                source, far)
    if y.dtype is not spec.dtype:  # half inputs: computed in float32, as the PyTorch path does
        y = y.to(spec.dtype)
    if not return_state:
        return y
    new = SATAState._unchecked(None, spec.n_taylor, spec.d_key, spec.d_value, spec.scale, state.n_tokens + 1,
                               kvT=S_out, window=hybrid.window, sinks=hybrid.sinks,
                               exact=None if state.exact is None else exact, key_centre=kept_centre)
    if in_place and (copied or (state.exact is not None and exact is not state.exact)):
        return y, written_into(state, new)  # the kernel updated copies (another layout): into the state's own
    return y, new


def written_into(state: SATAState, new: SATAState) -> SATAState:
    """``new`` in ``state``'s own tensors (``inplace=True`` where the step computed into others): its far state and
    window and sink buffers written over the passed state's, which the returned state shares (the key centre is the
    stream's, unchanged)."""
    with torch.no_grad():
        if new._stored().data_ptr() != state._stored().data_ptr():
            state.kv.copy_(new.kv)
        if state.exact is not None:  # (None: window = sinks = 0, the same in both)
            for old, now in zip(state.exact.tensors(), new.exact.tensors()):
                if old is not now:
                    old.copy_(now)
    return SATAState._unchecked(state.kv, new.n_taylor, new.d_key, new.d_value, new.scale, new.n_tokens,
                                window=new.window, sinks=new.sinks, exact=state.exact, key_centre=state.key_centre)


def _ready(exact: ExactKeys, dtype: torch.dtype, copy: bool):
    """``(exact, pointers, source)``: the buffers the kernel updates and their data pointers, and the data pointers
    of the buffers it fills them from (all 0: none); None if a buffer is not in the state's dtype. In place the
    buffers are the state's (contiguous copies where needed), and their pointers are kept on the object, so a
    decode loop checks them once. With ``copy`` they are new, uninitialised, and the kernel fills them from the
    state's as it reads them (no pass of its own, and no copy here: each costs a decode loop microseconds)."""
    cached = exact.__dict__.get("_kernel_pointers")
    if not copy and cached is not None and cached[0] is dtype:
        return exact, cached[1], IN_PLACE
    if any(t.dtype is not dtype for t in (exact.win_k, exact.win_v, exact.sink_k, exact.sink_v)):
        return None
    source = IN_PLACE
    tensors = exact.tensors()
    if copy and all(t.is_contiguous() for t in tensors):
        source = tuple(t.data_ptr() for t in tensors)
        exact = ExactKeys(*(torch.empty_like(t) for t in tensors))
    elif copy:
        exact = exact.map(_contiguous_copy)
    elif not all(t.is_contiguous() for t in tensors):
        exact = exact.map(torch.Tensor.contiguous)
    pointers = tuple(t.data_ptr() for t in exact.tensors())
    exact.__dict__["_kernel_pointers"] = (dtype, pointers)   # a frozen dataclass: its fields cannot change
    return exact, pointers, source


def needs_graph(query, key, value, state, hybrid: Hybrid) -> bool:
    """Autograd would need the call's graph: the kernel does not record one."""
    exact = () if state.exact is None else (state.exact.win_k, state.exact.win_v, state.exact.sink_k, state.exact.sink_v)
    return any(t is not None and isinstance(t, torch.Tensor) and t.requires_grad for t in (
        query, key, value, state.kv, *exact, state.key_centre, hybrid.taylor_mix, hybrid.recentre))


def _contiguous_copy(t: torch.Tensor) -> torch.Tensor:
    return t.clone(memory_format=torch.contiguous_format)


def _applies(spec) -> bool:
    """CPU, a compute and state dtype the kernel supports (float32 / float64; half inputs computed in float32),
    a compiler."""
    return spec.device.type == "cpu" and _kernels.supports(spec.compute_dtype, spec.state_dtype) and available()
