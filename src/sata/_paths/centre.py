"""A re-centred stream's key centre (``MATH.md`` section 6): the key vector subtracted from the keys of its Taylor part.

Softmax is invariant to the centre, the series is not: with keys centred, the far scores stay small and the
coefficients of the series around each query's centre do not cancel in float32. The centre only touches keys
in the Taylor part, so it is free to change until the first key enters that part (leaves the window, not a
sink): until then every call re-estimates it from all the non-sink keys it can see (the window and the call),
and it is fixed from the first far key on. A stream started by a long prefill is centred on that prefill's
keys; a stream decoded from its first token, or started by a short call, on the whole window that precedes its
first far key (it was centred on that first call's few keys alone, or on 0 where they were all sinks: float32
errors up to 3e-4 on SmolLM2's own keys at ``n_taylor=4``, where 1e-5 is usual).
"""

from __future__ import annotations

import torch

from ..state import SATAState

# set on a state's key centre once every row has far keys: from then on the centre is the stream's for good, and a
# decode loop pays nothing for it
_FIXED = "_sata_centre_fixed"


def centre_of(k: torch.Tensor, kept: torch.Tensor, sinks: int, dtype: torch.dtype) -> torch.Tensor:
    """The mean of a stream's first call's kept keys after its first ``sinks`` kept ones, 0 for a row with none:
    ``k [B, Hkv, L, E]``, ``kept [B, L]`` -> ``[B, Hkv, E]`` in ``dtype``."""
    far = kept & (kept.cumsum(-1) > sinks)                                       # [B, L]
    total = torch.where(far[:, None, :, None], k.to(dtype), 0.0).sum(-2)       # [B, Hkv, E]
    return total / far.sum(-1).clamp_min(1)[:, None, None]


def fixed(centre: torch.Tensor) -> torch.Tensor:
    """``centre`` (a new tensor object sharing its memory) marked as the stream's for good: calls continuing a state
    that holds it do not re-estimate it (a context-parallel call's centre, agreed by every rank)."""
    out = centre.view_as(centre)
    setattr(out, _FIXED, True)
    return out


def stream_centre(state: SATAState, k: torch.Tensor, kept: torch.Tensor, inplace: bool) -> torch.Tensor | None:
    """The key centre ``[B, Hkv, E]`` of a call continuing ``state`` (batch flattened to ``B``).

    The state's, except in the rows whose Taylor part is still empty: there the mean of the kept non-sink keys of
    the state's window and of the call (``k [B, Hkv, L, E]``, ``kept [B, L]``; the call's first kept keys fill the
    free sinks), where there are any. ``inplace``: the new rows written into the state's own centre, which is
    returned (the state is updated in place); else a new tensor. None for a stream without a centre.
    """
    mu = state.key_centre
    if mu is None:
        return None
    B, (Hkv, E) = kept.shape[0], mu.shape[-2:]
    flat = mu.reshape(B, Hkv, E)
    if getattr(mu, _FIXED, False):
        return flat
    has_far = state.kv[..., 0, -1].reshape(B, Hkv)[:, 0] > 0                   # [B] the far part's key count
    if bool(has_far.all()):
        setattr(mu, _FIXED, True)
        return flat
    dtype, k = mu.dtype, k.detach()
    free = kept.new_zeros(B, dtype=torch.long)
    total = torch.zeros(B, Hkv, E, dtype=dtype, device=mu.device)
    count = kept.new_zeros(B, dtype=torch.long)
    ex = state.exact
    if ex is not None:
        win = ex.win_keep.reshape(B, -1)                                         # [B, W] kept non-sink slots
        total = total + torch.where(win[:, None, :, None], ex.win_k.reshape(B, Hkv, -1, E).to(dtype), 0.0).sum(-2)
        count = count + win.sum(-1)
        free = state.sinks - (ex.sink_pos.reshape(B, -1) >= 0).sum(-1)         # [B]
    call = kept & (kept.cumsum(-1) > free[:, None])                             # [B, L] not taken by a sink
    total = total + torch.where(call[:, None, :, None], k.to(dtype), 0.0).sum(-2)
    count = count + call.sum(-1)
    renew = (~has_far & (count > 0))[:, None, None]                              # [B, 1, 1]
    new = torch.where(renew, total / count.clamp_min(1)[:, None, None], flat)   # [B, Hkv, E]
    if not inplace:
        return new
    with torch.no_grad():
        mu.copy_(new.reshape(mu.shape))
    return mu.reshape(B, Hkv, E)
