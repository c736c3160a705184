"""``a + b`` for window-mode states (``MATH.md`` section 6, "Merging segment states").

``b`` was built from an empty start, so it took its own first keys as sinks and never saw ``a``'s window.
The merged stream keeps the first ``S`` kept keys of ``a`` then ``b`` as sinks; ``b``'s other former sinks,
and ``a``'s window keys that fall out of reach of the merged end, enter the far Taylor state.
"""

from __future__ import annotations

import functools
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
    zero = a.kv.new_zeros(*batch, Hkv, a.d_key)
    mu_a = zero if a.key_centre is None else a.key_centre.to(a.dtype)
    mu_b = zero if b.key_centre is None else b.key_centre.to(a.dtype)
    b_kv = b.kv.to(a.dtype)
    if not torch.equal(mu_a, mu_b):  # b's keys were centred elsewhere: phi(k - mu_a) = M(mu_b - mu_a) phi(k - mu_b)
        b_kv = translate(b_kv, (mu_b - mu_a) * math.sqrt(abs(a.scale)), a.n_taylor)
    if a.exact is None:  # a re-centred stream without window or sinks: the far states are everything
        return replace(a, kv=a.kv + b_kv, n_tokens=N)
    ea = a.exact.map(lambda t: t.flatten(0, len(batch) - 1) if batch else t[None])     # batch flattened to [B, ...]
    eb = b.exact.map(lambda t: t.to(a.dtype if t.is_floating_point() else None).flatten(0, len(batch) - 1) if batch else t[None])
    B = ea.sink_pos.shape[0]
    far = (a.kv + b_kv).reshape(B, Hkv, *a.kv.shape[-2:])                      # [B, Hkv, D, F]
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
        # selected, not multiplied by the flags: a padded slot may hold NaN or inf, which 0 * x lets through
        keep = fs[:, None, :, None]                                                             # [B, 1, K, 1]
        ks = torch.where(keep, ks.to(a.dtype) - mu_a.reshape(B, Hkv, 1, a.d_key), 0.0)         # [B, Hkv, K, E]
        phik = torch.where(keep, _phi(ks * math.sqrt(abs(a.scale)), basis), 0.0)                # [B, Hkv, K, D]
        vt = torch.where(keep, torch.cat([vs, torch.ones_like(vs[..., :1])], dim=-1).to(a.dtype), 0.0)   # [B, Hkv, K, F]
        far = far + phik.mT @ vt
    exact = ExactKeys(win_k, win_v, win_keep, all_k[:, :, :S], all_v[:, :, :S], all_pos[:, :S])
    unflat = lambda t: t.reshape(*batch, *t.shape[1:]) if batch else t[0]
    return replace(a, kv=unflat(far), n_tokens=N, exact=exact.map(unflat))


def translate(kv: torch.Tensor, delta: torch.Tensor, n_taylor: int) -> torch.Tensor:
    """The state of keys moved by ``delta``: ``sum_j phi(x_j + delta) w_j^T`` from ``kv = sum_j phi(x_j) w_j^T``.

    ``kv [..., D, F]``, ``delta [..., E]`` (already scaled like the keys). With multi-indices and
    ``phi_a(x) = x^a / sqrt(a!)``, the binomial theorem gives
    ``phi_a(x + delta) = sum_{b + c = a} sqrt(a! / (b! c!)) phi_c(delta) phi_b(x)``: a sparse map per degree.
    """
    E = delta.shape[-1]
    out_idx, in_idx, shift_idx, weight = _translation(E, n_taylor, kv.device)
    basis = get_basis(E, n_taylor, kv.device, kv.dtype)
    phid = _phi(delta, basis)                                                   # [..., D]
    coef = phid[..., shift_idx] * weight.to(kv.dtype)                           # [..., T]
    terms = kv[..., in_idx, :] * coef[..., None]                                # [..., T, F]
    return torch.zeros_like(kv).index_add_(-2, out_idx, terms)


@functools.lru_cache(maxsize=16)
def _translation(d: int, n_taylor: int, device):
    """Index triples ``(a, b, c)`` with ``a = b + c`` over the packed basis, and ``sqrt(a! / (b! c!))``."""
    basis = get_basis(d, n_taylor)
    monos = [tuple(row.tolist()) for p in range(n_taylor) for row in basis.multi_indices(p)]   # sorted index lists
    where = {m: i for i, m in enumerate(monos)}
    fact = lambda m: math.prod(math.factorial(m.count(j)) for j in set(m))
    rows = []
    for bi, b in enumerate(monos):
        for ci, c in enumerate(monos):
            if len(b) + len(c) < n_taylor:
                a = tuple(sorted(b + c))
                rows.append((where[a], bi, ci, math.sqrt(fact(a) / (fact(b) * fact(c)))))
    out_idx, in_idx, shift_idx, weight = zip(*rows)
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)
    return as_long(out_idx), as_long(in_idx), as_long(shift_idx), torch.tensor(weight, dtype=torch.float64, device=device)
