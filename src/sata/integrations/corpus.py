"""Offline, deterministic English prose for conversion and evaluation, split into train and held-out by document.

Documents: every topic of the Python reference manual (``pydoc_data.topics``) and every module of the
standard library (its module, class and function docstrings, read with :mod:`ast`, nothing imported),
both shipped with every CPython. Only running prose is kept (no code, grammar, lists or headings), each
paragraph once (in the first document, in sorted order, that has it). A document is held out when the
CRC-32 of its name is divisible by 5: the split does not move when documents are added or removed.
"""

from __future__ import annotations

import ast
import functools
import sysconfig
import zlib
from pathlib import Path

__all__ = ["SPLITS", "documents", "split_text"]

SPLITS = ("train", "heldout")
_SKIP = ("test", "tests", "idle_test", "site-packages", "lib2to3", "turtledemo", "__pycache__")


def _docstrings(path: Path) -> str:
    """Module, class and function docstrings of one source file, in file order (empty if it does not parse)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return "\n\n".join(doc for n in nodes if (doc := ast.get_docstring(n, clean=True)))


@functools.lru_cache(maxsize=1)
def documents() -> dict[str, list[str]]:
    """``{name: paragraphs}`` of every document (``topic:NAME``, ``module:PATH``), paragraphs deduplicated
    (computed once per process; do not modify)."""
    from pydoc_data.topics import topics

    from sata.integrations.convert import _prose

    raw = {f"topic:{name}": text for name, text in topics.items()}
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if not any(part in _SKIP for part in rel.parts):
            raw[f"module:{rel.as_posix()}"] = _docstrings(path)
    seen: set[str] = set()
    out = {}
    for name in sorted(raw):
        paras = [p for p in _prose(raw[name]) if p not in seen]
        seen.update(paras)
        if paras:
            out[name] = paras
    return out


def _is_heldout(name: str) -> bool:
    return zlib.crc32(name.encode()) % 5 == 0


def split_text(split: str) -> str:
    """The documents of one split (``"train"`` or ``"heldout"``), in sorted order, paragraphs joined by blank lines."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    docs = documents()
    return "\n\n".join("\n\n".join(docs[n]) for n in sorted(docs) if _is_heldout(n) == (split == "heldout"))

