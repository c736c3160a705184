"""Reproduce the paper's evaluation: PNG figures, report.md and results.json.

    sata replicate [--quick | --full] [--out DIR] [--device cpu|cuda] [--dtype float32] [--resume]

Five parts: (1) reconstruction error against float64 softmax attention, (2) time and memory per
generated token against a KV cache as the context grows, (3) state size and FLOPs against a KV
cache and multi-head heatmaps, (4) the saving of tight packing, (5) the scaling constants
against floating-point resolution. ``--quick`` (the default) runs in minutes on a laptop CPU;
``--full`` uses the paper's sizes (100K-token errors, contexts up to 1e8: a GPU and hours).
Each finished unit is saved under ``DIR/parts`` at once: Ctrl-C keeps it, ``--resume`` skips it.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

_DTYPES = ("float32", "float64", "float16", "bfloat16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="minutes on a laptop CPU (the default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="the paper's sizes: 100K-token errors, contexts to 1e8 (GPU, hours)")
    mode.add_argument("--tiny", dest="mode", action="store_const", const="tiny", help=argparse.SUPPRESS)
    parser.set_defaults(mode="quick")
    parser.add_argument("--out", default="sata-replicate", help="output directory")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=_DTYPES,
                        help="dtype of the inputs sata runs on (references are float64)")
    parser.add_argument("--resume", action="store_true", help="keep finished parts in --out and run the rest")
    parser.add_argument("--parts", default="error,decode,costs,packing,precision",
                        help="comma-separated parts to run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    parser.add_argument("--max-memory", default=None,
                        help="most memory a KV cache may take (default: min(8G, half the free RAM))")
    parser.add_argument("--memory-budget", default=None,
                        help="sata's per-call memory budget, e.g. 16G (default: sata's, 4 GiB)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    import torch

    import sata

    from ..bench.cli import _max_memory
    from ..bench.timing import busy_warning, command_line, machine_info, set_threads, write_json
    from . import costs, decode, error, figures
    from .config import preset
    from .report import PART_TITLES, summarise, write_report
    from .store import ResumeMismatch, Store

    t_start = time.perf_counter()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("sata replicate: --device cuda requested but CUDA is not available; use --device cpu", file=sys.stderr)
        return 2
    wanted = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in PART_TITLES]
    if unknown:
        print(f"sata replicate: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PART_TITLES)}",
              file=sys.stderr)
        return 2
    try:
        import matplotlib  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError as e:
        print(f"sata replicate needs matplotlib and tqdm ({e}); install them with: pip install 'sata-attention[plot]'",
              file=sys.stderr)
        return 2
    threads = set_threads(args.threads)
    if args.memory_budget:
        sata.set_memory_budget(args.memory_budget)
    cfg = preset(args.mode, device=args.device, dtype=args.dtype)
    max_bytes = _max_memory(args.max_memory)
    out = Path(args.out)
    try:
        store = Store(out, cfg.to_dict(), resume=args.resume)
    except ResumeMismatch as e:
        print(f"sata replicate: {e}", file=sys.stderr)
        return 2
    if not args.resume:   # a fresh run: no figure or report of an earlier run may survive in --out
        for name in (*figures.FIGURES, "report.md", "results.json"):
            (out / name).unlink(missing_ok=True)
    progress = not args.no_progress
    machine = machine_info(args.device)
    device_label = _device_label(machine)
    print(f"sata replicate --{cfg.mode}: writing to {out}/ ({device_label}, {cfg.dtype})", flush=True)
    busy = busy_warning(machine)
    if busy:
        print(f"warning: {busy}", file=sys.stderr, flush=True)

    results = {"command": command_line("replicate", args, add_arguments), "date": datetime.datetime.now().isoformat(timespec="seconds"),
               "config": cfg.to_dict(), "machine": machine, "resumed": bool(args.resume), "status": {}, "parts": {},
               "figures": {}, "warnings": [busy] if busy else []}
    runners = {
        "error": (lambda: error.run_error(cfg, store, progress), lambda: error.collect_error(cfg, store),
                  figures.plot_error),
        "decode": (lambda: decode.run_decode_part(cfg, store, max_bytes, progress),
                   lambda: decode.collect_decode(cfg, store), figures.plot_decode),
        "costs": (lambda: _cached(store, "costs", lambda: costs.run_costs(cfg)), None, figures.plot_costs),
        "packing": (lambda: _cached(store, "packing", lambda: costs.run_packing(cfg)), None, figures.plot_packing),
        "precision": (lambda: _cached(store, "precision", lambda: costs.run_precision(cfg)), None,
                      figures.plot_precision),
    }

    def publish() -> None:
        """Figures, results.json and report.md from everything finished so far."""
        results["wall_seconds"] = time.perf_counter() - t_start
        results["summary"] = summarise(results["parts"])
        write_json(out / "results.json", results)
        write_report(out / "report.md", results)

    interrupted = False
    try:
        for i, name in enumerate(wanted, 1):
            run, _, plot = runners[name]
            t0 = time.perf_counter()
            res = run()
            res["seconds"] = time.perf_counter() - t0
            results["parts"][name] = res
            for fig in plot(res, out, device_label):
                results["figures"][fig] = figures.FIGURES[fig]
            results["status"][name] = "done"
            publish()
            if not progress:
                print(f"  {name}: done in {res['seconds']:.1f} s", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        for name in wanted:
            if name not in results["status"]:
                collect = runners[name][1]
                partial = collect() if collect else None
                if partial and (partial.get("combos") or partial.get("runs")):
                    results["parts"][name] = partial
                    results["status"][name] = "interrupted (partial)"
                else:
                    results["status"][name] = "not run"
        publish()
    wall = time.perf_counter() - t_start
    print(f"\n{'interrupted' if interrupted else 'done'} in {wall:.0f} s: {out / 'report.md'}, "
          f"{out / 'results.json'}, {len(results['figures'])} figures in {out}/")
    if interrupted:
        print("finished parts are kept; continue with the same command plus --resume", file=sys.stderr)
        return 130
    _print_summary(results)
    return 0


def _cached(store, key: str, compute):
    got = store.get(key)
    if got is None:
        got = compute()
        store.put(key, got)
    return got


def _device_label(machine: dict) -> str:
    if machine["device"].startswith("cuda"):
        return f"GPU {machine.get('gpu', machine['device'])}"
    n = machine["torch_threads"]
    return f"CPU ({machine['cpu']}, {n} thread{'s' if n != 1 else ''})"


def _print_summary(results: dict) -> None:
    from .report import _decode_summary, _error_table

    s = results["summary"]
    if "decode" in s:
        print("\nDecode time per generated token (sata flat, SDPA+KV cache growing):")
        print(_decode_summary(s["decode"]))
    if "error" in results["parts"]:
        print("\nMedian log10 |Y - Yhat| vs float64 softmax attention:")
        print(_error_table(results["parts"]["error"], "median_log10", lambda x: f"{x:.2f}"))
