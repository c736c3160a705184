"""Part 1: reconstruction error of sata against conventional causal softmax attention in float64.

For every head size ``d`` and number of Taylor terms ``P``: ``W / d`` heads (model width ``W``,
64 as in the paper), ``q, k, v ~ N(0, 1)``, rounded to the run's dtype; ``Yhat`` = sata causal
attention over the sequence (streamed in chunks through its state); ``Y`` = softmax attention
on the same inputs in float64. We keep the histogram of ``log10 |Y - Yhat|`` over all elements
and its median and 5-95% band by token position. As a sanity line, the same against the
truncated-Taylor oracle in float64 (``T_P`` applied to the scores): that difference is rounding
only, so the error against softmax is the truncation of the series, not the implementation.
"""

from __future__ import annotations

import math
import time

import torch

import sata

from .config import ReplicateConfig

__all__ = ["FLOOR", "HIST_EDGES", "error_stats", "reference_attention", "run_error"]

FLOOR = -16.0                                      # log10 of errors below 1e-16 (and of exact zeros)
HIST_EDGES = [FLOOR + 0.1 * i for i in range(181)]  # -16 .. 2 in steps of 0.1
_SCORE_BYTES = 512 * 2**20                          # float64 score block of the references


def reference_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, kernel: str = "softmax",
                        n_taylor: int | None = None, block: int = 1024, progress=None) -> torch.Tensor:
    r"""Causal attention in float64, by blocks of queries (memory ``O(block x L)``).

    ``kernel="softmax"``: conventional attention. ``kernel="taylor"``: weights ``T_P(s)`` (the
    oracle of :func:`sata.naive_sata_attention`, causal; a row whose normaliser is not positive
    gives 0). Inputs ``[..., H, L, E]``, output ``[..., H, L, Ev]`` float64.
    """
    q, k, v = (t.double() for t in (query, key, value))
    L, scale = q.shape[-2], q.shape[-1] ** -0.5
    rows = q[..., 0, 0].numel()                                # batch x heads
    block = max(1, min(block, _SCORE_BYTES // (3 * 8 * rows * L)))   # scores, weights, mask per block
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=torch.float64, device=q.device)
    for a in range(0, L, block):
        b = min(a + block, L)
        s = scale * (q[..., a:b, :] @ k[..., :b, :].transpose(-1, -2))                 # [..., H, b-a, b]
        future = torch.ones(b - a, b, dtype=torch.bool, device=q.device).triu(a + 1)   # key j > query a+i
        if kernel == "softmax":
            out[..., a:b, :] = s.masked_fill(future, float("-inf")).softmax(-1) @ v[..., :b, :]
        elif kernel == "taylor":
            w = sata.taylor_exp(s, n_taylor).masked_fill(future, 0.0)
            z = w.sum(-1, keepdim=True)
            out[..., a:b, :] = torch.where(z > 0, (w @ v[..., :b, :]) / torch.where(z > 0, z, 1.0), 0.0)
        else:
            raise ValueError(f"kernel must be 'softmax' or 'taylor', got {kernel!r}")
        if progress is not None:
            progress.update(b - a)
    return out


def _log_err(y: torch.Tensor, y_hat: torch.Tensor) -> torch.Tensor:
    """``log10 |y - y_hat|`` clipped below at :data:`FLOOR`, as ``[L, H * Ev]`` (token-major)."""
    e = (y - y_hat.double()).abs().log10().clamp(min=FLOOR)                             # [H, L, Ev]
    return e.transpose(0, 1).reshape(e.shape[1], -1)                                    # [L, H*Ev]


def _quantiles(x: torch.Tensor, qs: list[float]) -> list[torch.Tensor]:
    """Quantiles along the last dimension by sorting (``torch.quantile`` refuses large inputs)."""
    s, _ = x.sort(dim=-1)
    n = s.shape[-1]
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        out.append(s[..., lo] + (s[..., hi] - s[..., lo]) * (pos - lo))
    return out


def error_stats(y_ref: torch.Tensor, y_hat: torch.Tensor, y_taylor: torch.Tensor, block: int) -> dict:
    """Histogram, quantiles and by-position bands of ``log10 |Y - Yhat|`` (inputs ``[H, L, Ev]``)."""
    le = _log_err(y_ref, y_hat)                                                         # [L, H*Ev]
    lt = _log_err(y_taylor, y_hat)                                                      # [L, H*Ev]
    edges = torch.tensor(HIST_EDGES, dtype=torch.float64)
    hist = lambda x: torch.histogram(x.flatten().cpu().clamp(max=HIST_EDGES[-1] - 1e-9), bins=edges).hist
    flat = le.flatten()
    p5, p50, p95 = (float(x) for x in _quantiles(flat, [0.05, 0.5, 0.95]))
    t50, t100 = (float(x) for x in _quantiles(lt.flatten(), [0.5, 1.0]))
    L = le.shape[0]
    n_blocks = max(1, L // block)
    cut = n_blocks * block if L >= block else L
    per = le[:cut].reshape(n_blocks, -1)                                                # [n_blocks, block*H*Ev]
    b5, b50, b95 = _quantiles(per, [0.05, 0.5, 0.95])
    (t_b50,) = _quantiles(lt[:cut].reshape(n_blocks, -1), [0.5])
    err = (y_ref - y_hat.double()).abs()
    size = cut // n_blocks
    return {
        "hist_counts": hist(le).tolist(),
        "hist_counts_vs_taylor": hist(lt).tolist(),
        "median_log10": p50, "p5_log10": p5, "p95_log10": p95,
        "max_abs": float(err.max()), "mean_abs": float(err.mean()),
        "vs_taylor_median_log10": t50, "vs_taylor_max_log10": t100,
        "vs_taylor_max_abs": float((y_taylor - y_hat.double()).abs().max()),
        "by_position": {
            "block": size,
            "position": [size * (i + 0.5) for i in range(n_blocks)],
            "p5_log10": b5.tolist(), "median_log10": b50.tolist(), "p95_log10": b95.tolist(),
            "vs_taylor_median_log10": t_b50.tolist(),
        },
    }


def _sata_flops(cfg: ReplicateConfig, d: int, P: int) -> float:
    heads = cfg.error_width // d
    return 4.0 * cfg.error_tokens * heads * sata.feature_dim(d, P) * (d + 1)


def run_error(cfg: ReplicateConfig, store, progress: bool = True) -> dict:
    """Measure every (head size, terms) combination not already in ``store``. Returns the part's results."""
    from tqdm.auto import tqdm

    dtype = getattr(torch, cfg.dtype)
    L = cfg.error_tokens
    combos = [(d, P) for d in cfg.error_heads for P in cfg.error_terms]
    outer = tqdm(combos, desc="1/5 error vs softmax", unit="combo", disable=not progress)
    inputs: dict[int, tuple] = {}
    for d, P in outer:
        key = f"error/d{d}_P{P}"
        outer.set_postfix_str(f"head size {d}, {P} terms")
        if store.has(key):
            continue
        heads = cfg.error_width // d
        entry = {"d_key": d, "n_taylor": P, "heads": heads, "tokens": L, "features": sata.feature_dim(d, P),
                 "state_bytes": heads * sata.state_size(d, d, P) * 4}
        flops = _sata_flops(cfg, d, P)
        if flops > cfg.error_flop_limit:
            entry["skipped"] = (f"~{flops:.1e} FLOPs, over this mode's limit of {cfg.error_flop_limit:.0e} "
                                f"(run --full)")
            store.put(key, entry)
            continue
        if d not in inputs:
            inputs.clear()      # one head size at a time: inputs and references are reused across P
            g = torch.Generator().manual_seed(cfg.seed + d)
            q, k, v = (torch.randn(heads, L, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
            q, k, v = (t.to(cfg.device) for t in (q, k, v))
            with tqdm(total=L, desc=f"  softmax reference d={d}", unit="tok", leave=False, disable=not progress) as bar:
                y_ref = reference_attention(q, k, v, kernel="softmax", progress=bar)
            inputs[d] = (q, k, v, y_ref)
        q, k, v, y_ref = inputs[d]
        t0 = time.perf_counter()
        try:
            y_hat = _sata_streamed(q, k, v, P, cfg.error_chunk, progress, f"  sata d={d} P={P}")
        except sata.MemoryBudgetError as e:
            entry["skipped"] = f"memory budget: {e}"
            store.put(key, entry)
            continue
        entry["sata_seconds"] = time.perf_counter() - t0
        with tqdm(total=L, desc=f"  Taylor oracle d={d} P={P}", unit="tok", leave=False, disable=not progress) as bar:
            y_taylor = reference_attention(q, k, v, kernel="taylor", n_taylor=P, progress=bar)
        entry.update(error_stats(y_ref.cpu(), y_hat.cpu(), y_taylor.cpu(), cfg.error_position_block))
        store.put(key, entry)
    return collect_error(cfg, store)


def _sata_streamed(q, k, v, P, chunk, progress, desc) -> torch.Tensor:
    """Causal sata over ``[H, L, E]`` in chunks, each continuing the previous chunk's state."""
    from tqdm.auto import tqdm

    L = q.shape[-2]
    outs, state = [], None
    with torch.no_grad(), tqdm(total=L, desc=desc, unit="tok", leave=False, disable=not progress) as bar:
        for a in range(0, L, chunk):
            b = min(a + chunk, L)
            y, state = sata.sata_attention(q[:, a:b], k[:, a:b], v[:, a:b], n_taylor=P, is_causal=True,
                                           state=state, return_state=True)
            outs.append(y)
            bar.update(b - a)
    return torch.cat(outs, dim=-2)                                                      # [H, L, Ev]


def collect_error(cfg: ReplicateConfig, store) -> dict:
    combos = []
    for d in cfg.error_heads:
        for P in cfg.error_terms:
            e = store.get(f"error/d{d}_P{P}")
            if e is not None:
                combos.append(e)
    return {"tokens": cfg.error_tokens, "width": cfg.error_width, "dtype": cfg.dtype, "device": cfg.device,
            "hist_edges_log10": HIST_EDGES, "floor_log10": FLOOR, "combos": combos}
