"""``a + b`` for window-mode states (``MATH.md`` section 6, "Merging segment states").

``b`` was built from an empty start, so it took its own first keys as sinks and never saw ``a``'s window.
The merged stream keeps the first ``S`` kept keys of ``a`` then ``b`` as sinks; ``b``'s other former sinks,
and ``a``'s window keys that fall out of reach of the merged end, enter the far Taylor state.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from .basis import get_basis
from .features import _phi
from .state import ExactKeys, SATAState


def merge_exact(a: SATAState, b: SATAState) -> SATAState:
    W, S, n_a = a.window, a.sinks, a.n_tokens
    N = n_a + b.n_tokens
    batch, Hkv = a.batch_shape, a.n_heads
    ea = a.exact.map(lambda t: t.flatten(0, len(batch) - 1) if batch else t[None])     # batch flattened to [B, ...]
    eb = b.exact.map(lambda t: t.to(a.dtype if t.is_floating_point() else None).flatten(0, len(batch) - 1) if batch else t[None])
    B = ea.sink_pos.shape[0]
    far = (a.kv + b.kv.to(a.dtype)).reshape(B, Hkv, *a.kv.shape[-2:])        # [B, Hkv, D, F]
    leave_k, leave_v, leave_f = [], [], []                                     # keys that enter the far state

    # sinks: the first S kept keys of a, then of b
    pos = torch.cat([ea.sink_pos, torch.where(eb.sink_pos >= 0, eb.sink_pos + n_a, -1)], dim=-1)   # [B, 2S]
    order = torch.where(pos >= 0, pos, torch.iinfo(torch.long).max).argsort(dim=-1, stable=True)
    take = lambda t: t.gather(-2, order[:, None, :, None].expand(B, Hkv, 2 * S, t.shape[-1]))
    all_k, all_v = take(torch.cat([ea.sink_k, eb.sink_k], -2)), take(torch.cat([ea.sink_v, eb.sink_v], -2))
    all_pos = pos.gather(-1, order)
    demoted = all_pos[:, S:]                                                    # b's former sinks, -1 if none
    in_window = (demoted >= N - W) & (demoted >= 0)
    leave_k.append(all_k[:, :, S:]), leave_v.append(all_v[:, :, S:]), leave_f.append((demoted >= 0) & ~in_window)

    # the window: positions N - W .. N - 1, position p in slot p % W
    slot_pos = torch.arange(N - W, N, device=pos.device)
    slot_pos = slot_pos[(slot_pos % W).argsort()] if W else slot_pos           # the position each slot holds
    from_b = (slot_pos >= n_a)[None, :]                                         # b's ring slot (p - n_a) % W
    b_slot = ((slot_pos - n_a) % W) if W else slot_pos
    bk, bv, bf = eb.win_k[:, :, b_slot], eb.win_v[:, :, b_slot], eb.win_keep[:, b_slot]
    promoted = torch.zeros_like(bf)
    if W and S:
        hit = in_window[:, :, None] & (demoted[:, :, None] == slot_pos[None, None, :])  # [B, S, W]
        promoted = hit.any(dim=1)
    pick = lambda x_b, x_a: torch.where(from_b[..., None] if x_b.dim() == 2 else from_b[:, None, :, None], x_b, x_a)
    win_k = pick(bk, ea.win_k)
    win_v = pick(bv, ea.win_v)
    win_keep = torch.where(from_b, bf | promoted, ea.win_keep & (slot_pos >= 0)[None, :])
    # a's window keys older than N - W leave it
    a_pos = torch.arange(n_a - W, n_a, device=pos.device)
    a_pos = a_pos[(a_pos % W).argsort()] if W else a_pos                        # a's slot -> position
    leave_k.append(ea.win_k), leave_v.append(ea.win_v)
    leave_f.append(ea.win_keep & (a_pos < N - W)[None, :] & (a_pos >= 0)[None, :])

    ks, vs, fs = torch.cat(leave_k, -2), torch.cat(leave_v, -2), torch.cat(leave_f, -1)
    if bool(fs.any()):
        basis = get_basis(a.d_key, a.n_taylor, ks.device, a.dtype)
        phik = _phi(ks.to(a.dtype) * math.sqrt(abs(a.scale)), basis) * fs[:, None, :, None]     # [B, Hkv, K, D]
        vt = torch.cat([vs, torch.ones_like(vs[..., :1])], dim=-1).to(a.dtype)                  # [B, Hkv, K, F]
        far = far + phik.mT @ vt
    exact = ExactKeys(win_k, win_v, win_keep, all_k[:, :, :S], all_v[:, :, :S], all_pos[:, :S])
    unflat = lambda t: t.reshape(*batch, *t.shape[1:]) if batch else t[0]
    return replace(a, kv=unflat(far), n_tokens=N, exact=exact.map(unflat))
