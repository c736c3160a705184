"""Sizes the paths work in (chunks, blocks, kernel segments), and the overrides a caller may force.

A :class:`Tuning` travels with every call; the default one says "choose everything". Tests and
benchmarks override it for a block of code with :func:`sata.ops.force_path`.
"""

from __future__ import annotations

from dataclasses import dataclass

# tokens per chunk of the chunked path: intra-chunk work grows with it, per-chunk state reads
# shrink with it; 64 balances them for small heads on CPU (see benchmarks)
CHUNK = 64
# bytes of features and scores one block of a PyTorch path may hold (at most a quarter of the budget)
BLOCK_BYTES = 64 * 2**20
# bytes of converted inputs one fused-kernel call may hold (inputs the kernel cannot read in place)
SEGMENT_BYTES = 4 * 2**20


@dataclass(frozen=True)
class Tuning:
    """What :func:`sata.ops.force_path` may force; ``None`` = chosen per call.

    Attributes:
        path: the path to run (a name of :data:`sata.ops.PATHS`), or ``None``: the dispatch chooses.
        kernels: whether the fused CPU kernels may be used (``False``: as if no compiler were available).
        chunk_size: tokens per chunk of the chunked path. Default: :data:`CHUNK`, shorter for large ``D``.
        block_size: tokens per block of the PyTorch paths. Default: what :attr:`block_bytes` allows.
        block_bytes: working set of one block of a PyTorch path. Default: :data:`BLOCK_BYTES`.
        segment_bytes: converted inputs of one fused-kernel call. Default: :data:`SEGMENT_BYTES`.
    """

    path: str | None = None
    kernels: bool = True
    chunk_size: int | None = None
    block_size: int | None = None
    block_bytes: int = BLOCK_BYTES
    segment_bytes: int = SEGMENT_BYTES


DEFAULT = Tuning()
