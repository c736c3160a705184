"""Exact where it matters: the math of the window, the sinks and the re-centred series (``MATH.md`` section 6).

For query ``i`` the keys split in two: ``E_i``, attended exactly (softmax weights ``exp``), the ``window``
most recent positions (``0 <= i - j < window``; non-causal ``|i - j| < window``) and the first ``sinks``
kept keys of the stream; ``F_i``, every other visible key, through the Taylor state, expanded around a
per-query centre ``c_i`` and weighted by ``beta`` (``taylor_mix``) under one normaliser:

    m_i   = max(max_{E_i} s_ij, c_i)
    num_i = sum_{E_i} e^{s_ij - m_i} v_j + beta e^{c_i - m_i} sum_{F_i} T_P(s_ij - c_i) v_j
    y_i   = num_i / den_i                        (den_i: the same with 1 in place of v_j)

The centre is read from the same state: ``c_i = mu_i - alpha sd_i``, the mean and standard deviation of
query ``i``'s scores over ``F_i``, and ``T_P(s - c) = sum_m a_m(c) s^m / m!`` with
``a_m(c) = T_{P-m}(-c)``: only the query side changes, block by degree. Every path and the oracle take
these pieces from here, so each formula has one implementation.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .features import _normalize_rows

__all__ = ["Hybrid", "check_hybrid", "check_learned", "softplus_inverse"]


@dataclass(frozen=True, eq=False)
class Hybrid:
    """The validated window-mode arguments of one call (``window = sinks = 0`` and no centre: the plain op)."""

    window: int
    sinks: int
    taylor_mix: float | torch.Tensor       # beta, scalar or [Hq]
    recentre: float | torch.Tensor | None  # alpha, scalar or [Hq]; None: the series around 0

    @property
    def plain(self) -> bool:
        """No exact part and no centre: today's op (``taylor_mix`` then cancels in the normaliser)."""
        return self.window == 0 and self.sinks == 0 and self.recentre is None

    @property
    def has_exact(self) -> bool:
        return self.window > 0 or self.sinks > 0

    @property
    def no_far(self) -> bool:
        """``taylor_mix`` is the plain number 0: the output is the exact part alone (a sliding window with sinks);
        a tensor, even of zeros, may be trained away from 0 and keeps the far part."""
        return not isinstance(self.taylor_mix, torch.Tensor) and self.taylor_mix == 0


PLAIN = Hybrid(0, 0, 1.0, None)


def _check_count(fn: str, name: str, value: object, what: str) -> int:
    # any integer type (numpy's too), not bool
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{fn}: {name} must be a non-negative int ({what}), got {value!r}")
    return int(value)


def check_slots(fn: str, window: object, sinks: object) -> tuple[int, int]:
    """``window`` and ``sinks`` as non-negative ints; raise with the fix."""
    return (_check_count(fn, "window", window, "recent keys attended exactly; 0 turns the window off"),
            _check_count(fn, "sinks", sinks, "first keys of the stream attended exactly; 0 turns sinks off"))


def _check_per_head(fn: str, name: str, value: object, n_q_heads: int, device: torch.device, fix: str):
    """A finite float, or a floating tensor of shape ``[]`` or ``[Hq]`` on the inputs' device."""
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a float or a floating tensor [Hq], got a {value.dtype} tensor")
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != n_q_heads):
            raise ValueError(
                f"{fn}: {name} must be a scalar or one value per query head, shape [{n_q_heads}], "
                f"got shape {tuple(value.shape)}"
            )
        if value.device != device:
            raise ValueError(f"{fn}: {name} is on {value.device} but the inputs are on {device}; move it with .to()")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{fn}: {name} must be finite, got {value}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):   # (numpy's floats and ints too)
        raise TypeError(f"{fn}: {name} must be a finite float or a tensor [Hq] ({fix}), got {value!r}")
    if not math.isfinite(value):  # a ValueError, as for a tensor holding NaN or inf
        raise ValueError(f"{fn}: {name} must be a finite float or a tensor [Hq] ({fix}), got {value!r}")
    return float(value)


_HYBRID_CACHE: dict = {}


def check_hybrid(
    fn: str, *, window: object, sinks: object, taylor_mix: object, recentre: object, n_taylor: int,
    n_q_heads: int, device: torch.device,
) -> Hybrid:
    """Validate the window-mode arguments; raise with the fix.

    Settings given as plain numbers are a function of their values, so a repeated call (a decode loop)
    reuses the earlier verdict; tensors (which can change in place) are checked every call.
    """
    key = None
    if type(window) is int and type(sinks) is int and type(taylor_mix) is float and (
            recentre is None or type(recentre) is float):  # the usual types: their values are the key
        key = (fn, window, sinks, taylor_mix, recentre, n_taylor, n_q_heads, device)
    elif not isinstance(taylor_mix, torch.Tensor) and not isinstance(recentre, torch.Tensor):
        key = (fn, type(window), window, type(sinks), sinks, type(taylor_mix), taylor_mix, type(recentre), recentre,
               n_taylor, n_q_heads, device)
    if key is not None:
        try:
            hybrid = _HYBRID_CACHE.get(key)
        except TypeError:  # unhashable settings: the full check explains
            key = hybrid = None
        if hybrid is not None:
            return hybrid
    hybrid = _check_hybrid(fn, window=window, sinks=sinks, taylor_mix=taylor_mix, recentre=recentre, n_taylor=n_taylor,
                           n_q_heads=n_q_heads, device=device)
    if key is not None and len(_HYBRID_CACHE) < 1024:
        _HYBRID_CACHE[key] = hybrid
    return hybrid


def _check_hybrid(
    fn: str, *, window: object, sinks: object, taylor_mix: object, recentre: object, n_taylor: int,
    n_q_heads: int, device: torch.device,
) -> Hybrid:
    window, sinks = check_slots(fn, window, sinks)
    beta = _check_per_head(fn, "taylor_mix", taylor_mix, n_q_heads, device, "weight of the Taylor part, >= 0")
    negative = bool((beta < 0).any()) if isinstance(beta, torch.Tensor) else beta < 0
    if negative:
        raise ValueError(
            f"{fn}: taylor_mix must be >= 0 (the weight of the Taylor part in the shared normaliser), got {taylor_mix}; "
            "0 keeps only the window and sinks"
        )
    if not window and not sinks and (bool((beta == 0).any()) if isinstance(beta, torch.Tensor) else beta == 0):
        raise ValueError(
            f"{fn}: taylor_mix=0 without a window or sinks leaves no keys to attend to (every output would be 0); "
            "give a window and/or sinks to attend exactly, or a taylor_mix > 0"
        )
    if recentre is not None:
        recentre = _check_per_head(fn, "recentre", recentre, n_q_heads, device,
                                   "alpha in c = mean - alpha * sd, or None for the series around 0")
        if n_taylor < 2:
            raise ValueError(
                f"{fn}: recentre needs n_taylor >= 2 (the mean score is read from the degree-1 block), got "
                f"n_taylor={n_taylor}; use recentre=None or more terms"
            )
        nonzero = bool((recentre != 0).any()) if isinstance(recentre, torch.Tensor) else recentre != 0
        if nonzero and n_taylor < 3:
            raise ValueError(
                f"{fn}: recentre={recentre} (alpha != 0) needs n_taylor >= 3 (the standard deviation of the scores "
                f"is read from the degree-2 block), got n_taylor={n_taylor}; use recentre=0.0 (the mean) or more terms"
            )
        if n_taylor < 3 and isinstance(recentre, torch.Tensor) and recentre.requires_grad and torch.is_grad_enabled():
            # at alpha = 0 the output still depends on alpha through sd, which these terms cannot read
            raise ValueError(
                f"{fn}: a recentre tensor that requires grad needs n_taylor >= 3 (d/d alpha is -sd times the "
                f"pull of the centre, and the standard deviation is read from the degree-2 block), got "
                f"n_taylor={n_taylor}; pass recentre detached (or 0.0, the mean) or use more terms"
            )
    return Hybrid(window, sinks, beta, recentre)


def check_learned(fn: str, hybrid: Hybrid, *, learn_mix: bool, learn_recentre: bool, n_taylor: int) -> None:
    """Whether ``beta`` (``learn_mix``) and ``alpha`` (``learn_recentre``) can be learned from these settings;
    raise with the fix. ``hybrid``: the validated settings they start from (:func:`check_hybrid`)."""
    if learn_mix:
        if not hybrid.has_exact:
            raise ValueError(f"{fn}: learn_mix=True needs window > 0 or sinks > 0 (without exact keys "
                             "taylor_mix cancels in the normaliser and would learn nothing)")
        if not isinstance(hybrid.taylor_mix, float) or hybrid.taylor_mix <= 0:
            raise ValueError(f"{fn}: learn_mix=True starts at taylor_mix, which must be a float > 0 "
                             f"(softplus never reaches 0), got {hybrid.taylor_mix!r}")
    if learn_recentre and (hybrid.recentre is None or n_taylor < 3):
        raise ValueError(f"{fn}: learn_recentre=True needs a starting recentre (e.g. 0.0) and "
                         f"n_taylor >= 3 (alpha != 0 reads the degree-2 block), got recentre={hybrid.recentre!r}, "
                         f"n_taylor={n_taylor}")


def softplus_inverse(y: float) -> float:
    """``x`` with ``softplus(x) = log(1 + e^x) = y``, for ``y > 0``: the parameter that starts a learned ``beta``."""
    return y + math.log(-math.expm1(-y))


def per_head(value: float | torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype):
    """A float stays a float; a ``[Hq]`` tensor is reshaped to ``shape`` (e.g. ``(Hkv, g, 1)``) to broadcast."""
    if not isinstance(value, torch.Tensor):
        return value
    return value.to(dtype).reshape(shape) if value.dim() == 1 else value.to(dtype)


# ---------------------------------------------------------------- the centre and its coefficients
def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(max(x, 0))`` with gradient 0 (not Inf) where ``x <= 0``."""
    pos = x > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, x, torch.ones_like(x))), 0.0)


def centre(moments: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """``c = mu - alpha sd`` from the far moments ``[..., 3]`` = ``(N, sum s, sum s^2 / 2)`` -> ``[...]``.

    Where there are no far keys (``N = 0``) the centre is 0; it then weighs nothing.
    """
    n = moments[..., 0]
    has = n > 0
    n_safe = torch.where(has, n, torch.ones_like(n))
    mu = moments[..., 1] / n_safe
    if isinstance(alpha, (int, float)) and alpha == 0:
        c = mu
    else:
        var = 2.0 * moments[..., 2] / n_safe - mu * mu
        c = mu - alpha * safe_sqrt(var)
    return torch.where(has, c, 0.0)


def centre_coefficients(c: torch.Tensor, n_taylor: int) -> torch.Tensor:
    """``a_m(c) = T_{P-m}(-c) = sum_{n < P-m} (-c)^n / n!`` for ``m < P``: ``[...] -> [..., P]``.

    ``sum_m a_m(c) s^m / m! = T_P(s - c)``: the per-degree read-outs of the state, weighted, give the series
    around ``c``. The terms alternate for ``c > 0`` and grow like ``|c|^(P-1)``: keep ``|c|`` small
    (centre the keys) where float32 matters.
    """
    terms = [torch.ones_like(c)]                                                # (-c)^n / n!
    for n in range(1, n_taylor):
        terms.append(terms[-1] * (-c) / n)
    # a_{P-1} = 1, a_m = a_{m+1} + (-c)^{P-1-m} / (P-1-m)!
    coeffs = torch.stack(terms, dim=-1).cumsum(dim=-1)                          # [..., P]: a_{P-1}, ..., a_0
    return coeffs.flip(-1)


# ---------------------------------------------------------------- the exact part and the shared normaliser
def exact_part(s: torch.Tensor, exact: torch.Tensor, v: torch.Tensor):
    """Softmax over the exact keys, unnormalised, around its own maximum.

    Args:
        s: scores ``[..., T, K]``; exact: bool ``[..., T, K]`` (broadcastable), which keys are exact;
        v: values ``[..., K, Ev]``.

    Returns:
        ``(m [..., T], num [..., T, Ev], den [..., T])`` with ``num = sum e^{s - m} v`` over the exact keys,
        ``m = -inf`` and ``num = den = 0`` for a row with none. ``m`` carries no gradient: every use of it
        (here and in :func:`combine`) cancels in the normalised output, so its backward pass would add zeros.
    """
    s = s.masked_fill(~exact, -math.inf)
    m = s.detach().amax(dim=-1)                                                 # [..., T]
    m_safe = torch.where(torch.isfinite(m), m, 0.0)
    x = s - m_safe[..., None]                                                   # [..., T, K]
    # weights below the smallest normal number flushed to 0: a subnormal exp costs ~60x a normal one on x86
    # (trained models' scores span up to ~100 units: some land there) and weighs < 1.2e-38 beside the maximum's 1
    x = x.masked_fill_(x < _EXP_FLOOR[x.dtype], -math.inf)
    w = torch.exp(x)                                                            # [..., T, K]; 0 off the exact keys
    return m, w @ v, w.sum(dim=-1)


# log of the smallest normal number of each compute dtype, and a bound below the log of its largest
_EXP_FLOOR = {dt: math.log(torch.finfo(dt).tiny) for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}
_EXP_CEIL = {dt: math.log(torch.finfo(dt).max) - 1.0 for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def combine(m_exact, num_exact, den_exact, U_far, c, has_far, beta, d_value: int, dtype: torch.dtype) -> torch.Tensor:
    """``y = num / den`` with both parts scaled to the common maximum ``m = max(m_exact, c)``.

    ``U_far [..., T, Ev + 1]`` holds ``sum_F T_P(s - c) [v, 1]``; ``has_far [..., T]`` says whether ``F`` is
    non-empty. A row without far keys, or whose ``beta`` is 0, takes its maximum from the exact part alone
    (with ``c`` in it, exact scores ~88 below ``c`` would underflow in float32 to an output of 0). A row whose
    normaliser is not positive gives 0. ``U_far=None``: no far part (``taylor_mix=0``), the exact part alone.
    """
    if U_far is None:
        return _normalize_rows(num_exact, den_exact[..., None]).to(dtype)
    weighted = has_far & (beta != 0)                                            # [..., T] (beta: float or tensor)
    m = torch.where(weighted, torch.maximum(m_exact, c), m_exact)               # [..., T]
    m = torch.where(torch.isfinite(m), m, 0.0)
    e_exact = torch.exp(m_exact - m)                                            # 0 where no exact keys
    # c - m <= 0 where beta != 0; where beta = 0 it only carries beta's gradient, kept finite by the clamp
    x_far = torch.where(has_far, c - m, -math.inf).clamp(max=_EXP_CEIL[m.dtype])
    e_far = beta * torch.exp(x_far)                                             # 0 where no far keys
    num = e_exact[..., None] * num_exact + e_far[..., None] * U_far[..., :d_value]
    den = e_exact * den_exact + e_far * U_far[..., d_value]
    return _normalize_rows(num, den[..., None]).to(dtype)
