"""Part 2: time and peak memory per generated token as the context grows, against conventional
attention with a KV cache (and the paper's formulation), for head sizes 8..64 at a fixed model
width, ``decode_terms`` Taylor terms. The measurement is :func:`sata.bench.decode.run_decode`."""

from __future__ import annotations

import math

import torch

import sata

from ..bench.compare import crossover
from ..bench.decode import DecodeConfig, run_decode
from .config import ReplicateConfig

__all__ = ["run_decode_part", "stream_limit"]


def stream_limit(cfg: ReplicateConfig, d: int) -> int | None:
    """Tokens streamed for head size ``d``: a power of ten (so it divides every longer context of
    the context grid) whose prefill fits ``decode_stream_flops``; ``None`` streams every context."""
    if cfg.decode_stream_flops is None:
        return None
    heads = cfg.decode_width // d
    per_token = 2 * heads * sata.feature_dim(d, cfg.decode_terms) * (d + 1)
    lo = min(cfg.decode_contexts)
    limit = 10 ** int(math.floor(math.log10(lo)))
    while limit * 10 * per_token <= cfg.decode_stream_flops and limit * 10 <= max(cfg.decode_contexts):
        limit *= 10
    return limit


def run_decode_part(cfg: ReplicateConfig, store, max_bytes: int, progress: bool = True,
                    threads: int | None = None) -> dict:
    """Measure every head size not yet in ``store``; ``threads``: torch threads of the timed decode
    steps (``None``: as set). Returns :func:`collect_decode`."""
    from tqdm.auto import tqdm

    dtype = getattr(torch, cfg.dtype)
    outer = tqdm(cfg.decode_heads, desc="2/5 decode time & memory", unit="head size", disable=not progress)
    for d in outer:
        key = f"decode/d{d}"
        if store.has(key):
            continue
        heads = cfg.decode_width // d
        dc = DecodeConfig(batch=1, n_heads=heads, d_key=d, n_taylor=cfg.decode_terms, contexts=cfg.decode_contexts,
                          dtype=dtype, device=cfg.device, stream_limit=stream_limit(cfg, d), max_bytes=max_bytes,
                          min_time=cfg.decode_min_time, min_repeat=3, seed=cfg.seed, threads=threads,
                          label=f"  {heads} heads of {d}")
        try:
            res = run_decode(dc, progress)
        except sata.MemoryBudgetError as e:
            res = {"config": {"d_key": d, "n_heads": heads}, "skipped": f"memory budget: {e}", "rows": []}
        res["d_key"], res["heads"] = d, heads
        store.put(key, res)
    return collect_decode(cfg, store)


def collect_decode(cfg: ReplicateConfig, store) -> dict:
    runs = [r for d in cfg.decode_heads if (r := store.get(f"decode/d{d}")) is not None]
    summary = [_summarise(r) for r in runs]
    return {"width": cfg.decode_width, "n_taylor": cfg.decode_terms, "dtype": cfg.dtype, "device": cfg.device,
            "runs": runs, "summary": summary}


def _med(row: dict, m: str) -> float | None:
    e = row.get(m)
    return e["time"]["median"] if isinstance(e, dict) and "time" in e else None


def _tainted(row: dict, m: str) -> bool:
    e = row.get(m)
    return bool(isinstance(e, dict) and e.get("time", {}).get("contaminated"))


def _peak(row: dict, m: str) -> float | None:
    e = row.get(m)
    return e.get("peak_bytes") if isinstance(e, dict) and "time" in e else None


def _span(pts: list[tuple[int, float]]) -> dict:
    """First and last, smallest and largest of ``(context, seconds)`` points in context order."""
    (n0, t0), (n1, t1) = pts[0], pts[-1]
    ts = [t for _, t in pts]
    return {"first_context": n0, "first_seconds": t0, "last_context": n1, "last_seconds": t1, "growth": t1 / t0,
            "min_seconds": min(ts), "max_seconds": max(ts), "max_over_min": max(ts) / min(ts)}


def _summarise(run: dict) -> dict:
    """Per head size: flatness of sata, growth of SDPA, crossover, memory ratio at 1e6 tokens. Per
    method, the span of every measurement and (``clean``) of those not contaminated, whose contexts
    are listed; the crossover uses clean measurements only."""
    rows = run["rows"]
    out = {"d_key": run["d_key"], "heads": run["heads"]}
    if not rows:
        out["skipped"] = run.get("skipped", "no rows")
        return out
    for m in ("sata", "sdpa", "paper"):
        measured = [r for r in rows if _med(r, m) is not None]
        if not measured:
            continue
        out[m] = _span([(r["context"], _med(r, m)) for r in measured])
        out[m]["contaminated_contexts"] = [r["context"] for r in measured if _tainted(r, m)]
        clean = [(r["context"], _med(r, m)) for r in measured if not _tainted(r, m)]
        out[m]["clean"] = _span(clean) if clean else None
    clean = [r for r in rows if not (_tainted(r, "sata") or _tainted(r, "sdpa"))]
    out["crossover_vs_sdpa"] = crossover([r["context"] for r in clean], [_med(r, "sata") for r in clean],
                                         [_med(r, "sdpa") for r in clean])
    at = [r for r in rows if r["context"] == 1_000_000]
    if at and _peak(at[0], "sata") and _peak(at[0], "sdpa"):
        out["memory_ratio_at_1e6"] = _peak(at[0], "sata") / _peak(at[0], "sdpa")
        out["time_ratio_at_1e6"] = _med(at[0], "sata") / _med(at[0], "sdpa")
    largest = max((r for r in rows if _peak(r, "sdpa")), key=lambda r: r["context"], default=None)
    if largest is not None and _peak(largest, "sata"):
        out["memory_ratio_at_largest"] = {"context": largest["context"],
                                          "ratio": _peak(largest, "sata") / _peak(largest, "sdpa")}
    skipped = [r["context"] for r in rows if "skipped" in r.get("sdpa", {})]
    if skipped:
        out["sdpa_skipped_from"] = min(skipped)
        out["sdpa_skipped_reason"] = next(r["sdpa"]["skipped"] for r in rows if "skipped" in r.get("sdpa", {}))
    return out
