"""Feature map ``phi`` of the truncated Taylor kernel and the polynomial ``T_P`` itself.

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


def _phi(x: torch.Tensor, basis: TaylorBasis) -> torch.Tensor:
    """Features of already-scaled inputs: ``[..., d] -> [..., D]``, all degrees in one vector."""
    ones = x.new_ones(x.shape[:-1] + (1,))                          # [..., 1]   degree 0
    if basis.n_taylor == 1:
        return ones
    blocks = [ones, x]                                               # degree 1 is x itself
    if basis.n_taylor > 2:
        # the variable each monomial of degree >= 2 adds to its parent, with its weight
        step = x.index_select(-1, basis.last) * basis.weight        # [..., D - 1 - d]
        prev, lo = x, 0
        for p, parent in enumerate(basis.parents, start=2):
            m = basis.sizes[p]
            prev = prev.index_select(-1, parent) * step[..., lo : lo + m]   # [..., m_p]
            blocks.append(prev)
            lo += m
    return torch.cat(blocks, dim=-1)                                 # [..., D]


def _phi_t(xt: torch.Tensor, basis: TaylorBasis) -> torch.Tensor:
    """Feature-major features of already-scaled inputs: ``[..., d, T] -> [..., D, T]``.

    The same features as :func:`_phi`, transposed. Every gather copies whole rows of ``T``
    tokens, which is what makes bulk feature maps fast (a gather along the last dimension
    copies single elements).
    """
    ones = xt.new_ones(xt.shape[:-2] + (1, xt.shape[-1]))                  # [..., 1, T]   degree 0
    if basis.n_taylor == 1:
        return ones
    blocks = [ones, xt]                                                      # [..., d, T]   degree 1
    if basis.n_taylor > 2:
        step = xt.index_select(-2, basis.last) * basis.weight[:, None]       # [..., D - 1 - d, T]
        prev, lo = xt, 0
        for p, parent in enumerate(basis.parents, start=2):
            m = basis.sizes[p]
            prev = prev.index_select(-2, parent) * step[..., lo : lo + m, :]  # [..., m_p, T]
            blocks.append(prev)
            lo += m
    return torch.cat(blocks, dim=-2)                                         # [..., D, T]


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
