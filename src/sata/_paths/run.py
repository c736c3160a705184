"""One call's constants and the primitives every PyTorch path composes (``MATH.md`` section 3).

Inside the paths, states travel F-major, ``S^T [B, Hkv, F, D]`` with ``F = Ev + 1`` (the
normaliser is the last value column): the layout the kernels and :class:`~sata.SATAState` use.
They accumulate in the state dtype; features, scores and products are computed in the compute
dtype. Long inputs are processed in blocks whose working set is bounded by the budget; under
autograd each block is recomputed in the backward pass instead of storing its features.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from .._checks import Spec
from ..basis import get_basis
from ..features import _normalize_rows, _split_scale
from ..state import SATAState
from . import kernel
from .tuning import CHUNK, Tuning


def needs_grad(*tensors) -> bool:
    """Autograd is on and a tensor (or a SATAState's tensor) requires grad."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if isinstance(t, SATAState):
            t = t._stored()
        if t is not None and t.requires_grad:
            return True
    return False


class Run:
    """One call's constants: basis, dtypes, the split scale, chunk and block sizes, and whether
    blocks without autograd may go through the fused kernel (``fused``)."""

    def __init__(self, spec: Spec, tuning: Tuning, fused: bool):
        self.spec = spec
        self.basis = get_basis(spec.d_key, spec.n_taylor, spec.device, spec.compute_dtype)
        self.cd = spec.compute_dtype
        self.sd = spec.state_dtype
        self.sq, self.sk = _split_scale(spec.scale)
        self.fused = fused
        D, F, E, g, size = spec.feature_dim, spec.d_value + 1, spec.d_key, spec.group, self.cd.itemsize
        self.budget = budget = min(tuning.block_bytes, spec.budget // 4)
        # a chunk's features (x3 under autograd) must fit the block budget: large D, shorter chunks
        feature_bytes = 3 * D * (1 + g) * size * spec.batch * spec.n_kv_heads
        self.chunk = c = max(1, min(tuning.chunk_size or CHUNK, budget // max(feature_bytes, 1)))
        # bytes per token of a causal block, all heads (x3: temporaries under autograd)
        per_token = 3 * (D * (1 + g) + g * c + D * F / c + (1 + g) * (E + F)) * size * spec.batch * spec.n_kv_heads
        self.block = tuning.block_size or max(c, int(budget // max(per_token, 1)) // c * c)

    def keys_values(self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
        """Scaled keys and ``[v, 1]`` rows in compute dtype; masked positions zeroed in both."""
        ks = k.to(self.cd) * self.sk                                            # [B, Hkv, L, E]
        vt = torch.cat([v.to(self.cd), v.new_ones(v.shape[:-1] + (1,), dtype=self.cd)], dim=-1)  # [B, Hkv, L, F]
        if mask is not None:
            keep = ~mask[:, None, :, None]                                       # [B, 1, L, 1]
            ks = torch.where(keep, ks, 0.0)
            vt = torch.where(keep, vt, 0.0)
        return ks, vt

    def grow(self, S: torch.Tensor | None, inc: torch.Tensor) -> torch.Tensor:
        """``S + inc`` accumulated in the state dtype."""
        inc = inc.to(self.sd)
        return inc if S is None else S + inc

    def read(self, phi: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
        """``phi @ S``: ``[..., T, D] x S^T [..., F, D] -> [..., T, F]``."""
        return phi @ S.to(self.cd).transpose(-1, -2)

    def normalize(self, U: torch.Tensor) -> torch.Tensor:
        """``[..., Ev + 1] -> [..., Ev]`` in the output dtype: numerator / normaliser (0 where it is not positive)."""
        Ev = self.spec.d_value
        return _normalize_rows(U[..., :Ev], U[..., Ev:]).to(self.spec.dtype)

    def blocks(self, fn, length: int, slices, need_grad: bool, carry):
        """Apply ``fn(*slices(a, b), carry) -> (out, carry)`` over blocks of tokens.

        Under autograd each block is checkpointed: its features are recomputed in the
        backward pass instead of kept, so memory does not grow with the length.
        """
        outs = []
        for start in range(0, length, self.block):
            args = slices(start, min(start + self.block, length))
            out, carry = checkpoint(fn, *args, carry, use_reentrant=False) if need_grad else fn(*args, carry)
            outs.append(out)
        return outs, carry


def torch_path(body):
    """A PyTorch path with the uniform path signature of :data:`sata.ops.PATHS`.

    ``body(run, q, k, v, mask, S, need_state) -> (y, S)`` works on ``q [B, Hkv, g, Lq, E]``,
    ``k [B, Hkv, Lk, E]``, ``v [B, Hkv, Lk, Ev]``, ``mask [B, Lk]`` and ``S^T [B, Hkv, F, D]`` (or
    ``None``); this wrapper reshapes the caller's ``[..., H, L, X]`` tensors to and from those.
    """

    @functools.wraps(body)
    def path(query, key, value, spec: Spec, mask, state, need_state: bool, inplace: bool, tuning: Tuning):
        B, Hkv, g, D, F = spec.batch, spec.n_kv_heads, spec.group, spec.feature_dim, spec.d_value + 1
        q = query.reshape(B, Hkv, g, spec.len_q, spec.d_key)                  # [B, Hkv, g, Lq, E]
        k = key.reshape(B, Hkv, spec.len_k, spec.d_key)                       # [B, Hkv, Lk, E]
        v = value.reshape(B, Hkv, spec.len_k, spec.d_value)                   # [B, Hkv, Lk, Ev]
        m = None if mask is None else mask.reshape(B, spec.len_k)             # [B, Lk]
        S_in = None if state is None else state.kv.transpose(-1, -2).reshape(B, Hkv, F, D)   # [B, Hkv, F, D]
        run = Run(spec, tuning, fused=tuning.kernels and kernel.usable(spec))
        y, S = body(run, q, k, v, m, S_in, need_state)
        out = y.reshape(*spec.batch_shape, spec.n_q_heads, spec.len_q, spec.d_value)
        if out.numel() == 0 and not out.requires_grad and needs_grad(query, key, value, state):
            # an empty output still belongs to the graph, so that backward() through it works
            out = out + 0 * (query.sum() + key.sum() + value.sum()).to(out.dtype)
        if S is None:
            return out, None
        if S is S_in:  # no keys: a new state all the same, never a view of the caller's
            S = S.clone()
        return out, S.reshape(*spec.batch_shape, Hkv, F, D).contiguous()           # as the paths promise

    return path
