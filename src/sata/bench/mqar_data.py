"""Multi-query associative recall (MQAR) data, as Zoology defines it.

Source: Arora, Eyuboglu et al., "Zoology: Measuring and Improving Recall in Efficient Language
Models" (arXiv 2312.04927), generator ``multiquery_ar`` in ``zoology/data/multiquery_ar.py`` of
github.com/HazyResearch/zoology (studied, not copied; this is a vectorised re-implementation).

One example of ``L`` tokens with ``N`` key/value pairs::

    k_1 v_1 k_2 v_2 ... k_N v_N | x x k_7 x x x k_2 x ... x       (x: a random token)
    answers:                          ^ v_7       ^ v_2

- The first ``2N`` tokens are the pairs. Keys are ``N`` distinct tokens of ``[1, V/2)``, values
  ``N`` distinct tokens of ``[V/2, V)`` (``V``: vocabulary size).
- The query region is the other ``L - 2N`` tokens: ``space = (L - 2N) / 2`` even slots. Every key
  is queried once, key ``i`` at slot ``g_i`` (absolute position ``2N + 2 g_i``); the slots are drawn
  without replacement with ``P(g) ~ (g + 1)^(a - 1)``, ``a = power_a`` (a power law favouring
  early slots: the gap between a bigram and its repetition in text).
- Every other position holds a token drawn uniformly from the whole vocabulary (Zoology's
  ``random_non_queries=True``), so a key may also appear as noise.
- The target at a query position is its key's value; loss and accuracy count only there.

Zoology returns full label rows (``-100`` = ignored) and computes logits at every position;
we return the query positions and their answers, so that a model computes logits only there.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

__all__ = ["MQARBatch", "mqar_batch", "slice_generator", "slice_name"]

VOCAB_SIZE = 8192    # Zoology's default: large vocabularies separate architectures (Zoology section 3)
POWER_A = 0.01       # Zoology's train_power_a and test_power_a


@dataclass(frozen=True)
class MQARBatch:
    """``n`` examples of one slice ``(L, N)``.

    Attributes:
        inputs (torch.Tensor): ``[n, L]`` int64 tokens.
        positions (torch.Tensor): ``[n, N]`` int64 query positions (key ``i`` of the context is
            queried at ``positions[:, i]``).
        answers (torch.Tensor): ``[n, N]`` int64: the value to predict at each query position.
    """

    inputs: torch.Tensor
    positions: torch.Tensor
    answers: torch.Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, index: slice) -> MQARBatch:
        return MQARBatch(self.inputs[index], self.positions[index], self.answers[index])


def check_slice(seq_len: int, n_pairs: int, vocab_size: int) -> None:
    """Raise a ``ValueError`` naming the argument if ``(seq_len, n_pairs, vocab_size)`` is not an MQAR slice."""
    for name, value in (("seq_len", seq_len), ("n_pairs", n_pairs), ("vocab_size", vocab_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"MQAR: {name} must be a positive int, got {value!r}")
    if seq_len % 2:
        raise ValueError(f"MQAR: seq_len must be even (queries sit on even slots), got {seq_len}")
    if 4 * n_pairs > seq_len:
        raise ValueError(f"MQAR: {n_pairs} pairs need seq_len >= 4 n_pairs = {4 * n_pairs} (2N tokens of pairs "
                         f"and N query slots of two tokens), got seq_len={seq_len}; use fewer pairs")
    if vocab_size <= seq_len or vocab_size // 2 - 1 < n_pairs:
        raise ValueError(f"MQAR: vocab_size={vocab_size} is too small for seq_len={seq_len}, n_pairs={n_pairs} "
                         f"(Zoology requires vocab_size > seq_len, and V/2 - 1 >= n_pairs distinct keys)")


def mqar_batch(n: int, seq_len: int, n_pairs: int, *, vocab_size: int = VOCAB_SIZE, power_a: float = POWER_A,
               generator: torch.Generator | None = None) -> MQARBatch:
    r"""``n`` MQAR examples of length ``seq_len`` with ``n_pairs`` key/value pairs (module docstring).

    Args:
        n (int): examples.
        seq_len (int): ``L``, even.
        n_pairs (int): ``N``, with ``4 N <= L``.
        vocab_size (int): ``V``. Default: ``8192``.
        power_a (float): ``a`` of the query slots' law ``P(g) ~ (g + 1)^(a - 1)``; ``1`` = uniform.
            Default: ``0.01``.
        generator (torch.Generator, optional): the source of randomness (CPU). Default: torch's global one.

    Returns:
        :class:`MQARBatch` (``inputs [n, L]``, ``positions [n, N]``, ``answers [n, N]``).
    """
    check_slice(seq_len, n_pairs, vocab_size)
    if not power_a > 0:
        raise ValueError(f"MQAR: power_a must be > 0 (1 = uniform slots), got {power_a!r}")
    g, N, half = generator, n_pairs, vocab_size // 2
    # top-N of uniform noise: N distinct indices in uniformly random order
    keys = 1 + torch.rand(n, half - 1, generator=g).topk(N, dim=-1).indices                  # [n, N] in [1, V/2)
    values = half + torch.rand(n, vocab_size - half, generator=g).topk(N, dim=-1).indices   # [n, N] in [V/2, V)
    space = (seq_len - 2 * N) // 2
    weights = torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1.0)             # [space]
    # successive draws without replacement, like numpy's choice(replace=False, p=...)
    slots = torch.multinomial(weights.expand(n, space), N, replacement=False, generator=g)  # [n, N]
    inputs = torch.randint(0, vocab_size, (n, seq_len), generator=g)                         # [n, L] noise
    inputs[:, 0 : 2 * N : 2] = keys
    inputs[:, 1 : 2 * N : 2] = values
    positions = 2 * N + 2 * slots                                                             # [n, N]
    inputs.scatter_(1, positions, keys)
    return MQARBatch(inputs, positions, values)


def slice_name(seq_len: int, n_pairs: int) -> str:
    """``"256x64"``: the key of a slice in tables and JSON."""
    return f"{seq_len}x{n_pairs}"


def slice_generator(seed: int, split: str, seq_len: int, n_pairs: int) -> torch.Generator:
    """A generator seeded from ``(seed, split, L, N)``: each split and slice its own reproducible stream."""
    return torch.Generator().manual_seed(zlib.crc32(f"mqar:{seed}:{split}:{seq_len}:{n_pairs}".encode()))
