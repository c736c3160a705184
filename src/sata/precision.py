"""Accurate states over unbounded streams: segment-local sums added exactly or with compensation.

A state is a running sum over every token seen. Summed in float32 chunk after chunk, each
addition rounds at the scale of the whole sum, so after ``n`` chunks the relative error
grows like ``eps * sqrt(n)`` (or ``eps * n`` when roundings correlate); once the sum is
``~1e7`` times one chunk's contribution, new tokens barely register. Two remedies, same
idea: compute each segment's state from zero (its own float32 sum, small error relative
to the segment), then add it to the running state without losing it:

- ``float64`` accumulator: ``S64 += segment``; reads use ``S64`` rounded to float32.
- :class:`CompensatedState`: float32 ``hi`` plus float32 compensation ``lo`` (Neumaier's
  variant of Kahan summation): the error of ``hi + lo`` stays at about one float32 rounding
  of the total however many segments are added, with the same memory as a float64 state and
  only float32 arithmetic (fast on every GPU).

:func:`stream_attention` is causal (or non-causal) prefill of one segment against such a
state: outputs from the fused float32 path reading the rounded state, plus one extra pass
over the segment's keys for its state (``accumulate_state``), about 1.5x the plain cost.
``benchmarks/long_stream.py`` measures all modes over ``1e8`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ._checks import compute_dtype_for
from .ops import accumulate_state, sata_attention
from .state import SATAState

__all__ = ["CompensatedState", "stream_attention"]


@dataclass(frozen=True, eq=False)
class CompensatedState:
    r"""A float32 state with a float32 compensation term: the sum is ``hi + lo``.

    Attributes:
        hi (SATAState): the rounded running sum (float32); pass it as ``state=`` to read.
        lo (torch.Tensor): ``[..., Hkv, D, Ev + 1]`` float32, the part of the sum ``hi`` lost.

    Adding a segment's state ``x`` (Neumaier):

    .. math::
        t = hi + x,\quad lo \mathrel{+}= \begin{cases}(hi - t) + x & |hi| \ge |x| \\ (x - t) + hi & \text{else}\end{cases},\quad hi = t
    """

    hi: SATAState
    lo: torch.Tensor

    def __post_init__(self) -> None:
        if self.hi.dtype != torch.float32 or self.lo.dtype != torch.float32:
            raise TypeError(f"CompensatedState holds float32 tensors, got {self.hi.dtype} and {self.lo.dtype}")
        if self.lo.shape != self.hi.kv.shape:
            raise ValueError(f"CompensatedState: lo has shape {tuple(self.lo.shape)}, hi {tuple(self.hi.kv.shape)}")

    @classmethod
    def from_state(cls, state: SATAState) -> CompensatedState:
        """Start from an existing state (float64 states keep their extra bits in ``lo``)."""
        hi = state.kv.to(torch.float32)
        lo = (state.kv - hi.to(state.kv.dtype)).to(torch.float32)
        return cls(hi=replace(state, kv=hi), lo=lo)

    @classmethod
    def zeros(cls, batch_shape, n_heads: int, d_key: int, d_value: int, n_taylor: int, scale: float | None = None,
              *, device: torch.device | str | None = None) -> CompensatedState:
        """An empty compensated state; arguments as :meth:`SATAState.zeros`."""
        hi = SATAState.zeros(batch_shape, n_heads, d_key, d_value, n_taylor, scale, dtype=torch.float32, device=device)
        return cls(hi=hi, lo=torch.zeros_like(hi.kv))

    @property
    def n_tokens(self) -> int:
        return self.hi.n_tokens

    def add(self, segment: SATAState) -> CompensatedState:
        """The sum with the state of a later, disjoint segment (compensated)."""
        self.hi.check_compatible(segment, what="the segment state", ours="accumulated", theirs="in the segment")
        s, x = self.hi.kv, segment.kv.to(torch.float32)
        t = s + x
        # the rounding error of s + x, exactly, taken from the smaller operand
        err = torch.where(s.abs() >= x.abs(), (s - t) + x, (x - t) + s)
        return CompensatedState(hi=replace(self.hi, kv=t, n_tokens=self.hi.n_tokens + segment.n_tokens), lo=self.lo + err)

    def value(self, dtype: torch.dtype = torch.float64) -> SATAState:
        """The compensated sum ``hi + lo`` as one state (float64 by default, to keep its precision)."""
        return replace(self.hi, kv=self.hi.kv.to(dtype) + self.lo.to(dtype))

    def detach(self) -> CompensatedState:
        return CompensatedState(hi=self.hi.detach(), lo=self.lo.detach())


def stream_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    state: CompensatedState | SATAState,
    n_taylor: int = 3,
    is_causal: bool = True,
    scale: float | None = None,
    enable_gqa: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    block: int = 1024,
) -> tuple[torch.Tensor, CompensatedState | SATAState]:
    r"""One segment of a long stream, with an accurate running state.

    Outputs as :func:`sata.sata_attention` with ``state``; the new state is ``state + S_seg``
    where ``S_seg = phi(K)^T [V, 1]`` is the segment's own state, computed from zero in the
    input precision and then added exactly (float64 ``state``) or with compensation
    (:class:`CompensatedState`). Reads use the state rounded to float32, so float32 inputs
    keep the fused float32 path.

    Args:
        query (torch.Tensor): ``[..., Hq, L, E]``.
        key (torch.Tensor): ``[..., Hkv, L, E]``.
        value (torch.Tensor): ``[..., Hkv, L, Ev]``.
        state (CompensatedState | SATAState): the running state; a :class:`SATAState` must be
            float64 (``SATAState.zeros(..., dtype=torch.float64)``).
        n_taylor, is_causal, scale, enable_gqa, key_padding_mask: as in :func:`sata.sata_attention`.
            Default ``is_causal=True``.
        block (int): tokens per from-zero partial sum of the segment state (one batched call
            computes all of them; they are then summed in float64, or pairwise in float32 for a
            :class:`CompensatedState`). A float32 sum of ``n`` chunks carries an error of about
            ``eps * sqrt(n)``: smaller blocks, smaller error. Default: ``1024``.

    Returns:
        ``(output [..., Hq, L, Ev], new state of the same kind)``.
    """
    if isinstance(state, CompensatedState):
        read = state.hi
    elif isinstance(state, SATAState):
        if state.dtype != torch.float64:
            raise TypeError(
                "stream_attention: pass a float64 SATAState (SATAState.zeros(..., dtype=torch.float64)) or a "
                f"CompensatedState; a {state.dtype} state gains nothing here, use sata.sata_attention"
            )
        read = state.to(dtype=compute_dtype_for(query.dtype))
    else:
        raise TypeError(f"stream_attention: state must be a CompensatedState or a float64 SATAState, got {type(state).__name__}")
    out = sata_attention(query, key, value, n_taylor=n_taylor, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
                         key_padding_mask=key_padding_mask, state=read)
    segment = _segment_state(key, value, n_taylor, scale, key_padding_mask, block,
                             torch.float32 if isinstance(state, CompensatedState) else torch.float64)
    return out, (state.add(segment) if isinstance(state, CompensatedState) else state + segment)


def _segment_state(key, value, n_taylor, scale, mask, block: int, sum_dtype: torch.dtype) -> SATAState:
    """``phi(K)^T [V, 1]`` as the sum of from-zero partial sums over blocks of ``block`` tokens."""
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise ValueError(f"stream_attention: block must be a positive int (tokens per partial sum), got {block!r}")
    L = key.shape[-2]
    nb, rest = divmod(L, block)
    parts = []
    if nb > 1:  # all full blocks in one call: blocks become a leading batch dimension
        blocks = lambda t: t[..., : nb * block, :].unflatten(-2, (nb, block)).movedim(-3, 0)   # [nb, ..., H, b, X]
        m = None if mask is None else mask[..., : nb * block].unflatten(-1, (nb, block)).movedim(-2, 0)  # [nb, ..., b]
        st = accumulate_state(blocks(key), blocks(value), n_taylor=n_taylor, scale=scale, key_padding_mask=m)
        parts.append(replace(st, kv=st.kv.to(sum_dtype).sum(0), n_tokens=nb * block))
        key, value = key[..., nb * block :, :], value[..., nb * block :, :]
        mask = None if mask is None else mask[..., nb * block :]
    if key.shape[-2] or not parts:
        st = accumulate_state(key, value, n_taylor=n_taylor, scale=scale, key_padding_mask=mask)
        parts.append(replace(st, kv=st.kv.to(sum_dtype)))
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]
