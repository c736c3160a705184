"""The O(n^2) oracle: ``T_P`` applied to the score matrix. Obviously correct, never fast."""

from __future__ import annotations

import torch

from ._checks import check_inputs
from .features import _normalize_rows, taylor_exp
from .hybrid import check_hybrid, centre, combine, exact_part, per_head

__all__ = ["naive_sata_attention"]


def naive_sata_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    n_taylor: int = 3,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    window: int = 0,
    sinks: int = 0,
    taylor_mix: float | torch.Tensor = 1.0,
    recentre: float | torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Reference truncated-Taylor attention, materialising the ``[..., Hq, Lq, Lk]`` weights.

    .. math:: Y = \mathrm{rownorm}\big(\mathrm{mask}(T_P(\mathrm{scale}\, Q K^T))\big)\, V

    Same arguments and conventions as :func:`sata.sata_attention` (without a state):
    computed in float32 (float64 for float64 inputs), returned in the input dtype; a
    row whose normaliser is not positive gives 0.

    With ``window``, ``sinks`` or ``recentre`` (``MATH.md`` section 6) the weights of query ``i`` are
    ``e^{s_ij - m_i}`` on its exact keys ``E_i`` (the ``window`` most recent positions, and the first
    ``sinks`` kept keys) and ``beta e^{c_i - m_i} T_P(s_ij - c_i)`` on every other visible key ``F_i``,
    where ``c_i = mean - alpha * sd`` of its scores over ``F_i`` (``c_i = 0`` without ``recentre``) and
    ``m_i = max(max_{E_i} s_ij, c_i)``; computed here directly on the score matrix.

    Args:
        query (torch.Tensor): ``[..., Hq, Lq, E]``.
        key (torch.Tensor): ``[..., Hkv, Lk, E]``.
        value (torch.Tensor): ``[..., Hkv, Lk, Ev]``.
        window, sinks, taylor_mix, recentre: as in :func:`sata.sata_attention`. Default: the plain op.
        attn_mask (torch.Tensor, optional): bool keep mask broadcastable to ``[..., Hq, Lq, Lk]``,
            ``True`` = query ``i`` attends to key ``j`` (SDPA's boolean convention); combined with
            ``is_causal`` and ``key_padding_mask``. Oracle only: a state cannot represent an
            arbitrary mask. A key it hides still meets its value with weight 0 (keep values finite).

    Returns:
        ``[..., Hq, Lq, Ev]``.
    """
    spec = check_inputs(
        "naive_sata_attention", query, key, value, n_taylor=n_taylor, is_causal=is_causal, scale=scale,
        enable_gqa=enable_gqa, key_padding_mask=key_padding_mask,
    )
    weights_shape = (*spec.batch_shape, spec.n_q_heads, spec.len_q, spec.len_k)
    if attn_mask is not None:
        _check_attn_mask(attn_mask, weights_shape, query.device)
    hybrid = check_hybrid(
        "naive_sata_attention", window=window, sinks=sinks, taylor_mix=taylor_mix, recentre=recentre,
        n_taylor=spec.n_taylor, n_q_heads=spec.n_q_heads, device=query.device,
    )
    q, k, v = (t.to(spec.compute_dtype) for t in (query, key, value))
    if spec.group > 1:
        k = k.repeat_interleave(spec.group, dim=-3)                             # [..., Hq, Lk, E]
        v = v.repeat_interleave(spec.group, dim=-3)                             # [..., Hq, Lk, Ev]
    s = spec.scale * (q @ k.transpose(-1, -2))                                  # [..., Hq, Lq, Lk]
    visible = torch.ones(spec.len_q, spec.len_k, dtype=torch.bool, device=q.device)
    if is_causal:
        visible = visible.tril()
    if key_padding_mask is not None:
        visible = visible & ~key_padding_mask[..., None, None, :]               # [..., 1, Lq, Lk]
        # a padded key's value must not reach the product either (0 * NaN is NaN)
        v = v.masked_fill(key_padding_mask[..., None, :, None], 0.0)
    if attn_mask is not None:
        visible = visible & attn_mask                                          # [..., Hq|1, Lq, Lk]
    if hybrid.plain:
        w = taylor_exp(s, spec.n_taylor).masked_fill(~visible, 0.0)            # [..., Hq, Lq, Lk]
        return _normalize_rows(w @ v, w.sum(dim=-1, keepdim=True)).to(query.dtype)   # [..., Hq, Lq, Ev]
    if spec.len_k == 0:  # no keys: every output 0, as the op gives (its reductions over keys have nothing to reduce)
        return (s @ v).to(query.dtype)                                          # [..., Hq, Lq, Ev] zeros
    exact = visible & _exact_keys(spec, hybrid, key_padding_mask, is_causal, q.device)   # [..., Hq|1, Lq, Lk]
    return _hybrid(s, v, exact, visible & ~exact, spec, hybrid).to(query.dtype)


def _hybrid(s, v, exact, far, spec, hybrid) -> torch.Tensor:
    """``exp`` on the exact keys, ``beta e^{c - m} T_P(s - c)`` on the far ones, one normaliser: ``[..., Hq, Lq, Ev]``."""
    alpha, beta = (per_head(x, (spec.n_q_heads, 1), spec.compute_dtype) for x in (hybrid.recentre, hybrid.taylor_mix))
    farf = far.to(s.dtype).expand_as(s)                                         # [..., Hq, Lq, Lk]
    if hybrid.recentre is None:
        c = torch.zeros_like(s[..., 0])                                         # [..., Hq, Lq]
    else:
        moments = torch.stack([farf.sum(-1), (s * farf).sum(-1), (s * s / 2 * farf).sum(-1)], dim=-1)
        c = centre(moments, alpha)                                              # [..., Hq, Lq]
    T = taylor_exp(s - c[..., None], spec.n_taylor) * farf                     # [..., Hq, Lq, Lk]
    U_far = torch.cat([T @ v, T.sum(dim=-1, keepdim=True)], dim=-1)           # [..., Hq, Lq, Ev + 1]
    m, num, den = exact_part(s, exact, v)
    return combine(m, num, den, U_far, c, far.any(dim=-1), beta, spec.d_value, s.dtype)

def _exact_keys(spec, hybrid, key_padding_mask, is_causal: bool, device) -> torch.Tensor:
    """``[..., 1, Lq, Lk]`` bool: key ``j`` is in query ``i``'s window, or is one of the first ``sinks`` kept keys."""
    i = torch.arange(spec.len_q, device=device)[:, None]
    j = torch.arange(spec.len_k, device=device)[None, :]
    gap = i - j if is_causal else (i - j).abs()
    exact = (gap >= 0) & (gap < hybrid.window)                                   # [Lq, Lk]
    kept = torch.ones(spec.len_k, dtype=torch.bool, device=device) if key_padding_mask is None else ~key_padding_mask
    rank = kept.long().cumsum(-1) - 1                                           # [..., Lk] among kept keys
    sink = kept & (rank < hybrid.sinks)                                         # [..., Lk]
    return exact | sink[..., None, None, :]


def _check_attn_mask(mask: object, shape: tuple[int, ...], device: torch.device) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(
            "naive_sata_attention: attn_mask must be a bool tensor (True = attend), got "
            f"{type(mask).__name__ if not isinstance(mask, torch.Tensor) else mask.dtype}; "
            "for an additive float mask use mask == 0"
        )
    try:
        ok = torch.broadcast_shapes(mask.shape, shape) == shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(
            f"naive_sata_attention: attn_mask of shape {tuple(mask.shape)} does not broadcast to the weights "
            f"[..., Hq, Lq, Lk] = {shape}"
        )
    if mask.device != device:
        raise ValueError(f"naive_sata_attention: attn_mask is on {mask.device}, query on {device}")
