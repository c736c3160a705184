"""Causal prefill time of the window mode through the fused kernel, beside the plain fused prefill (issue 15).

    python benchmarks/window_prefill.py                          # defaults below
    python benchmarks/window_prefill.py --json docs/window/window_prefill.json

Batch 1, 64 heads of 8 (as many kv heads as query heads), n_taylor 4, window 64, sinks 4, float32, the window
without re-centring (``window``) and re-centred at alpha 0.0 (``recentred``), under ``torch.no_grad``: one
``sata.sata_attention(q, k, v, is_causal=True, return_state=True)`` call per measurement, for each length and
thread count (``--threads``: 1 and torch's default). The calls are measured in interleaved rounds (a busy spell
of the machine hits all of them); medians, and the ratios of the medians. The window mode's PyTorch path (what a call cost before the kernel) is timed once at the shortest length.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

import sata
from sata.ops import force_path
from _report import write_json  # the script's own folder is on sys.path
from window_decode import add_window_config, window_configs


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_window_config(p)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per length and thread count")
    p.add_argument("--torch-path", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the window mode's PyTorch path once at the shortest length")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args()


def main() -> None:
    args = parse()
    torch.manual_seed(0)
    H, d, P = args.heads, args.d_head, args.n_taylor
    settings = {"plain": {}, **window_configs(args)}
    common = dict(n_taylor=P, is_causal=True, return_state=True)
    rows = []
    with torch.no_grad():
        for threads in dict.fromkeys(args.threads):
            torch.set_num_threads(threads)
            for L in args.lengths:
                q, k, v = (torch.randn(1, H, L, d) for _ in range(3))
                calls = {name: (lambda kw=kw: sata.sata_attention(q, k, v, **common, **kw)) for name, kw in settings.items()}
                for call in calls.values():
                    call()                                   # plans, caches and pages warm
                times = {name: [] for name in calls}
                for _ in range(args.rounds):
                    for name, call in calls.items():
                        t0 = time.perf_counter()
                        call()
                        times[name].append(time.perf_counter() - t0)
                med = {name: statistics.median(ts) for name, ts in times.items()}
                row = dict(threads=threads, tokens=L)
                for name in calls:
                    row[f"{name}_s"] = med[name]
                    if name != "plain":
                        row[f"{name}_ratio"] = med[name] / med["plain"]
                rows.append(row | {f"{name}_all_s": ts for name, ts in times.items()})
                print(f"threads {threads:>2}  {L:>6} tokens  " + "  ".join(
                    f"{name} {med[name]:7.3f} s" + ("" if name == "plain" else f" ({med[name] / med['plain']:.3f}x)")
                    for name in calls), flush=True)
        torch_s = None
        if args.torch_path:
            L = min(args.lengths)
            q, k, v = (torch.randn(1, H, L, d) for _ in range(3))
            with force_path(kernels=False):
                t0 = time.perf_counter()
                sata.sata_attention(q, k, v, **common, **settings[list(settings)[-1]])
                torch_s = time.perf_counter() - t0
            print(f"window prefill through the PyTorch path ({L} tokens, {torch.get_num_threads()} threads): {torch_s:.2f} s")
    print(f"# window prefill: batch 1, {H} heads of {d}, n_taylor {P}, window {args.window}, sinks {args.sinks}, "
          f"recentred: alpha {args.recentre}, float32, medians of {args.rounds}; load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        write_json(args.json, args, rows, torch_path_window_s=torch_s)

if __name__ == "__main__":
    main()
