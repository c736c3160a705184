"""The non-causal path (``MATH.md`` section 3, non-causal): every query reads the state of all keys.

    S = S_in + phi(K)^T [V, 1],      Y = rownorm(phi(Q) S)

Both phases run in blocks of tokens, checkpointed under autograd. The key phase
(:func:`absorb`) is also how the quadratic path returns a state.
"""

from __future__ import annotations

import functools

import torch

from ..features import _phi
from .run import Run, needs_grad


def absorb_block(k, v, mask, S, *, run: Run):
    """Add one block of keys to the state: ``S^T + [V, 1]^T phi(K)``."""
    ks, vt = run.keys_values(k, v, mask)                                       # [B, Hkv, T, E], [B, Hkv, T, F]
    return None, run.grow(S, vt.transpose(-1, -2) @ _phi(ks, run.basis))      # [B, Hkv, F, D]


def read_block(q, S, *, run: Run):
    """Read one block of queries out of the state: ``rownorm(phi(Q) S)``."""
    U = run.read(_phi(q.to(run.cd) * run.sq, run.basis), S[:, :, None])       # [B, Hkv, g, T, F]
    return run.normalize(U), S


def absorb(run: Run, k, v, mask, S, need_grad: bool):
    """``S`` plus every key: ``S + phi(K)^T [V, 1]`` (``None`` when there is neither)."""
    slices = lambda a, b: (k[:, :, a:b], v[:, :, a:b], None if mask is None else mask[:, a:b])
    return run.blocks(functools.partial(absorb_block, run=run), k.shape[-2], slices, need_grad, S)[1]


def parallel(run: Run, q, k, v, mask, S, need_state: bool):
    """Non-causal through the features: ``S += phi(K)^T [V, 1]`` over all keys, then ``phi(Q) S``."""
    B, Hkv, g, Lq, E = q.shape
    need_grad = needs_grad(q, k, v, S)
    S = absorb(run, k, v, mask, S, need_grad)
    if S is None:  # no keys at all: every normaliser is 0
        return q.new_zeros(B, Hkv, g, Lq, run.spec.d_value), None
    outs, _ = run.blocks(functools.partial(read_block, run=run), Lq, lambda a, b: (q[:, :, :, a:b],), need_grad, S)
    return torch.cat(outs, dim=-2) if outs else q.new_empty(B, Hkv, g, 0, run.spec.d_value), S
