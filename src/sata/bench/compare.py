"""Comparing two methods: where one becomes faster, and how closely their outputs agree."""

from __future__ import annotations

import math

import torch

__all__ = ["agreement", "crossover"]


def crossover(contexts: list[int], ours: list[float | None], theirs: list[float | None]) -> dict:
    """Context length where ``ours`` becomes faster than ``theirs``, interpolated in log-log space.

    Returns ``{"context": n or None, "status": ...}``: ``"interpolated"`` between the last measured
    context where ours was slower and the next one (``between``), ``"faster at every measured
    context"`` (``context`` is then the smallest measured, an upper bound), ``"not reached up to N"``
    (slower at the largest measured context) or ``"no data"``.
    """
    pts = [(n, a, b) for n, a, b in zip(contexts, ours, theirs) if a is not None and b is not None]
    if not pts:
        return {"context": None, "status": "no data"}
    if pts[-1][1] >= pts[-1][2]:
        return {"context": None, "status": f"not reached up to {pts[-1][0]}"}
    i = len(pts) - 1            # walk back to the last crossing from slower to faster
    while i > 0 and pts[i - 1][1] < pts[i - 1][2]:
        i -= 1
    if i == 0:
        return {"context": pts[0][0], "status": "faster at every measured context", "upper_bound": True}
    (n0, a0, b0), (n1, a1, b1) = pts[i - 1], pts[i]
    r0, r1 = math.log(a0 / b0), math.log(a1 / b1)                  # r0 >= 0 > r1
    t = r0 / (r0 - r1)
    n = math.exp(math.log(n0) + t * (math.log(n1) - math.log(n0)))
    return {"context": int(round(n)), "status": "interpolated", "between": [n0, n1]}


def agreement(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-3) -> dict:
    """How closely two outputs agree: max and median absolute difference, and the fraction of
    elements with ``|a - b| <= rtol (1 + |b|)``.

    The median and the fraction are the meaningful numbers for an even number of Taylor terms,
    where a few normalisers are near zero and the two methods' outputs there are both huge.
    """
    diff = (a.double() - b.double()).abs().flatten()
    if diff.numel() == 0:
        return {"max_abs_diff": 0.0, "median_abs_diff": 0.0, "frac_close": 1.0}
    close = diff <= rtol * (1 + b.double().abs().flatten())
    return {"max_abs_diff": float(diff.max()), "median_abs_diff": float(diff.median()),
            "frac_close": float(close.double().mean())}
