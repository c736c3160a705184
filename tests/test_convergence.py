"""With bounded scores the truncated series converges to softmax attention as n_taylor grows.

Queries and keys lie on a sphere of radius r with scale * r^2 = 2, so every score |s| <= 2.
Reference: exact softmax attention (SDPA) in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

import sata

E, L = 8, 64


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = math.sqrt(2 / E**-0.5)

    def sphere():
        x = torch.randn(2, 4, L, E, generator=g, dtype=torch.float64)
        return x / x.norm(dim=-1, keepdim=True) * r

    q, k = sphere(), sphere()
    v = torch.randn(2, 4, L, E, generator=g, dtype=torch.float64)
    return q, k, v


def _errors(causal, Ps):
    q, k, v = _inputs()
    assert (E**-0.5 * q @ k.mT).abs().max() <= 2 + 1e-12
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return {P: float((sata.sata_attention(q, k, v, n_taylor=P, is_causal=causal) - ref).abs().max()) for P in Ps}, v


def _weight_error_bound(P):
    """eps_P = max_{|s|<=2} |T_P(s) e^{-s} - 1| (on a fine grid): each weight is off by at most
    this factor, so |y - y_softmax| <= 2 eps / (1 - eps) max|v| while eps < 1."""
    s = torch.linspace(-2, 2, 40001, dtype=torch.float64)
    return float((sata.taylor_exp(s, P) * torch.exp(-s) - 1).abs().max())


def test_noncausal_error_falls_with_every_term():
    err, v = _errors(False, range(1, 9))
    assert all(err[P + 1] < err[P] for P in range(1, 8)), err
    assert err[8] < 1e-3, err
    bounded = [P for P in range(1, 9) if _weight_error_bound(P) < 1]       # the bound needs eps < 1
    assert bounded == [6, 7, 8]
    for P in bounded:
        eps = _weight_error_bound(P)
        assert err[P] <= 2 * eps / (1 - eps) * float(v.abs().max()), (P, err[P], eps)


def test_causal_error_falls_with_terms():
    """Causal early rows see few keys, so for P = 2 (T_2(s) = 1 + s < 0 for s < -1) a normaliser can
    go negative (output 0): the error is monotone from P = 2 on, and over odd P (positive weights)."""
    err, v = _errors(True, range(1, 10))
    assert all(err[P + 1] < err[P] for P in range(2, 9)), err
    assert err[1] > err[3] > err[5] > err[7] > err[9], err
    assert err[8] < 2e-3, err


@pytest.mark.parametrize("P", [3, 5], ids=lambda P: f"P={P}")
def test_float32_error_is_the_truncation_not_rounding(P):
    """float32 inputs: the distance to softmax is the truncation error (float64 path), not rounding."""
    q, k, v = _inputs(1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    e64 = (sata.sata_attention(q, k, v, n_taylor=P, is_causal=True) - ref).abs().max()
    e32 = (sata.sata_attention(q.float(), k.float(), v.float(), n_taylor=P, is_causal=True).double() - ref).abs().max()
    assert abs(e32 - e64) < 1e-4 * v.abs().max()
