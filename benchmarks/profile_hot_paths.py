"""Where a decode step and a causal prefill spend their time (issue 4, targets 1a and 4a).

    python benchmarks/profile_hot_paths.py            # 64 heads of 8, n_taylor=4, 2 threads

Decode: a full ``sata_attention`` call on a state (in place) against its parts: the input
checks, the kernel wrapper and the C++ kernel alone. Prefill: microseconds per token of a
causal forward at 4K, 16K and 64K tokens (constant work per token should give constant time).
Medians of repeated timings; run on an idle machine.
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
from sata._checks import check_inputs  # noqa: E402
from sata._paths import kernel as glue  # noqa: E402
from sata._paths.tuning import DEFAULT  # noqa: E402


def per_call_us(fn, calls: int = 3000, repeats: int = 7) -> float:
    for _ in range(200):
        fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(runs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--head-size", type=int, default=8)
    ap.add_argument("--n-taylor", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", default="4096,16384,65536")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    H, E, P = args.heads, args.head_size, args.n_taylor
    q, k, v = (torch.randn(1, H, 1, E) for _ in range(3))
    with torch.no_grad():
        _, st = sata.sata_attention(*(torch.randn(1, H, 1024, E) for _ in range(3)), n_taylor=P, is_causal=True,
                                    return_state=True)
        kw = dict(n_taylor=P, is_causal=True, scale=None, enable_gqa=False, key_padding_mask=None, state=st)
        full = per_call_us(lambda: sata.sata_attention(q, k, v, n_taylor=P, is_causal=True, state=st,
                                                       return_state=True, inplace=True))
        checks = per_call_us(lambda: check_inputs("sata_attention", q, k, v, **kw))
        spec = check_inputs("sata_attention", q, k, v, **kw)
        step = lambda: glue.decode(q, k, v, spec, None, st, True, True, DEFAULT)   # the decode_kernel path
        step()                                                                    # builds the plan
        wrapper = per_call_us(step)
        plan, S, y = glue._decode_plan(spec), st._fmajor(), torch.empty_like(q)
        kernel = per_call_us(lambda: plan(q, k, v, None, S, S, y))
    print(f"decode, {H} heads of {E}, n_taylor={P}, {args.threads} threads: full call {full:.1f} us | input checks "
          f"{checks:.1f} | kernel wrapper {wrapper:.1f} | C++ kernel alone {kernel:.1f} | outside the kernel "
          f"{(full - kernel) / full:.0%}")
    for L in (int(x) for x in args.lengths.split(",")):
        q, k, v = (torch.randn(1, H, L, E) for _ in range(3))
        with torch.no_grad():
            sata.sata_attention(q, k, v, n_taylor=P, is_causal=True)
            times = []
            for _ in range(5 if L < 65536 else 3):
                t0 = time.perf_counter()
                sata.sata_attention(q, k, v, n_taylor=P, is_causal=True)
                times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        print(f"causal prefill, {L:,} tokens: {1e3 * t:.1f} ms, {1e6 * t / L:.2f} us per token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
