"""Prefill benchmark: causal attention over a whole prompt, by prompt length.

For every length, in one run on the same ``q, k, v``: ``sata`` (:func:`sata.sata_attention`
with ``is_causal=True``), SDPA's causal kernel, and the paper's formulation by cumulative
sums (skipped where its ``n x m_p x d_v`` cumulative sums would not fit in ``max_bytes``).
In the window mode (``window``, ``sinks``, ``recentre``) ``sata`` is the window mode and ``plain``
the plain op on the same inputs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

import sata

from .baselines import PaperTaylorAttention, sdpa_causal
from .compare import crossover
from .decode import METHODS, WindowSettings, compare
from .timing import peak_memory, time_interleaved

__all__ = ["PrefillConfig", "run_prefill"]


@dataclass
class PrefillConfig(WindowSettings):
    """One prefill sweep."""

    batch: int = 1
    n_heads: int = 64
    d_key: int = 8
    d_value: int | None = None
    n_taylor: int = 4
    lengths: tuple[int, ...] = (1024, 4096, 16384, 65536)
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    max_bytes: int = 4 * 2**30
    methods: tuple[str, ...] = METHODS
    measure_memory: bool = True
    min_time: float = 0.5
    min_repeat: int = 3
    max_time: float = 10.0        # stop repeating a slow method after this many seconds
    paper_max_length: int | None = None   # longest prompt the paper's formulation is run on
    seed: int = 0
    label: str = ""

    @property
    def dv(self) -> int:
        return self.d_key if self.d_value is None else self.d_value


def method_flops(batch: int, n_heads: int, length: int, d_key: int, d_value: int, n_taylor: int,
                 exact_keys: int = 0) -> int:
    """FLOPs of the method for causal attention over ``length`` tokens: the per-token cost of
    the recurrent formulation (:func:`sata.flops_per_token`: features, state update, read-out)
    times tokens and heads, plus ``2 (E + Ev)`` per exact key of the window mode (``exact_keys =
    window + sinks``: scores and weighted values). The chunked algorithm's extra intra-chunk work and
    the centre's moments are not counted."""
    per_token = sata.flops_per_token(d_key, d_value, n_taylor) + 2 * exact_keys * (d_key + d_value)
    return batch * n_heads * length * per_token


def sdpa_flops(batch: int, n_heads: int, length: int, d_key: int, d_value: int) -> int:
    """Multiply-add FLOPs of causal softmax attention: ``Q K^T`` and ``P V`` over the lower triangle."""
    pairs = length * (length + 1) // 2
    return batch * n_heads * pairs * 2 * (d_key + d_value)


def run_prefill(cfg: PrefillConfig, progress: bool = True, partial: bool = False) -> dict:
    """Time causal prefill for every length of ``cfg``. Returns a JSON-ready dict; with ``partial``, Ctrl-C returns
    the lengths measured so far (``interrupted`` set) instead of raising ``KeyboardInterrupt``."""
    from tqdm.auto import tqdm

    rows = []
    paper = PaperTaylorAttention(cfg.d_key, cfg.n_taylor, device=cfg.device) if "paper" in cfg.methods else None
    desc = cfg.label or f"prefill B={cfg.batch} H={cfg.n_heads} d={cfg.d_key} P={cfg.n_taylor}"
    interrupted = False
    for n in tqdm(sorted(cfg.lengths), desc=desc, unit="len", disable=not progress, leave=False):
        try:
            rows.append(_prefill_row(cfg, n, paper))
        except KeyboardInterrupt:   # Ctrl-C: the lengths measured so far are still reported
            if not partial:
                raise
            interrupted = True
            break
    med = lambda m: [r[m]["time"]["median"] if "time" in r.get(m, {}) else None for r in rows]
    cfg_d = dataclasses.asdict(cfg)
    cfg_d.update(dtype=str(cfg.dtype).replace("torch.", ""), d_value=cfg.dv, lengths=list(cfg.lengths),
                 methods=list(cfg.methods))
    return {"config": cfg_d, "rows": rows, "interrupted": interrupted,
            "crossover_vs_sdpa": crossover([r["length"] for r in rows], med("sata"), med("sdpa"))}


def _prefill_row(cfg: PrefillConfig, n: int, paper) -> dict:
    """The measurements of one prefill length: a row of the table."""
    g = torch.Generator(device="cpu").manual_seed(cfg.seed + n)
    shape = (cfg.batch, cfg.n_heads, n)
    q = torch.randn(*shape, cfg.d_key, generator=g).to(cfg.device, cfg.dtype)    # [B, H, L, E]
    k = torch.randn(*shape, cfg.d_key, generator=g).to(cfg.device, cfg.dtype)    # [B, H, L, E]
    v = torch.randn(*shape, cfg.dv, generator=g).to(cfg.device, cfg.dtype)       # [B, H, L, Ev]
    row: dict = {"length": n,
                 "method_flops": method_flops(cfg.batch, cfg.n_heads, n, cfg.d_key, cfg.dv, cfg.n_taylor,
                                              cfg.window + cfg.sinks),
                 "sdpa_flops": sdpa_flops(cfg.batch, cfg.n_heads, n, cfg.d_key, cfg.dv)}
    fns = {}
    for name in ("sata", "plain"):
        if name in cfg.methods:
            hybrid = cfg.hybrid if name == "sata" else {}
            fns[name] = lambda q=q, k=k, v=v, h=hybrid: sata.sata_attention(q, k, v, n_taylor=cfg.n_taylor,
                                                                         is_causal=True, **h)
    if "sdpa" in cfg.methods:
        fns["sdpa"] = lambda q=q, k=k, v=v: sdpa_causal(q, k, v)
    if paper is not None:
        need = paper.causal_nbytes(cfg.batch, cfg.n_heads, n, cfg.dv, cfg.dtype)
        if cfg.paper_max_length is not None and n > cfg.paper_max_length:
            row["paper"] = {"skipped": f"longer than {cfg.paper_max_length} tokens (its time limit in this run)"}
        elif need > cfg.max_bytes:
            row["paper"] = {"skipped": f"its cumulative sums need ~{need / 2**30:.1f} GiB, over the memory "
                                       f"limit of {cfg.max_bytes / 2**30:.2f} GiB"}
        else:
            fns["paper"] = lambda q=q, k=k, v=v: paper.causal(q, k, v)[0]
    with torch.no_grad():
        outs, peaks = {}, {}
        for name, fn in fns.items():     # the first call, profiled for memory, is the warm-up
            peaks[name], outs[name] = peak_memory(fn, cfg.device) if cfg.measure_memory else (None, fn())
        timings = time_interleaved(fns, device=cfg.device, warmup=0, min_time=cfg.min_time,
                                   min_repeat=cfg.min_repeat, max_time=cfg.max_time)
        for name in fns:
            entry = {"time": timings[name].to_dict(), "tokens_per_s": n * cfg.batch / timings[name].median}
            if cfg.measure_memory:
                entry["transient_peak_bytes"] = peaks[name]
            row[name] = entry
    if "sata" in outs:
        row["sata"]["method_flops_per_s"] = row["method_flops"] / timings["sata"].median
    compare(row, outs)
    return row
