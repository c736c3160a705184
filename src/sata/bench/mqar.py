"""Multi-query associative recall (MQAR): recall accuracy against the state a mixer keeps.

    sata bench mqar [--preset smoke|pilot|full] [--results FILE.jsonl] [--json F] [--figure F.png]
    python -m sata.bench.mqar ...            (the same command)

The probe of a recurrent state from Zoology (Arora, Eyuboglu et al., arXiv 2312.04927), used by
Based (arXiv 2402.18668) and most linear-attention papers: key/value pairs, then queries of the
keys; accuracy as a function of the state's size separates architectures that perplexity at
short context does not. Data: :mod:`sata.bench.mqar_data`; model and mixers (softmax, sliding
window, Based, SATA) and Zoology's state accounting: :mod:`sata.bench.mqar_model`.

Protocol (after the Based paper's recall figure, ``arxiv24_based_figure2`` in Zoology's repo):

- Training: batches of one slice each, the slice drawn with probability proportional to Zoology's
  example counts, ``(L, N) = (64, 4): 100k, (128, 8): 20k, (256, 16): 20k, (256, 32): 20k``, fresh
  examples every step (Zoology cycles a fixed set for up to 32 epochs; our budget is far below
  one of its epochs, so fresh examples are the same distribution). AdamW (weight decay 0.1 on
  every parameter, as Zoology), cosine schedule to 0 over ``steps`` (per step; Zoology's is per
  epoch), no warm-up, no clipping.
- Early stop when the mean accuracy on a validation set (test slices, other seeds) reaches
  ``target`` (Zoology: 0.99); then the test slices, ``(64, 4), (64, 8), (64, 16), (128, 32),
  (256, 64), (512, 128)`` by default (Zoology's test set without ``(1024, 256)``), 1000 examples
  each. The accuracy of a run is the mean over the test slices of the fraction of queries
  answered (``argmax`` over the whole vocabulary) right.
- Learning rates: every configuration runs ``lrs`` in turn (Zoology: 4 from 1e-3 to 3e-2) until
  one reaches the validation target; it is reported at its best.
- State: Zoology's accounting (:func:`sata.bench.mqar_model.model_state_bytes`): softmax's KV
  cache at the longest test sequence.

Resumable: every finished run is appended as one JSON line to ``--results``; runs already there
(same task, configuration and learning rate) are skipped. The summary (``--json``), the table
(``--markdown``) and the figure (``--figure``) are rebuilt from that file.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .._files import make_parent
from .mqar_data import VOCAB_SIZE, MQARBatch, check_slice, mqar_batch, slice_generator, slice_name
from .mqar_model import MIXERS, MQARModel, model_state_bytes

__all__ = ["MQARPoint", "MQARTask", "PRESETS", "run_sweep", "train_run"]

Slices = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class MQARTask:
    """The data and the training budget every run of a sweep shares.

    Attributes:
        vocab_size: ``V``. Default: 8192 (Zoology).
        power_a: the query slots' power law. Default: 0.01 (Zoology).
        train_slices / train_weights: ``(L, N)`` trained on and the probability weights of
            drawing each. Default: the Based paper's mixture, weighted by Zoology's example counts.
        test_slices: ``(L, N)`` tested on. Default: Zoology's test set up to ``(512, 128)``.
        n_test / n_valid: examples per test / validation slice. Default: 1000 / 100.
        batch_size: examples per step (one slice). Default: 64 (Zoology: 256).
        steps: optimizer steps at most. eval_every: validation period (steps).
        target: stop when the validation mean accuracy reaches it. Default: 0.99 (Zoology).
        weight_decay: AdamW's, every parameter. Default: 0.1 (Zoology).
        warmup / min_lr_ratio: linear warm-up steps and final / peak learning rate of the cosine.
            Default: 0 / 0 (Zoology).
        seed: initialisation and data. Default: 0.
    """

    vocab_size: int = VOCAB_SIZE
    power_a: float = 0.01
    train_slices: Slices = ((64, 4), (128, 8), (256, 16), (256, 32))
    train_weights: tuple[float, ...] = (100_000, 20_000, 20_000, 20_000)
    test_slices: Slices = ((64, 4), (64, 8), (64, 16), (128, 32), (256, 64), (512, 128))
    n_test: int = 1000
    n_valid: int = 100
    batch_size: int = 64
    steps: int = 2000
    eval_every: int = 250
    target: float = 0.99
    weight_decay: float = 0.1
    warmup: int = 0
    min_lr_ratio: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for L, N in self.train_slices + self.test_slices:
            check_slice(L, N, self.vocab_size)
        if len(self.train_weights) != len(self.train_slices) or not all(w > 0 for w in self.train_weights):
            raise ValueError(f"MQARTask: train_weights must be {len(self.train_slices)} positive numbers (one per "
                             f"train slice), got {self.train_weights}")
        for name in ("n_test", "n_valid", "batch_size", "steps", "eval_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"MQARTask: {name} must be a positive int, got {v!r}")
        if not (0 < self.target <= 1 and self.weight_decay >= 0 and self.warmup >= 0 and 0 <= self.min_lr_ratio <= 1):
            raise ValueError("MQARTask: need 0 < target <= 1, weight_decay >= 0, warmup >= 0, 0 <= min_lr_ratio <= 1")

    @property
    def state_len(self) -> int:
        """The sequence length softmax's state is counted at: the longest test sequence."""
        return max(L for L, _ in self.test_slices)

    def to_dict(self) -> dict:
        return {k: [list(s) for s in v] if k.endswith("slices") else v for k, v in dataclasses.asdict(self).items()}

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class MQARPoint:
    """One configuration: a mixer, the model width and the mixer's parameters."""

    mixer: str
    d_model: int
    params: tuple[tuple[str, object], ...] = ()

    @classmethod
    def make(cls, mixer: str, d_model: int, **params) -> MQARPoint:
        if mixer not in MIXERS:
            raise ValueError(f"MQAR: unknown mixer {mixer!r}; choose one of {sorted(MIXERS)}")
        return cls(mixer, d_model, tuple(sorted(params.items())))

    @classmethod
    def parse(cls, text: str) -> MQARPoint:
        """``"sata:d_model=64,n_taylor=3,head_dim=16"`` -> a point (``d_model`` required)."""
        mixer, _, rest = text.partition(":")
        kv = {}
        for item in filter(None, rest.split(",")):
            k, eq, v = item.partition("=")
            if not eq:
                raise ValueError(f"--point {text!r}: {item!r} is not key=value")
            kv[k.strip()] = _number(v.strip())
        if "d_model" not in kv:
            raise ValueError(f"--point {text!r}: give d_model=..., e.g. 'sata:d_model=64,n_taylor=3,head_dim=16'")
        return cls.make(mixer.strip(), kv.pop("d_model"), **kv)

    @property
    def kwargs(self) -> dict:
        return dict(self.params)

    @property
    def label(self) -> str:
        return f"{self.mixer} d={self.d_model} {MIXERS[self.mixer].label(**self.kwargs)}"

    def state_bytes(self, task: MQARTask) -> int:
        return model_state_bytes(self.mixer, self.d_model, task.state_len, self.kwargs)

    def build(self, task: MQARTask) -> MQARModel:
        return MQARModel(task.vocab_size, self.d_model, self.mixer, self.kwargs)

    def to_dict(self) -> dict:
        return {"mixer": self.mixer, "d_model": self.d_model, "params": self.kwargs}


def _number(text: str):
    if text == "None":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def run_key(task: MQARTask, point: MQARPoint, lr: float) -> str:
    """Identifies a run in the results file: the task, the configuration and the learning rate."""
    return json.dumps({"task": task.fingerprint(), **point.to_dict(), "lr": lr}, sort_keys=True)


# ---------------------------------------------------------------------------- presets
def _full_points() -> list[MQARPoint]:
    """The sweep of the issue: Based (f = 8, 16, 24), softmax, sliding windows 8-512 and SATA at
    2-5 terms and head sizes 8-64 (values E wide, and Based's one-head layout), SATA + window (16, 64)
    at a few small states, within 600 KB;
    d_model 48, 64 and 128 as the Based paper. The published points come first: a partial sweep
    already says whether they are reproduced."""
    points = [MQARPoint.make("based", d, feature_dim=f) for d in (128, 64, 48) for f in (16, 24, 8)]
    points += [MQARPoint.make("softmax", d) for d in (128, 64)]
    points += [MQARPoint.make("sliding", 128, window=w) for w in (8, 512, 16, 32, 64, 128, 256)]
    for d in (48, 64, 128):
        for E in (8, 16, 32, 64):
            for P in (2, 3, 4, 5):
                if d % E == 0:
                    points.append(MQARPoint.make("sata", d, n_taylor=P, head_dim=E))
                if E <= 16 and E < d:
                    points.append(MQARPoint.make("sata", d, n_taylor=P, head_dim=E, n_heads=1))
    # the largest SATA states within half of Based f=16's at d_model 128 with sixteen heads (values 8 wide):
    # head 10 at P=3 (D=66, 38.6 KiB) and head 5 at P=4 (D=56, 33 KiB), more features than head 8's 45
    points += [MQARPoint.make("sata", 128, n_taylor=P, head_dim=E, n_heads=16) for E, P in ((10, 3), (5, 4))]
    points += [MQARPoint.make("sata+window", d, n_taylor=P, head_dim=E, window=w)
               for d in (64, 128) for E, P in ((8, 3), (16, 3), (8, 4)) for w in (16, 64)]
    return [p for p in points if p.state_bytes(MQARTask()) <= 600_000]


# the full sweep's configurations that decide issue 18's acceptance, in the order they decide it: the published
# anchors (Based f = 16, 24 and attention at d_model 128, sliding windows 8 / 64 / 512), the SATA candidates for
# >= 0.985 within half of Based's 80 KB (39.3 KiB), then SATA and Based near each other's states (the frontier)
_ACCEPTANCE = (
    "based d=128 f=16", "based d=128 f=24", "softmax d=128 H=1", "sliding d=128 w=8", "sliding d=128 w=64",
    "sliding d=128 w=512",
    "sata d=48 P=4 E=8", "sata d=48 P=4 E=8 H=1", "sata d=48 P=3 E=16", "sata d=128 P=2 E=64", "sata d=128 P=3 E=8",
    "based d=48 f=16", "based d=64 f=16", "based d=128 f=8", "sata d=64 P=3 E=8", "sata d=128 P=3 E=16",
    "sata d=128 P=3 E=10 H=16", "sata d=128 P=4 E=5 H=16", "sata d=128 P=4 E=8", "sata d=48 P=5 E=8",
    "sata d=64 P=5 E=8", "sata d=64 P=3 E=32",
)


def _acceptance_points() -> list[MQARPoint]:
    """:data:`_ACCEPTANCE` as points of the full sweep (the same runs: a results file serves both presets)."""
    by_label = {p.label: p for p in _full_points()}
    return [by_label[label] for label in _ACCEPTANCE]


@dataclass(frozen=True)
class Preset:
    task: MQARTask
    points: tuple[MQARPoint, ...]
    lrs: tuple[float, ...]
    note: str = ""


PRESETS: dict[str, Preset] = {
    # seconds, for CI: meaningless accuracies, every mixer and every output
    "smoke": Preset(
        MQARTask(vocab_size=64, train_slices=((16, 2), (32, 4)), train_weights=(1, 1), test_slices=((16, 2), (32, 4)),
                 n_test=16, n_valid=8, batch_size=8, steps=4, eval_every=2),
        (MQARPoint.make("softmax", 16), MQARPoint.make("sliding", 16, window=4),
         MQARPoint.make("based", 16, feature_dim=4), MQARPoint.make("sata", 16, n_taylor=3, head_dim=4),
         MQARPoint.make("sata+window", 16, n_taylor=3, head_dim=4, window=4, sinks=1)),
        (3e-3,), "tiny sizes: checks the harness runs, not recall"),
    # does the harness learn? one point per mixer family on the two easiest slices (minutes each)
    "pilot": Preset(
        MQARTask(train_slices=((64, 4), (128, 8)), train_weights=(5, 1), test_slices=((64, 4), (128, 8)),
                 n_test=500, steps=600, eval_every=100),
        (MQARPoint.make("softmax", 64), MQARPoint.make("sliding", 64, window=32),
         MQARPoint.make("based", 64, feature_dim=16), MQARPoint.make("sata", 64, n_taylor=3, head_dim=16)),
        (3e-3,), "(64, 4) and (128, 8) only, one learning rate"),
    "full": Preset(MQARTask(), tuple(_full_points()), (3e-3, 1e-2, 1e-3),
                   "the Based paper's training mixture, Zoology's test slices up to (512, 128)"),
    # the configurations of the full sweep that decide the acceptance (its runs count for "full" too)
    "acceptance": Preset(MQARTask(), tuple(_acceptance_points()), (3e-3, 1e-2, 1e-3),
                         "the full sweep's anchors, its SATA candidates within 40 KB and its frontier near Based"),
}


# ---------------------------------------------------------------------------- training
def _eval_batch(n_queries: int, vocab_size: int) -> int:
    """Examples per evaluation batch: logits ``[B, N, V]`` of at most 2^24 floats."""
    return max(1, min(256, 2**24 // (n_queries * vocab_size)))


@torch.no_grad()
def evaluate(model: MQARModel, sets: dict[str, MQARBatch], vocab_size: int) -> dict[str, float]:
    """Fraction of queries answered right, per slice name."""
    model.eval()
    acc = {}
    for name, data in sets.items():
        right, step = 0, _eval_batch(data.answers.shape[1], vocab_size)
        for i in range(0, len(data), step):
            b = data[i : i + step]
            right += int((model(b.inputs, b.positions).argmax(-1) == b.answers).sum())
        acc[name] = right / data.answers.numel()
    model.train()
    return acc


def _sets(task: MQARTask, split: str, n: int) -> dict[str, MQARBatch]:
    return {slice_name(L, N): mqar_batch(n, L, N, vocab_size=task.vocab_size, power_a=task.power_a,
                                         generator=slice_generator(task.seed, split, L, N))
            for L, N in task.test_slices}


def _lr_factor(step: int, task: MQARTask) -> float:
    from ..train.loop import lr_factor   # linear warm-up then cosine, on the fields steps/warmup/min_lr_ratio

    return lr_factor(step, task)


class _Stream:
    """Training batches: a slice drawn by ``train_weights``, then fresh examples; one seeded generator."""

    def __init__(self, task: MQARTask):
        self.task = task
        self.gen = slice_generator(task.seed, "train", 0, 0)
        self.weights = torch.tensor(task.train_weights, dtype=torch.float64)

    def next(self) -> MQARBatch:
        L, N = self.task.train_slices[int(torch.multinomial(self.weights, 1, generator=self.gen))]
        return mqar_batch(self.task.batch_size, L, N, vocab_size=self.task.vocab_size, power_a=self.task.power_a,
                          generator=self.gen)


def _loss(model: MQARModel, b: MQARBatch) -> torch.Tensor:
    logits = model(b.inputs, b.positions)                                                    # [B, N, V]
    return F.cross_entropy(logits.flatten(0, 1), b.answers.flatten())


def train_run(task: MQARTask, point: MQARPoint, lr: float, *, test_sets: dict[str, MQARBatch] | None = None,
              progress: bool = False) -> dict:
    """Train one configuration at one learning rate; returns its record (test accuracy per slice and mean).

    A run whose loss stops being finite ends there and is recorded with ``accuracy = None``.
    """
    if not lr > 0:
        raise ValueError(f"MQAR: learning rate must be > 0, got {lr!r}")
    torch.manual_seed(task.seed)
    model = point.build(task)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=task.weight_decay)
    stream, valid = _Stream(task), _sets(task, "valid", task.n_valid)
    test_sets = _sets(task, "test", task.n_test) if test_sets is None else test_sets
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=task.steps, desc=f"{point.label} lr={lr:g}", unit="step", leave=False, dynamic_ncols=True)
    t0, c0, losses, stopped, val, step = time.perf_counter(), time.process_time(), [], "budget", {}, 0
    for step in range(1, task.steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * _lr_factor(step - 1, task)
        loss = _loss(model, stream.next())
        if not torch.isfinite(loss):
            stopped = "diverged"
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % task.eval_every == 0 or step == task.steps:
            val = evaluate(model, valid, task.vocab_size)
            if bar is not None:
                bar.set_postfix(loss=f"{losses[-1]:.3f}", valid=f"{_mean(val):.3f}")
            if _mean(val) >= task.target:
                stopped = "target"
        if bar is not None:
            bar.update(1)
        if stopped == "target":
            break
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    if bar is not None:
        bar.close()
    t1 = time.perf_counter()
    test = evaluate(model, test_sets, task.vocab_size) if stopped != "diverged" else {}
    return {
        "key": run_key(task, point, lr), **point.to_dict(), "label": point.label, "lr": lr,
        "state_bytes": point.state_bytes(task),
        "accuracy": _mean(test) if test else None, "slices": test,
        "valid_accuracy": _mean(val) if val else None, "stopped": stopped, "steps": step,
        "final_loss": sum(losses[-20:]) / len(losses[-20:]) if losses else None,
        "train_s": round(train_s, 2), "train_cpu_s": round(train_cpu_s, 2), "test_s": round(time.perf_counter() - t1, 2),
        "s_per_step": round(train_s / max(1, step), 4), "n_params": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def _mean(acc: dict[str, float]) -> float:
    return sum(acc.values()) / len(acc)


# ---------------------------------------------------------------------------- sweeps
def _lines(path: str | os.PathLike) -> list[dict]:
    """Every JSON line of a results file: run records and claims. A line that is not JSON (a write
    cut short by a kill) is skipped with a warning: that run is simply run again."""
    if not os.path.exists(path):
        return []
    out, bad = [], 0
    with open(path) as f:
        for line in f:
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    bad += 1
    if bad:
        print(f"warning: {path}: {bad} line(s) are not JSON (interrupted writes); ignored", file=sys.stderr)
    return out


def read_results(path: str | os.PathLike) -> list[dict]:
    """The run records of a results file (JSON lines), without the claims of running processes."""
    return [r for r in _lines(path) if "claim" not in r]


def _append(path: str | os.PathLike, record: dict) -> None:
    # one write of one line in append mode: lines of processes sharing the file do not interleave
    with open(make_parent(path), "a+b") as f:
        torn = False
        if f.seek(0, os.SEEK_END):
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"          # a write cut short: start a new line
        f.write((("\n" if torn else "") + json.dumps(record) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _take(path: str | os.PathLike, key: str) -> bool:
    """Claim the run ``key`` for this process, unless it is done or a live process claimed it
    first. Claims are lines of the results file; the first live one wins, so processes on one
    machine running the same sweep share its runs, and a killed process's claims lapse."""
    def owner(lines: list[dict]) -> int | None:
        return next((r["pid"] for r in lines if r.get("claim") == key and _alive(r["pid"])), None)

    lines = _lines(path)
    if any(r.get("key") == key for r in lines if "claim" not in r) or owner(lines) not in (None, os.getpid()):
        return False
    _append(path, {"claim": key, "pid": os.getpid()})
    return owner(_lines(path)) == os.getpid()


def run_sweep(task: MQARTask, points: list[MQARPoint], lrs: list[float], results: str | os.PathLike, *,
              progress: bool = True) -> list[dict]:
    """Every configuration at the learning rates ``lrs`` in that order, skipping runs already in
    ``results`` and the remaining learning rates of a configuration once one run reached
    ``task.target`` (it is solved; another rate could add at most ``1 - target``). Each run is
    appended to ``results`` when it ends. Several processes may run the same sweep on one results
    file: each claims a run before starting it (:func:`_take`). Returns the records of these runs
    found in ``results`` at the end (old and new)."""
    wanted = {run_key(task, p, lr): p for p in points for lr in lrs}

    def solved() -> set[MQARPoint]:
        return {wanted[r["key"]] for r in read_results(results) if r["key"] in wanted and r["stopped"] == "target"}

    done = {r["key"] for r in read_results(results)}
    todo = [(p, lr) for p in points for lr in lrs if run_key(task, p, lr) not in done and p not in solved()]
    if todo:
        test_sets = _sets(task, "test", task.n_test)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=f"MQAR ({len(wanted) - len(todo)} runs done or skipped before)",
                       unit="run", dynamic_ncols=True)
        for point, lr in todo:
            key = run_key(task, point, lr)
            if point not in solved() and _take(results, key):
                _append(results, train_run(task, point, lr, test_sets=test_sets, progress=progress))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    return finished_runs(task, points, lrs, results)


def finished_runs(task: MQARTask, points: list[MQARPoint], lrs: list[float], results: str | os.PathLike) -> list[dict]:
    """The records in ``results`` of the sweep's runs (``points`` x ``lrs`` on ``task``) that have ended."""
    wanted = {run_key(task, p, lr) for p in points for lr in lrs}
    return [r for r in read_results(results) if r["key"] in wanted]


def estimate(task: MQARTask, points: list[MQARPoint], lrs: list[float], *, reps: int = 2,
             progress: bool = False) -> list[dict]:
    """CPU seconds a sweep takes at most (no early stop): per configuration, the CPU time of ``reps``
    training steps on each train slice (after one warm-up step) weighted by the mixture, times
    ``steps``, plus its evaluations, times the learning rates. CPU time, not wall time: other
    processes on the machine do not inflate it; with one thread it is the wall time on idle cores."""
    rows = []
    w = [x / sum(task.train_weights) for x in task.train_weights]
    if progress:
        from tqdm.auto import tqdm

        points = tqdm(points, desc="timing", unit="config", dynamic_ncols=True)
    for point in points:
        torch.manual_seed(task.seed)
        model = point.build(task)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=task.weight_decay)
        per_slice = []
        for L, N in task.train_slices:
            b = mqar_batch(task.batch_size, L, N, vocab_size=task.vocab_size, generator=slice_generator(0, "time", L, N))
            times = []
            for _ in range(reps + 1):
                t = time.process_time()
                opt.zero_grad(set_to_none=True)
                _loss(model, b).backward()
                opt.step()
                times.append(time.process_time() - t)
            per_slice.append(min(times[1:]))
        step_s = sum(wi * s for wi, s in zip(w, per_slice))
        k = 16
        t = time.process_time()
        evaluate(model, _sets(task, "time", k), task.vocab_size)
        per_example = (time.process_time() - t) / k            # one example of every test slice
        evals = per_example * (task.n_test + task.n_valid * math.ceil(task.steps / task.eval_every))
        rows.append({"label": point.label, "state_bytes": point.state_bytes(task), "s_per_step": step_s,
                     "run_s": task.steps * step_s + evals, "sweep_s": len(lrs) * (task.steps * step_s + evals)})
    return rows


# ---------------------------------------------------------------------------- command line
def add_arguments(parser) -> None:
    """The options of ``sata bench mqar`` (beside bench's --json, --markdown, --threads, --no-progress)."""
    g = parser.add_argument_group("mqar (sata bench mqar): multi-query associative recall")
    g.add_argument("--preset", default="full", choices=sorted(PRESETS),
                   help="smoke: seconds (CI); pilot: one point per mixer family on (64,4), (128,8); full: the sweep")
    g.add_argument("--results", metavar="FILE", default=None,
                   help="results file (JSON lines), appended after every run; runs in it are skipped "
                        "(default: mqar-<preset>.jsonl)%(default).0s")
    g.add_argument("--figure", metavar="FILE", default=None, help="accuracy vs state bytes, PNG%(default).0s")
    g.add_argument("--point", action="append", default=None, metavar="SPEC",
                   help="a configuration instead of the preset's, e.g. 'sata:d_model=64,n_taylor=3,head_dim=16' "
                        "(repeatable; mixers: " + ", ".join(sorted(MIXERS)) + ")%(default).0s")
    g.add_argument("--mixers", default=None, help="keep only these mixers' configurations, e.g. sata,based%(default).0s")
    g.add_argument("--lrs", default=None, help="learning rates, e.g. 1e-3,3e-3 (default: the preset's)%(default).0s")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps per run at most%(default).0s")
    g.add_argument("--batch-size", type=int, default=None, help="examples per step%(default).0s")
    g.add_argument("--eval-every", type=int, default=None, help="validation period in steps%(default).0s")
    g.add_argument("--n-test", type=int, default=None, help="test examples per slice%(default).0s")
    g.add_argument("--seed", type=int, default=None, help="initialisation and data seed%(default).0s")
    g.add_argument("--train-slices", default=None,
                   help="LxN[:weight],... trained on, e.g. 64x4:5,128x8:1 (weight 1 if omitted)%(default).0s")
    g.add_argument("--test-slices", default=None, help="LxN,... tested on, e.g. 64x4,512x128%(default).0s")
    g.add_argument("--list", action="store_true", help="list the runs and their state, train nothing%(default).0s")
    g.add_argument("--report", action="store_true",
                   help="table, --json, --markdown and --figure of the runs already in the results file, train "
                        "nothing (while processes sharing the file still run, or after them)%(default).0s")
    g.add_argument("--estimate", action="store_true",
                   help="time a few steps of every configuration and print the sweep's time at most%(default).0s")


def _slices(text: str, weights: bool = False):
    out, ws = [], []
    for item in filter(None, text.split(",")):
        sl, _, w = item.partition(":")
        L, x, N = sl.strip().partition("x")
        if not x or not L.isdigit() or not N.isdigit():
            raise ValueError(f"slice {item!r} is not LxN (e.g. 64x4)")
        out.append((int(L), int(N)))
        ws.append(float(w) if w else 1.0)
    return (tuple(out), tuple(ws)) if weights else tuple(out)


def configure(args) -> tuple[str, MQARTask, list[MQARPoint], list[float]]:
    """Preset, task, configurations and learning rates from the parsed options."""
    preset = PRESETS[args.preset]
    over = {k: getattr(args, k) for k in ("steps", "batch_size", "eval_every", "n_test", "seed")
            if getattr(args, k) is not None}
    if args.train_slices:
        over["train_slices"], over["train_weights"] = _slices(args.train_slices, weights=True)
    if args.test_slices:
        over["test_slices"] = _slices(args.test_slices)
    task = dataclasses.replace(preset.task, **over)
    points = [MQARPoint.parse(s) for s in args.point] if args.point else list(preset.points)
    if args.mixers:
        keep = {m.strip() for m in args.mixers.split(",")}
        unknown = keep - set(MIXERS)
        if unknown:
            raise ValueError(f"--mixers: unknown {sorted(unknown)}; choose from {sorted(MIXERS)}")
        points = [p for p in points if p.mixer in keep]
    lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else list(preset.lrs)
    for p in points:      # build once: bad parameters fail now, not hours into a sweep
        p.build(task)
    return args.results or f"mqar-{args.preset}.jsonl", task, points, lrs


def _hms(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main(args) -> int:
    from . import mqar_report as report
    from .cli import add_arguments as bench_arguments
    from .tables import fmt_bytes, render
    from .timing import busy_warning, command_line, machine_info, set_threads, write_json

    if args.device != "cpu":
        print("sata bench mqar runs on the CPU (--device cpu)", file=sys.stderr)
        return 2
    try:
        results, task, points, lrs = configure(args)
    except ValueError as e:
        print(f"sata bench mqar: {e}", file=sys.stderr)
        return 2
    if args.figure:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("sata bench mqar --figure needs matplotlib: pip install 'sata-attention[plot]'", file=sys.stderr)
            return 2
    threads = set_threads(args.threads)
    machine = machine_info("cpu")
    print(f"MQAR ({args.preset}: {PRESETS[args.preset].note}): {len(points)} configurations x {len(lrs)} learning rates, {task.steps} steps at most, "
          f"batch {task.batch_size}, train {[slice_name(*s) for s in task.train_slices]}, test "
          f"{[slice_name(*s) for s in task.test_slices]}; {threads} thread(s) on {machine['cpu']}", flush=True)
    warning = busy_warning(machine)
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    if args.list or args.estimate:
        rows = [{"label": p.label, "state_bytes": p.state_bytes(task)} for p in points]
        if args.estimate:
            rows = estimate(task, points, lrs, progress=not args.no_progress)
        headers = ["configuration", "state"] + (["CPU s/step", "one run (max)", "all lrs (max)"] if args.estimate else [])
        print(render(headers, [[r["label"], fmt_bytes(r["state_bytes"])] + (
            [f"{r['s_per_step']:.3f}", _hms(r["run_s"]), _hms(r["sweep_s"])] if args.estimate else []) for r in rows]))
        if args.estimate:
            total = sum(r["sweep_s"] for r in rows)
            print(f"\nsweep: {len(points) * len(lrs)} runs, at most {_hms(total)} of CPU with {threads} thread(s) "
                  f"(no early stop; a run stops at {task.target} validation accuracy and its configuration's "
                  f"other learning rates are skipped); with one thread, the wall time on an idle core")
        return 0
    if args.report:
        records = finished_runs(task, points, lrs, results)
        print(f"{len({r['key'] for r in records})} of {len(points) * len(lrs)} runs in {results} (a configuration "
              f"solved at one rate skips its other rates)", flush=True)
    else:
        records = run_sweep(task, points, lrs, results, progress=not args.no_progress)
    best = report.best_per_config(records)
    text = report.table(best)
    print(f"\nMQAR accuracy at the best learning rate per configuration (results: {results})\n{text}")
    title = (f"MQAR ({args.preset}): train {', '.join(slice_name(*s) for s in task.train_slices)}; test "
             f"{', '.join(slice_name(*s) for s in task.test_slices)}; <= {task.steps} steps of {task.batch_size}")
    if args.json:
        front = {m: [r["label"] for r in line] for m, line in report.frontier(best).items()}
        write_json(args.json, {"command": command_line("bench", args, bench_arguments), "preset": args.preset,
                               "date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine,
                               "task": task.to_dict(), "lrs": lrs, "results_file": os.path.abspath(results),
                               "runs": records, "best": best, "frontier": front, "anchors": report.ANCHORS})
        print(f"wrote {args.json}")
    if args.markdown:
        with open(make_parent(args.markdown), "w") as f:
            f.write(f"**{title}**\n\n{report.table(best, markdown=True)}\n")
        print(f"wrote {args.markdown}")
    if args.figure:
        report.plot(best, args.figure, title, anchors=task.test_slices == MQARTask().test_slices)
        print(f"wrote {args.figure}")
    return 0


if __name__ == "__main__":
    from ..cli import main as sata_main

    sys.exit(sata_main(["bench", "mqar", *sys.argv[1:]]))
