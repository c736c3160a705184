"""The training loop behind ``sata train``: AdamW + cosine schedule, clipping, validation in bits
per byte, exact resume, and DistributedDataParallel when launched by ``torchrun``.

Exact resume: the batch of a step is a function of ``(seed, step)`` (see :mod:`sata.train.data`)
and the model, optimizer and schedule states are saved together, so stopping after step ``s``
and resuming gives bit-identical parameters to an uninterrupted run (same machine, same thread
count). The run has no other randomness (no dropout).

Distributed: every process takes ``batch_size / world`` rows of the same global batch;
DDP averages the gradients, so the update equals that of one process with the whole batch
(up to float summation order).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..lm import LMConfig, TransformerLM
from .data import ByteCorpus, load_corpus

__all__ = ["TrainConfig", "train"]

_LOG_FIELDS = ["step", "tokens", "lr", "loss", "grad_norm", "val_loss", "val_bpb", "elapsed_s", "tokens_per_s"]


@dataclass
class TrainConfig:
    """Everything that defines a run (saved in the checkpoint; a resumed run must match it).

    Attributes:
        out: output folder (checkpoint/, log.csv, log.json, loss.png, model/).
        data: files or folders of text; empty = the standard library's sources.
        steps: optimizer steps. batch_size: global batch (windows per step). seq_len: bytes per window.
        lr: peak learning rate; warmup linear over ``warmup`` steps, then cosine to ``lr * min_lr_ratio``.
        mix_lr: peak learning rate of the window mode's learned ``taylor_mix`` and ``recentre`` (the layers'
            ``mix_param`` / ``recentre_param``, one scalar per head), on the same schedule; None: ``lr``. Adam
            moves a parameter by about its learning rate per step, so at ``lr`` a mix started at 0.01 (log
            scale -4.6) cannot pass ~0.02 in a few hundred steps: a higher rate lets the model choose it.
        weight_decay: AdamW decay of matrices (not of norms). clip: max gradient norm (0 = off).
        eval_every / eval_tokens: validation period (steps) and size (bytes).
        save_every: checkpoint period (steps; a checkpoint is also written at the end).
        seed: parameter initialisation and data order.
    """

    out: str = "runs/sata"
    data: list[str] = field(default_factory=list)
    model: LMConfig = field(default_factory=LMConfig)
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    mix_lr: float | None = None
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    beta2: float = 0.95
    clip: float = 1.0
    eval_every: int = 100
    eval_tokens: int = 65536
    save_every: int = 200
    seed: int = 0

    def to_dict(self) -> dict:
        return {**asdict(self), "model": self.model.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return cls(**{**d, "model": LMConfig.from_dict(d["model"])})

    def check(self, world: int) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_tokens", "save_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.batch_size % world:
            raise ValueError(f"--batch-size {self.batch_size} is not divisible by the {world} processes; "
                             f"use a multiple of {world}")
        for name in ("lr", "min_lr_ratio", "weight_decay", "clip"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or abs(v) > 1e30:
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {v!r}")
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1 and self.warmup >= 0 and self.clip >= 0
                and self.weight_decay >= 0):
            raise ValueError("need --lr > 0, 0 <= --min-lr-ratio <= 1, --warmup >= 0, --clip >= 0, --weight-decay >= 0")
        if self.mix_lr is not None:
            v = self.mix_lr
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 < v <= 1e30:
                raise ValueError(f"--mix-lr must be a finite learning rate > 0, got {v!r}")
            if not (self.model.learn_mix or self.model.learn_recentre):
                raise ValueError("--mix-lr sets the learning rate of the learned taylor_mix and recentre: it needs "
                                 "--learn-mix and/or --learn-recentre")
        if not 0 <= self.beta2 < 1:  # (no command-line option: TrainConfig's own field; NaN fails this too)
            raise ValueError(f"TrainConfig.beta2 must be in [0, 1), got {self.beta2!r}")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``lr`` at optimizer step ``step`` (0-based): linear warmup, then cosine."""
    if step < cfg.warmup:
        return (step + 1) / (cfg.warmup + 1)
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW: matrices with weight decay, the rest without; with ``mix_lr`` the learned mixes and centres in a
    group of their own (``lr_scale``: its rate over ``lr``, which the schedule keeps)."""
    mixes = {id(p) for name, p in model.named_parameters() if name.endswith(("mix_param", "recentre_param"))} \
        if cfg.mix_lr is not None else set()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2 and id(p) not in mixes]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}]
    if mixes:  # (a third group only then: checkpoints of runs without mix_lr keep their two)
        groups.append({"params": [p for p in model.parameters() if id(p) in mixes], "weight_decay": 0.0,
                       "lr_scale": cfg.mix_lr / cfg.lr})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8, foreach=False)


# ---------------------------------------------------------------------------- distributed
class _Dist:
    """Rank, world size and reductions; a no-op outside ``torchrun``."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.on = self.world > 1
        if self.on:
            import torch.distributed as dist

            if not dist.is_initialized():
                if device.type == "cuda":
                    torch.cuda.set_device(device)  # NCCL needs each rank on its own GPU before the group forms
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.dist = dist

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        if self.on:
            x = x.clone()
            self.dist.all_reduce(x)
            x /= self.world
        return x

    def barrier(self) -> None:
        if self.on:
            self.dist.barrier()

    def close(self) -> None:
        if self.on:
            self.dist.destroy_process_group()


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: TransformerLM, windows: torch.Tensor, dist: _Dist, batch_size: int = 16,
             progress: bool = False) -> float:
    """Mean next-byte cross-entropy (nats) over ``windows [n, T + 1]``, split across processes.
    ``progress``: a transient progress bar (validation can take a minute on a CPU)."""
    mine = windows[dist.rank::dist.world]
    dev = next(model.parameters()).device
    total = torch.zeros(2, dtype=torch.float64, device=dev)                # [sum of losses, count]
    starts = range(0, mine.shape[0], batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="validation", unit="batch", leave=False, dynamic_ncols=True)
    for i in starts:
        w = mine[i:i + batch_size].to(dev)                                 # [b, T + 1]
        logits, _ = model(w[:, :-1])                                       # [b, T, V]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), w[:, 1:].flatten(), reduction="sum")
        total += torch.stack([loss.double(), torch.tensor(w[:, 1:].numel(), dtype=torch.float64, device=dev)])
    total = dist.mean(total) * dist.world
    return (total[0] / total[1]).item()


# ---------------------------------------------------------------------------- checkpoints
def _save_checkpoint(path: Path, model: TransformerLM, opt, step: int, rows: list[dict], cfg: TrainConfig,
                     elapsed: float) -> None:
    """Write ``path`` atomically: a temporary folder renamed over the old checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save({"step": step, "optimizer": opt.state_dict(), "rows": rows, "train_config": cfg.to_dict(),
                "elapsed_s": elapsed}, tmp / "trainer.pt")
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def _complete_checkpoint(path: Path) -> Path:
    """The newest complete checkpoint: ``path``, or if a save was interrupted between its two
    renames, the ``.old`` (previous) or ``.tmp`` (finished new) folder it left behind."""
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    # .tmp is known complete only once the previous checkpoint was moved aside to .old
    for p in (path, tmp if old.exists() else None, old):
        if p is not None and (p / "trainer.pt").is_file() and (p / "config.json").is_file():
            return p
    raise FileNotFoundError(f"--resume: no checkpoint in {path}; run without --resume to start")


def _load_trainer_state(path: Path, device: torch.device) -> dict:
    """The optimizer state, log rows and settings of a checkpoint, read with ``weights_only=True``:
    tensors and plain containers only, so a checkpoint from elsewhere cannot run code."""
    import pickle

    try:
        saved = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise ValueError(f"--resume: {path} is not a readable sata training checkpoint (damaged, or it holds "
                         f"objects other than tensors and plain data, which are never unpickled): {e}") from e
    if not isinstance(saved, dict) or not {"step", "optimizer", "rows", "train_config", "elapsed_s"} <= set(saved):
        raise ValueError(f"--resume: {path} is not a sata training checkpoint (fields missing)")
    return saved


def _write_logs(out: Path, rows: list[dict], cfg: TrainConfig, meta: dict) -> None:
    with open(out / "log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_LOG_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in _LOG_FIELDS})
    (out / "log.json").write_text(json.dumps({"config": cfg.to_dict(), **meta, "rows": rows}, indent=1) + "\n")
    try:
        _plot(out / "loss.png", rows, cfg)
    except ImportError:
        pass


def _plot(path: Path, rows: list[dict], cfg: TrainConfig) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    tr = [r for r in rows if r.get("loss") is not None]
    va = [r for r in rows if r.get("val_bpb") is not None]
    if tr:
        ax.plot([r["step"] for r in tr], [r["loss"] / math.log(2) for r in tr], lw=0.8, alpha=0.6, label="train")
    if va:
        ax.plot([r["step"] for r in va], [r["val_bpb"] for r in va], "o-", ms=3, label="validation")
    m = cfg.model
    ax.set(xlabel="step", ylabel="bits per byte",
           title=f"{m.mixer}: {m.n_heads} heads of "
                 f"{m.resolved_head_dim}, d_model {m.d_model}, {m.n_layers} layers")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, *, resume: bool = False, device: str | torch.device = "cpu", progress: bool = True,
          corpus: ByteCorpus | None = None, stop_after: int | None = None) -> dict:
    """Train (or resume) a :class:`~sata.lm.TransformerLM`; returns the final log summary.

    Args:
        cfg: the run.
        resume: continue from ``cfg.out/checkpoint`` (the saved config must match ``cfg``).
        device: ``"cpu"`` or ``"cuda"`` (under torchrun, ``cuda:LOCAL_RANK``).
        progress: tqdm progress bar on the main process.
        corpus: pre-loaded data (default: :func:`load_corpus` of ``cfg.data``).
        stop_after: stop (with a checkpoint) after this step, as if interrupted; for tests.
    """
    device = torch.device(device)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    dist = _Dist(device)
    try:
        return _train(cfg, resume, device, progress, corpus, stop_after, dist)
    finally:
        dist.close()


def _train(cfg, resume, device, progress, corpus, stop_after, dist: _Dist) -> dict:
    cfg.check(dist.world)
    out = Path(cfg.out)
    ckpt = out / "checkpoint"
    corpus = corpus or load_corpus(cfg.data or None)
    val = corpus.validation_windows(cfg.seq_len, cfg.eval_tokens)

    torch.manual_seed(cfg.seed)
    model = TransformerLM(cfg.model).to(device)
    opt = _optimizer(model, cfg)
    start, rows, elapsed0 = 0, [], 0.0
    if resume:
        found = _complete_checkpoint(ckpt)
        saved = _load_trainer_state(found / "trainer.pt", device)
        mine = {k: v for k, v in cfg.to_dict().items() if k != "out"}  # a moved run folder still resumes
        # through TrainConfig: fields added since the checkpoint was written take their defaults
        theirs = {k: v for k, v in TrainConfig.from_dict(saved["train_config"]).to_dict().items() if k != "out"}
        if theirs != mine:
            diff = sorted(k for k in mine if theirs.get(k) != mine[k])
            raise ValueError(f"--resume: the checkpoint in {ckpt} was made with different settings ({', '.join(diff)}); "
                             "pass the same arguments, or a new --out")
        model.load_state_dict(TransformerLM.from_pretrained(found, map_location=device).state_dict())
        opt.load_state_dict(saved["optimizer"])
        start, rows, elapsed0 = saved["step"], saved["rows"], saved["elapsed_s"]
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
    ddp = model
    if dist.on:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    n_params = model.num_parameters()
    meta = {"parameters": n_params, "world_size": dist.world, "data": corpus.describe(),
            "torch_threads": torch.get_num_threads()}
    bar = None
    if progress and dist.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True,
                   desc=f"{cfg.model.attention} {n_params / 1e6:.2f}M")
    t0 = time.perf_counter() - elapsed0
    tokens_per_step = cfg.batch_size * cfg.seq_len
    last = start
    for step in range(start, cfg.steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(step, cfg) * g.get("lr_scale", 1.0)
        x, y = corpus.batch(step, cfg.batch_size, cfg.seq_len, cfg.seed, rank=dist.rank, world=dist.world)
        x, y = x.to(device), y.to(device)                                          # [b, T]
        logits, _ = ddp(x)                                                         # [b, T, V]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip if cfg.clip > 0 else float("inf"))
        if not torch.isfinite(gnorm):
            raise FloatingPointError(f"step {step + 1}: gradient norm is {gnorm.item()}; lower --lr or raise --warmup")
        opt.step()
        done = step + 1
        row = {"step": done, "tokens": done * tokens_per_step, "lr": opt.param_groups[0]["lr"],
               "loss": dist.mean(loss.detach()).item(), "grad_norm": gnorm.item()}
        if done % cfg.eval_every == 0 or done == cfg.steps:
            row["val_loss"] = evaluate(model, val, dist, progress=bar is not None)
            row["val_bpb"] = row["val_loss"] / math.log(2)
        elapsed = time.perf_counter() - t0
        row["elapsed_s"] = elapsed
        row["tokens_per_s"] = (done - start) * tokens_per_step / max(elapsed - elapsed0, 1e-9)
        rows.append(row)
        if bar is not None:
            post = {"loss": f"{row['loss']:.3f}", "tok/s": f"{row['tokens_per_s']:,.0f}"}
            if "val_bpb" in row:
                post["val_bpb"] = f"{row['val_bpb']:.3f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
        last = done
        stopping = stop_after is not None and done >= stop_after
        if done % cfg.save_every == 0 or done == cfg.steps or stopping:
            if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):  # never save a broken model
                raise FloatingPointError(f"step {done}: the weights are not finite after the update; lower --lr")
            if dist.main:
                _save_checkpoint(ckpt, model, opt, done, rows, cfg, elapsed)
                _write_logs(out, rows, cfg, meta)
            dist.barrier()
        if stopping:
            break
    if bar is not None:
        bar.close()
    if dist.main and last == cfg.steps:
        model.save_pretrained(out / "model")
        _write_logs(out, rows, cfg, meta)
    vals = [r for r in rows if "val_bpb" in r]
    return {"step": last, "parameters": n_params, "final_val_bpb": vals[-1]["val_bpb"] if vals else None,
            "rows": rows, "out": str(out)}
