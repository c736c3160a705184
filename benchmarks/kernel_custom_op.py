"""Would registering the fused decode kernel as a ``torch.library`` custom op pay (issue 13, part 4)?

    python benchmarks/kernel_custom_op.py            # 64 heads of 8, n_taylor=4, batch 1, 1 thread

Measures, in one run:

- eager: microseconds per decode step through the plan directly (what ``sata.ops`` does) and
  through the same plan wrapped as a custom op (``torch.library.custom_op``, in-place state);
- ``torch.compile``: graph breaks (``torch._dynamo.explain``) of a small step function that calls
  the kernel directly and through the custom op, and the compiled step's time per call.

The custom op looks its plan up through ``sata._kernels.decode_plan`` (ops take tensors and
numbers, not plan objects), which is the price of the wrapper besides the dispatcher.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from sata import _kernels  # noqa: E402
from sata.basis import feature_dim  # noqa: E402
from kernel_threads import per_call_us  # noqa: E402  (this folder)


@torch.library.custom_op("sata_bench::decode", mutates_args=("S",))
def decode_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, S: torch.Tensor, n_taylor: int, sk: float) -> torch.Tensor:
    """One decode step in place on ``S [N, F, D]``: q ``[N, G, d]``, k ``[N, d]``, v ``[N, Ev]`` -> y ``[N, G, Ev]``."""
    N, G, d = q.shape
    Ev = v.shape[-1]
    plan = _kernels.decode_plan(N, G, d, Ev, n_taylor, q.dtype, 1.0, sk, S.dtype, (), ())
    y = q.new_empty(N, G, Ev)
    plan(q, k, v, None, S, S, y)
    return y


@decode_op.register_fake
def _(q, k, v, S, n_taylor, sk):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--head-size", type=int, default=8)
    ap.add_argument("--n-taylor", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=2.0, help="time per measured case (default 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    N, E, P = args.heads, args.head_size, args.n_taylor
    D, sk = feature_dim(E, P), E ** -0.5
    q, k, v = torch.randn(N, 1, E), torch.randn(N, E), torch.randn(N, E)
    S1, S2 = torch.zeros(N, E + 1, D), torch.zeros(N, E + 1, D)
    plan = _kernels.decode_plan(N, 1, E, E, P, torch.float32, 1.0, sk, torch.float32, (), ())

    def direct(q, k, v, S):
        y = q.new_empty(N, 1, E)
        plan(q, k, v, None, S, S, y)
        return y * 2  # some work around the kernel, as in a model

    def via_op(q, k, v, S):
        return decode_op(q, k, v, S, P, sk) * 2

    with torch.no_grad():
        torch.testing.assert_close(direct(q, k, v, S1), via_op(q, k, v, S2))     # the same step
        print(f"{N} heads of {E}, n_taylor={P}, {args.threads} thread(s), load {os.getloadavg()[0]:.2f}")
        print(f"eager, median us per step: direct {per_call_us(lambda: direct(q, k, v, S1), args.seconds)[0]:.1f} | "
              f"custom op {per_call_us(lambda: via_op(q, k, v, S2), args.seconds)[0]:.1f}")
        for name, fn, S in (("direct", direct, S1), ("custom op", via_op, S2)):
            torch._dynamo.reset()
            ex = torch._dynamo.explain(fn)(q, k, v, S)
            reasons = sorted({str(b.reason).splitlines()[0][:90] for b in ex.break_reasons})
            compiled = torch.compile(fn)
            compiled(q, k, v, S)
            t = per_call_us(lambda: compiled(q, k, v, S), args.seconds)[0]
            print(f"torch.compile, {name}: {ex.graph_count} graph(s), {ex.graph_break_count} break(s) "
                  f"{reasons} | {t:.1f} us per step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
