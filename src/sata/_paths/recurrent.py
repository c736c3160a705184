"""The recurrent path (``MATH.md`` section 3, decode / recurrent): causal, token by token in PyTorch.

    S_t = S_{t-1} + phi(k_t) [v_t, 1]^T,      u_t = phi(q_t)^T S_t,      y_t = u_t[:Ev] / u_t[Ev]

Constant cost per token and no chunk to form: the path for single tokens under autograd, on
CUDA, or without a compiler.
"""

from __future__ import annotations

import torch

from ..features import _phi
from .run import Run


def recurrent(run: Run, q, k, v, mask, S, need_state: bool):
    """Token by token: ``S += [v_t, 1] phi(k_t)^T``, then ``u_t = phi(q_t) S``."""
    B, Hkv, g, L, E = q.shape
    phiq = _phi(q.to(run.cd) * run.sq, run.basis)                              # [B, Hkv, g, L, D]
    ks, vt = run.keys_values(k, v, mask)                                        # [B, Hkv, L, E], [B, Hkv, L, F]
    phik = _phi(ks, run.basis)                                                  # [B, Hkv, L, D]
    outs = []
    for t in range(L):
        S = run.grow(S, vt[:, :, t, :, None] * phik[:, :, t, None, :])          # [B, Hkv, F, D]
        outs.append(run.read(phiq[:, :, :, t], S))                             # [B, Hkv, g, F]
    U = torch.stack(outs, dim=-2) if outs else phiq.new_zeros(B, Hkv, g, 0, vt.shape[-1])
    return run.normalize(U), S                                                  # [B, Hkv, g, L, Ev]
