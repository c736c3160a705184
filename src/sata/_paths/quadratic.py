"""The quadratic path (``MATH.md`` section 1): ``T_P`` on the score matrix, the oracle's form in blocks.

    Y = rownorm(mask(T_P(scale Q K^T)) [V, 1] + phi(Q) S_in)

Cheaper than features when the sequence is short next to ``D`` (``sata.ops.select_path``). The
scores give no state: when one is asked for, the keys are absorbed by the non-causal path's key
phase.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from ..features import _phi, taylor_exp
from .parallel import absorb
from .run import Run, needs_grad


def quadratic(run: Run, q, k, v, mask, S, need_state: bool):
    """Query block by query block against all keys (causal by position when the call is)."""
    B, Hkv, g, Lq, E = q.shape
    Lk = k.shape[-2]
    need_grad = needs_grad(q, k, v, S)
    ks, vt = run.keys_values(k, v, mask)                                        # [B, Hkv, Lk, E], [B, Hkv, Lk, F]
    # query rows per block so that one block's scores fit the block budget
    rows = max(1, run.budget // max(3 * run.cd.itemsize * B * Hkv * g * max(Lk, 1), 1))
    fn = functools.partial(_scores_block, ks=ks, vt=vt, run=run, offset=Lk - Lq)
    outs = []
    for a in range(0, Lq, rows):
        args = (q[:, :, :, a : min(a + rows, Lq)], S, a)
        outs.append(checkpoint(fn, *args, use_reentrant=False) if need_grad else fn(*args))
    y = torch.cat(outs, dim=-2) if outs else q.new_empty(B, Hkv, g, 0, run.spec.d_value)   # [B, Hkv, g, Lq, Ev]
    return y, absorb(run, k, v, mask, S, need_grad) if need_state else S


def _scores_block(q, S, start: int, *, ks, vt, run: Run, offset: int):
    """Queries ``start ..`` of a block against all keys: ``rownorm(T_P(Q K^T) masked [V, 1] + phi(Q) S)``."""
    qs = q.to(run.cd) * run.sq                                                  # [B, Hkv, g, T, E]
    A = taylor_exp(qs @ ks[:, :, None].mT, run.spec.n_taylor)                  # [B, Hkv, g, T, Lk]
    if run.spec.is_causal:  # query i (absolute offset + start + i) sees keys j <= it
        T, Lk = A.shape[-2:]
        i = torch.arange(start + offset, start + offset + T, device=A.device)[:, None]
        A = A.masked_fill(torch.arange(Lk, device=A.device)[None, :] > i, 0.0)
    U = A @ vt[:, :, None]                                                      # [B, Hkv, g, T, F]
    if S is not None:
        U = U + run.read(_phi(qs, run.basis), S[:, :, None])
    return run.normalize(U)
