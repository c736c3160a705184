"""Precision of a state over a long stream: float32 modes against a float64 accumulation.

Streams N tokens (default 1e8) of random queries, keys and values through causal chunked
prefill, ``--segment`` tokens per call, and reports the relative error of the final state
and of the outputs of the last tokens against a float64 reference (float64 inputs holding the
same float32 values, float64 state). Modes (``--modes``):

    float32        sata_attention, float32 inputs and state (the default everywhere)
    float64-state  sata_attention with SATAState.zeros(..., dtype=torch.float64), float32 inputs
                   (the core's mode; today it leaves the fused kernel: slow, see docs/RELIABILITY.md)
    float64-acc    sata.precision.stream_attention, float64 running state: float32 segment sums added in float64
    kahan          sata.precision.stream_attention, CompensatedState: float32 hi + float32 lo (Neumaier)

    nice python benchmarks/long_stream.py                       # 1e8 tokens, ~20-30 min on 2 busy cores
    nice python benchmarks/long_stream.py --tokens 1e6 --modes float32,float64-state,float64-acc,kahan
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import sata  # noqa: E402
from sata.precision import CompensatedState, stream_attention  # noqa: E402

MODES = ("float32", "float64-state", "float64-acc", "kahan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tokens", type=float, default=1e8, help="tokens to stream")
    p.add_argument("--segment", type=int, default=65536, help="tokens per prefill call")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-head", type=int, default=8)
    p.add_argument("--n-taylor", type=int, default=4)
    p.add_argument("--last", type=int, default=1024, help="compare the outputs of this many final tokens")
    p.add_argument("--value-mean", type=float, default=0.0, help="mean of the values (0: N(0,1) values)")
    p.add_argument("--modes", default="float32,float64-acc,kahan", help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--block", type=int, default=1024, help="float64-acc/kahan: tokens per from-zero partial sum")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        p.error(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    N, T, H, E, P = int(args.tokens), args.segment, args.heads, args.d_head, args.n_taylor
    n_seg = math.ceil(N / T)
    zeros = lambda dtype: sata.SATAState.zeros((1,), H, E, E, P, dtype=dtype)
    states = {
        "reference": zeros(torch.float64),
        "float32": zeros(torch.float32),
        "float64-state": zeros(torch.float64),
        "float64-acc": zeros(torch.float64),
        "kahan": CompensatedState.zeros((1,), H, E, E, P),
    }
    seconds = dict.fromkeys(["reference", *modes], 0.0)
    gen = torch.Generator().manual_seed(args.seed)
    opts = dict(n_taylor=P, is_causal=True)
    outs: dict[str, torch.Tensor] = {}
    with tqdm(total=N, unit="tok", unit_scale=True, desc=f"{N:.0e} tokens", smoothing=0.05) as bar:
        for i in range(n_seg):
            L = min(T, N - i * T)
            q, k, v = (torch.randn(1, H, L, E, generator=gen) for _ in range(3))          # [1, H, L, E]
            if args.value_mean:
                v += args.value_mean
            last = i == n_seg - 1
            for mode in ["reference", *modes]:
                t0 = time.perf_counter()
                st = states[mode]
                if mode == "reference":
                    y, st = sata.sata_attention(q.double(), k.double(), v.double(), state=st, return_state=True, **opts)
                elif mode in ("float32", "float64-state"):
                    y, st = sata.sata_attention(q, k, v, state=st, return_state=True, **opts)
                else:
                    y, st = stream_attention(q, k, v, state=st, block=args.block, **opts)
                states[mode] = st
                seconds[mode] += time.perf_counter() - t0
                if last:
                    outs[mode] = y[..., -args.last :, :].double()
            bar.update(L)
            if last:
                q_last = q[..., -args.last :, :]

    ref_kv, ref_y = states["reference"].kv, outs["reference"]
    results = {"tokens": N, "segment": T, "heads": H, "d_head": E, "n_taylor": P, "value_mean": args.value_mean,
               "block": args.block,
               "last": min(args.last, L), "modes": {}}
    for mode in modes:
        st = states[mode]
        kv = (st.value() if isinstance(st, CompensatedState) else st).kv.double()
        assert (st.n_tokens if not isinstance(st, CompensatedState) else st.n_tokens) == N
        results["modes"][mode] = {
            "state_rel": _rel(kv, ref_kv),
            "state_values_rel": _rel(kv[..., :E], ref_kv[..., :E]),            # numerator columns only
            "state_normaliser_rel": _rel(kv[..., E], ref_kv[..., E]),
            "output_rel": _rel(outs[mode], ref_y),
            "output_max_token_rel": _max_token_rel(outs[mode], ref_y),
            "seconds": seconds[mode],
            "time_vs_float32": seconds[mode] / seconds["float32"] if "float32" in seconds else None,
        }
    results["reference_seconds"] = seconds["reference"]
    # the floor of any float32 mode: the last queries read the exact final state in float32
    empty = q_last[..., :0, :]
    read = lambda qq, st: sata.sata_attention(qq, empty.to(qq.dtype), empty.to(qq.dtype), n_taylor=P, state=st).double()
    y32, y64 = read(q_last, states["reference"].to(dtype=torch.float32)), read(q_last.double(), states["reference"])
    results["float32_read_floor"] = _rel(y32, y64)
    results["float32_read_floor_max_token"] = _max_token_rel(y32, y64)

    print(f"\n{N:,} tokens in segments of {T:,}, {H} heads of size {E}, n_taylor={P}; "
          f"relative errors against float64 (outputs: last {results['last']} tokens)")
    print(f"{'mode':<15}{'state':>11}{'state[V]':>11}{'state[1]':>11}{'outputs':>11}{'max token':>11}{'seconds':>10}")
    for mode, r in results["modes"].items():
        print(f"{mode:<15}{r['state_rel']:>11.2e}{r['state_values_rel']:>11.2e}{r['state_normaliser_rel']:>11.2e}"
              f"{r['output_rel']:>11.2e}{r['output_max_token_rel']:>11.2e}{r['seconds']:>10.1f}")
    print(f"{'(reference)':<15}{'':>55}{seconds['reference']:>10.1f}")
    print(f"{'(floor)':<15}{'':>33}{results['float32_read_floor']:>11.2e}"
          f"{results['float32_read_floor_max_token']:>11.2e}   <- the last queries reading the exact state in float32")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _max_token_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """The worst token's ``|a_t - b_t| / |b_t|`` (norms over the value dimension)."""
    return ((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-300)).max().item()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frobenius-norm relative error ``|a - b| / |b|``."""
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


if __name__ == "__main__":
    sys.exit(main())
