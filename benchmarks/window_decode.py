"""Decode step time of the window mode through the fused kernel, beside the plain decode step (issue 15).

    python benchmarks/window_decode.py                          # defaults below, one thread
    python benchmarks/window_decode.py --json docs/window/window_decode.json

Batch 1, 64 heads of 8 (as many kv heads as query heads), n_taylor 4, window 64, sinks 4, float32, the window
step without re-centring (``window``) and re-centred at alpha 0.0 (``recentred``), under ``torch.no_grad``,
``torch.set_num_threads(1)``. A state at 1K tokens is built by a prefill; the
"1M" state is the same state with ``n_tokens`` set to 2**20 (a state is its tensors and a count: nothing in a
step depends on how many tokens it has seen but the slot index). Each step calls ``sata.sata_attention`` on one
new token and keeps the returned state, as a serving loop does (``inplace=True`` and, as a second row per
configuration, ``inplace=False``: a new state per step, the old one dropped; until 2026-11-30 23:10 UTC the
``inplace=False`` rows restarted every step from one state, which kept the new state's memory hot).
The configurations are measured in interleaved rounds (so a busy spell of the machine hits all of them) and every
call is timed alone: medians and 10th / 90th percentiles over all steps. The PyTorch path of the window mode (what
a step cost before the kernel) is timed on a few steps for scale.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path

import torch

import sata
from sata.ops import force_path

from _report import write_json


def add_window_config(p: argparse.ArgumentParser) -> None:
    """The configuration both window benchmarks time (this one and ``window_prefill.py``)."""
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--d-head", type=int, default=8)
    p.add_argument("--n-taylor", type=int, default=4)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--recentre", type=_alpha, default=0.0,
                   help="alpha of the re-centred configuration timed besides the window without re-centring ('none': skip it)")


def _alpha(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def window_configs(args: argparse.Namespace) -> dict[str, dict]:
    """The window-mode settings timed beside the plain op: ``window`` (the series around 0, issue 15's acceptance
    configuration) and, unless ``--recentre none``, ``recentred`` (the series re-centred per query at alpha)."""
    window = dict(window=args.window, sinks=args.sinks)
    configs = {"window": window}
    if args.recentre is not None:
        configs["recentred"] = dict(window, recentre=args.recentre)
    return configs


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_window_config(p)
    p.add_argument("--prefill", type=int, default=1024, help="tokens of the prefill that builds the 1K state")
    p.add_argument("--rounds", type=int, default=30, help="interleaved rounds over the configurations")
    p.add_argument("--steps", type=int, default=100, help="timed steps per configuration and round")
    p.add_argument("--torch-steps", type=int, default=5, help="steps of the PyTorch window path (0: skip)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args()


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    H, d, P = args.heads, args.d_head, args.n_taylor
    settings = {"plain": {}, **window_configs(args)}
    common = dict(n_taylor=P, is_causal=True, return_state=True)
    q, k, v = (torch.randn(1, H, args.prefill, d) for _ in range(3))
    pool = [tuple(torch.randn(1, H, 1, d) for _ in range(3)) for _ in range(64)]   # tokens the steps cycle through
    with torch.no_grad():
        states = {name: sata.sata_attention(q, k, v, **common, **kw)[1] for name, kw in settings.items()}
        configs = {}
        for name, st in states.items():
            for context, n in (("1K", args.prefill), ("1M", 2**20)):
                for inplace in (True, False):
                    configs[(name, context, inplace)] = dataclasses.replace(st, n_tokens=n).clone()
        times = {key: [] for key in configs}
        for _ in range(args.rounds):
            for key in configs:
                name, _, inplace = key
                kw = {**common, **settings[name], "inplace": inplace}
                st = configs[key]
                for i in range(-5, args.steps):        # 5 untimed steps: caches warm after the other configuration
                    q1, k1, v1 = pool[i % len(pool)]
                    t0 = time.perf_counter()
                    _, new = sata.sata_attention(q1, k1, v1, state=st, **kw)
                    t1 = time.perf_counter()
                    if i >= 0:
                        times[key].append(t1 - t0)
                    st = new                               # a serving loop keeps the returned state
                configs[key] = st
        torch_us = None
        if args.torch_steps:
            last = list(settings)[-1]
            torch_us = 1e6 * time_torch_path(states[last], pool, args.torch_steps, {**common, **settings[last]})

    rows = []
    for (name, context, inplace), ts in times.items():
        ts = sorted(ts)
        rows.append(dict(step=name, context=context, inplace=inplace, median_us=1e6 * statistics.median(ts),
                         p10_us=1e6 * ts[len(ts) // 10], p90_us=1e6 * ts[9 * len(ts) // 10], steps=len(ts)))
    med = {(r["step"], r["context"], r["inplace"]): r["median_us"] for r in rows}
    for r in rows:
        r["vs_plain"] = r["median_us"] / med[("plain", r["context"], r["inplace"])]
        r["vs_1K"] = r["median_us"] / med[(r["step"], "1K", r["inplace"])]
    print(f"# window decode: batch 1, {H} heads of {d}, n_taylor {P}, window {args.window}, sinks {args.sinks}, "
          f"recentred: alpha {args.recentre}, float32, {args.threads} thread(s), {args.rounds} x {args.steps} steps per row; "
          f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'step':<9} {'context':>7} {'inplace':>7} {'median us':>10} {'p10':>8} {'p90':>8} {'vs plain':>9} {'vs 1K':>7}")
    for r in rows:
        print(f"{r['step']:<9} {r['context']:>7} {str(r['inplace']):>7} {r['median_us']:>10.1f} {r['p10_us']:>8.1f} "
              f"{r['p90_us']:>8.1f} {r['vs_plain']:>9.3f} {r['vs_1K']:>7.3f}")
    if torch_us is not None:
        print(f"{last} step through the PyTorch path (1K, median of {args.torch_steps}): {torch_us:.0f} us")
    if args.json:
        write_json(args.json, args, rows, torch_path_window_us=torch_us)

def time_torch_path(state, pool, steps: int, kw) -> float:
    """Median seconds of a window step through the PyTorch path (the kernels switched off)."""
    ts = []
    with force_path(kernels=False):
        for i in range(steps):
            q1, k1, v1 = pool[i]
            t0 = time.perf_counter()
            sata.sata_attention(q1, k1, v1, state=state, **kw)
            ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


if __name__ == "__main__":
    main()
