"""Byte-level text data: files or folders of text, a fixed file-level train/validation split.

The default corpus is the Python standard library's own ``.py`` sources (every machine with
Python has them; real text nobody here wrote). Files are assigned to validation by a hash of
their path relative to the corpus root, so the split is the same on every machine and does
not move when files are added or removed.

Training windows are drawn at random positions by a generator seeded with ``(seed, step)``:
the batch of any step is a pure function of the step number, which makes resuming exact and
lets every process of a distributed run take its own slice of the same global batch.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["ByteCorpus", "default_data_root", "load_corpus"]

_TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst"}
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", ".git"}


def default_data_root() -> Path:
    """The standard library's source folder (``sysconfig.get_paths()['stdlib']``)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _files(root: Path, suffixes: set[str]) -> list[Path]:
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root}: no such file or folder")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        out += [Path(dirpath) / f for f in sorted(filenames) if Path(f).suffix in suffixes]
    return out


def _is_validation(relpath: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "little")
    return (h % 10_000) < fraction * 10_000


@dataclass
class ByteCorpus:
    """Two byte streams: ``train`` and ``validation`` (uint8 ``[N]`` tensors, files joined by a NUL)."""

    train: torch.Tensor
    validation: torch.Tensor
    n_files: tuple[int, int]
    source: str

    def describe(self) -> str:
        return (f"{self.source}: {self.n_files[0]:,} training files ({self.train.numel() / 1e6:.1f} MB), "
                f"{self.n_files[1]:,} validation files ({self.validation.numel() / 1e6:.1f} MB)")

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int, *, rank: int = 0, world: int = 1):
        """Inputs and next-byte targets ``[batch_size / world, seq_len]`` (int64) of ``step``'s global batch.

        The global batch of ``batch_size`` windows depends only on ``(seed, step)``; process
        ``rank`` of ``world`` takes rows ``rank::world``.
        """
        if self.train.numel() < seq_len + 2:
            raise ValueError(f"--seq-len {seq_len} needs more than {seq_len + 1} training bytes, the data has "
                             f"{self.train.numel():,}; lower --seq-len or add --data")
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, self.train.numel() - seq_len - 1, (batch_size,), generator=g)  # [B]
        starts = starts[rank::world]                                                             # [B / world]
        idx = starts[:, None] + torch.arange(seq_len + 1)                                        # [b, T + 1]
        w = self.train[idx].long()                                                               # [b, T + 1]
        return w[:, :-1], w[:, 1:]

    def validation_windows(self, seq_len: int, max_tokens: int) -> torch.Tensor:
        """Non-overlapping windows ``[n, seq_len + 1]`` evenly spread over the validation stream."""
        n_all = (self.validation.numel() - 1) // seq_len
        if n_all < 1:
            raise ValueError(f"--seq-len {seq_len} needs more than {seq_len} validation bytes, the held-out files "
                             f"have {self.validation.numel():,}; lower --seq-len or add --data")
        n = max(1, min(n_all, max_tokens // seq_len))
        starts = torch.linspace(0, (n_all - 1) * seq_len, n).long() // seq_len * seq_len           # [n]
        idx = starts[:, None] + torch.arange(seq_len + 1)                                          # [n, T + 1]
        return self.validation[idx].long()


def load_corpus(paths: list[str] | None = None, *, validation_fraction: float = 0.05,
                suffixes: set[str] | None = None, max_bytes: int | None = None) -> ByteCorpus:
    """Read text files (or folders of them, recursively) into a :class:`ByteCorpus`.

    Args:
        paths: files or folders; default: the standard library's ``.py`` sources.
        validation_fraction: share of files held out (by path hash). Default: ``0.05``.
        suffixes: file suffixes read from folders. Default: ``.py`` for the default corpus,
            ``.py .txt .md .rst`` otherwise.
        max_bytes: stop reading after this many bytes (files in sorted order). Default: all.
    """
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    default = not paths
    roots = [default_data_root()] if default else [Path(p) for p in paths]
    suffixes = suffixes or ({".py"} if default else _TEXT_SUFFIXES)
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    total = 0
    for root in roots:
        for f in _files(root, suffixes):
            rel = f.name if root.is_file() else f.relative_to(root).as_posix()
            # a single file cannot be split by files: hold out its tail instead
            data = f.read_bytes()
            if root.is_file() and len(roots) == 1:
                cut = int(len(data) * (1 - validation_fraction))
                parts[False].append(data[:cut])
                parts[True].append(data[cut:])
            else:
                parts[_is_validation(rel, validation_fraction)].append(data)
            total += len(data)
            if max_bytes is not None and total >= max_bytes:
                break
        if max_bytes is not None and total >= max_bytes:
            break
    streams = {k: b"\0".join(v) for k, v in parts.items()}
    if len(streams[False]) < 4096 or len(streams[True]) < 1024:
        raise ValueError(
            f"--data {', '.join(map(str, roots))}: too little text ({len(streams[False]):,} training and "
            f"{len(streams[True]):,} validation bytes; need at least 4 KiB and 1 KiB). Pass more files "
            f"or a folder (suffixes {sorted(suffixes)})"
        )
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
    source = "Python standard library sources" if default else ", ".join(map(str, roots))
    return ByteCorpus(as_tensor(streams[False]), as_tensor(streams[True]),
                      (len(parts[False]), len(parts[True])), source)
