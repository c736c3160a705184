"""The window mode in PyTorch: exact softmax on a window and sinks, the re-centred Taylor state for the rest.

``MATH.md`` section 6. Every call, prefill or one decoded token, causal or not, runs the same three steps
on the *extended stream*: the ``W`` keys of the state's window (oldest first) followed by the call's keys.
With that stream, query ``i`` of the call sees

- far keys: extended positions ``e <= i`` (the keys at least ``W`` positions back), through the state:
  the plain chunked causal form of section 3 with the keys shifted by ``W``, starting from the far state
  ``S_F``, read per degree with the coefficients ``a_m(c_i)`` of the centre;
- exact keys: the band ``i < e <= i + W`` (its window) and the sink slots, through ``exp``;
- non-causal calls add the far keys on the right (``j >= i + W``) by the same causal form on the reversed
  call, and the band widens to ``i < e < i + 2W``.

Under autograd each block of queries is checkpointed (recomputed in the backward pass) with the far state
carried between blocks, so memory holds one state per block, never features per token. Without autograd on
the CPU, a single causal token takes the fused decode kernel instead (:mod:`sata._paths.window_kernel`) and
a longer causal call the fused prefill kernel (:mod:`sata._paths.window_prefill`).
"""

from __future__ import annotations

import math
import torch
from torch.utils.checkpoint import checkpoint

from ..basis import TaylorBasis, get_basis
from ..budget import MemoryBudgetError, format_bytes
from ..features import _phi, taylor_exp
from ..state import ExactKeys
from ..hybrid import Hybrid, centre, centre_coefficients, combine, exact_part, per_head
from . import window_prefill

# bytes of scores and features one block may hold
_BLOCK_BYTES = 32 * 2**20


class _Call:
    """Constants of one call: dtypes, the split scale, the basis and its degree of every feature."""

    def __init__(self, spec, hybrid: Hybrid, chunk: int = 64, block: int | None = None):
        self.spec, self.hybrid = spec, hybrid
        self.cd, self.sd = spec.compute_dtype, spec.state_dtype
        root = math.sqrt(abs(spec.scale))
        self.sq, self.sk = math.copysign(root, spec.scale), root
        self.P = spec.n_taylor
        self.basis: TaylorBasis = get_basis(spec.d_key, self.P, spec.device, self.cd)
        self.deg = torch.repeat_interleave(torch.arange(self.P, device=spec.device),
                                           torch.tensor(self.basis.sizes, device=spec.device))   # [D]
        self.n_mom = min(self.P, 3)                                       # degrees the centre reads
        self.D_mom = self.basis.offsets[self.n_mom]
        self.chunk = chunk
        W, S, D, F, g = hybrid.window, hybrid.sinks, spec.feature_dim, spec.d_value + 1, spec.group
        per_query = (g * (chunk + 2 * W + S) + (1 + g) * D + D * F / chunk) * 4 * 8 * spec.batch * spec.n_kv_heads
        self.block = block or max(chunk, int(_BLOCK_BYTES // max(per_query, 1)) // chunk * chunk)
        self.alpha = per_head(hybrid.recentre, (spec.n_kv_heads, g, 1), self.cd)
        self.beta = per_head(hybrid.taylor_mix, (spec.n_kv_heads, g, 1), self.cd)


def window_attention(q, k, v, mask, far, exact: ExactKeys, n_tokens: int, spec, hybrid: Hybrid, causal: bool,
                     key_centre=None, kernels: bool = True, far_qk=None, need_far: bool = True):
    """The window mode for one call.

    Args:
        q: ``[B, Hkv, g, Lq, E]`` with ``Lq == Lk`` (query ``i`` at key ``i``'s position), or ``Lq == 0``
            to absorb keys only; k: ``[B, Hkv, Lk, E]``; v: ``[B, Hkv, Lk, Ev]``;
        mask: ``[B, Lk]`` bool, True = padded key, or None;
        far: the far Taylor state before the call, F-major ``[B, Hkv, Ev + 1, D]``, or None (empty);
        exact: the window and sink keys before the call, batch flattened to ``B``;
        n_tokens: positions seen before the call;
        key_centre: ``[B, Hkv, E]`` subtracted from the keys of the far state, or None;
        kernels: a causal call may take the fused prefill kernel (:mod:`sata._paths.window_prefill`);
        far_qk: ``(q', k')`` shaped like ``q`` and ``k``: the far part's own queries and keys (the converted
            hybrid's learned maps of them, :mod:`sata.integrations.adapted`), the exact part keeping ``q`` and
            ``k``; only for a stream's first call (no state: the window holds no keys to map). None: ``q``, ``k``.
        need_far: the far state after the call is wanted (a returned state). Without it and with ``taylor_mix``
            the plain number 0 (:attr:`Hybrid.no_far`) the far part is skipped: the window-only model's training.

    Returns:
        ``y [B, Hkv, g, Lq, Ev]``, the far state (None where skipped) and the :class:`ExactKeys` after the call.

    With a key centre ``mu`` the far state holds ``phi(k - mu)``: the far scores are ``s' = s - delta_i``,
    ``delta_i = scale q_i . mu``, and the series around ``c_i`` is the series of ``s'`` around
    ``c_i - delta_i`` (moments read from the state are those of ``s'``); the exact keys use ``s``.
    """
    if far_qk is not None and (far is not None or n_tokens or bool(exact.win_keep.any())):
        raise ValueError("window_attention: far_qk needs the stream's first call (no far state, no window keys)")
    exact_only = hybrid.no_far and not need_far and q.shape[-2] > 0  # the far part weighted by 0, no state to keep
    if causal and kernels and q.shape[-2] and not exact_only and window_prefill.serves(
            spec, hybrid, q, k, v, far, exact, key_centre, *(far_qk or ())):
        win_k, win_v, ext_f, new_exact = stream(hybrid.window, spec.state_dtype, k, v, mask, exact, n_tokens)
        y, far = window_prefill.prefill(q, k, v, win_k, win_v, ext_f, new_exact, far, n_tokens, spec, hybrid, key_centre,
                                        far_qk)
        return y, far, new_exact
    run = _Call(spec, hybrid, chunk=min(64, max(q.shape[-2], 1)))  # a short call (decode) is not padded to a whole chunk
    B, Hkv, g, L, E = q.shape
    # the far part's keys (centred, or its own) only where it runs
    far_centre, far_k = (None, None) if exact_only else (key_centre, None if far_qk is None else far_qk[1])
    ext_k, ext_v, ext_f, ks, ks_far, vt, new_exact = _extend(run, k, v, mask, exact, n_tokens, far_centre, far_k)
    Lk, W = k.shape[-2], hybrid.window
    if L == 0:  # absorb only: the keys that left the window
        return q.new_zeros(B, Hkv, g, 0, spec.d_value), absorb(run, ks_far[:, :, :Lk], vt[:, :, :Lk], far), new_exact
    qs = q.to(run.cd) * run.sq                                                    # [B, Hkv, g, L, E] exact part
    sinks = (new_exact.sink_k.to(run.cd) * run.sk, new_exact.sink_v.to(run.cd), new_exact.sink_pos)
    if exact_only:  # (2-3x faster than the fused prefill kernel, which computes the far part)
        m, num, den = _exact(run, qs, ks, vt, ext_f, sinks, n_tokens, causal)
        return combine(m, num, den, None, None, None, None, spec.d_value, spec.dtype), None, new_exact
    qf = qs if far_qk is None else far_qk[0].to(run.cd) * run.sq                  # [B, Hkv, g, L, E] far part

    # how many far keys each query has, and their centre
    n_far = ext_f[:, None, :L, None].to(run.cd).cumsum(-2)                      # [B, 1, L, 1]
    if far is not None:
        n_far = n_far + far[:, :, -1, 0, None, None].to(run.cd)                 # [B, Hkv, L, 1]
    right = None
    if not causal:
        sR = max(W, 1)  # right far keys: j >= i + max(W, 1)
        right = tuple(_reverse_shift(x[:, :, W:], sR) for x in (ks_far, vt))
        n_far = n_far + right[1][..., -1:].cumsum(-2).flip(-2)
    has_far = (n_far > 0)[:, :, None, :, 0].expand(B, Hkv, g, L)                # [B, Hkv, g, L]
    if run.alpha is not None and right is None:  # causal: each block's centres from the scan's own features
        U, far, shifted = _scan(run, qf, ks_far[:, :, :L], vt[:, :, :L], far, None, centred=True)
        delta = _delta(run, qf, key_centre)
        c = shifted if delta is None else shifted + delta[..., 0]
    else:
        c, coef = _centre(run, qf, ks_far[:, :, :L], vt[:, :, :L, -1:], far, right, key_centre)
        U, far = _scan(run, qf, ks_far[:, :, :L], vt[:, :, :L], far, coef)     # [B, Hkv, g, L, F]
    if right is not None:
        U = U + _scan(run, qf.flip(-2), *right, None, None if coef is None else coef.flip(-2))[0].flip(-2)
    m, num, den = _exact(run, qs, ks, vt, ext_f, sinks, n_tokens, causal)
    y = combine(m, num, den, U, c, has_far, run.beta, spec.d_value, spec.dtype)  # [B, Hkv, g, L, Ev]
    return y, far, new_exact


def _extend(run: _Call, k, v, mask, exact: ExactKeys, n_tokens: int, key_centre, far_k=None):
    """The extended stream (the state's window, oldest first, then the call), its scaled keys and ``[v, 1]``
    rows (raw for the exact part; for the far state centred, and ``far_k`` instead of ``k`` if given) and the
    window and sinks after the call."""
    win_k, win_v, ext_f, new_exact = stream(run.hybrid.window, run.sd, k, v, mask, exact, n_tokens)
    ext_k = torch.cat([win_k, k], dim=-2)                                       # [B, Hkv, W + Lk, E]
    ext_v = torch.cat([win_v, v], dim=-2)                                       # [B, Hkv, W + Lk, Ev]
    ks, vt = _keys_values(run, ext_k, ext_v, ext_f)                              # [B, Hkv, W + Lk, E | F]
    ext_kf = ext_k if far_k is None else torch.cat([win_k.to(far_k.dtype), far_k], dim=-2)   # (no window keys: zeros)
    if key_centre is not None:  # in the compute dtype: half keys minus the centre would round again
        ext_kf = ext_kf.to(run.cd) - key_centre[:, :, None].to(run.cd)
    ks_far = ks if ext_kf is ext_k else _keys_values(run, ext_kf, ext_v, ext_f)[0]
    return ext_k, ext_v, ext_f, ks, ks_far, vt, new_exact


def stream(W: int, state_dtype: torch.dtype, k, v, mask, exact: ExactKeys, n_tokens: int):
    """The extended stream without copying the call: the state's window keys and values ``[B, Hkv, W, E | Ev]``,
    oldest first, in the call's dtype (the call's keys follow them), the flags ``[B, W + Lk]`` (a kept key that
    is not a sink) of the whole stream, and the window and sinks after the call."""
    B, Hkv, Lk, _ = k.shape
    kept = torch.ones(B, Lk, dtype=torch.bool, device=k.device) if mask is None else ~mask
    sink_k, sink_v, sink_pos, is_sink = _take_sinks(exact, k, v, kept, n_tokens)
    flag = kept & ~is_sink                                                       # [B, Lk] window/far keys
    shift = n_tokens % W if W else 0
    win_k = exact.win_k.roll(-shift, dims=-2).to(k.dtype)                       # [B, Hkv, W, E]
    win_v = exact.win_v.roll(-shift, dims=-2).to(v.dtype)                       # [B, Hkv, W, Ev]
    ext_f = torch.cat([exact.win_keep.roll(-shift, dims=-1), flag], dim=-1)              # [B, W + Lk]
    last = lambda w, x: torch.cat([w, x[:, :, -W:]], dim=-2)[:, :, -W:] if W else w   # the stream's last W rows
    shift = (n_tokens + Lk) % W if W else 0
    new_exact = ExactKeys(                                                      # the last W positions, ring order
        last(win_k, k).roll(shift, dims=-2).to(state_dtype), last(win_v, v).roll(shift, dims=-2).to(state_dtype),
        ext_f[:, Lk:].roll(shift, dims=-1), sink_k.to(state_dtype), sink_v.to(state_dtype), sink_pos,
    )
    return win_k, win_v, ext_f, new_exact


def _centre(run: _Call, qs, ks_far, w_far, far, right, key_centre):
    """Each query's centre ``c [B, Hkv, g, L]`` and the coefficients ``a_m [B, Hkv, g, L, P]`` of its series in the
    far state's (centred) scores ``s' = s - delta`` (None: plain ``T_P``)."""
    B, Hkv, g, L, E = qs.shape
    delta = _delta(run, qs, key_centre)
    if run.alpha is None:
        c = qs.new_zeros(B, Hkv, g, L)                                          # the series around 0 ...
        shifted = None if delta is None else -delta[..., 0]                     # ... is the series of s' around -delta
    else:
        mom = _moments(run, qs, ks_far, w_far, far)                             # [B, Hkv, g, L, 3]
        if right is not None:
            mom = mom + _moments(run, qs.flip(-2), right[0], right[1][..., -1:], None).flip(-2)
        shifted = centre(mom, run.alpha)                                        # [B, Hkv, g, L] in units of s'
        c = shifted if delta is None else shifted + delta[..., 0]
    return c, None if shifted is None else centre_coefficients(shifted, run.P)


def _delta(run: _Call, qs, key_centre):
    """``delta_i = scale q_i . mu`` ``[B, Hkv, g, L, 1]``, the shift of the far scores by the key centre (None: none)."""
    return None if key_centre is None else qs @ (key_centre.to(run.cd) * run.sk)[:, :, None, :, None]


def absorb(run: _Call, ks, vt, S):
    """``S + [V, 1]^T phi(K)`` block by block (keys already scaled and flagged): ``[B, Hkv, F, D]``, a tensor of its
    own even without keys (``S`` is the passed state's: a returned state sharing it would let an in-place step on
    the new state rewrite the old one)."""
    if ks.shape[-2] == 0:
        return None if S is None else S.clone()
    for k_, v_ in _split(run, ks.shape[-2], ks, vt):
        inc = (v_.mT @ _phi(k_.mT, run.basis, dim=-2).mT).to(run.sd)
        S = inc if S is None else S + inc
    return S


def _take_sinks(parts: ExactKeys, k, v, kept, n_tokens: int):
    """The sink slots after the call, and which of the call's keys fill them (the first kept keys of the stream)."""
    S = parts.sink_pos.shape[-1]
    B, Hkv = k.shape[:2]
    filled = (parts.sink_pos >= 0).sum(-1, keepdim=True)                       # [B, 1]
    slot = filled + kept.long().cumsum(-1) - kept.long()                       # [B, L] the slot key j would fill
    is_sink = kept & (slot < S)
    if S == 0 or not bool(is_sink.any()):  # copies: the passed state's buffers (its free slots are written in place)
        return parts.sink_k.clone(), parts.sink_v.clone(), parts.sink_pos.clone(), is_sink
    n = int(is_sink.any(0).nonzero()[-1]) + 1                                  # only keys up to the last sink fill one
    k, v, sink = k[:, :, :n], v[:, :, :n], is_sink[:, :n]
    idx = torch.where(sink, slot[:, :n], S)                                     # [B, n]; slot S: scratch, dropped
    pos = torch.arange(n_tokens, n_tokens + n, device=k.device).expand(B, n)
    keep_old = torch.cat([parts.sink_pos, parts.sink_pos.new_full((B, 1), -1)], -1)
    sink_pos = keep_old.scatter(-1, idx, torch.where(sink, pos, -1))[:, :S]

    def fill(buf, x):  # [B, Hkv, S, X] <- the sink rows of x [B, Hkv, n, X]
        ext = torch.cat([buf.to(x.dtype), x.new_zeros(B, Hkv, 1, x.shape[-1])], dim=-2)
        rows = torch.where(sink[:, None, :, None], x, 0.0)   # a non-sink row lands in the scratch slot
        return ext.scatter(-2, idx[:, None, :, None].expand(B, Hkv, n, x.shape[-1]), rows)[:, :, :S]

    return fill(parts.sink_k, k), fill(parts.sink_v, v), sink_pos, is_sink


def _keys_values(run: _Call, k, v, flag):
    """Scaled keys and ``[v, 1]`` rows in the compute dtype, zero where ``flag`` is False."""
    ks = k.to(run.cd) * run.sk                                                  # [B, Hkv, T, E]
    vt = torch.cat([v.to(run.cd), v.new_ones(v.shape[:-1] + (1,), dtype=run.cd)], dim=-1)   # [B, Hkv, T, F]
    keep = flag[:, None, :, None]
    return torch.where(keep, ks, 0.0), torch.where(keep, vt, 0.0)


def _reverse_shift(x, shift: int):
    """``[B, Hkv, L, X]`` reversed and delayed by ``shift``: the right far keys as a causal stream."""
    L = x.shape[-2]
    pad = x.new_zeros(x.shape[:2] + (min(shift, L), x.shape[-1]))
    return torch.cat([pad, x.flip(-2)], dim=-2)[:, :, :L]


# ---------------------------------------------------------------- chunked scans over blocks of queries
def _blocks(run: _Call, fn, blocks, carry, carried: int = 0):
    """``fn(*args, carry) -> (out, carry)`` for the ``args`` of each block of queries in turn (``blocks``, e.g. from
    :func:`_split`); checkpointed under autograd, where ``carried`` is the bytes of the carry a block keeps (the
    first block's may be None: a stream's first call)."""
    need_grad, checked = torch.is_grad_enabled(), False
    outs, blocks = [], list(blocks)
    for i, args in enumerate(blocks):
        if need_grad and any(isinstance(t, torch.Tensor) and t.requires_grad for t in (*args, carry)):
            if not checked:
                _check_saved(run, len(blocks) - i, carried)
                checked = True
            out, carry = checkpoint(fn, *args, carry, use_reentrant=False)
        else:
            out, carry = fn(*args, carry)
        outs.append(out)
    return outs, carry


def _check_saved(run: _Call, n_blocks: int, each: int) -> None:
    """The checkpointed blocks keep their carried state (the far state, or the moments) until the backward pass:
    refused before the first block when they would take more than half the memory budget."""
    held, budget = n_blocks * each, run.spec.budget
    if held > budget // 2:
        raise MemoryBudgetError(
            f"sata_attention: the backward pass of the window mode over {n_blocks} blocks of {run.block} tokens keeps "
            f"{format_bytes(held)} of carried states ({format_bytes(each)} each), more than half the memory budget of "
            f"{format_bytes(budget)}. Use fewer Taylor terms or smaller heads, or raise the budget with "
            "sata.set_memory_budget(...) or SATA_MEMORY_BUDGET."
        )


def _split(run: _Call, L: int, *tensors):
    """The blocks of ``run.block`` rows (dim -2) of each of ``tensors`` (``[..., >= L, X]`` or None), zipped, one
    tuple per block of the ``L`` queries. One ``split`` per tensor: slicing each block out of the whole tensor
    would make the backward pass zero-fill a gradient of the whole tensor once per block (O(L^2 / block))."""
    n = -(-L // run.block)
    parts = [(None,) * n if t is None else t.split(run.block, dim=-2)[:n] for t in tensors]
    return list(zip(*parts))


def _chunks(x, c: int):
    """``[..., T, X] -> [..., n, c, X]``, zero-padded to whole chunks."""
    T = x.shape[-2]
    n = -(-T // c)
    if n * c != T:
        x = torch.nn.functional.pad(x, (0, 0, 0, n * c - T))
    return x.unflatten(-2, (n, c))


def _scan(run: _Call, qs, ks, vt, S0, coef, centred: bool = False):
    """``U_i = sum_{e <= i} T_coef(s_ie) vt_e + phi_coef(q_i) S0`` over blocks of chunks (``MATH.md`` 3, chunked).

    ``T_coef(s) = sum_m coef_m s^m / m!`` per query (``coef [..., L, P]``; None: all ones, ``T_P``). Returns
    ``U [B, Hkv, g, L, F]`` and the far state after all keys ``[B, Hkv, F, D]`` (None in, None out).
    ``centred`` (causal calls with ``run.alpha``): the coefficients of each query's series around its centre,
    worked out inside the block from the same features and scores (:func:`_chunk_moments`, which
    :func:`_moments` runs in a pass of its own); then also returns the centres ``[B, Hkv, g, L]`` (in units
    of the far scores).
    """
    B, Hkv, g, L, E = qs.shape
    F, D = vt.shape[-1], run.basis.dim

    def block(q, k, v, a_, S):
        T = q.shape[-2]
        qc, kc, vc = _chunks(q, run.chunk), _chunks(k, run.chunk), _chunks(v, run.chunk)   # [.., n, c, X]
        phik = _phi(kc.mT, run.basis, dim=-2)                                       # [B, Hkv, n, D, c]
        dS = vc.mT @ phik.mT                                                    # [B, Hkv, n, F, D]
        start = dS.new_zeros(B, Hkv, 1, F, D) if S is None else S.to(run.cd)[:, :, None]
        before = torch.cat([start, dS[:, :, :-1]], dim=2).cumsum(dim=2)        # [B, Hkv, n, F, D] exclusive
        phiq = _phi(qc.mT, run.basis, dim=-2).mT                                      # [B, Hkv, g, n, c, D]
        s = qc @ kc[:, :, None].mT                                              # [B, Hkv, g, n, c, c]
        state = before[:, :, None].mT                                           # [B, Hkv, 1, n, D, F]
        shifted = ac = None
        if centred:  # each query's centre from the moments of its far scores, read off this block's own pieces
            mom = _chunk_moments(run, phiq, before[:, :, :, -1, :run.D_mom], s, vc[..., -1])   # [.., n, c, n_mom]
            shifted = centre(torch.nn.functional.pad(mom, (0, 3 - run.n_mom)).flatten(-3, -2), run.alpha)
            ac = centre_coefficients(shifted, run.P).unflatten(-2, s.shape[-3:-1])   # [B, Hkv, g, n, c, P]
        elif a_ is not None:
            ac = _chunks(a_, run.chunk)                                         # [B, Hkv, g, n, c, P]
        if ac is None:
            A = _horner(s, None, run.P)
            U = phiq @ state                                                    # [B, Hkv, g, n, c, F]
        else:  # degree m's block read with a_m(c_i): one product per degree, weighted per query (no [c, D] gather)
            A = _horner(s, ac, run.P)
            o = run.basis.offsets
            U = sum(ac[..., m, None] * (phiq[..., o[m]:o[m + 1]] @ state[..., o[m]:o[m + 1], :]) for m in range(run.P))
        U = U + A.tril() @ vc[:, :, None]                                        # [B, Hkv, g, n, c, F]
        inc = dS.sum(dim=2).to(run.sd)
        S_new = inc if S is None else S + inc                                   # [B, Hkv, F, D]
        U = U.flatten(-3, -2)[..., :T, :]
        return (U, shifted[..., :T]) if centred else U, S_new

    outs, S = _blocks(run, block, _split(run, L, qs, ks, vt, coef), S0, B * Hkv * F * D * run.sd.itemsize)
    if not centred:
        return (torch.cat(outs, dim=-2) if outs else qs.new_zeros(B, Hkv, g, 0, F)), S
    if not outs:
        return qs.new_zeros(B, Hkv, g, 0, F), S, qs.new_zeros(B, Hkv, g, 0)
    return torch.cat([o[0] for o in outs], dim=-2), S, torch.cat([o[1] for o in outs], dim=-1)


def _horner(s, coef, P: int):
    """``sum_m coef_m s^m / m!`` by Horner's rule; ``coef [..., P]`` per row of ``s [..., c, c]`` (None: ones).

    With ``b_m = coef_m / m!`` (on the small coefficient tensor) each step is one ``b_m + r s`` over the scores."""
    if coef is None:
        return taylor_exp(s, P)
    b = coef / torch.tensor([math.factorial(m) for m in range(P)], dtype=coef.dtype, device=coef.device)
    if P == 1:
        return b[..., 0, None].expand_as(s)
    r = torch.addcmul(b[..., P - 2, None], b[..., P - 1, None], s)              # [..., c, c]
    for m in range(P - 3, -1, -1):
        r = torch.addcmul(b[..., m, None], r, s)
    return r


def _moments(run: _Call, qs, ks, w, S0):
    """``(N, sum s, sum s^2 / 2)`` over each query's far keys ``[B, Hkv, g, L, 3]``: degrees 0..2 of the
    normaliser column, read like :func:`_scan` with features of degree < 3 only. ``w [B, Hkv, L, 1]``
    is 1 for a far key, 0 otherwise."""
    B, Hkv, g, L, E = qs.shape
    n, Dm = run.n_mom, run.D_mom
    basis = get_basis(run.spec.d_key, n, run.spec.device, run.cd)

    def block(q, k, w_, C):
        T = q.shape[-2]
        qc, kc, wc = _chunks(q, run.chunk), _chunks(k, run.chunk), _chunks(w_, run.chunk)
        dC = (_phi(kc.mT, basis, dim=-2) @ wc)[..., 0]                                # [B, Hkv, n_c, Dm]
        start = dC.new_zeros(B, Hkv, 1, Dm) if C is None else C.to(run.cd)[:, :, None]
        before = torch.cat([start, dC[:, :, :-1]], dim=2).cumsum(dim=2)         # [B, Hkv, n_c, Dm]
        s = qc @ kc[:, :, None].mT                                              # [B, Hkv, g, n_c, c, c]
        mom = _chunk_moments(run, _phi(qc.mT, basis, dim=-2).mT, before, s, wc[..., 0])
        out = mom.flatten(-3, -2)[..., :T, :]                                   # [B, Hkv, g, T, n]
        C_new = dC.sum(dim=2) if C is None else C + dC.sum(dim=2)
        return out, C_new

    C0 = None if S0 is None else S0[:, :, -1, :Dm].to(run.cd)
    outs, _ = _blocks(run, block, _split(run, L, qs, ks, w), C0, B * Hkv * Dm * run.cd.itemsize)
    mom = torch.cat(outs, dim=-2) if outs else qs.new_zeros(B, Hkv, g, 0, n)
    return torch.nn.functional.pad(mom, (0, 3 - n))                             # [B, Hkv, g, L, 3]


def _chunk_moments(run: _Call, phiq, before, s, w):
    """``(N, sum s, sum s^2 / 2)`` (degrees ``< run.n_mom``) of each query's far scores ``[B, Hkv, g, n_c, c, n]``:
    before its chunk, its features against the normaliser row's degree blocks, and within it, its scores times
    the far-key flags (causal). ``phiq [B, Hkv, g, n_c, c, >= D_mom]`` (degrees 0.. of the basis), ``before
    [B, Hkv, n_c, D_mom]``, ``s [B, Hkv, g, n_c, c, c]`` (only its lower triangle is read), ``w [B, Hkv, n_c, c]``."""
    n, Dm = run.n_mom, run.D_mom
    fact = torch.tensor([math.factorial(m) for m in range(n)], dtype=run.cd, device=s.device)
    degree = torch.nn.functional.one_hot(run.deg[:Dm], n).to(run.cd)            # [Dm, n]: each feature's degree
    # each degree's block of phi(q) . before, as one product with the state spread over the degrees
    inter = phiq[..., :Dm] @ (before[..., None] * degree)[:, :, None]             # [B, Hkv, g, n_c, c, n]
    # within the chunk, sum_{j <= i} w_j s_ij^m: a running count for m = 0, then the causal powers of the
    # scores times the flags (a product per power, no [c, c] tensor of weighted flags)
    sums = [w.cumsum(-1)[:, :, None]]                                           # [B, Hkv, 1, n_c, c]
    wv, st, power = w[:, :, None, :, :, None], s.tril(), None                  # wv [B, Hkv, 1, n_c, c, 1]
    for _ in range(1, n):
        power = st if power is None else power * st                             # s^m on and below the diagonal
        sums.append((power @ wv)[..., 0])                                       # [B, Hkv, g, n_c, c]
    # (the count has one head axis: broadcast before stacking)
    return inter + torch.stack(torch.broadcast_tensors(*sums), dim=-1) / fact


# ---------------------------------------------------------------- the exact part
def _exact(run: _Call, qs, ks, vt, ext_f, sinks, n_tokens: int, causal: bool):
    """Softmax over each query's window (extended positions ``i < e <= i + W``; non-causal ``< i + 2W``) and
    sinks, unnormalised: ``(m, num, den)`` as :func:`sata.hybrid.exact_part`, block by block."""
    B, Hkv, g, L, E = qs.shape
    W = run.hybrid.window
    span = W if causal else max(2 * W - 1, 0)                                   # band width after e = i
    sink_ks, sink_v, sink_pos = sinks
    if span:  # keys past the end (non-causal) are never exact: zero rows, flag False
        pad = span - W
        ks = torch.nn.functional.pad(ks, (0, 0, 0, pad))
        vt = torch.nn.functional.pad(vt, (0, 0, 0, pad))
        ext_f = torch.nn.functional.pad(ext_f, (0, pad))

    def block(q, kb, vb, a: int, carry):
        T = q.shape[-2]
        i = torch.arange(a, a + T, device=q.device)
        parts_s, parts_m, parts_v = [], [], []
        if span:
            fb = ext_f[:, a + 1 : a + T + span]
            e = torch.arange(a + 1, a + T + span, device=q.device)
            band = (e[None, :] > i[:, None]) & (e[None, :] <= i[:, None] + span)          # [T, K]
            parts_s.append(q @ kb[:, :, None].mT)                                          # [B, Hkv, g, T, K]
            parts_m.append(band & fb[:, None, None, None, :])                               # [B, 1, 1, T, K]
            parts_v.append(vb)
        if sink_pos.shape[-1]:
            ok = sink_pos[:, None, None, None, :] >= 0
            if causal:
                ok = ok & (sink_pos[:, None, None, None, :] <= n_tokens + i[:, None])
            parts_s.append(q @ sink_ks[:, :, None].mT)                                     # [B, Hkv, g, T, S]
            parts_m.append(ok)
            parts_v.append(sink_v)
        if not parts_s:
            z = q.new_zeros(B, Hkv, g, T)
            return (z - math.inf, q.new_zeros(B, Hkv, g, T, run.spec.d_value), z), carry
        s = torch.cat(parts_s, dim=-1)
        mask = torch.cat([m.expand(B, 1, 1, T, m.shape[-1]) for m in parts_m], dim=-1)
        vals = torch.cat(parts_v, dim=-2)[:, :, None]                          # [B, Hkv, 1, K, Ev]
        return exact_part(s, mask, vals), carry

    starts = range(0, L, run.block)
    if span:  # block [a, a + T) reads the band rows a + 1 .. a + T + span - 1: its own rows of the shifted stream and
        # the next blocks' first ones (joined from the split blocks, so the backward pass stays per block)
        rows = [t[:, :, 1:].split(run.block, dim=-2) for t in (ks, vt[..., :-1])]
        need = 1 + -(-(span - 1) // run.block)
        band = lambda pieces, j, T: torch.cat(pieces[j:j + need], dim=-2)[:, :, :T + span - 1]
        blocks = [(q, band(rows[0], j, q.shape[-2]), band(rows[1], j, q.shape[-2]), a)
                  for j, ((q,), a) in enumerate(zip(_split(run, L, qs), starts))]
    else:
        blocks = [(q, None, None, a) for (q,), a in zip(_split(run, L, qs), starts)]
    outs, _ = _blocks(run, block, blocks, None)
    if not outs:
        z = qs.new_zeros(B, Hkv, g, 0)
        return z, qs.new_zeros(B, Hkv, g, 0, run.spec.d_value), z
    return tuple(torch.cat([o[j] for o in outs], dim=-2 if j == 1 else -1) for j in range(3))
