"""The chunked causal path (``MATH.md`` section 3, chunked causal): prefill and training in PyTorch.

For chunk ``t`` of ``c`` tokens with the state ``S_{t-1}`` of everything before it:

    A   = T_P(scale Q_t K_t^T), lower-triangular      (Horner on the scores, no features)
    U_t = phi(Q_t) S_{t-1} + A [V_t, 1],     y = U_t[:Ev] / U_t[Ev]
    S_t = S_{t-1} + phi(K_t)^T [V_t, 1]

Chunks are grouped in blocks whose working set fits the block budget. Without autograd a block
may run through the fused kernel (:func:`sata._paths.kernel.causal_block`); under autograd the
blocks run without a graph and are recomputed one by one in the backward pass
(:class:`sata._paths.autograd.BlockRecompute`).
"""

from __future__ import annotations

import torch

from ..features import _phi, taylor_exp
from . import kernel
from .autograd import BlockRecompute, BlockSteps
from .parallel import absorb_block
from .run import Run, needs_grad


def chunked(run: Run, q, k, v, mask, S, need_state: bool):
    """Causal, in chunks of ``run.chunk`` tokens, blocks of ``run.block``."""
    B, Hkv, g, L, E = q.shape
    if S is None:
        S = q.new_zeros(B, Hkv, run.spec.d_value + 1, run.spec.feature_dim, dtype=run.sd)   # [B, Hkv, F, D]
    if needs_grad(q, k, v, S):
        return BlockRecompute.apply(q, k, v, S, mask, run, _STEPS)
    return causal_forward(q, k, v, mask, S, run)


def causal_forward(q, k, v, mask, S, run: Run, saved: list | None = None, save_every: int = 1):
    """All blocks of a causal sequence, without autograd; ``saved`` collects the start state of
    every ``save_every``-th block."""
    B, Hkv, g, L, E = q.shape
    out = q.new_empty(B, Hkv, g, L, run.spec.d_value)                         # [B, Hkv, g, L, Ev]
    block_fn = kernel.causal_block if run.fused else causal_block
    for i, a in enumerate(range(0, L, run.block)):
        b = min(a + run.block, L)
        if saved is not None and i % save_every == 0:
            saved.append(S)
        out[:, :, :, a:b], S = block_fn(
            q[:, :, :, a:b], k[:, :, a:b], v[:, :, a:b], None if mask is None else mask[:, a:b], S, run=run
        )
    return out, S


def causal_block(q, k, v, mask, S, *, run: Run):
    """One block of ``n`` chunks of ``c`` tokens, causal, starting from state ``S^T [B, Hkv, F, D]``."""
    B, Hkv, g, T, E = q.shape
    c = min(run.chunk, T)
    n = -(-T // c)
    pad = n * c - T
    qs = q.to(run.cd) * run.sq                                                  # [B, Hkv, g, T, E]
    ks, vt = run.keys_values(k, v, mask)                                        # [B, Hkv, T, E], [B, Hkv, T, F]
    if pad:  # zero rows: a padded key adds nothing, a padded query is dropped below
        qs = torch.nn.functional.pad(qs, (0, 0, 0, pad))
        ks = torch.nn.functional.pad(ks, (0, 0, 0, pad))
        vt = torch.nn.functional.pad(vt, (0, 0, 0, pad))
    F = vt.shape[-1]
    qc = qs.view(B, Hkv, g, n, c, E)                                            # [B, Hkv, g, n, c, E]
    kc = ks.view(B, Hkv, n, c, E)                                               # [B, Hkv, n, c, E]
    vc = vt.view(B, Hkv, n, c, F)                                               # [B, Hkv, n, c, F]

    # inter-chunk: features chunk by chunk, feature-major, and the state before each chunk
    phik = _phi(kc.mT.contiguous(), run.basis, dim=-2)                          # [B, Hkv, n, D, c]
    dS = vc.mT @ phik.mT                                                        # [B, Hkv, n, F, D]
    S_c = S.to(run.cd)[:, :, None]                                              # [B, Hkv, 1, F, D]
    before = torch.cat([S_c, dS[:, :, :-1]], dim=2).cumsum(dim=2)              # [B, Hkv, n, F, D] exclusive
    phiq = _phi(qc.mT.contiguous(), run.basis, dim=-2)                          # [B, Hkv, g, n, D, c]
    U = phiq.mT @ before[:, :, None].mT                                         # [B, Hkv, g, n, c, F]

    # intra-chunk: the polynomial of the scores, causally masked
    A = taylor_exp(qc @ kc[:, :, None].mT, run.spec.n_taylor)                  # [B, Hkv, g, n, c, c]
    A = A.tril_() if not A.requires_grad else A.tril()
    U = U + A @ vc[:, :, None]                                                  # [B, Hkv, g, n, c, F]

    y = run.normalize(U.view(B, Hkv, g, n * c, F)[:, :, :, :T])                # [B, Hkv, g, T, Ev]
    # the new state sums in the state dtype: earlier state + this block's chunks
    return y, run.grow(S, dS.sum(dim=2))                                       # [B, Hkv, F, D]


_STEPS = BlockSteps(forward=causal_forward, block=causal_block, absorb=absorb_block)
