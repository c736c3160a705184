"""Symmetry-aware Taylor attention: the functional op, a drop-in beside SDPA.

Three internal paths compute the same thing (``MATH.md`` section 3):

- ``_parallel``  (non-causal): ``S = S_in + phi(K)^T [V, 1]``, then ``U = phi(Q) S``; or, when
  cheaper and no state is needed, ``U = T_P(scale Q K^T) [V, 1]`` directly.
- ``_chunked``   (causal prefill / training): per chunk, the polynomial of the scores inside
  the chunk plus ``phi(Q_t) S_{t-1}`` for everything before it.
- ``_recurrent`` (causal decode, a few tokens): ``S += phi(k) [v, 1]^T``, ``u = phi(q)^T S``.

Long inputs are processed in blocks whose working set is bounded, and under
autograd each block is recomputed in the backward pass instead of storing its
features, so memory stays ``O(block)`` however long the sequence.
"""

from __future__ import annotations

import functools
import math

import torch
from torch.utils.checkpoint import checkpoint

from ._checks import Spec, check_inputs
from .basis import TaylorBasis, get_basis
from .budget import get_memory_budget
from .features import _phi, taylor_exp
from .state import SATAState

__all__ = ["accumulate_state", "sata_attention"]

# causal calls with at most this many tokens run token by token (decode)
_RECURRENT_MAX_LEN = 1
# bytes of features and scores one block may hold (at most a quarter of the budget)
_BLOCK_BYTES = 64 * 2**20


def sata_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    n_taylor: int = 3,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    state: SATAState | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, SATAState]:
    r"""Attention with ``exp`` replaced by its Taylor series truncated to ``n_taylor`` terms.

    .. math::
        y_i = \frac{\sum_j T_P(s_{ij})\, v_j}{\sum_j T_P(s_{ij})},\qquad
        T_P(s) = \sum_{p<P} \frac{s^p}{p!},\qquad s_{ij} = \mathrm{scale}\; q_i \cdot k_j

    computed at constant cost per token through the packed symmetric features ``phi``
    with ``<phi(q), phi(k)> = T_P(scale q.k)``. Same layout as
    :func:`torch.nn.functional.scaled_dot_product_attention`.

    Args:
        query (torch.Tensor): ``[..., Hq, Lq, E]``.
        key (torch.Tensor): ``[..., Hkv, Lk, E]``.
        value (torch.Tensor): ``[..., Hkv, Lk, Ev]``.
        n_taylor (int): number of Taylor terms ``P`` (degrees ``0..P-1``). Default: ``3``,
            the most terms every head size up to 64 affords; odd ``P`` keeps every weight
            ``T_P(s) > 0``. Features per head: ``D = C(E + P - 1, P - 1)``.
        is_causal (bool): query ``i`` attends to the keys in ``state`` and to the passed keys at
            positions ``<= i``; requires ``Lq == Lk``. Default: ``False`` (every query attends to
            the state and to all passed keys).
        scale (float, optional): score scale. Default: ``1 / sqrt(E)``.
        enable_gqa (bool): grouped-query attention, ``Hq`` a multiple of ``Hkv``; query head ``h``
            uses key/value head ``h // (Hq // Hkv)``, one state per key/value head. Default: ``False``.
        key_padding_mask (torch.Tensor, optional): ``[..., Lk]`` bool, ``True`` = ignore that key
            (``nn.MultiheadAttention``'s convention). A masked key changes neither output nor state.
        state (SATAState, optional): keys seen before this call. Never modified.
        return_state (bool): also return the state after this call. Default: ``False``.

    Returns:
        ``[..., Hq, Lq, Ev]`` in the input dtype, or ``(output, state)`` with ``return_state=True``.
        States accumulate in float32 (float64 for float64 inputs, or when ``state`` is float64).

    Notes:
        A query whose normaliser ``sum_j T_P(s_ij)`` is not positive (no keys, or, for even
        ``P`` only, strongly negative scores) gets a zero output, never Inf or NaN.
        NaN/Inf in unmasked inputs propagate to the outputs and states that depend on them,
        as in SDPA (to later tokens too: they enter the state); masked keys are ignored.

    Examples::
        >>> q, k, v = (torch.randn(2, 8, 1024, 16) for _ in range(3))
        >>> y, st = sata.sata_attention(q, k, v, n_taylor=3, is_causal=True, return_state=True)
        >>> q1, k1, v1 = (torch.randn(2, 8, 1, 16) for _ in range(3))       # one more token
        >>> y1, st = sata.sata_attention(q1, k1, v1, n_taylor=3, is_causal=True, state=st, return_state=True)
    """
    spec = check_inputs(
        "sata_attention", query, key, value, n_taylor=n_taylor, is_causal=is_causal, scale=scale,
        enable_gqa=enable_gqa, key_padding_mask=key_padding_mask, state=state,
    )
    return _attention(query, key, value, spec, is_causal, key_padding_mask, state, return_state)


def accumulate_state(
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    n_taylor: int = 3,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    state: SATAState | None = None,
) -> SATAState:
    r"""Absorb keys and values into a state without reading it: ``S + phi(K)^T [V, 1]``.

    The state of a segment, for building a context without computing outputs, or for
    combining segments processed elsewhere (states of disjoint segments add).

    Args:
        key (torch.Tensor): ``[..., Hkv, Lk, E]``.
        value (torch.Tensor): ``[..., Hkv, Lk, Ev]``.
        n_taylor, scale, key_padding_mask: as in :func:`sata_attention`.
        state (SATAState, optional): state to continue; never modified.

    Returns:
        :class:`SATAState` with ``kv [..., Hkv, D, Ev + 1]``; gradients flow to key, value and state.
    """
    query = key[..., :0, :]
    spec = check_inputs(
        "accumulate_state", query, key, value, n_taylor=n_taylor, is_causal=False, scale=scale,
        enable_gqa=False, key_padding_mask=key_padding_mask, state=state,
    )
    _, new_state = _attention(query, key, value, spec, False, key_padding_mask, state, True)
    return new_state


def _attention(query, key, value, spec: Spec, is_causal: bool, key_padding_mask, state, return_state, mode=None, chunk_size=None):
    """Reshape to ``[B, Hkv, (g,) L, E]``, dispatch to a path, reshape back. ``mode`` forces a path (tests)."""
    B, Hkv, g, D, F = spec.batch, spec.n_kv_heads, spec.group, spec.feature_dim, spec.d_value + 1
    basis = get_basis(spec.d_key, spec.n_taylor, spec.device, spec.compute_dtype)
    q = query.reshape(B, Hkv, g, spec.len_q, spec.d_key)                      # [B, Hkv, g, Lq, E]
    k = key.reshape(B, Hkv, spec.len_k, spec.d_key)                           # [B, Hkv, Lk, E]
    v = value.reshape(B, Hkv, spec.len_k, spec.d_value)                       # [B, Hkv, Lk, Ev]
    mask = None if key_padding_mask is None else key_padding_mask.reshape(B, spec.len_k)   # [B, Lk]
    S = None if state is None else state.kv.reshape(B, Hkv, D, F)             # [B, Hkv, D, F]
    run = _Run(spec, basis, chunk_size or _default_chunk(spec))

    if mode is None:
        if is_causal:
            mode = "recurrent" if spec.len_q <= _RECURRENT_MAX_LEN else "chunked"
        else:
            mode = "parallel"
    if is_causal and mode == "parallel":
        raise ValueError("mode='parallel' is non-causal only")
    if not is_causal and mode != "parallel":
        raise ValueError(f"mode={mode!r} is causal only")
    y, S_new = {"recurrent": run.recurrent, "chunked": run.chunked, "parallel": run.parallel}[mode](
        q, k, v, mask, S, need_state=return_state
    )
    out = y.reshape(*spec.batch_shape, spec.n_q_heads, spec.len_q, spec.d_value)
    if not return_state:
        return out
    if S_new is None:
        S_new = torch.zeros(B, Hkv, D, F, dtype=spec.state_dtype, device=spec.device)
    new_state = SATAState(
        kv=S_new.reshape(*spec.batch_shape, Hkv, D, F),
        n_taylor=spec.n_taylor,
        d_key=spec.d_key,
        d_value=spec.d_value,
        scale=spec.scale,
        n_tokens=(0 if state is None else state.n_tokens) + spec.len_k,
    )
    return out, new_state


def _default_chunk(spec: Spec) -> int:
    # intra-chunk work grows with c, per-chunk state reads shrink with it; 64 balances them
    # for small heads on CPU (see benchmarks)
    return 64


def _normalize(U: torch.Tensor, d_value: int, dtype: torch.dtype) -> torch.Tensor:
    """``[..., Ev + 1] -> [..., Ev]``: numerator / normaliser; 0 where the normaliser is not positive."""
    num, z = U[..., :d_value], U[..., d_value:]
    pos = z > 0
    # the inner where keeps the unused branch finite so its gradient is 0, not NaN
    return torch.where(pos, num / torch.where(pos, z, torch.ones_like(z)), 0.0).to(dtype)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _Run:
    """One call's constants; methods are the three paths."""

    def __init__(self, spec: Spec, basis: TaylorBasis, chunk: int):
        self.spec = spec
        self.basis = basis
        self.chunk = chunk
        self.cd = spec.compute_dtype
        self.sd = spec.state_dtype
        root = math.sqrt(abs(spec.scale))
        # scale = sq * sk; the sign of a negative scale rides on the query side
        self.sq = math.copysign(root, spec.scale)
        self.sk = root
        D, F, E = spec.feature_dim, spec.d_value + 1, spec.d_key
        itemsize = torch.empty((), dtype=self.cd).element_size()
        budget = min(_BLOCK_BYTES, get_memory_budget() // 4)
        g, c = spec.group, chunk
        # floats per token and batch*kv-head a causal block holds (x3 for temporaries under autograd)
        per_token = 3 * (D * (1 + g) + g * c + D * F / c + (1 + g) * (E + F)) * itemsize * spec.batch * spec.n_kv_heads
        self.block = max(c, int(budget // max(per_token, 1)) // c * c)

    # ------------------------------------------------------------ shared pieces
    def _keys_values(self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
        """Scaled keys and ``[v, 1]`` rows in compute dtype; masked positions zeroed in both."""
        ks = k.to(self.cd) * self.sk                                            # [B, Hkv, L, E]
        vt = torch.cat([v.to(self.cd), v.new_ones(v.shape[:-1] + (1,), dtype=self.cd)], dim=-1)  # [B, Hkv, L, F]
        if mask is not None:
            keep = ~mask[:, None, :, None]                                       # [B, 1, L, 1]
            ks = torch.where(keep, ks, 0.0)
            vt = torch.where(keep, vt, 0.0)
        return ks, vt

    def _grow(self, S: torch.Tensor | None, inc: torch.Tensor) -> torch.Tensor:
        """``S + inc`` accumulated in the state dtype."""
        inc = inc.to(self.sd)
        return inc if S is None else S + inc

    def _map_blocks(self, fn, length: int, tensors_at, need_grad: bool, carry=None):
        """Apply ``fn(*block_tensors, carry) -> (out, carry)`` over blocks of ``self.block`` tokens."""
        outs = []
        for start in range(0, length, self.block):
            stop = min(start + self.block, length)
            args = tensors_at(start, stop)
            if need_grad:
                out, carry = checkpoint(fn, *args, carry, use_reentrant=False)
            else:
                out, carry = fn(*args, carry)
            outs.append(out)
        return outs, carry

    # ------------------------------------------------------------ decode
    def recurrent(self, q, k, v, mask, S, need_state):
        """Token by token: ``S += phi(k_t)^T [v_t, 1]``, then ``u_t = phi(q_t) S``."""
        B, Hkv, g, L, E = q.shape
        qs = q.to(self.cd) * self.sq                                            # [B, Hkv, g, L, E]
        ks, vt = self._keys_values(k, v, mask)                                  # [B, Hkv, L, E], [B, Hkv, L, F]
        phiq = _phi(qs, self.basis)                                             # [B, Hkv, g, L, D]
        phik = _phi(ks, self.basis)                                             # [B, Hkv, L, D]
        outs = []
        for t in range(L):
            S = self._grow(S, phik[:, :, t, :, None] * vt[:, :, t, None, :])    # [B, Hkv, D, F]
            outs.append(phiq[:, :, :, t] @ S.to(self.cd))                      # [B, Hkv, g, F]
        U = torch.stack(outs, dim=-2) if outs else q.new_zeros(B, Hkv, g, 0, vt.shape[-1], dtype=self.cd)
        return _normalize(U, self.spec.d_value, self.spec.dtype), S              # [B, Hkv, g, L, Ev]

    # ------------------------------------------------------------ causal prefill / training
    def chunked(self, q, k, v, mask, S, need_state):
        """Causal, in chunks of ``c``: intra-chunk ``T_P(QK^T)`` plus inter-chunk ``phi(Q_t) S_{t-1}``."""
        B, Hkv, g, L, E = q.shape
        if S is None:
            S = q.new_zeros(B, Hkv, self.spec.feature_dim, self.spec.d_value + 1, dtype=self.sd)
        need_grad = _needs_grad(q, k, v, S)
        at = lambda a, b: (q[:, :, :, a:b], k[:, :, a:b], v[:, :, a:b], None if mask is None else mask[:, a:b])
        fn = functools.partial(_causal_block, run=self)
        if need_grad:
            outs, S = self._map_blocks(fn, L, at, True, S)
            return torch.cat(outs, dim=-2) if outs else q.new_empty(B, Hkv, g, 0, self.spec.d_value), S
        out = q.new_empty(B, Hkv, g, L, self.spec.d_value)                     # [B, Hkv, g, L, Ev]
        for start in range(0, L, self.block):
            stop = min(start + self.block, L)
            out[:, :, :, start:stop], S = fn(*at(start, stop), S)
        return out, S

    # ------------------------------------------------------------ non-causal
    def parallel(self, q, k, v, mask, S, need_state):
        """Every query attends to ``S`` and to all passed keys."""
        spec = self.spec
        B, Hkv, g, Lq, E = q.shape
        Lk, D, F = k.shape[-2], spec.feature_dim, spec.d_value + 1
        need_grad = _needs_grad(q, k, v, S)
        # quadratic in (Lq, Lk) versus linear through features: pick the cheaper one
        quadratic = not need_state and Lq * Lk * (E + F) <= (Lq + Lk) * D * F
        if not quadratic or need_state:
            at = lambda a, b: (k[:, :, a:b], v[:, :, a:b], None if mask is None else mask[:, a:b])
            _, S = self._map_blocks(functools.partial(_key_block, run=self), Lk, at, need_grad, S)
        if quadratic:
            qs = q.to(self.cd) * self.sq                                        # [B, Hkv, g, Lq, E]
            ks, vt = self._keys_values(k, v, mask)                              # [B, Hkv, Lk, E], [B, Hkv, Lk, F]
            A = taylor_exp(qs @ ks[:, :, None].transpose(-1, -2), spec.n_taylor)   # [B, Hkv, g, Lq, Lk]
            U = A @ vt[:, :, None]                                              # [B, Hkv, g, Lq, F]
            if S is not None:
                U = U + _phi(qs, self.basis) @ S.to(self.cd)[:, :, None]
            return _normalize(U, spec.d_value, spec.dtype), S
        if S is None:  # no keys at all: every normaliser is 0
            return q.new_zeros(B, Hkv, g, Lq, spec.d_value), None
        at = lambda a, b: (q[:, :, :, a:b],)
        outs, _ = self._map_blocks(functools.partial(_query_block, run=self), Lq, at, need_grad, S)
        return (torch.cat(outs, dim=-2) if outs else q.new_empty(B, Hkv, g, 0, spec.d_value)), S


def _key_block(k, v, mask, S, *, run: _Run):
    """Add one block of keys to the state: ``S + phi(K)^T [V, 1]``."""
    ks, vt = run._keys_values(k, v, mask)                                      # [B, Hkv, T, E], [B, Hkv, T, F]
    return None, run._grow(S, _phi(ks, run.basis).transpose(-1, -2) @ vt)      # [B, Hkv, D, F]


def _query_block(q, S, *, run: _Run):
    """Read one block of queries out of the state: ``phi(Q) S``."""
    U = _phi(q.to(run.cd) * run.sq, run.basis) @ S.to(run.cd)[:, :, None]      # [B, Hkv, g, T, F]
    return _normalize(U, run.spec.d_value, run.spec.dtype), S


def _causal_block(q, k, v, mask, S, *, run: _Run):
    """One block of ``n`` chunks of ``c`` tokens, causal, starting from state ``S``."""
    B, Hkv, g, T, E = q.shape
    c = min(run.chunk, T)
    n = -(-T // c)
    pad = n * c - T
    qs = q.to(run.cd) * run.sq                                                  # [B, Hkv, g, T, E]
    ks, vt = run._keys_values(k, v, mask)                                       # [B, Hkv, T, E], [B, Hkv, T, F]
    if pad:  # zero rows: a padded key adds nothing, a padded query is dropped below
        qs = torch.nn.functional.pad(qs, (0, 0, 0, pad))
        ks = torch.nn.functional.pad(ks, (0, 0, 0, pad))
        vt = torch.nn.functional.pad(vt, (0, 0, 0, pad))
    F = vt.shape[-1]
    qc = qs.view(B, Hkv, g, n, c, E)                                            # [B, Hkv, g, n, c, E]
    kc = ks.view(B, Hkv, n, c, E)                                               # [B, Hkv, n, c, E]
    vc = vt.view(B, Hkv, n, c, F)                                               # [B, Hkv, n, c, F]

    # inter-chunk: the state before each chunk
    dS = _phi(kc, run.basis).transpose(-1, -2) @ vc                             # [B, Hkv, n, D, F]
    prefix = dS.cumsum(dim=2)                                                   # [B, Hkv, n, D, F] inclusive
    S_c = S.to(run.cd)[:, :, None]                                              # [B, Hkv, 1, D, F]
    before = torch.cat([S_c, S_c + prefix[:, :, :-1]], dim=2)                   # [B, Hkv, n, D, F] exclusive
    U = _phi(qc, run.basis) @ before[:, :, None]                                # [B, Hkv, g, n, c, F]

    # intra-chunk: the polynomial of the scores, causally masked
    A = taylor_exp(qc @ kc[:, :, None].transpose(-1, -2), run.spec.n_taylor)   # [B, Hkv, g, n, c, c]
    A = A * _tril(c, A.device, A.dtype)
    U = U + A @ vc[:, :, None]                                                  # [B, Hkv, g, n, c, F]

    y = _normalize(U.view(B, Hkv, g, n * c, F)[:, :, :, :T], run.spec.d_value, run.spec.dtype)  # [B, Hkv, g, T, Ev]
    return y, run._grow(S, prefix[:, :, -1])                                   # [B, Hkv, D, F]


@functools.lru_cache(maxsize=32)
def _tril(c: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.ones(c, c, device=device, dtype=dtype).tril()
