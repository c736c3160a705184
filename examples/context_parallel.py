"""Context parallelism with sata: one long sequence split across processes, exact.

Run on CPU with 2 processes (gloo), from the repository root:

    OMP_NUM_THREADS=1 PYTHONPATH=src torchrun --standalone --nproc-per-node 2 examples/context_parallel.py

With ``--window 64 --sinks 4 --recentre 0.5`` it runs the window mode (exact softmax on the last
64 positions, which may lie on earlier ranks, and the first 4 keys, the re-centred Taylor state for
the rest); the ranks then also exchange their window and sink keys, still independent of the length.

(``torchrun`` sets RANK, WORLD_SIZE, MASTER_ADDR, ...; on GPUs the backend is nccl.) Started
without torchrun (``python examples/context_parallel.py``), it starts those 2 processes itself.
Each rank holds one contiguous segment of the sequence, runs a forward and backward pass,
and with ``--check`` compares its outputs and gradients with one process running the whole
sequence (every rank recomputes that reference, so keep ``--length`` modest when checking).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

import sata
from sata.basis import state_size
from sata.budget import format_bytes
from sata.distributed import context_parallel_attention, state_exchange_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--length", type=int, default=32768, help="tokens in the whole sequence")
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA when fewer than --heads)")
    p.add_argument("--d-head", type=int, default=8)
    p.add_argument("--n-taylor", type=int, default=4)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float64")
    p.add_argument("--window", type=int, default=0, help="window mode: recent positions attended exactly")
    p.add_argument("--sinks", type=int, default=0, help="window mode: first keys attended exactly")
    p.add_argument("--recentre", type=float, default=None, help="window mode: alpha of the re-centred series")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="compare with one process running the whole sequence")
    args = p.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    dtype = getattr(torch, args.dtype)

    # the same sequence on every rank (seeded); rank r keeps segment r
    g = torch.Generator().manual_seed(0)
    L, E = args.length, args.d_head
    q = torch.randn(1, args.heads, L, E, generator=g, dtype=dtype)
    k = torch.randn(1, args.kv_heads, L, E, generator=g, dtype=dtype)
    v = torch.randn(1, args.kv_heads, L, E, generator=g, dtype=dtype)
    bounds = [L * r // world for r in range(world + 1)]
    a, b = bounds[rank], bounds[rank + 1]
    ql, kl, vl = (t[..., a:b, :].to(device).clone().requires_grad_() for t in (q, k, v))
    opts = dict(n_taylor=args.n_taylor, is_causal=True, enable_gqa=args.heads != args.kv_heads, window=args.window,
                sinks=args.sinks, recentre=args.recentre)

    dist.barrier()
    t0 = time.perf_counter()
    y = context_parallel_attention(ql, kl, vl, **opts)
    y.square().sum().backward()
    elapsed = time.perf_counter() - t0

    vol = state_exchange_bytes(1, args.kv_heads, E, E, args.n_taylor, world, torch.float64 if dtype == torch.float64 else torch.float32,
                               window=args.window, sinks=args.sinks, recentre=args.recentre is not None)
    if rank == 0:
        print(f"{world} ranks x {L // world:,} tokens, {args.heads} query / {args.kv_heads} kv heads of size {E}, "
              f"n_taylor={args.n_taylor}, {args.dtype}"
              + (f", window={args.window}, sinks={args.sinks}, recentre={args.recentre}" if args.window or args.sinks
                 or args.recentre is not None else ""))
        print(f"state per rank: {state_size(E, E, args.n_taylor, window=args.window, sinks=args.sinks):,} floats per kv head, {format_bytes(vol['state'])}; "
              f"forward sends {format_bytes(vol['sent'])} and receives {format_bytes(vol['received'])} per rank "
              f"(backward: {format_bytes(vol['backward'])}), whatever the length", flush=True)
    print(f"rank {rank}: tokens {a:,}..{b - 1:,}  forward+backward {elapsed:.2f} s", flush=True)

    if args.check:
        qf, kf, vf = (t.to(device).requires_grad_() for t in (q, k, v))
        t0 = time.perf_counter()
        ref = sata.sata_attention(qf, kf, vf, **opts)
        ref.square().sum().backward()
        if rank == 0:
            print(f"one process, whole sequence: forward+backward {time.perf_counter() - t0:.2f} s "
                  "(measured while the other ranks do the same)", flush=True)
        errs = torch.tensor([
            _rel(y.detach(), ref.detach()[..., a:b, :]),
            *(_rel(t.grad, f.grad[..., a:b, :]) for t, f in ((ql, qf), (kl, kf), (vl, vf))),
        ], dtype=torch.float64, device=device)
        dist.all_reduce(errs, op=dist.ReduceOp.MAX)
        if rank == 0:
            print("max relative error vs one process: output {:.2e}, dq {:.2e}, dk {:.2e}, dv {:.2e}".format(*errs.tolist()))
    dist.destroy_process_group()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _start_processes(n: int = 2) -> None:
    """Run this file under torchrun with ``n`` local processes of one thread each."""
    import sys

    from torch.distributed.run import main as torchrun

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"not started by torchrun: starting {n} processes (torchrun --standalone --nproc-per-node {n})", flush=True)
    torchrun(["--standalone", "--nproc-per-node", str(n), __file__, *sys.argv[1:]])


if __name__ == "__main__":
    if "RANK" in os.environ:
        main()
    else:
        _start_processes()
