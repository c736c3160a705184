"""The symmetric (tightly packed) monomial basis of the truncated Taylor kernel.

For head size ``d`` and ``n_taylor = P`` terms, degree ``p < P`` contributes the
``m_p = C(d + p - 1, p)`` distinct monomials ``x_{i_1} ... x_{i_p}`` with
``i_1 <= ... <= i_p``. They are kept in co-lexicographic (colex) order, which makes
every degree-``p`` monomial a degree-``(p-1)`` *parent* times one variable (its
largest index, ``last``), so the features of degree ``p`` are one gather of the
degree-``(p-1)`` block and one multiply (see ``MATH.md`` section 2).

The weights come from the multinomial theorem:

    <q, k>^p = sum_i  p! / prod_j c_j!  *  prod_t q_{i_t} * prod_t k_{i_t}

so each side carries ``1 / sqrt(prod_j c_j!)`` and the ``1/p!`` of the Taylor term
is absorbed; along the hierarchy that is one factor ``1/sqrt(c_last)`` per step.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch

from .budget import check_budget

__all__ = [
    "TaylorBasis",
    "feature_dim",
    "flops_per_token",
    "get_basis",
    "monomial_counts",
    "state_size",
]


def check_n_taylor(n_taylor: object, where: str = "n_taylor") -> int:
    """``n_taylor`` if it is a positive int, else ``ValueError`` naming ``where`` and the fix."""
    if not isinstance(n_taylor, int) or isinstance(n_taylor, bool) or n_taylor < 1:
        raise ValueError(
            f"{where} must be a positive int (the number of Taylor terms, degrees 0..n_taylor-1), got {n_taylor!r}; "
            "odd values (3, 5) keep every attention weight positive"
        )
    return n_taylor


def monomial_counts(d_key: int, n_taylor: int) -> list[int]:
    """``[m_0, ..., m_{P-1}]`` with ``m_p = C(d + p - 1, p)``: distinct monomials per degree."""
    return [math.comb(d_key + p - 1, p) for p in range(n_taylor)]


def feature_dim(d_key: int, n_taylor: int) -> int:
    """Features per head ``D = sum_p m_p = C(d + P - 1, P - 1)`` (hockey-stick identity)."""
    return math.comb(d_key + n_taylor - 1, n_taylor - 1)


def state_size(d_key: int, d_value: int, n_taylor: int, *, window: int = 0, sinks: int = 0) -> int:
    """Floats in one head's state: ``D * (d_value + 1) + (window + sinks) * (d_key + d_value)``.

    The extra value column is the normaliser (denominator), fused into the same state. With a window
    or sinks (``MATH.md`` section 6) the state also keeps their keys and values (and one flag or position
    per slot and batch row, not counted here).
    """
    return feature_dim(d_key, n_taylor) * (d_value + 1) + (window + sinks) * (d_key + d_value)


def flops_per_token(d_key: int, d_value: int, n_taylor: int) -> int:
    """FLOPs of one decode step for one head (its query and its key/value), state size fixed.

    Counted as: scaling q and k (``2 d``); every feature of degree >= 2 costs two
    multiplies (parent times variable, times its weight) for q and for k
    (``4 (D - 1 - d)``); the rank-1 state update ``S += phi(k) [v, 1]^T`` and the
    read-out ``phi(q)^T S`` are ``2 D (d_value + 1)`` each (multiply-add = 2 FLOPs);
    the normalisation is ``d_value`` divisions. Independent of the context length.
    """
    D = feature_dim(d_key, n_taylor)
    n_high = max(D - 1 - d_key, 0) if n_taylor > 1 else 0
    scale_ops = 2 * d_key if n_taylor > 1 else 0
    return scale_ops + 4 * n_high + 4 * D * (d_value + 1) + d_value


@dataclass(frozen=True, eq=False)
class TaylorBasis:
    """Colex feature hierarchy for head size ``d`` and ``n_taylor`` terms (degrees ``0..P-1``).

    Attributes:
        d: head size of queries and keys.
        n_taylor: number of Taylor terms ``P``.
        sizes: ``m_p`` for ``p = 0..P-1``.
        offsets: start of degree ``p`` inside the feature vector, ``len = P + 1``;
            ``offsets[-1] == D``.
        parents: per degree ``p >= 2``, ``[m_p]`` int64 index into the degree-``(p-1)`` block.
        last: ``[D - 1 - d]`` int64, the largest variable of every degree >= 2 monomial.
        weight: ``[D - 1 - d]``, ``1/sqrt(c_last)``: the step weight along the hierarchy.
    """

    d: int
    n_taylor: int
    sizes: tuple[int, ...]
    offsets: tuple[int, ...]
    parents: tuple[torch.Tensor, ...]
    last: torch.Tensor
    weight: torch.Tensor

    @property
    def dim(self) -> int:
        """Total feature dimension ``D``."""
        return self.offsets[-1]

    def degree_slice(self, p: int) -> slice:
        """Slice of degree ``p`` inside a ``[..., D]`` feature vector."""
        if not 0 <= p < self.n_taylor:
            raise ValueError(f"degree p={p} is outside 0..{self.n_taylor - 1} for n_taylor={self.n_taylor}")
        return slice(self.offsets[p], self.offsets[p + 1])

    def multi_indices(self, p: int) -> torch.Tensor:
        """``[m_p, p]`` int64 sorted multi-indices of degree ``p`` in colex order.

        Diagnostics and tests only: the feature map never builds this matrix.
        """
        self.degree_slice(p)
        rows = torch.zeros(1, 0, dtype=torch.long)
        for q in range(1, p + 1):
            parent = self.parents[q - 2].cpu() if q >= 2 else torch.zeros(self.d, dtype=torch.long)
            lo = self.offsets[q] - 1 - self.d if q >= 2 else 0
            last = self.last[lo : lo + self.sizes[q]].cpu() if q >= 2 else torch.arange(self.d)
            rows = torch.cat([rows[parent], last[:, None]], dim=1)
        return rows


def _build(d: int, n_taylor: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
    """Parents, last indices and step weights of degrees ``2..P-1`` (CPU, float64 weights)."""
    parents: list[torch.Tensor] = []
    lasts: list[torch.Tensor] = []
    weights: list[torch.Tensor] = []
    # degree 1: monomial j is x_j; its last index is j, occurring once
    prev_last = torch.arange(d)
    prev_count = torch.ones(d, dtype=torch.long)
    for p in range(2, n_taylor):
        # degree-p monomials with largest index j = the first C(j+p-1, p-1) degree-(p-1)
        # monomials (those over variables 0..j) times x_j
        block = [math.comb(j + p - 1, p - 1) for j in range(d)]
        parent = torch.cat([torch.arange(n) for n in block])
        last = torch.repeat_interleave(torch.arange(d), torch.tensor(block))
        count = torch.where(prev_last[parent] == last, prev_count[parent] + 1, torch.ones_like(parent))
        parents.append(parent)
        lasts.append(last)
        weights.append(count.double().rsqrt())
        prev_last, prev_count = last, count
    if not lasts:
        empty = torch.zeros(0, dtype=torch.long)
        return (), empty, empty.double()
    return tuple(parents), torch.cat(lasts), torch.cat(weights)


@functools.lru_cache(maxsize=64)
def _build_cached(d: int, n_taylor: int):
    return _build(d, n_taylor)


@functools.lru_cache(maxsize=64)
def get_basis(d: int, n_taylor: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> TaylorBasis:
    """The cached :class:`TaylorBasis` for ``(d, n_taylor)`` with index tensors on ``device``
    and weights in ``dtype``. Built once per combination."""
    if not isinstance(d, int) or isinstance(d, bool) or d < 1:
        raise ValueError(f"head size d must be a positive int, got {d!r}")
    check_n_taylor(n_taylor)
    device = torch.device(device)
    D = feature_dim(d, n_taylor)
    check_budget(
        D * 24,
        f"The feature basis for head size d={d} with n_taylor={n_taylor} (D={D:,} features)",
        "Use fewer Taylor terms or smaller heads.",
    )
    sizes = tuple(monomial_counts(d, n_taylor))
    offsets = tuple(itertools.accumulate(sizes, initial=0))
    parents, last, weight = _build_cached(d, n_taylor)
    return TaylorBasis(
        d=d,
        n_taylor=n_taylor,
        sizes=sizes,
        offsets=offsets,
        parents=tuple(t.to(device) for t in parents),
        last=last.to(device),
        weight=weight.to(device=device, dtype=dtype),
    )

