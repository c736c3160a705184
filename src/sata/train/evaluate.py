"""Bits per byte of models trained by ``sata train``, at any context length and by position in the window.

Each requested context ``T`` is scored on the same non-overlapping validation windows for every model
(:meth:`sata.train.data.ByteCorpus.validation_windows`, evenly spread over the held-out files): every byte
is predicted from all its predecessors in its window, as the training loss does, so at ``T`` longer than
the training windows the models see contexts they were never trained on. Long windows go through the
model ``--chunk`` bytes at a time, carrying its states (SATA: the fixed-size state; softmax: the KV cache),
which bounds the memory of the scores and gives the same numbers as one pass.

Outputs: a table (bits/byte per model and context, and at the longest context over the positions beyond
the shortest), ``--json`` (also bits/byte in log-spaced position buckets) and ``--figure`` (bits/byte
against position, one panel per context, one line per model).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .._files import make_parent, unwritable, write_atomic

__all__ = ["evaluate_models", "position_bins", "position_losses"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+",
                   help="model folders (OUT/model of `sata train`), each as PATH or NAME=PATH (default name: the run "
                        "folder, i.e. the parent of a folder called model)")
    p.add_argument("--context", type=int, nargs="+", default=[2048], help="window lengths in bytes, each scored apart")
    p.add_argument("--max-bytes", type=int, default=262_144,
                   help="validation bytes scored per context (whole windows; at least one window)")
    p.add_argument("--data", nargs="*", default=[],
                   help="text files or folders, as given to `sata train` (default: the standard library's .py files)")
    p.add_argument("--bins", type=int, default=64, help="log-spaced position buckets of the by-position curves")
    p.add_argument("--chunk", type=int, default=2048,
                   help="bytes per forward pass; a longer window is carried through the model's states")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--markdown", default=None, help="write the table here (Markdown)")
    p.add_argument("--figure", default=None,
                   help="write bits/byte against position here (PNG, or the format the suffix names: .svg, .pdf)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---------------------------------------------------------------------------- scoring
@torch.no_grad()
def position_losses(model, windows: torch.Tensor, *, chunk: int = 2048, batch_size: int = 1,
                    progress: str | None = None) -> torch.Tensor:
    """Next-byte cross-entropy (nats) summed over windows, per position: ``windows [n, T + 1] -> [T]`` float64.

    Position ``t`` is the prediction of byte ``t + 1`` of a window from bytes ``0 .. t``. The window passes
    through ``model`` ``chunk`` bytes at a time with its states carried (the same logits as one pass).
    ``progress``: a tqdm bar with this description.
    """
    n, T = windows.shape[0], windows.shape[1] - 1
    dev = next(model.parameters()).device
    total = torch.zeros(T, dtype=torch.float64)                                        # [T]
    starts = range(0, n, batch_size)
    if progress is not None:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=progress, unit="batch", leave=False, dynamic_ncols=True)
    for i in starts:
        w = windows[i:i + batch_size].to(dev)                                          # [b, T + 1]
        states = None
        for a in range(0, T, chunk):
            b = min(a + chunk, T)
            logits, states = model(w[:, a:b], states, return_states=b < T)             # [b, c, V]
            loss = F.cross_entropy(logits.float().transpose(1, 2), w[:, a + 1:b + 1], reduction="none")  # [b, c]
            total[a:b] += loss.double().sum(0).cpu()
    return total


def position_bins(length: int, bins: int) -> torch.Tensor:
    """Edges ``[k + 1]`` (int64, ``0 = e_0 < ... < e_k = length``, ``k <= bins``) of log-spaced position buckets
    ``[e_j, e_j+1)``: the first bytes of a window, where the loss falls fastest, get the finest buckets."""
    inner = torch.logspace(0, math.log10(length), bins, dtype=torch.float64).round().long()  # [bins]
    return torch.unique(torch.cat([torch.tensor([0]), inner.clamp(1, length), torch.tensor([length])]))


def evaluate_models(models: dict, corpus, contexts: list[int], *, max_bytes: int, bins: int = 64,
                    chunk: int = 2048, batch_size: int = 1, progress: bool = False) -> dict:
    """Score ``models`` (name -> :class:`sata.lm.TransformerLM`) on ``corpus``'s validation windows of each
    length in ``contexts``; returns the JSON-ready results (see the module docstring)."""
    out = []
    for T in contexts:
        windows = corpus.validation_windows(T, max_bytes)                              # [n, T + 1]
        edges = position_bins(T, bins)                                                 # [k + 1]
        entry = {"context": T, "windows": windows.shape[0], "bytes": windows.shape[0] * T,
                 "bins": {"start": edges[:-1].tolist(), "end": edges[1:].tolist()}, "bpb": {}, "bpb_by_position": {},
                 "seconds": {}}
        for name, model in models.items():
            t0 = time.perf_counter()
            per_pos = position_losses(model, windows, chunk=chunk, batch_size=batch_size,
                                      progress=f"{name} @ {T}" if progress else None) / windows.shape[0]  # [T]
            if not bool(torch.isfinite(per_pos).all()):
                raise FloatingPointError(f"{name}: the loss at context {T} is not finite; the model diverged or "
                                         "overflowed at this length")
            by_bin = torch.stack([per_pos[a:b].mean() for a, b in zip(edges[:-1], edges[1:])])  # [k]
            entry["bpb"][name] = per_pos.mean().item() / math.log(2)
            entry["bpb_by_position"][name] = (by_bin / math.log(2)).tolist()
            entry["seconds"][name] = round(time.perf_counter() - t0, 2)
            if T > min(contexts):
                entry.setdefault("bpb_beyond", {"from": min(contexts)})[name] = (
                    per_pos[min(contexts):].mean().item() / math.log(2))
        out.append(entry)
    return {"data": corpus.describe(),
            "models": [{"name": name, "mixer": m.config.mixer, "parameters": m.num_parameters(),
                        "config": m.config.to_dict()} for name, m in models.items()],
            "contexts": out}


# ---------------------------------------------------------------------------- reports
def table(results: dict, markdown: bool = False) -> str:
    """One row per model: parameters, bits/byte at each context, and beyond the shortest at the longer ones."""
    heads = ["model", "mixer", "parameters"]
    for c in results["contexts"]:
        heads.append(f"bpb @ {c['context']:,}")
        if "bpb_beyond" in c:
            heads.append(f"bpb @ {c['context']:,}, positions >= {c['bpb_beyond']['from']:,}")
    rows = []
    for m in results["models"]:
        row = [m["name"], m["mixer"], f"{m['parameters']:,}"]
        for c in results["contexts"]:
            row.append(f"{c['bpb'][m['name']]:.4f}")
            if "bpb_beyond" in c:
                row.append(f"{c['bpb_beyond'][m['name']]:.4f}")
        rows.append(row)
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"
    widths = [max(len(x) for x in col) for col in zip(heads, *rows)]
    fmt = lambda r: "  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(heads), *map(fmt, rows)]) + "\n"


def figure(results: dict, path: str | Path) -> None:
    """Bits/byte against position (log x), one panel per context, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctx = results["contexts"]
    fig, axes = plt.subplots(1, len(ctx), figsize=(6 * len(ctx), 4), squeeze=False, sharey=True)
    for ax, c in zip(axes[0], ctx):
        # bucket [a, b) holds the bytes predicted from a + 1 .. b bytes of context: its geometric middle
        mid = [math.sqrt((a + 1) * b) for a, b in zip(c["bins"]["start"], c["bins"]["end"])]
        for m in results["models"]:
            ax.plot(mid, c["bpb_by_position"][m["name"]], lw=1.2,
                    label=f"{m['name']} ({c['bpb'][m['name']]:.3f})")
        for other in ctx:
            if other["context"] < c["context"]:
                ax.axvline(other["context"], color="grey", ls="--", lw=0.8)
        ax.set(xscale="log", xlabel="bytes of context (position in the window + 1)",
               title=f"context {c['context']:,} bytes, {c['windows']} windows")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, title="model (mean bits/byte)", title_fontsize=8)
    axes[0][0].set_ylabel("bits per byte")
    fig.tight_layout()
    # at the path given: in the format its suffix names, else PNG (matplotlib would append .png to the name)
    suffix = Path(path).suffix[1:].lower()
    fig.savefig(path, dpi=120, format=suffix if suffix in fig.canvas.get_supported_filetypes() else "png")
    plt.close(fig)


# ---------------------------------------------------------------------------- command line
def _named(specs: list[str]) -> dict[str, Path]:
    named: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            path = spec
            p = Path(spec).resolve()
            name = p.parent.name if p.name in ("model", "checkpoint") else p.name
        if not name or name in named:
            raise ValueError(f"models: {'an empty' if not name else f'the name {name!r} is given twice, a'} name in "
                             f"{spec!r}; label each model as NAME=PATH with distinct names")
        named[name] = Path(path)
    return named


def _check(args) -> None:
    for name in ("max_bytes", "bins", "chunk", "batch_size", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    bad = [c for c in args.context if c < 2]
    if bad:
        raise ValueError(f"--context must be window lengths >= 2 bytes, got {bad}")
    if len(set(args.context)) != len(args.context):
        raise ValueError(f"--context lists a length twice: {args.context}")
    for name in ("json", "markdown", "figure"):
        path = getattr(args, name)
        if path is not None and (why := unwritable(f"--{name}", path)):
            raise ValueError(why)


def main(args) -> int:
    from ..lm import TransformerLM
    from .data import load_corpus

    t0 = time.perf_counter()
    try:
        _check(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        paths = _named(args.models)
        models = {name: TransformerLM.from_pretrained(p).eval() for name, p in paths.items()}
        for name, m in models.items():
            if m.config.vocab_size != 256:
                raise ValueError(f"{name}: vocab_size {m.config.vocab_size}, not a byte model (256)")
        corpus = load_corpus(args.data or None)
        contexts = sorted(args.context)
        too_long = [c for c in contexts if c >= corpus.validation.numel()]
        if too_long:
            raise ValueError(f"--context {too_long} needs more validation bytes than the held-out files have "
                             f"({corpus.validation.numel():,}); shorten it or add --data")
        results = evaluate_models(models, corpus, contexts, max_bytes=args.max_bytes, bins=args.bins,
                                  chunk=args.chunk, batch_size=args.batch_size, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"sata evaluate: {e}", file=sys.stderr)
        return 2
    for m in results["models"]:
        m["path"] = str(paths[m["name"]])
    launched = sys.argv[1:2] == ["evaluate"]   # from the console script (not called from Python)
    results.update(command=shlex.join(["sata", *sys.argv[1:]]) if launched else None,
                   torch_threads=torch.get_num_threads(), seconds=round(time.perf_counter() - t0, 1))
    print(table(results), end="")
    if args.json:
        write_atomic(args.json, (json.dumps(results, indent=1) + "\n").encode())
    if args.markdown:
        make_parent(args.markdown).write_text(table(results, markdown=True))
    if args.figure:
        figure(results, make_parent(args.figure))
    return 0
