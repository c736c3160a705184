"""The performance targets of issue 4, measured in one run with PASS/FAIL.

1. Decode, batch 1, 64 heads of size 8, 4 terms: >= 20x faster than the paper's formulation,
   faster than SDPA with a KV cache at every context >= 1K, >= 1000x faster at 1M tokens.
2. Decode is constant: time per token at 1e7 tokens within 15% of that at 1e3 (streamed).
3. Decode at batch 32: >= 50% of the memory-bandwidth roofline (state bytes read and written
   per step / copy bandwidth measured in this run).
4. Causal prefill, 64K tokens: >= 25% of the fp32 matmul throughput measured in this run,
   counted on the method's FLOPs; faster than SDPA's causal kernel from 16K tokens on.
5. Training step (forward + backward, causal, 64K tokens): peak memory <= 3x inputs + outputs
   + gradients.
6. Scaling over head sizes {8..64} and terms {2..6} at fixed model width: cost falls with head size.

``--quick`` sizes are smaller (see :data:`QUICK`); every row says at which size it was measured.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

import sata

from .decode import DecodeConfig, _Streams, run_decode, sata_step
from .prefill import PrefillConfig, run_prefill
from .tables import count_contaminated
from .timing import copy_bandwidth, matmul_throughput, peak_memory, time_interleaved, torch_threads

__all__ = ["FULL", "QUICK", "TINY", "TargetSizes", "run_targets"]

PASS, FAIL, NOT_MEASURED = "PASS", "FAIL", "NOT MEASURED"


@dataclass(frozen=True)
class TargetSizes:
    """Sizes of one targets run."""

    name: str
    heads: int = 64
    d_key: int = 8
    n_taylor: int = 4
    decode_contexts: tuple[int, ...] = (1024, 4096, 16384, 65536, 262144, 1048576)
    decode_stream_limit: int | None = None
    constant_contexts: tuple[int, int] = (1000, 10_000_000)
    serving_batch: int = 32
    serving_context: int = 1024
    prefill_lengths: tuple[int, ...] = (4096, 16384, 32768, 65536)
    paper_prefill_max: int = 4096
    train_length: int = 65536
    scaling_width: int = 512
    scaling_heads: tuple[int, ...] = (8, 16, 32, 64)
    scaling_terms: tuple[int, ...] = (2, 3, 4, 5, 6)
    scaling_prefill_length: int = 4096
    scaling_flop_limit: float = 1e12
    scaling_state_limit: int | None = None      # skip larger states (default: a quarter of the memory limit)
    copy_bytes: int = 256 * 2**20
    mm_size: int = 4096
    min_time: float = 0.3


FULL = TargetSizes("full")
QUICK = TargetSizes(
    "quick", decode_contexts=(1024, 4096, 16384, 65536), decode_stream_limit=16384,
    constant_contexts=(1000, 100_000), prefill_lengths=(1024, 4096, 16384), paper_prefill_max=1024,
    train_length=16384, scaling_prefill_length=1024, scaling_flop_limit=5e9, scaling_state_limit=128 * 2**20,
    mm_size=2048, min_time=0.2,
)
TINY = TargetSizes(  # for tests: seconds, numbers meaningless
    "tiny", heads=4, decode_contexts=(64, 256), decode_stream_limit=64, constant_contexts=(64, 256),
    serving_batch=2, serving_context=64, prefill_lengths=(64, 128), paper_prefill_max=64, train_length=128,
    scaling_width=32, scaling_heads=(8, 16), scaling_terms=(2, 3), scaling_prefill_length=64,
    scaling_flop_limit=1e8, copy_bytes=8 * 2**20, mm_size=256, min_time=0.01,
)


def _row(tid: str, target: str, measured: str, status: str, at: str, value=None, threshold=None, note: str = "") -> dict:
    return {"id": tid, "target": target, "measured": measured, "status": status, "at": at,
            "value": value, "threshold": threshold, "note": note}


def _k(n: int) -> str:
    for unit, size in (("M", 2**20), ("K", 2**10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"1e{int(math.log10(n))}" if n == 10 ** int(math.log10(n)) else f"{n:,}"
    return f"{n:,}"


def _flag_contaminated(rows: list[dict], measured) -> list[dict]:
    """Add to each row's note that the measurements behind it were contaminated, if any were."""
    n = count_contaminated(measured)
    if n:
        for r in rows:
            r["note"] = "; ".join(x for x in (r["note"], f"{n} contaminated timing(s) (*): rerun on a quiet machine") if x)
    return rows


def _median(entry: dict) -> float | None:
    return entry["time"]["median"] if isinstance(entry, dict) and "time" in entry else None


# ---------------------------------------------------------------------------- 1. decode latency
def _target_decode(sz: TargetSizes, common: dict, latency: int | None, progress: bool) -> tuple[dict, list[dict]]:
    cfg = DecodeConfig(batch=1, n_heads=sz.heads, d_key=sz.d_key, n_taylor=sz.n_taylor, contexts=sz.decode_contexts,
                       stream_limit=sz.decode_stream_limit, min_time=sz.min_time, threads=latency,
                       label="target 1: decode", **common)
    res = run_decode(cfg, progress)
    rows = res["rows"]
    what = f"B=1, {sz.heads} heads of {sz.d_key}, P={sz.n_taylor}"
    out = []
    speedups = [_median(r["paper"]) / _median(r["sata"]) for r in rows if _median(r.get("paper")) and _median(r.get("sata"))]
    if speedups:
        v = min(speedups)
        out.append(_row("1a", "decode >= 20x faster than the paper's formulation", f"{v:.1f}x (slowest context)",
                        PASS if v >= 20 else FAIL, what, v, 20))
    else:
        out.append(_row("1a", "decode >= 20x faster than the paper's formulation", "-", NOT_MEASURED, what))
    ratios = [(r["context"], _median(r["sdpa"]) / _median(r["sata"])) for r in rows
              if r["context"] >= 1024 and _median(r.get("sdpa")) and _median(r.get("sata"))]
    if ratios:
        worst = min(ratios, key=lambda t: t[1])
        ok = all(x > 1 for _, x in ratios)
        out.append(_row("1b", "decode faster than SDPA+KV cache at every context >= 1K",
                        f"min speedup {worst[1]:.2f}x (at {_k(worst[0])})", PASS if ok else FAIL,
                        f"{what}, contexts {', '.join(_k(n) for n, _ in ratios)}", worst[1], 1))
    else:
        out.append(_row("1b", "decode faster than SDPA+KV cache at every context >= 1K", "-", NOT_MEASURED, what))
    at_1m = [r for r in rows if r["context"] >= 1_000_000 and _median(r.get("sdpa")) and _median(r.get("sata"))]
    if at_1m:
        r = at_1m[0]
        v = _median(r["sdpa"]) / _median(r["sata"])
        out.append(_row("1c", "decode >= 1000x faster than SDPA+KV cache at 1M tokens", f"{v:.0f}x",
                        PASS if v >= 1000 else FAIL, f"{what}, context {_k(r['context'])}", v, 1000))
    else:
        largest = max((r["context"] for r in rows if _median(r.get("sdpa"))), default=None)
        why = "1M context not in this run" if largest is None or largest < 1_000_000 else "SDPA skipped at 1M"
        out.append(_row("1c", "decode >= 1000x faster than SDPA+KV cache at 1M tokens", "-", NOT_MEASURED, what,
                        note=f"{why} (largest SDPA context: {_k(largest) if largest else '-'}); run without --quick"))
    return res, _flag_contaminated(out, rows)


# ---------------------------------------------------------------------------- 2. constant decode
def _target_constant(sz: TargetSizes, common: dict, latency: int | None, progress: bool) -> tuple[dict, list[dict]]:
    from tqdm.auto import tqdm

    lo, hi = sz.constant_contexts
    cfg = DecodeConfig(batch=1, n_heads=sz.heads, d_key=sz.d_key, n_taylor=sz.n_taylor, contexts=(lo, hi),
                       methods=("sata",), measure_memory=False, **common)
    streams = _Streams(cfg, capacity=0)
    with tqdm(total=hi, desc="target 2: streaming prefill", unit="tok", unit_scale=True, disable=not progress,
              leave=False) as bar:
        t0 = time.perf_counter()
        streams.stream_to(lo, bar)
        s_lo = streams.state
        streams.stream_to(hi, bar)
        s_hi = streams.state
        stream_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(1)
    q1, k1, v1 = (torch.randn(1, sz.heads, 1, sz.d_key, generator=g).to(cfg.device, cfg.dtype) for _ in range(3))
    with torch.no_grad(), torch_threads(latency):   # interleaved, so that load from other processes hits both alike
        t = time_interleaved({"lo": sata_step(s_lo, q1, k1, v1, sz.n_taylor), "hi": sata_step(s_hi, q1, k1, v1, sz.n_taylor)},
                             device=cfg.device, min_time=max(sz.min_time, 0.5), min_repeat=20)
    ratio = t["hi"].median / t["lo"].median
    res = {"contexts": [lo, hi], "streamed_tokens": hi, "stream_seconds": stream_s,
           "stream_tokens_per_s": hi / stream_s, "time_lo": t["lo"].to_dict(), "time_hi": t["hi"].to_dict(),
           "ratio": ratio, "state_n_tokens": s_hi.n_tokens}
    row = _row("2", f"decode time at {_k(hi)} within 15% of that at {_k(lo)} (streamed)",
               f"{t['hi'].median * 1e3:.3f} ms vs {t['lo'].median * 1e3:.3f} ms: ratio {ratio:.3f}",
               PASS if abs(ratio - 1) <= 0.15 else FAIL, f"B=1, {sz.heads} heads of {sz.d_key}, P={sz.n_taylor}",
               ratio, 1.15, note="" if hi >= 10_000_000 else f"quick: {_k(hi)} instead of 1e7")
    return res, _flag_contaminated([row], [res["time_lo"], res["time_hi"]])


# ---------------------------------------------------------------------------- 3. serving roofline
def _target_serving(sz: TargetSizes, common: dict, bandwidth: float, progress: bool) -> tuple[dict, list[dict]]:
    B = sz.serving_batch
    m_copy_mib = sz.copy_bytes / 2**20
    cfg = DecodeConfig(batch=B, n_heads=sz.heads, d_key=sz.d_key, n_taylor=sz.n_taylor, contexts=(sz.serving_context,),
                       methods=("sata",), min_time=sz.min_time, label="target 3: decode at serving batch", **common)
    res = run_decode(cfg, progress)
    r = res["rows"][0]
    t = _median(r["sata"])
    state_bytes = r["sata"]["held_bytes"]
    traffic = 2 * state_bytes                   # read the state once, write it once (in place)
    roofline = traffic / bandwidth
    frac = roofline / t
    res.update(state_bytes=state_bytes, bytes_per_step=traffic, roofline_seconds=roofline, fraction=frac,
               tokens_per_s=B / t)
    row = _row("3", ">= 50% of the memory-bandwidth roofline at batch 32",
               f"{100 * frac:.1f}% ({t * 1e3:.2f} ms/step vs roofline {roofline * 1e3:.2f} ms; {B / t:,.0f} tok/s)",
               PASS if frac >= 0.5 else FAIL,
               f"B={B}, {sz.heads} heads of {sz.d_key}, P={sz.n_taylor}, context {_k(sz.serving_context)}",
               frac, 0.5, note=f"traffic = state ({state_bytes / 2**20:.1f} MiB) read + written once per step; copy "
                               f"bandwidth on {m_copy_mib:.0f} MiB buffers (a state that fits in cache can exceed 100%)")
    return res, [row]


# ---------------------------------------------------------------------------- 4. prefill
def _target_prefill(sz: TargetSizes, common: dict, mm_flops: float, progress: bool) -> tuple[dict, list[dict]]:
    cfg = PrefillConfig(batch=1, n_heads=sz.heads, d_key=sz.d_key, n_taylor=sz.n_taylor, lengths=sz.prefill_lengths,
                        paper_max_length=sz.paper_prefill_max, min_time=sz.min_time, label="target 4: prefill", **common)
    res = run_prefill(cfg, progress)
    rows = res["rows"]
    what = f"B=1, {sz.heads} heads of {sz.d_key}, P={sz.n_taylor}"
    out = []
    longest = rows[-1]
    if _median(longest.get("sata")):
        eff = longest["sata"]["method_flops_per_s"] / mm_flops
        out.append(_row("4a", ">= 25% of fp32 matmul throughput (method FLOPs), 64K-token prefill",
                        f"{100 * eff:.1f}% ({longest['sata']['method_flops_per_s'] / 1e9:.2f} of {mm_flops / 1e9:.1f} GFLOP/s)",
                        PASS if eff >= 0.25 else FAIL, f"{what}, {_k(longest['length'])} tokens", eff, 0.25,
                        note="" if longest["length"] >= 65536 else f"quick: {_k(longest['length'])} instead of 64K"))
    ratios = [(r["length"], _median(r["sdpa"]) / _median(r["sata"])) for r in rows
              if r["length"] >= 16384 and _median(r.get("sdpa")) and _median(r.get("sata"))]
    if ratios:
        worst = min(ratios, key=lambda t: t[1])
        out.append(_row("4b", "causal prefill faster than SDPA from 16K tokens on",
                        f"min speedup {worst[1]:.2f}x (at {_k(worst[0])})", PASS if worst[1] > 1 else FAIL,
                        f"{what}, lengths {', '.join(_k(n) for n, _ in ratios)}", worst[1], 1))
    else:
        out.append(_row("4b", "causal prefill faster than SDPA from 16K tokens on", "-", NOT_MEASURED, what,
                        note="no length >= 16K in this run"))
    return res, out


# ---------------------------------------------------------------------------- 5. training memory
def _target_training(sz: TargetSizes, common: dict, progress: bool) -> tuple[dict, list[dict]]:
    L, H, d = sz.train_length, sz.heads, sz.d_key
    device, dtype = common["device"], common["dtype"]
    g = torch.Generator().manual_seed(2)
    q, k, v, dy = (torch.randn(1, H, L, d, generator=g).to(device, dtype) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)

    def step():
        for t in (q, k, v):
            t.grad = None
        y = sata.sata_attention(q, k, v, n_taylor=sz.n_taylor, is_causal=True)
        y.backward(dy)
        return y.detach()

    if progress:
        print(f"target 5: forward+backward over {_k(L)} tokens (one profiled run) ...", flush=True)
    t0 = time.perf_counter()
    transient, y = peak_memory(step, device)
    seconds = time.perf_counter() - t0
    one = q.numel() * q.element_size()
    held = 4 * one                      # q, k, v and the output gradient exist before the step
    reference = 8 * one                 # inputs q, k, v + output y + gradients dy, dq, dk, dv
    res = {"length": L, "tensor_bytes": one, "held_bytes": held, "transient_peak_bytes": transient,
           "reference_bytes": reference, "seconds_under_profiler": seconds}
    if transient is None:
        return res, [_row("5", "training peak memory <= 3x inputs + outputs + gradients", "-", NOT_MEASURED,
                          f"{H} heads of {d}, {_k(L)} tokens", note="no allocator statistics on this device")]
    peak = held + transient
    ratio = peak / reference
    res.update(peak_bytes=peak, ratio=ratio)
    row = _row("5", "training step peak memory <= 3x inputs + outputs + gradients",
               f"{ratio:.2f}x ({peak / 2**20:.0f} MiB peak vs {reference / 2**20:.0f} MiB)",
               PASS if ratio <= 3 else FAIL, f"B=1, {H} heads of {d}, P={sz.n_taylor}, {_k(L)} tokens", ratio, 3,
               note="" if L >= 65536 else f"quick: {_k(L)} instead of 64K")
    del q, k, v, dy, y
    return res, [row]


# ---------------------------------------------------------------------------- 6. scaling
def _target_scaling(sz: TargetSizes, common: dict, progress: bool) -> tuple[dict, list[dict]]:
    from tqdm.auto import tqdm

    device, dtype, max_bytes = common["device"], common["dtype"], common["max_bytes"]
    W, L = sz.scaling_width, sz.scaling_prefill_length
    itemsize = torch.empty((), dtype=dtype).element_size()
    table = []
    combos = [(d, P) for P in sz.scaling_terms for d in sz.scaling_heads if W % d == 0]
    for d, P in tqdm(combos, desc="target 6: scaling", disable=not progress, leave=False):
        H = W // d
        D = sata.feature_dim(d, P)
        state_bytes = H * D * (d + 1) * 4
        flops_tok = H * sata.flops_per_token(d, d, P)
        entry = {"d_key": d, "n_taylor": P, "heads": H, "features": D, "state_bytes": state_bytes,
                 "flops_per_token": flops_tok}
        limit = max_bytes // 4 if sz.scaling_state_limit is None else min(max_bytes // 4, sz.scaling_state_limit)
        if state_bytes > limit:
            entry["skipped"] = (f"state of {state_bytes / 2**20:,.0f} MiB, over this run's limit of "
                                f"{limit / 2**20:,.0f} MiB (a step reads and writes it)")
            table.append(entry)
            continue
        g = torch.Generator().manual_seed(3)
        try:
            with torch.no_grad():
                ctx = 64
                k, v = (torch.randn(1, H, ctx, d, generator=g).to(device, dtype) for _ in range(2))
                st = sata.accumulate_state(k, v, n_taylor=P)
                q1, k1, v1 = (torch.randn(1, H, 1, d, generator=g).to(device, dtype) for _ in range(3))
                fns = {"decode": sata_step(st, q1, k1, v1, P)}
                if flops_tok * L <= sz.scaling_flop_limit:
                    q, k, v = (torch.randn(1, H, L, d, generator=g).to(device, dtype) for _ in range(3))
                    fns["prefill"] = lambda: sata.sata_attention(q, k, v, n_taylor=P, is_causal=True)
                else:
                    entry["prefill_skipped"] = (f"{flops_tok * L:.2g} FLOPs for {_k(L)} tokens, over this run's "
                                                f"limit of {sz.scaling_flop_limit:.2g}")
                t = time_interleaved(fns, device=device, warmup=1, min_repeat=3, min_time=sz.min_time, max_time=5)
        except sata.MemoryBudgetError as e:
            entry["skipped"] = f"memory budget: {e}"
            table.append(entry)
            continue
        entry["decode_seconds"] = t["decode"].median
        if "prefill" in t:
            entry["prefill_seconds_per_token"] = t["prefill"].median / L
        table.append(entry)
    # cost relative to the smallest head at the same number of terms, measured and by the FLOP count
    verdicts = []
    for P in sz.scaling_terms:
        rows = [e for e in table if e["n_taylor"] == P and "skipped" not in e]
        for key in ("decode_seconds", "prefill_seconds_per_token"):
            pts = [(e["d_key"], e[key], e["flops_per_token"]) for e in rows if key in e]
            if len(pts) < 2:
                continue
            base = pts[0]
            for e in rows:
                if key in e:
                    e[f"{key}_rel"] = e[key] / base[1]
                    e["flops_rel"] = e["flops_per_token"] / base[2]
            xs = [math.log(p[0]) for p in pts]
            ys = [math.log(p[1]) for p in pts]
            slope = _slope(xs, ys)
            model = _slope(xs, [math.log(p[2]) for p in pts])
            verdicts.append({"n_taylor": P, "cost": key, "heads": [p[0] for p in pts], "slope": slope,
                             "flops_slope": model, "smaller_heads_cheaper": pts[-1][1] >= pts[0][1]})
    ok = bool(verdicts) and all(v["smaller_heads_cheaper"] for v in verdicts)
    summary = "; ".join(f"P={v['n_taylor']} {v['cost'].split('_')[0]} {v['slope']:.2f} (FLOPs {v['flops_slope']:.2f})"
                        for v in verdicts)
    row = _row("6", "cost at fixed model width falls with head size (table over d, P)",
               f"slope of log cost vs log head size: {summary}" if verdicts else "-",
               (PASS if ok else FAIL) if verdicts else NOT_MEASURED,
               f"width {W}, d in {list(sz.scaling_heads)}, P in {list(sz.scaling_terms)}",
               note="PASS = smaller heads never cost more; slope > 0 means smaller heads are cheaper. The FLOP "
                    "count (W/d) C(d+P-1, P-1) (d+1) predicts slope ~ P-1 (not -1): see the scaling table")
    return {"width": W, "prefill_length": L, "table": table, "verdicts": verdicts}, [row]


def _slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float("nan")


# ---------------------------------------------------------------------------- all
def run_targets(sizes: TargetSizes = QUICK, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                max_bytes: int = 4 * 2**30, only: tuple[str, ...] | None = None, progress: bool = True,
                latency_threads: int | None = None) -> dict:
    """Measure every target (or those in ``only``, e.g. ``("1", "4")``). Returns a JSON-ready dict
    with ``rows`` (one per target condition, with PASS/FAIL) and the raw measurements.
    ``latency_threads``: torch threads of the one-token decode steps of targets 1 and 2 (``None``: as set)."""
    common = {"device": device, "dtype": dtype, "max_bytes": max_bytes}
    want = lambda t: only is None or t in only
    out: dict = {"sizes": asdict(sizes), "rows": [], "measurements": {}}
    m = out["measurements"]
    if progress:
        print("measuring this machine: copy bandwidth and matmul throughput ...", flush=True)
    m["copy_bandwidth"] = copy_bandwidth(sizes.copy_bytes, device=device)
    m["matmul"] = matmul_throughput(sizes.mm_size, device=device, dtype=torch.float32)
    steps = [
        ("1", "decode", lambda: _target_decode(sizes, common, latency_threads, progress)),
        ("2", "constant", lambda: _target_constant(sizes, common, latency_threads, progress)),
        ("3", "serving", lambda: _target_serving(sizes, common, m["copy_bandwidth"]["bytes_per_s"], progress)),
        ("4", "prefill", lambda: _target_prefill(sizes, common, m["matmul"]["flops_per_s"], progress)),
        ("5", "training", lambda: _target_training(sizes, common, progress)),
        ("6", "scaling", lambda: _target_scaling(sizes, common, progress)),
    ]
    for tid, key, fn in steps:
        if not want(tid):
            continue
        res, rows = fn()
        m[key] = res
        out["rows"].extend(rows)
    return out

