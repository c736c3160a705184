"""Memory budget: refuse configurations whose state or working set would not fit, before allocating.

The budget bounds what one call may allocate for states and features (not the
inputs and outputs the caller already holds). Default: 4 GiB, or the
``SATA_MEMORY_BUDGET`` environment variable (bytes, or with a suffix: ``512M``,
``16G``). Change it with :func:`set_memory_budget` or, for a block of code,
``with sata.memory_budget("16G"): ...``.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

__all__ = ["MemoryBudgetError", "get_memory_budget", "memory_budget", "set_memory_budget"]

_DEFAULT = 4 * 2**30
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class MemoryBudgetError(ValueError):
    """A configuration would need more memory than the budget allows."""


def _parse(value: int | str) -> int:
    if isinstance(value, bool):
        raise TypeError("memory budget must be a number of bytes or a string like '16G'")
    if isinstance(value, int):
        nbytes = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)i?B?\s*", str(value), flags=re.IGNORECASE)
        if m is None:
            raise ValueError(f"cannot read memory budget {value!r}: use bytes or a size like '512M', '16G'")
        nbytes = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if nbytes <= 0:
        raise ValueError(f"memory budget must be positive, got {value!r}")
    return nbytes


_budget = _parse(os.environ["SATA_MEMORY_BUDGET"]) if os.environ.get("SATA_MEMORY_BUDGET") else _DEFAULT


def get_memory_budget() -> int:
    """The current budget in bytes."""
    return _budget


def set_memory_budget(value: int | str | None) -> int:
    """Set the budget (bytes or ``'16G'``); ``None`` restores the default. Returns the previous one."""
    global _budget
    previous = _budget
    _budget = _DEFAULT if value is None else _parse(value)
    return previous


@contextlib.contextmanager
def memory_budget(value: int | str) -> Iterator[int]:
    """Temporarily use another budget: ``with sata.memory_budget('16G'): ...``."""
    previous = set_memory_budget(value)
    try:
        yield _budget
    finally:
        set_memory_budget(previous)


def format_bytes(n: float, digits: int = 1) -> str:
    """``n`` bytes in the largest binary unit below it, with ``digits`` decimals: ``'17.8 GiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1024
    raise AssertionError


def check_budget(nbytes: int, what: str, fix: str) -> None:
    """Raise :class:`MemoryBudgetError` if ``nbytes`` exceeds the budget."""
    if nbytes > _budget:
        raise MemoryBudgetError(
            f"{what} needs {format_bytes(nbytes)}, more than the memory budget of {format_bytes(_budget)}. "
            f"{fix} To allow it, raise the budget with sata.set_memory_budget(...) or the "
            f"SATA_MEMORY_BUDGET environment variable."
        )
