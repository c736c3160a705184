"""Per-call cost of a tight decode loop, for comparing two source trees of sata.

    python benchmarks/decode_overhead.py --src /path/to/old/src --src src --rounds 9

One token per call, batch 1, one thread, on a state of 1,024 tokens:
``_, st = sata_attention(..., state=st, return_state=True)`` with ``inplace=True`` (a serving
loop) and ``inplace=False`` (a new state per token). Two shapes: 64 heads of 8 with n_taylor=4 (the decode
target), and 1 head of 2 with n_taylor=2, where the kernel's work is negligible and the time is
the per-call overhead of the Python around it. Each round runs every tree once, in a fresh
subprocess, alternating; the report gives per-tree medians over the rounds (each round's value is
itself the median of several timed bursts) and their ratios to the first tree. Times are the
thread's CPU time (one thread does all the work), so that other processes on a busy machine
inflate them less than wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, statistics, time, torch
torch.set_num_threads(1)
import sata

def per_call_us(step, calls=2000, bursts=9):
    for _ in range(500):
        step()
    runs = []
    for _ in range(bursts):
        t0 = time.thread_time()
        for _ in range(calls):
            step()
        runs.append((time.thread_time() - t0) / calls * 1e6)
    return statistics.median(runs)

out = {}
with torch.no_grad():
    for H, E, P in ((64, 8, 4), (1, 2, 2)):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, H, 1, E, generator=g) for _ in range(3))
        _, st0 = sata.sata_attention(*(torch.randn(1, H, 1024, E, generator=g) for _ in range(3)), n_taylor=P,
                                     is_causal=True, return_state=True)
        for inplace in (True, False):
            box = [st0.clone()]

            def step():  # a decode loop: every call continues from the state the last one returned
                _, box[0] = sata.sata_attention(q, k, v, n_taylor=P, is_causal=True, state=box[0], return_state=True,
                                                inplace=inplace)

            out[f"{H}x{E} P={P} {'inplace' if inplace else 'new_state'}"] = per_call_us(step)
print(json.dumps(out))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", action="append", required=True, help="a src directory holding the sata package")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    results: dict[str, list[dict]] = {s: [] for s in args.src}
    for _ in range(args.rounds):
        for src in args.src:
            proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True,
                                  env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin", "HOME": __import__("os").environ["HOME"]})
            results[src].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first = args.src[0]
    for case in results[first][0]:
        base = statistics.median(r[case] for r in results[first])
        for src in args.src:
            m = statistics.median(r[case] for r in results[src])
            print(f"{case:18s} {src:22s} {m:7.2f} us/call  x{m / base:.3f}  "
                  f"(rounds: {', '.join(f'{r[case]:.1f}' for r in results[src])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
