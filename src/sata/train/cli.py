"""Train a byte-level language model with SATA or softmax attention.

Default data: the Python standard library's sources (fixed file-level train/validation split).
Writes OUT/checkpoint (resumable), OUT/model (final weights: model.safetensors + config.json),
OUT/log.csv, OUT/log.json and OUT/loss.png. Runs unchanged under
``torchrun --nproc_per_node N -m sata.cli train ...`` (DistributedDataParallel; gloo on CPU).
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model")
    m.add_argument("--attention", choices=["sata", "softmax"], default="sata", help="attention of every layer")
    m.add_argument("--n-taylor", type=int, default=3, help="Taylor terms of SATA attention")
    m.add_argument("--d-model", type=int, default=256, help="model width")
    m.add_argument("--n-layers", type=int, default=4, help="transformer blocks")
    m.add_argument("--n-heads", type=int, default=16, help="query heads")
    m.add_argument("--head-dim", type=int, default=None, help="head size (default: d_model / n_heads)")
    m.add_argument("--n-kv-heads", type=int, default=None, help="key/value heads, grouped-query (default: n_heads)")
    m.add_argument("--no-rope", action="store_true", help="no rotary position embeddings")
    m.add_argument("--short-conv", type=int, default=0,
                   help="kernel of a causal depthwise convolution before attention (0 = none)")
    m.add_argument("--local-layers", type=_layer_index, nargs="*", default=[],
                   help="layer indices that use sliding-window softmax instead (a hybrid; e.g. 0 2); 'all' = every "
                        "layer (with --attention softmax: the local-window-only model)")
    m.add_argument("--local-window", type=int, default=64, help="window of --local-layers")
    m.add_argument("--learn-scale", action="store_true", help="SATA layers learn a per-head query gain")
    w = p.add_argument_group("window mode of the SATA layers (exact recent keys beside the Taylor state; MATH.md 6)")
    w.add_argument("--window", type=int, default=0, help="recent tokens attended exactly (0 = none)")
    w.add_argument("--sinks", type=int, default=0, help="first tokens attended exactly (0 = none)")
    w.add_argument("--taylor-mix", type=float, default=1.0, help="weight of the Taylor part in the shared normaliser")
    w.add_argument("--recentre", type=float, default=None,
                   help="expand the series around mean - RECENTRE * sd of the far scores (default: around 0)")
    w.add_argument("--learn-mix", action="store_true", help="learn --taylor-mix per head (needs --window or --sinks)")
    w.add_argument("--learn-recentre", action="store_true", help="learn --recentre per head (needs --recentre)")
    t = p.add_argument_group("training")
    t.add_argument("--data", nargs="*", default=[], help="text files or folders (default: the standard library's .py files)")
    t.add_argument("--out", default="runs/sata", help="output folder")
    t.add_argument("--steps", type=int, default=1000, help="optimizer steps")
    t.add_argument("--batch-size", type=int, default=16, help="global batch, windows per step")
    t.add_argument("--seq-len", type=int, default=256, help="bytes per window")
    t.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    t.add_argument("--mix-lr", type=float, default=None,
                   help="peak learning rate of the learned taylor_mix / recentre (--learn-mix, --learn-recentre), "
                        "same schedule (default: --lr)")
    t.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate / peak (cosine)")
    t.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    t.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay of matrices")
    t.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping (0 = off)")
    t.add_argument("--eval-every", type=int, default=100, help="validate every N steps")
    t.add_argument("--eval-tokens", type=int, default=65536, help="validation bytes")
    t.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps")
    t.add_argument("--seed", type=int, default=0, help="seed of the initial parameters and of the batch order")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    t.add_argument("--device", default="cpu", help="cpu or cuda")
    t.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: one per core; on a machine busy with other work, 1 is faster)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")


def _layer_index(text: str) -> int | str:
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a layer index or 'all', got {text!r}") from None


def _local_layers(values: list, n_layers: int) -> list[int]:
    if "all" not in values:
        return list(values)
    if len(values) > 1:
        raise ValueError(f"--local-layers: 'all' stands alone, got {' '.join(map(str, values))}")
    return list(range(n_layers))


def config_from_args(args):
    from ..lm import LMConfig
    from .loop import TrainConfig

    model = LMConfig(d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads, head_dim=args.head_dim,
                     n_kv_heads=args.n_kv_heads, attention=args.attention, n_taylor=args.n_taylor,
                     rope=not args.no_rope, short_conv=args.short_conv,
                     local_layers=_local_layers(args.local_layers, args.n_layers), local_window=args.local_window,
                     learn_scale=args.learn_scale, window=args.window, sinks=args.sinks, taylor_mix=args.taylor_mix,
                     recentre=args.recentre, learn_mix=args.learn_mix, learn_recentre=args.learn_recentre)
    return TrainConfig(out=args.out, data=list(args.data), model=model, steps=args.steps, batch_size=args.batch_size,
                       seq_len=args.seq_len, lr=args.lr, mix_lr=args.mix_lr, min_lr_ratio=args.min_lr_ratio, warmup=args.warmup,
                       weight_decay=args.weight_decay, clip=args.clip, eval_every=args.eval_every,
                       eval_tokens=args.eval_tokens, save_every=args.save_every, seed=args.seed)


def _warn_if_busy(device: str) -> None:
    """Several threads on cores that other processes keep busy make every step wait for the slowest."""
    import os

    import torch

    from ..bench.timing import cpu_count, is_busy

    threads = torch.get_num_threads()
    if device == "cpu" and threads > 1 and hasattr(os, "getloadavg") and int(os.environ.get("RANK", "0")) == 0:
        load, cores = os.getloadavg()[0], cpu_count()
        if is_busy(load, cores):
            print(f"sata train: warning: the machine is busy (load average {load:.1f} on {cores} cores); with "
                  f"{threads} threads every step waits for the slowest, and --threads 1 is likely faster",
                  file=sys.stderr, flush=True)


def main(args) -> int:
    import torch

    try:
        import matplotlib  # noqa: F401
        import safetensors  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError:
        print("sata train needs safetensors (checkpoints), tqdm and matplotlib: pip install 'sata-attention[train]'",
              file=sys.stderr)
        return 2
    from .loop import train

    if args.threads is not None and args.threads < 1:
        print(f"sata train: --threads must be a positive integer, got {args.threads}", file=sys.stderr)
        return 2
    import os

    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"sata train: --out {args.out} is a file; give a folder (made if missing) for the run", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("sata train: --device cuda requested but CUDA is not available; use --device cpu", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    _warn_if_busy(args.device)
    try:
        cfg = config_from_args(args)  # (its checks raise TypeError for a value of the wrong kind, e.g. a NaN mix)
    except (ValueError, TypeError) as e:
        print(f"sata train: {e}", file=sys.stderr)
        return 2
    try:
        result = train(cfg, resume=args.resume, device=args.device, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:  # bad arguments (the checks name the option and the fix)
        print(f"sata train: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # diverged; the last checkpoint stays intact
        print(f"sata train: training diverged: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        bpb = result["final_val_bpb"]
        print(f"{result['parameters']:,} parameters, {result['step']} steps; validation "
              f"{'-' if bpb is None else f'{bpb:.4f}'} bits per byte; {result['out']}/model, log.csv, loss.png")
    return 0
