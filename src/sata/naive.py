"""The O(n^2) oracle: ``T_P`` applied to the score matrix. Obviously correct, never fast."""

from __future__ import annotations

import torch

from ._checks import check_inputs
from .features import taylor_exp

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

    Returns:
        ``[..., Hq, Lq, Ev]``.
    """
    spec = check_inputs(
        "naive_sata_attention", query, key, value, n_taylor=n_taylor, is_causal=is_causal, scale=scale,
        enable_gqa=enable_gqa, key_padding_mask=key_padding_mask,
    )
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
    num = w @ v                                                                 # [..., Hq, Lq, Ev]
    z = w.sum(dim=-1, keepdim=True)                                             # [..., Hq, Lq, 1]
    dead = z <= 0  # False for NaN: a NaN normaliser propagates, as in SDPA
    return torch.where(dead, 0.0, num / torch.where(dead, torch.ones_like(z), z)).to(query.dtype)
