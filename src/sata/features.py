"""Feature map ``phi`` of the truncated Taylor kernel, the polynomial ``T_P`` itself, and the row
normalisation every path and the oracle share (``MATH.md`` sections 1-3).

    <phi(q), phi(k)> = T_P(scale * <q, k>) = sum_{p < P} (scale <q, k>)^p / p!

``phi`` is built degree by degree through the colex hierarchy of
:mod:`sata.basis`: one gather of the previous degree and one multiply per degree,
never an ``[m_p, p]`` index matrix or ``p`` copies of the input.
"""

from __future__ import annotations

import math

import torch

from .basis import TaylorBasis, get_basis

__all__ = ["taylor_exp", "taylor_features"]


def taylor_exp(s: torch.Tensor, n_taylor: int) -> torch.Tensor:
    r"""Truncated exponential ``T_P(s) = sum_{p=0}^{P-1} s^p / p!`` by Horner's rule.

    Args:
        s (torch.Tensor): scores of any shape, e.g. ``[B, H, Lq, Lk]``.
        n_taylor (int): number of terms ``P >= 1``.

    Returns:
        A tensor shaped like ``s``. Strictly positive for odd ``P``; for even ``P`` it is
        negative below ``s ~ -1.6`` (``P = 4``).
    """
    if n_taylor == 1:
        return torch.ones_like(s)
    # T = 1 + s (1 + s/2 (1 + s/3 (... (1 + s/(P-1)))))
    one = s.new_ones(())
    r = torch.add(one, s, alpha=1.0 / (n_taylor - 1))
    for p in range(n_taylor - 2, 0, -1):
        r = torch.addcmul(one, r, s, value=1.0 / p)
    return r


def _phi(x: torch.Tensor, basis: TaylorBasis, dim: int = -1) -> torch.Tensor:
    """Features of already-scaled inputs along ``dim``: ``[..., d] -> [..., D]`` (``dim=-1``), or
    feature-major ``[..., d, T] -> [..., D, T]`` (``dim=-2``), all degrees in one vector.

    Feature-major is what makes bulk feature maps fast: every gather copies whole rows of ``T``
    tokens, where a gather along the last dimension copies single elements.
    """
    shape = list(x.shape)
    shape[dim] = 1
    ones = x.new_ones(shape)                                          # degree 0
    if basis.n_taylor == 1:
        return ones
    blocks = [ones, x]                                                # degree 1 is x itself
    if basis.n_taylor > 2:
        # the variable each monomial of degree >= 2 adds to its parent, with its weight
        weight = basis.weight if dim == -1 else basis.weight[:, None]
        step = x.index_select(dim, basis.last) * weight              # [..., D - 1 - d] along dim
        prev, lo = x, 0
        for p, parent in enumerate(basis.parents, start=2):
            m = basis.sizes[p]
            prev = prev.index_select(dim, parent) * step.narrow(dim, lo, m)   # [..., m_p] along dim
            blocks.append(prev)
            lo += m
    return torch.cat(blocks, dim=dim)                                 # [..., D] along dim


def _normalize_rows(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` row by row, ``0`` where the normaliser ``den`` is not positive (no keys, or an
    even ``n_taylor`` summing to ``<= 0``). A NaN normaliser propagates, as in SDPA (``NaN <= 0`` is
    False); the inner ``where`` keeps the unused branch finite so its gradient is 0, not NaN."""
    dead = den <= 0
    return torch.where(dead, 0.0, num / torch.where(dead, torch.ones_like(den), den))


def _split_scale(scale: float) -> tuple[float, float]:
    """``(sq, sk)`` with ``sq * sk = scale``, the factors the query and key sides carry; the sign of a
    negative scale rides on the query side."""
    root = math.sqrt(abs(scale))
    return math.copysign(root, scale), root


def taylor_features(x: torch.Tensor, n_taylor: int, scale: float | None = None) -> torch.Tensor:
    r"""Symmetric-power features of the truncated Taylor kernel.

    .. math::  \langle \phi(q), \phi(k) \rangle = \sum_{p<P} (\mathrm{scale}\, q \cdot k)^p / p!

    Args:
        x (torch.Tensor): queries or keys ``[..., d]``, floating point.
        n_taylor (int): number of Taylor terms ``P`` (degrees ``0..P-1``).
        scale (float, optional): score scale; each side carries ``sqrt(scale)``.
            Default: ``1 / sqrt(d)``.

    Returns:
        ``[..., D]`` with ``D = C(d + P - 1, P - 1)``, degrees concatenated in order;
        ``sata.get_basis(d, P).degree_slice(p)`` locates degree ``p``.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}"
                        f"{'' if not isinstance(x, torch.Tensor) else ' of dtype ' + str(x.dtype)}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have a non-empty last (feature) dimension, got shape {tuple(x.shape)}")
    d = x.shape[-1]
    scale = d ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"scale must be a finite non-negative float for a symmetric feature map, got {scale}")
    basis = get_basis(d, n_taylor, x.device, x.dtype)
    return _phi(x * math.sqrt(scale), basis)
