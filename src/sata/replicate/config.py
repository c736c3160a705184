"""Sizes of a replication run: ``quick`` (CPU, minutes), ``full`` (the paper's sizes, GPU, hours),
``tiny`` (tests, seconds)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

__all__ = ["FULL", "QUICK", "TINY", "ReplicateConfig", "preset"]


def _grid(lo_exp: int, hi_exp: int, steps: tuple[int, ...] = (1, 3)) -> tuple[int, ...]:
    """``steps x 10^k`` from ``10^lo_exp`` to ``10^hi_exp`` (powers of ten divide every later point)."""
    out = [m * 10**e for e in range(lo_exp, hi_exp) for m in steps]
    return (*out, 10**hi_exp)


@dataclass(frozen=True)
class ReplicateConfig:
    """Everything that decides what a run measures (``--resume`` requires it unchanged)."""

    mode: str
    device: str = "cpu"
    dtype: str = "float32"           # dtype of the inputs sata runs on (references are float64)
    seed: int = 0
    # 1. reconstruction error (width = heads x head size, as in the paper: 64)
    error_tokens: int = 2048
    error_width: int = 64
    error_heads: tuple[int, ...] = (8, 16, 32, 64)
    error_terms: tuple[int, ...] = (3, 4, 5, 6)
    error_flop_limit: float = 5e10   # skip (d, P) whose sata pass exceeds this estimate (quick only)
    error_position_block: int = 64   # tokens per point in the error-by-position curves
    error_chunk: int = 512           # tokens per streamed call (progress, memory)
    # 2. decode time and memory per token
    decode_width: int = 64
    decode_heads: tuple[int, ...] = (8, 16, 32, 64)
    decode_terms: int = 4
    decode_contexts: tuple[int, ...] = _grid(3, 6)
    decode_stream_flops: float | None = 2e9   # streamed prefill per head size; longer contexts repeat it
    decode_min_time: float = 0.2
    # 3. costs by context length and multi-head heatmaps (analytic)
    cost_terms: int = 4
    cost_contexts: tuple[int, ...] = _grid(3, 8, (1, 2, 5))
    heatmap_widths: tuple[int, ...] = tuple(range(1024, 8193, 1024))
    heatmap_heads: tuple[int, ...] = tuple(range(8, 65, 8))
    # 4./5. packing and precision (analytic)
    max_terms: int = 8

    def to_dict(self) -> dict:
        return asdict(self)


QUICK = ReplicateConfig("quick")
FULL = ReplicateConfig(
    "full", error_tokens=100 * 1024, error_flop_limit=float("inf"), error_position_block=1024, error_chunk=4096,
    decode_contexts=_grid(3, 8, (1, 2, 5)), decode_stream_flops=None, decode_min_time=0.3,
)
TINY = ReplicateConfig(
    "tiny", error_tokens=128, error_width=16, error_heads=(8, 16), error_terms=(3, 4), error_position_block=16,
    error_chunk=64, decode_width=16, decode_heads=(8, 16), decode_contexts=(100, 1000), decode_stream_flops=1e6,
    decode_min_time=0.01, cost_contexts=(1000, 10000), heatmap_widths=(64, 128), heatmap_heads=(8, 16), max_terms=4,
)


def preset(mode: str, **changes) -> ReplicateConfig:
    base = {"quick": QUICK, "full": FULL, "tiny": TINY}[mode]
    return replace(base, **changes)
