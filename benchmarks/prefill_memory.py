"""Peak memory of one causal prefill beyond its inputs and output (issue 2's acceptance test).

    python benchmarks/prefill_memory.py                      # 262,144 tokens, 64 heads of 8, n_taylor=4
    python benchmarks/prefill_memory.py --tokens 32768 --heads 4 --json

Allocates q, k, v ``[batch, heads, tokens, head_dim]`` first, resets the process's peak
resident set (``/proc/self/clear_refs``), runs one forward of ``sata.sata_attention`` and reads
``VmHWM``: extra = peak - resident before the call - the output's bytes. Linux only. Run it
in its own process (it is one): other allocations in the same process would blur the number.
The paper's cumulative-sum formulation would hold ``tokens x m_p x d_v`` floats per power and head.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import sata  # noqa: E402
from sata.bench.generate import _reset_peak_rss as _reset_peak, _status_bytes  # noqa: E402


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (``VmRSS``, ``VmHWM``)."""
    value = _status_bytes(field)
    if value is None:
        raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")
    return value


def measure(tokens: int, heads: int, head_dim: int, n_taylor: int, batch: int = 1, dtype: str = "float32",
            causal: bool = True, grad: bool = False, threads: int | None = None, kernels: bool = True) -> dict:
    """Run one forward (and backward with ``grad``) and return the measured numbers."""
    if threads:
        torch.set_num_threads(threads)
    if not kernels:  # as if no C++ compiler were available: the PyTorch paths
        sata._kernels.load = lambda: None
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    shape = (batch, heads, tokens, head_dim)
    q, k, v = (torch.randn(shape, generator=gen, dtype=dt) for _ in range(3))
    # warm up on a few tokens: builds the kernels, the basis and the caches outside the measurement
    sata.sata_attention(q[..., :3, :], k[..., :3, :], v[..., :3, :], n_taylor=n_taylor, is_causal=causal)
    if grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    before = _status("VmRSS")
    exact = _reset_peak()
    start = time.perf_counter()
    y = sata.sata_attention(q, k, v, n_taylor=n_taylor, is_causal=causal)
    if grad:
        y.sum().backward()  # the gradients (3 x the input size) are outputs too
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    outputs = y.numel() * y.element_size() + (sum(t.grad.numel() * t.grad.element_size() for t in (q, k, v)) if grad else 0)
    inputs = 3 * q.numel() * q.element_size()
    return {
        "tokens": tokens, "heads": heads, "head_dim": head_dim, "n_taylor": n_taylor, "batch": batch,
        "dtype": dtype, "causal": causal, "grad": grad, "threads": torch.get_num_threads(),
        "kernels": sata._kernels.load() is not None,
        "inputs_mib": inputs / 2**20, "outputs_mib": outputs / 2**20,
        "extra_mib": (peak - before - outputs) / 2**20,
        "peak_reset": exact, "seconds": seconds,
        "finite": bool(torch.isfinite(y).all()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=262_144)
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=8)
    p.add_argument("--n-taylor", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float16", "bfloat16", "float32", "float64"])
    p.add_argument("--non-causal", action="store_true")
    p.add_argument("--grad", action="store_true", help="also run the backward pass")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-kernels", action="store_true", help="use the PyTorch paths (as without a C++ compiler)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of a sentence")
    args = p.parse_args(argv)
    r = measure(args.tokens, args.heads, args.head_dim, args.n_taylor, args.batch, args.dtype,
                causal=not args.non_causal, grad=args.grad, threads=args.threads, kernels=not args.no_kernels)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{'causal' if r['causal'] else 'non-causal'} {r['dtype']} {'forward+backward' if r['grad'] else 'forward'}, "
              f"{r['tokens']:,} tokens x {r['heads']} heads of {r['head_dim']}, n_taylor={r['n_taylor']}, "
              f"batch {r['batch']} ({'fused kernels' if r['kernels'] else 'PyTorch path'}, {r['threads']} threads): "
              f"{r['extra_mib']:.1f} MiB beyond inputs ({r['inputs_mib']:.0f} MiB) and outputs "
              f"({r['outputs_mib']:.0f} MiB), {r['seconds']:.1f} s")
        print(f"{r['extra_mib']:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
