"""The O(n^2) oracle: ``T_P`` applied to the score matrix. Obviously correct, never fast."""

from __future__ import annotations

import torch

from ._checks import check_inputs
from .features import _normalize_rows, taylor_exp

__all__ = ["naive_sata_attention"]


def naive_sata_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, n_taylor: int = 3, is_causal: bool = False,
    scale: float | None = None, enable_gqa: bool = False, key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Reference truncated-Taylor attention, materialising the ``[..., Hq, Lq, Lk]`` weights.

    .. math:: Y = \mathrm{rownorm}\big(\mathrm{mask}(T_P(\mathrm{scale}\, Q K^T))\big)\, V

    Same arguments and conventions as :func:`sata.sata_attention` (without a state):
    computed in float32 (float64 for float64 inputs), returned in the input dtype; a
    row whose normaliser is not positive gives 0.

    Args:
        query (torch.Tensor): ``[..., Hq, Lq, E]``.
        key (torch.Tensor): ``[..., Hkv, Lk, E]``.
        value (torch.Tensor): ``[..., Hkv, Lk, Ev]``.
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
    q, k, v = (t.to(spec.compute_dtype) for t in (query, key, value))
    if spec.group > 1:
        k = k.repeat_interleave(spec.group, dim=-3)                             # [..., Hq, Lk, E]
        v = v.repeat_interleave(spec.group, dim=-3)                             # [..., Hq, Lk, Ev]
    w = taylor_exp(spec.scale * (q @ k.transpose(-1, -2)), spec.n_taylor)      # [..., Hq, Lq, Lk]
    if is_causal:
        future = torch.ones(spec.len_q, spec.len_k, dtype=torch.bool, device=q.device).triu(1)
        w = w.masked_fill(future, 0.0)
    if key_padding_mask is not None:
        w = w.masked_fill(key_padding_mask[..., None, None, :], 0.0)
        # a padded key's value must not reach the product either (0 * NaN is NaN)
        v = v.masked_fill(key_padding_mask[..., None, :, None], 0.0)
    if attn_mask is not None:
        w = w.masked_fill(~attn_mask, 0.0)
    return _normalize_rows(w @ v, w.sum(dim=-1, keepdim=True)).to(query.dtype)   # [..., Hq, Lq, Ev]


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
