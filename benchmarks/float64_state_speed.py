"""Time of one causal prefill call with a float32 state against a float64 state (float32 inputs).

    nice python benchmarks/float64_state_speed.py --threads 1

Alternates the two modes in one process and reports medians, so machine load hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import sata  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--length", type=int, default=65536)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-head", type=int, default=8)
    p.add_argument("--n-taylor", type=int, default=4)
    p.add_argument("--repeats", type=int, default=6)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    H, E, L, P = args.heads, args.d_head, args.length, args.n_taylor
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, L, E, generator=g) for _ in range(3))
    states = {"float32": sata.SATAState.zeros((1,), H, E, E, P),
              "float64-state": sata.SATAState.zeros((1,), H, E, E, P, dtype=torch.float64)}
    times: dict[str, list[float]] = {name: [] for name in states}
    for _ in range(args.repeats):
        for name, st in states.items():
            t0 = time.perf_counter()
            sata.sata_attention(q, k, v, n_taylor=P, is_causal=True, state=st, return_state=True)
            times[name].append(time.perf_counter() - t0)
    m = {name: statistics.median(t) for name, t in times.items()}
    print(f"threads={args.threads}, {L:,} tokens, {H} heads of size {E}, n_taylor={P}: median s per call "
          f"float32 {m['float32']:.3f}, float64-state {m['float64-state']:.3f} ({m['float64-state'] / m['float32']:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
