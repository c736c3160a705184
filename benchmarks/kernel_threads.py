"""How the fused CPU kernels use threads, idle and beside a busy process (issue 16, part 1).

    python benchmarks/kernel_threads.py threshold      # kernel alone: 1 vs all threads by work per call
    python benchmarks/kernel_threads.py decode         # one decode step, 1 and 2 threads, contexts 1K / 1M
    python benchmarks/kernel_threads.py prefill        # causal prefill of 64K tokens and torch's fp32 matmul
    python benchmarks/kernel_threads.py build          # build time of the kernels into an empty cache
    ... --src /work/main/src                           # the same (decode, prefill, build) for another checkout

Every measurement runs twice: on the machine as it is, then beside one CPU-bound process
(``python -c 'while True: pass'``) started by this script. Per-call times are reported as the
median and the mean: a worker the scheduler does not run stalls a call for a time slice, which
shows in the mean (and in the time a user waits) long before it shows in the median. The load
average is printed with every table; the machine may be shared.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time


@contextlib.contextmanager
def busy(on: bool):
    """One CPU-bound competitor while the block runs (``on``), else nothing."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if on else None
    try:
        time.sleep(0.3 if on else 0.0)
        yield
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def per_call_us(fn, seconds: float, warmup: int = 20) -> tuple[float, float, int]:
    """Median and mean microseconds of ``fn()`` called repeatedly for about ``seconds``."""
    for _ in range(warmup):
        fn()
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6, statistics.fmean(times) * 1e6, len(times)


def load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


def threshold(args) -> None:
    """The kernel alone on growing work per call, forced to one thread and to all of torch's."""
    import torch
    from sata import _kernels
    from sata.basis import feature_dim

    H, E, P = args.heads, args.head_size, args.n_taylor
    D, F = feature_dim(E, P), E + 1
    torch.set_num_threads(args.threads)
    cases = []
    for B in (1, 4, 16, 64, 256):
        plan = _kernels.decode_plan(B * H, 1, E, E, P, torch.float32, 1.0, E ** -0.5, torch.float32, (), ())
        q, k, v, y = (torch.randn(B * H, E) for _ in range(4))
        S = torch.zeros(B * H, F, D)
        cases.append((f"decode B={B}", 2.0 * B * H * 2 * F * D, plan._args,
                      lambda plan=plan, q=q, k=k, v=v, S=S, y=y: plan(q, k, v, None, S, S, y)))
    plan = _kernels.prefill_plan(H, 1, E, E, P, torch.float32, 1.0, E ** -0.5, True, torch.float32)
    for L in (32, 128, 512, 2048, 8192):
        q, k, v, y = (torch.randn(1, H, L, E) for _ in range(4))
        S = torch.zeros(1, H, D, F)
        cases.append((f"prefill L={L}", 2.0 * H * 2 * L * F * D, plan._args,
                      lambda q=q, k=k, v=v, S=S, y=y: plan(q, k, v, None, S, y)))
    keep = plan._args.work_per_thread
    print(f"kernel alone, {H} heads of {E}, n_taylor={P}, torch threads {args.threads}; work = 2 F D (keys + "
          f"queries) flops per head; median / mean us per call")
    for on in (False, True):
        with busy(on):
            print(f"-- {'with one busy process' if on else 'as is'} ({load()})")
            for name, flops, cargs, fn in cases:
                row = []
                for force in (1e30, 1.0):  # one thread, all threads
                    cargs.work_per_thread = force
                    med, mean, n = per_call_us(fn, args.seconds)
                    row.append((med, mean))
                cargs.work_per_thread = keep
                (m1, a1), (m2, a2) = row
                print(f"{name:>16} {flops / 1e6:9.2f} Mflop | 1 thread {m1:9.1f} / {a1:9.1f} | {args.threads} "
                      f"threads {m2:9.1f} / {a2:9.1f} | mean 1/{args.threads} threads {a1 / a2:5.2f}", flush=True)


def decode(args) -> None:
    """A full in-place ``sata_attention`` decode step on states of 1K and 1M tokens, 1 and 2 threads."""
    import dataclasses

    import torch
    import sata

    H, E, P = args.heads, args.head_size, args.n_taylor
    q, k, v = (torch.randn(1, H, 1, E) for _ in range(3))
    with torch.no_grad():
        _, st1k = sata.sata_attention(*(torch.randn(1, H, 1024, E) for _ in range(3)), n_taylor=P, is_causal=True,
                                      return_state=True)
        # the state of the 1K tokens repeated 1024 times: the cost per token does not depend on it
        st1m = dataclasses.replace(st1k, kv=st1k.kv * 1024, n_tokens=1024 * 1024)
    print(f"decode step (sata_attention in place), {H} heads of {E}, n_taylor={P}; median / mean us per call; "
          f"kernels {sata._kernels.status()}")
    for on in (False, True):
        with busy(on):
            print(f"-- {'with one busy process' if on else 'as is'} ({load()})")
            for threads in (1, 2):
                torch.set_num_threads(threads)
                for name, st in (("1K", st1k), ("1M", st1m)):
                    st = st.clone()
                    with torch.no_grad():
                        med, mean, n = per_call_us(lambda: sata.sata_attention(
                            q, k, v, n_taylor=P, is_causal=True, state=st, return_state=True, inplace=True),
                            args.seconds, warmup=200)
                    print(f"   {threads} thread(s), context {name}: {med:8.1f} / {mean:8.1f} us ({n} calls)", flush=True)


def prefill(args) -> None:
    """Causal prefill of ``--length`` tokens against torch's fp32 matmul throughput, same run."""
    import torch
    import sata

    H, E, P, L = args.heads, args.head_size, args.n_taylor, args.length
    torch.set_num_threads(args.threads)
    q, k, v = (torch.randn(1, H, L, E) for _ in range(3))
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    flops = H * L * sata.flops_per_token(E, E, P)
    print(f"causal prefill, {L} tokens, {H} heads of {E}, n_taylor={P}, {args.threads} threads; "
          f"kernels {sata._kernels.status()}")
    for on in (False, True):
        with busy(on):
            with torch.no_grad():
                sata.sata_attention(q[:, :, :4096], k[:, :, :4096], v[:, :, :4096], n_taylor=P, is_causal=True)
                t = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    sata.sata_attention(q, k, v, n_taylor=P, is_causal=True)
                    t.append(time.perf_counter() - t0)
                mm = []
                for _ in range(10):
                    t0 = time.perf_counter()
                    torch.mm(a, b)
                    mm.append(time.perf_counter() - t0)
            sec, mm_rate = statistics.median(t), 2 * 2048 ** 3 / statistics.median(mm)
            print(f"-- {'with one busy process' if on else 'as is'} ({load()}): {sec * 1e3:.0f} ms, "
                  f"{L / sec / 1e6:.3f} M tokens/s, {flops / sec / 1e9:.1f} GFLOP/s | fp32 matmul 2048^3 "
                  f"{mm_rate / 1e9:.1f} GFLOP/s | ratio {flops / sec / mm_rate:.0%}", flush=True)


def build(args) -> None:
    """Wall time of building the kernels into an empty cache directory."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, SATA_KERNEL_CACHE=cache)
        code = ("import time, torch, sata; t0 = time.perf_counter(); lib = sata._kernels.load(); "
                "print(f'{time.perf_counter() - t0:.2f} s ({sata._kernels.status()})')")
        print(f"build ({load()}):", subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                                  text=True, check=True).stdout.strip())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("threshold", "decode", "prefill", "build"))
    ap.add_argument("--src", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"),
                    help="the sata sources to measure (default: this checkout's)")
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--head-size", type=int, default=8)
    ap.add_argument("--n-taylor", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--length", type=int, default=65536, help="prefill: tokens (default 65536)")
    ap.add_argument("--repeats", type=int, default=3, help="prefill: timed runs (default 3)")
    ap.add_argument("--seconds", type=float, default=1.0, help="time per measured case (default 1)")
    args = ap.parse_args()
    sys.path.insert(0, os.path.abspath(args.src))
    os.environ["PYTHONPATH"] = os.path.abspath(args.src)  # for the build's subprocess
    {"threshold": threshold, "decode": decode, "prefill": prefill, "build": build}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
