"""The baselines ``sata`` is measured against, on the same inputs.

- :class:`KVCacheAttention`: conventional softmax attention as served in practice: SDPA on
  4-D ``[B, H, L, E]`` tensors, keys and values written in place into a preallocated cache
  (no ``torch.cat`` per token), each decode step attending over the filled prefix view.
  :func:`sdpa_causal` is its prefill: SDPA's causal kernel.
- :class:`PaperTaylorAttention`: the paper's formulation of the same truncated-Taylor
  attention, written here from ``MATH.md`` sections 2-3: for every power ``p`` separately,
  features ``x[..., M_p].prod(-1)`` with ``M_p = combinations_with_replacement(range(d), p)``
  (``m_p * p`` copied elements per vector), separate numerator and denominator states,
  multiplicities ``p! / prod_j c_j!`` applied at read-out, ``alpha_p = scale^p / p!``, and
  cumulative sums over tokens for causal input (``n x m_p x d_v`` materialised per power).

- :class:`PaperCode`: the paper's own code (``SymmetryAwareTaylorApproximatedAttention`` of
  ``sata_attention.py``, github.com/glassroom/sata_attention), loaded from a file the user supplies
  (it is not shipped here), driven for decode from a :class:`PaperTaylorAttention` state.

All compute in the dtype of their inputs.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..basis import check_n_taylor

__all__ = ["KVCacheAttention", "PaperCode", "PaperTaylorAttention", "sdpa_causal"]


# ---------------------------------------------------------------------------- conventional
def sdpa_causal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Causal softmax attention with torch's fused kernel: ``[B, H, L, E] -> [B, H, L, Ev]``."""
    return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale)


class KVCacheAttention:
    """Softmax attention decoding over a preallocated key/value cache.

    The cache holds ``capacity`` positions ``[B, H, capacity, E]``; a step writes the new key and
    value at position ``length`` (in place) and runs SDPA over the view ``[:, :, :length + 1]``.

    Args:
        batch, n_heads, d_key, d_value: shapes of the cache.
        capacity (int): positions to preallocate (context plus the tokens to decode).
        dtype, device: of the cache and of the inputs it accepts.
        scale (float, optional): score scale. Default: ``1 / sqrt(d_key)``.
    """

    def __init__(self, batch: int, n_heads: int, d_key: int, d_value: int, capacity: int, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", scale: float | None = None):
        self.k = torch.empty(batch, n_heads, capacity, d_key, dtype=dtype, device=device)    # [B, H, C, E]
        self.v = torch.empty(batch, n_heads, capacity, d_value, dtype=dtype, device=device)  # [B, H, C, Ev]
        self.length = 0
        self.scale = scale

    @staticmethod
    def nbytes_for(batch: int, n_heads: int, d_key: int, d_value: int, capacity: int, dtype: torch.dtype) -> int:
        """Bytes a cache of this shape holds."""
        return batch * n_heads * capacity * (d_key + d_value) * torch.empty((), dtype=dtype).element_size()

    @property
    def capacity(self) -> int:
        return self.k.shape[-2]

    @property
    def nbytes(self) -> int:
        """Bytes held by the whole preallocated cache."""
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def context_nbytes(self, length: int | None = None) -> int:
        """Bytes of the filled part of the cache (``length`` positions, default: all filled)."""
        n = self.length if length is None else length
        return self.nbytes * n // self.capacity

    def extend(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Append ``[B, H, T, E]`` keys and ``[B, H, T, Ev]`` values without attending."""
        t = key.shape[-2]
        if self.length + t > self.capacity:
            raise ValueError(f"KV cache full: {self.length} + {t} tokens > capacity {self.capacity}; "
                             "allocate a larger capacity")
        self.k[:, :, self.length:self.length + t].copy_(key)
        self.v[:, :, self.length:self.length + t].copy_(value)
        self.length += t

    def prefill(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Causal attention over a prompt on an empty cache, keeping its keys and values."""
        if self.length:
            raise ValueError("prefill needs an empty cache (length 0); call step() to continue")
        self.extend(key, value)
        return sdpa_causal(query, key, value, self.scale)

    def step(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """One decode token: ``[B, H, 1, E]`` query/key, ``[B, H, 1, Ev]`` value -> ``[B, H, 1, Ev]``."""
        n = self.length
        if n >= self.capacity:
            raise ValueError(f"KV cache full (capacity {self.capacity}); allocate a larger capacity")
        self.k[:, :, n].copy_(key[:, :, 0])
        self.v[:, :, n].copy_(value[:, :, 0])
        self.length = n + 1
        # the new token attends to every cached position including itself: no mask needed
        return F.scaled_dot_product_attention(query, self.k[:, :, : n + 1], self.v[:, :, : n + 1], scale=self.scale)


# ---------------------------------------------------------------------------- the paper's formulation
@dataclass(frozen=True)
class _Term:
    """One Taylor term ``p``: its monomial index matrix, multiplicities and constant."""

    p: int
    index: torch.Tensor         # [m_p, p] int64, rows i_1 <= ... <= i_p
    multiplicity: torch.Tensor  # [m_p], p! / prod_j c_j!
    alpha: float                # scale^p / p!
    _cast: dict = field(default_factory=dict, compare=False, repr=False)

    def counts(self, dtype: torch.dtype) -> torch.Tensor:
        """``multiplicity`` in ``dtype``, made once per dtype (the paper's code keeps its counts as a buffer: a
        cast per call would charge the baseline ~3% of a decode step it does not pay)."""
        c = self._cast.get(dtype)
        if c is None:
            c = self._cast[dtype] = self.multiplicity.to(dtype)
        return c


def _multiplicity(row: tuple[int, ...]) -> int:
    """Number of distinct orderings of a multi-index: ``p! / prod_j c_j!``."""
    return math.factorial(len(row)) // math.prod(math.factorial(c) for c in Counter(row).values())


class PaperTaylorAttention:
    r"""Truncated-Taylor attention in the paper's formulation, one pass per power.

    .. math:: y = \frac{\sum_p \alpha_p\, (C_p \odot \phi_p(q))^T H^S_p}{\sum_p \alpha_p\, (C_p \odot \phi_p(q))^T H^Z_p},
        \qquad \phi_p(x) = \prod_t x[M_p[:, t]],\quad H^S_p = \sum_j \phi_p(k_j) v_j^T,\quad H^Z_p = \sum_j \phi_p(k_j)

    A state is a list over ``p`` of pairs ``(H^S_p [B, H, m_p, Ev], H^Z_p [B, H, m_p])`` (already
    times ``alpha_p``). Methods are functional: they return new states and never modify one.

    Args:
        d_key (int): head size of queries and keys.
        n_taylor (int): number of terms ``P`` (powers ``0..P-1``).
        scale (float, optional): score scale. Default: ``1 / sqrt(d_key)`` (``alpha_p = 1 / (p! d^{p/2})``).
        device: where the index matrices live.
    """

    def __init__(self, d_key: int, n_taylor: int, scale: float | None = None, device: torch.device | str = "cpu"):
        check_n_taylor(n_taylor, "PaperTaylorAttention: n_taylor")
        self.d_key, self.n_taylor = d_key, n_taylor
        self.scale = d_key ** -0.5 if scale is None else float(scale)
        self.terms: list[_Term] = []
        for p in range(n_taylor):
            rows = list(itertools.combinations_with_replacement(range(d_key), p))
            index = torch.tensor(rows, dtype=torch.long, device=device).reshape(len(rows), p)   # [m_p, p]
            mult = torch.tensor([_multiplicity(r) for r in rows], dtype=torch.float64, device=device)
            self.terms.append(_Term(p, index, mult, self.scale ** p / math.factorial(p)))

    # ---------------------------------------------------------------- sizes
    def state_numel(self, d_value: int) -> int:
        """Floats per head in the numerator and denominator states of all terms."""
        return sum(t.index.shape[0] * (d_value + 1) for t in self.terms)

    def causal_nbytes(self, batch: int, n_heads: int, length: int, d_value: int, dtype: torch.dtype) -> int:
        """Approximate peak bytes of :meth:`causal` (the largest term's cumulative sums dominate)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        worst = 0
        for t in self.terms:
            m = t.index.shape[0]
            # summands, their cumsum and its scaled copy (numerator and denominator), plus the gathered copies
            worst = max(worst, 3 * m * (d_value + 1) + 2 * m * max(t.p, 1))
        return batch * n_heads * length * (worst + 2 * (d_value + 1)) * itemsize

    # ---------------------------------------------------------------- pieces
    @staticmethod
    def features(x: torch.Tensor, term: _Term) -> torch.Tensor:
        """``[..., d] -> [..., m_p]``: gather ``p`` copies of ``x`` and multiply them (1 for ``p = 0``)."""
        return x[..., term.index].prod(dim=-1)                                   # [..., m_p, p] -> [..., m_p]

    def empty_state(self, batch: int, n_heads: int, d_value: int, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(torch.zeros(batch, n_heads, t.index.shape[0], d_value, dtype=dtype, device=device),
                 torch.zeros(batch, n_heads, t.index.shape[0], dtype=dtype, device=device)) for t in self.terms]

    def _read(self, phi_q: torch.Tensor, term: _Term, num: torch.Tensor, den: torch.Tensor):
        """Weighted read-out of one term: multiplicities applied to the query features here."""
        wq = phi_q * term.counts(phi_q.dtype)                                    # [..., Lq, m_p]
        return wq @ num, (wq * den.unsqueeze(-2)).sum(-1)                       # [..., Lq, Ev], [..., Lq]

    @staticmethod
    def _finish(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        return torch.nan_to_num(num / den[..., None])                            # [..., L, Ev]

    # ---------------------------------------------------------------- modes
    def absorb(self, key: torch.Tensor, value: torch.Tensor, state=None):
        """Add ``[B, H, L, E]`` keys and ``[B, H, L, Ev]`` values to a state (non-causal sum over tokens)."""
        if state is None:
            state = self.empty_state(*key.shape[:2], value.shape[-1], dtype=value.dtype, device=value.device)
        new = []
        for term, (num, den) in zip(self.terms, state):
            phi_k = self.features(key, term)                                     # [B, H, L, m_p]
            new.append((num + term.alpha * (phi_k.transpose(-1, -2) @ value),    # [B, H, m_p, Ev]
                        den + term.alpha * phi_k.sum(-2)))                       # [B, H, m_p]
        return new

    def step(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, state=None):
        """One decode token ``[B, H, 1, E]`` against a state: update it, then read it. Returns ``(y, state)``."""
        if state is None:
            state = self.empty_state(*key.shape[:2], value.shape[-1], dtype=value.dtype, device=value.device)
        num_out = den_out = 0.0
        new = []
        for term, (num, den) in zip(self.terms, state):
            phi_q = self.features(query, term)                                   # [B, H, 1, m_p]
            phi_k = self.features(key, term)[:, :, 0]                            # [B, H, m_p]
            num = num + term.alpha * phi_k[..., None] * value                    # [B, H, m_p, Ev]
            den = den + term.alpha * phi_k                                       # [B, H, m_p]
            n, z = self._read(phi_q, term, num, den)
            num_out, den_out = num_out + n, den_out + z
            new.append((num, den))
        return self._finish(num_out, den_out), new

    def causal(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, state=None):
        """Causal attention over ``L`` tokens by cumulative sums. Returns ``(y [B, H, L, Ev], state)``."""
        num_out = den_out = 0.0
        new = []
        for i, term in enumerate(self.terms):
            phi_q = self.features(query, term)                                   # [B, H, L, m_p]
            phi_k = self.features(key, term)                                     # [B, H, L, m_p]
            num = (phi_k[..., None] * value[..., None, :]).cumsum(dim=-3) * term.alpha   # [B, H, L, m_p, Ev]
            den = phi_k.cumsum(dim=-2) * term.alpha                              # [B, H, L, m_p]
            if state is not None:
                num = num + state[i][0][:, :, None]
                den = den + state[i][1][:, :, None]
            wq = phi_q * term.counts(phi_q.dtype)                                # [B, H, L, m_p]
            num_out = num_out + (wq[..., None, :] @ num).squeeze(-2)             # [B, H, L, Ev]
            den_out = den_out + (wq * den).sum(-1)                               # [B, H, L]
            new.append((num[:, :, -1], den[:, :, -1]))
        return self._finish(num_out, den_out), new


# ---------------------------------------------------------------------------- the paper's own code
class PaperCode:
    """The paper's reference implementation, one decode step at a time.

    Its module keeps the state itself (``prev_H_S [B, H, 1, m_p, Ev]`` and ``prev_H_Z [B, H, 1, m_p, 1]`` per
    term, already times ``alpha_p``, monomials in ``combinations_with_replacement`` order): exactly the layout
    of a :class:`PaperTaylorAttention` state with one more axis, so :meth:`load_state` sets it from one, and a
    decode step is the module's own ``forward(q, k, v, continue_prev=True)``.

    Args:
        path: the reference's ``sata_attention.py`` (e.g. from a clone of github.com/glassroom/sata_attention).
        d_key, d_value, n_taylor: the head sizes and terms (its scale is ``1 / sqrt(d_key)``).
        device, dtype: of its buffers (its constants in the inputs' dtype: its einsum takes one dtype).
    """

    def __init__(self, path: str | os.PathLike, d_key: int, d_value: int, n_taylor: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--paper-code {path}: no such file; pass the paper's sata_attention.py "
                                    "(github.com/glassroom/sata_attention)")
        spec = importlib.util.spec_from_file_location("sata_paper_reference", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        cls = getattr(module, "SymmetryAwareTaylorApproximatedAttention", None)
        if cls is None:
            raise ValueError(f"--paper-code {path}: no SymmetryAwareTaylorApproximatedAttention in that file; pass the "
                             "paper's sata_attention.py (github.com/glassroom/sata_attention)")
        self.path = str(path)
        self.attn = cls(d_key, d_value, is_causal=True, n_taylor=n_taylor).to(device=device, dtype=dtype)

    def load_state(self, state: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Set the module's state from a :class:`PaperTaylorAttention` state (copied: steps update the module's)."""
        for term, (num, den) in zip(self.attn.tptts, state):
            term.prev_H_S = num[:, :, None].clone()                              # [B, H, 1, m_p, Ev]
            term.prev_H_Z = den[:, :, None, :, None].clone()                     # [B, H, 1, m_p, 1]

    def step(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """One token ``[B, H, 1, E]``: the module absorbs it and reads its state. Returns ``y [B, H, 1, Ev]``."""
        return self.attn(query, key, value, continue_prev=True)
