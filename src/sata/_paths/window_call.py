"""The window mode's call (``MATH.md`` section 6): the state's parts in, :func:`window_attention`, a new state out.

Validation beyond :func:`sata._checks.check_inputs` (the window and sinks of a passed state, aligned
non-causal queries, the memory of the window and sink buffers), the batch flattened to ``B``, and the
stream's key centre (:mod:`sata._paths.centre`).
"""

from __future__ import annotations

import torch

from .._checks import Spec, refuse_inplace
from ..budget import check_budget, format_bytes
from ..hybrid import Hybrid
from ..state import ExactKeys, SATAState
from .centre import centre_of, stream_centre
from .window import window_attention
from .window_kernel import decode_step as window_decode_step, needs_graph, written_into


def window_call(query, key, value, spec: Spec, hybrid: Hybrid, is_causal: bool, key_padding_mask, state, return_state,
                inplace: bool = False, kernels: bool = True):
    """The window mode (``MATH.md`` section 6): a decode step through the fused kernel where it applies, else
    reshape, run :func:`window_attention`, wrap the new state."""
    if kernels:  # (force_path(kernels=False) turns them off)
        fast = window_decode_step(query, key, value, spec, hybrid, is_causal, key_padding_mask, state, return_state,
                                  inplace)
        if fast is not None:
            return fast
    if inplace and torch.is_grad_enabled() and needs_graph(query, key, value, state, hybrid):
        refuse_inplace(state, return_state)
    fn = "accumulate_state" if spec.len_q == 0 and not is_causal else "sata_attention"
    if state is not None and (state.window, state.sinks) != (hybrid.window, hybrid.sinks):
        raise ValueError(
            f"{fn}: state has window={state.window}, sinks={state.sinks} but the call asks for window={hybrid.window}, "
            f"sinks={hybrid.sinks}; continue a stream with the window and sinks it was started with"
        )
    if not is_causal and spec.len_q not in (0, spec.len_k):
        raise ValueError(
            f"{fn}: non-causal calls with window, sinks or recentre need Lq == Lk (query i sits at key i's position), "
            f"got Lq={spec.len_q}, Lk={spec.len_k}; absorb earlier keys into a state with sata.accumulate_state"
        )
    B, Hkv, g, D, F = spec.batch, spec.n_kv_heads, spec.group, spec.feature_dim, spec.d_value + 1
    itemsize = torch.empty((), dtype=spec.state_dtype).element_size()
    # the window and sink buffers, and the extended stream of one call (window + call keys and values)
    exact_bytes = B * Hkv * (2 * hybrid.window + hybrid.sinks + spec.len_k) * (spec.d_key + F) * itemsize
    check_budget(
        exact_bytes + B * Hkv * D * F * itemsize,
        f"{fn}: window={hybrid.window}, sinks={hybrid.sinks} with {spec.len_k} keys, {B} x {Hkv} heads of "
        f"d_key={spec.d_key}, d_value={spec.d_value} ({format_bytes(exact_bytes)} of exact keys and values)",
        "Use a smaller window, fewer sinks, or split the call into shorter segments.",
    )
    q = query.reshape(B, Hkv, g, spec.len_q, spec.d_key)                      # [B, Hkv, g, Lq, E]
    k = key.reshape(B, Hkv, spec.len_k, spec.d_key)                           # [B, Hkv, Lk, E]
    v = value.reshape(B, Hkv, spec.len_k, spec.d_value)                       # [B, Hkv, Lk, Ev]
    mask = None if key_padding_mask is None else key_padding_mask.reshape(B, spec.len_k)
    if state is None:
        exact = ExactKeys.empty((B, Hkv), hybrid.window, hybrid.sinks, spec.d_key, spec.d_value, spec.state_dtype, spec.device)
        far, n0 = None, 0
    else:
        flat = lambda t: t.reshape(B, *t.shape[len(spec.batch_shape):])
        exact = ExactKeys.empty((B, Hkv), 0, 0, spec.d_key, spec.d_value, spec.state_dtype, spec.device) \
            if state.exact is None else state.exact.map(flat)
        far, n0 = flat(state.kv).mT.to(spec.state_dtype), state.n_tokens          # [B, Hkv, F, D]
    centre = _key_centre(state, hybrid, k, mask, spec, B, inplace and return_state)
    y, far, exact = window_attention(q, k, v, mask, far, exact, n0, spec, hybrid, is_causal, centre, kernels,
                                     need_far=return_state)
    out = y.reshape(*spec.batch_shape, spec.n_q_heads, spec.len_q, spec.d_value)
    if not return_state:
        return out
    if far is None:
        far = torch.zeros(B, Hkv, F, D, dtype=spec.state_dtype, device=spec.device)
    # contiguous, as a decode step updates them in place (a strided buffer would be copied and written back)
    unflat = lambda t: t.reshape(*spec.batch_shape, *t.shape[1:]).contiguous()
    has_exact = hybrid.window > 0 or hybrid.sinks > 0
    new_state = SATAState._unchecked(
        unflat(far).mT, spec.n_taylor, spec.d_key, spec.d_value, spec.scale, n0 + spec.len_k,
        window=hybrid.window, sinks=hybrid.sinks, exact=exact.map(unflat) if has_exact else None,
        key_centre=None if centre is None else unflat(centre),
    )
    return out, written_into(state, new_state) if inplace else new_state


def _key_centre(state: SATAState | None, hybrid: Hybrid, k, mask, spec: Spec, B: int, inplace: bool):
    """The stream's key centre ``[B, Hkv, E]``: for a new re-centred stream the mean of this call's kept keys that
    are not sinks, 0 for a row with none (a plain stream keeps none); continuing a state, the state's, re-estimated
    where its Taylor part is still empty (:func:`sata._paths.centre.stream_centre`).

    Sinks are never in the Taylor part, whose scores the centre keeps small; and the first keys of a trained
    model's stream are its outliers.
    """
    kept = torch.ones(B, spec.len_k, dtype=torch.bool, device=k.device) if mask is None else ~mask    # [B, L]
    if state is not None:
        return stream_centre(state, k, kept, inplace)
    if hybrid.recentre is None:
        return None
    return centre_of(k.detach(), kept, hybrid.sinks, spec.state_dtype)
