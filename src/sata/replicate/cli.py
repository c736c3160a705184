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
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for everything (default: one-token decode steps on 1 thread, the rest "
                             "one per core)")
    parser.add_argument("--max-memory", default=None,
                        help="most memory a KV cache may take (default: min(8G, half the free RAM))")
    parser.add_argument("--memory-budget", default=None,
                        help="sata's per-call memory budget, e.g. 16G (default: sata's, 4 GiB)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    from .store import ResumeMismatch

    problem = _problem(args)
    if problem:
        print(f"sata replicate: {problem}", file=sys.stderr)
        return 2
    try:
        run = _Run(args)
    except ResumeMismatch as e:
        print(f"sata replicate: {e}", file=sys.stderr)
        return 2
    interrupted = run.run_parts()
    wall = time.perf_counter() - run.t_start
    out = run.out
    print(f"\n{'interrupted' if interrupted else 'done'} in {wall:.0f} s: {out / 'report.md'}, "
          f"{out / 'results.json'}, {len(run.results['figures'])} figures in {out}/")
    if interrupted:
        print("finished parts are kept; continue with the same command plus --resume", file=sys.stderr)
        return 130
    _print_summary(run.results)
    return 0


def _problem(args: argparse.Namespace) -> str | None:
    """What makes these arguments or this environment unusable, or ``None``."""
    import torch

    from .report import PART_TITLES

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        return "--device cuda requested but CUDA is not available; use --device cpu"
    unknown = [p for p in _wanted(args) if p not in PART_TITLES]
    if unknown:
        return f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PART_TITLES)}"
    if not _wanted(args):
        return f"--parts names no part; choose from {', '.join(PART_TITLES)}"
    from ..bench.cli import _bad_option

    problem = _bad_option(args)  # --threads, --max-memory, --memory-budget
    if problem:
        return problem
    try:
        import matplotlib  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError as e:
        return f"needs matplotlib and tqdm ({e}); install them with: pip install 'sata-attention[plot]'"
    return None


def _wanted(args: argparse.Namespace) -> list[str]:
    return [p.strip() for p in args.parts.split(",") if p.strip()]


class _Run:
    """One invocation: settings, the store of finished parts, and the results published so far."""

    def __init__(self, args: argparse.Namespace):
        import sata

        from ..bench.cli import _max_memory
        from ..bench.timing import LATENCY_THREADS, busy_warning, command_line, machine_info, set_threads, threads_note
        from . import figures
        from .config import preset
        from .store import Store

        self.t_start = time.perf_counter()
        threads = set_threads(args.threads)
        latency = args.threads or LATENCY_THREADS
        if args.memory_budget:
            sata.set_memory_budget(args.memory_budget)
        self.cfg = preset(args.mode, device=args.device, dtype=args.dtype)
        self.max_bytes = _max_memory(args.max_memory)
        self.latency_threads = latency
        self.out = Path(args.out)
        self.store = Store(self.out, self.cfg.to_dict(), resume=args.resume)
        if not args.resume:   # a fresh run: no figure or report of an earlier run may survive in --out
            for name in (*figures.FIGURES, "report.md", "results.json"):
                (self.out / name).unlink(missing_ok=True)
        self.progress = not args.no_progress
        self.wanted = _wanted(args)
        machine = machine_info(args.device)
        self.device_label = _device_label(machine, latency)
        note = threads_note(threads, latency, args.threads is not None)
        print(f"sata replicate --{self.cfg.mode}: writing to {self.out}/ ({self.device_label}, {self.cfg.dtype}); "
              f"{note}", flush=True)
        busy = busy_warning(machine)
        if busy:
            print(f"warning: {busy}", file=sys.stderr, flush=True)
        self.results = {"command": command_line("replicate", args, add_arguments),
                        "date": datetime.datetime.now().isoformat(timespec="seconds"), "config": self.cfg.to_dict(),
                        "machine": machine, "threads": {"bulk": threads, "one_token_decode": latency},
                        "threads_note": note, "resumed": bool(args.resume), "status": {}, "parts": {},
                        "figures": {}, "warnings": [busy] if busy else []}

    def runners(self) -> dict:
        """Per part: (run it, collect what an interrupted run finished or None, plot it)."""
        from . import costs, decode, error, figures

        cfg, store = self.cfg, self.store
        return {
            "error": (lambda: error.run_error(cfg, store, self.progress), lambda: error.collect_error(cfg, store),
                      figures.plot_error),
            "decode": (lambda: decode.run_decode_part(cfg, store, self.max_bytes, self.progress, self.latency_threads),
                       lambda: decode.collect_decode(cfg, store), figures.plot_decode),
            "costs": (lambda: _cached(store, "costs", lambda: costs.run_costs(cfg)), None, figures.plot_costs),
            "packing": (lambda: _cached(store, "packing", lambda: costs.run_packing(cfg)), None, figures.plot_packing),
            "precision": (lambda: _cached(store, "precision", lambda: costs.run_precision(cfg)), None,
                          figures.plot_precision),
        }

    def publish(self) -> None:
        """Figures, results.json and report.md from everything finished so far."""
        from ..bench.timing import write_json
        from .report import summarise, write_report

        self.results["wall_seconds"] = time.perf_counter() - self.t_start
        self.results["summary"] = summarise(self.results["parts"])
        write_json(self.out / "results.json", self.results)
        write_report(self.out / "report.md", self.results)

    def run_parts(self) -> bool:
        """Run the wanted parts, publishing after each; returns whether Ctrl-C stopped the run."""
        from . import figures

        runners = self.runners()
        try:
            for name in self.wanted:
                run, _, plot = runners[name]
                t0 = time.perf_counter()
                res = run()
                res["seconds"] = time.perf_counter() - t0
                self.results["parts"][name] = res
                for fig in plot(res, self.out, self.device_label):
                    self.results["figures"][fig] = figures.FIGURES[fig]
                self.results["status"][name] = "done"
                self.publish()
                if not self.progress:
                    print(f"  {name}: done in {res['seconds']:.1f} s", flush=True)
        except KeyboardInterrupt:
            self._keep_partial(runners)
            self.publish()
            return True
        return False

    def _keep_partial(self, runners: dict) -> None:
        for name in self.wanted:
            if name in self.results["status"]:
                continue
            collect = runners[name][1]
            partial = collect() if collect else None
            if partial and (partial.get("combos") or partial.get("runs")):
                self.results["parts"][name] = partial
                self.results["status"][name] = "interrupted (partial)"
            else:
                self.results["status"][name] = "not run"


def _cached(store, key: str, compute):
    got = store.get(key)
    if got is None:
        got = compute()
        store.put(key, got)
    return got


def _device_label(machine: dict, latency_threads: int) -> str:
    if machine["device"].startswith("cuda"):
        return f"GPU {machine.get('gpu', machine['device'])}"
    n = machine["torch_threads"]
    return f"CPU ({machine['cpu']}, {n} thread{'s' if n != 1 else ''}, decode steps on {latency_threads})"


def _print_summary(results: dict) -> None:
    from .report import _decode_summary, _error_table, decode_verdict

    s = results["summary"]
    if "decode" in s:
        print(f"\n{decode_verdict(results['parts']['decode'])}")
        print(_decode_summary(s["decode"]))
    if "error" in results["parts"]:
        print("\nMedian log10 |Y - Yhat| vs float64 softmax attention:")
        print(_error_table(results["parts"]["error"], "median_log10", lambda x: f"{x:.2f}"))
