"""The feature map is exact: <phi(q), phi(k)> = T_P(scale q.k), built on the colex basis it claims.

Proves the symmetric basis (counts, multiplicities, colex order, parent/last hierarchy, weights),
the per-degree pieces of the identity, the size/cost helpers on hand-checked cases, and T_P itself.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sata
from conftest import rand

# every d in 1..64 with every P in 1..8 whose basis is cheap to build, plus the largest that fit a test
SWEEP_MAX_D = 3_000
LARGE = [(64, 4), (32, 5), (20, 6), (12, 7), (9, 8)]
IDENTITY_CASES = [
    pytest.param(d, P, id=f"d={d}-P={P}")
    for d in range(1, 65)
    for P in range(1, 9)
    if sata.feature_dim(d, P) <= SWEEP_MAX_D or (d, P) in LARGE
]


def _colex(d: int, p: int) -> list[tuple[int, ...]]:
    """Sorted multi-indices of degree p in colex order, built independently of sata."""
    return sorted(itertools.combinations_with_replacement(range(d), p), key=lambda r: r[::-1])


def _mult(row) -> int:
    """p! / prod_j c_j!: how many ordered index tuples one multiset stands for."""
    counts = [row.count(j) for j in set(row)]
    return math.factorial(len(row)) // math.prod(math.factorial(c) for c in counts)


@pytest.mark.parametrize("d,P", IDENTITY_CASES)
def test_feature_inner_product_is_truncated_exp(d, P):
    q, k = rand(6, d, seed=d), rand(6, d, seed=100 + d)
    for scale in (None, 0.37):
        s = (d**-0.5 if scale is None else scale) * (q * k).sum(-1)                  # [6]
        got = (sata.taylor_features(q, P, scale) * sata.taylor_features(k, P, scale)).sum(-1)
        want = sum(s**p / math.factorial(p) for p in range(P))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(d=st.integers(1, 12), P=st.integers(1, 6), scale=st.floats(0.0, 3.0), lead=st.lists(st.integers(1, 3), max_size=2),
       seed=st.integers(0, 2**16))
def test_identity_random_shapes(d, P, scale, lead, seed):
    q, k = rand(*lead, d, seed=seed), rand(*lead, d, seed=seed + 1)
    phq, phk = sata.taylor_features(q, P, scale), sata.taylor_features(k, P, scale)
    assert phq.shape == (*lead, sata.feature_dim(d, P))
    torch.testing.assert_close((phq * phk).sum(-1), sata.taylor_exp(scale * (q * k).sum(-1), P), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("d,P", [(1, 1), (1, 8), (3, 4), (8, 4), (16, 3), (5, 7)], ids=str)
def test_per_degree_slices(d, P):
    basis = sata.get_basis(d, P)
    q, k = rand(4, d, seed=1), rand(4, d, seed=2)
    scale = 0.6
    phq, phk = sata.taylor_features(q, P, scale), sata.taylor_features(k, P, scale)
    s = scale * (q * k).sum(-1)
    for p in range(P):
        sl = basis.degree_slice(p)
        assert sl.stop - sl.start == math.comb(d + p - 1, p)
        got = (phq[..., sl] * phk[..., sl]).sum(-1)
        torch.testing.assert_close(got, s**p / math.factorial(p), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(phq[..., basis.degree_slice(0)], torch.ones(4, 1, dtype=torch.float64))
    if P > 1:
        torch.testing.assert_close(phq[..., basis.degree_slice(1)], q * math.sqrt(scale))
    with pytest.raises(ValueError, match="degree p"):
        basis.degree_slice(P)


# D for (d, P) as tabulated in MATH.md section 4 (hand-checked there)
MATH_TABLE = {8: [9, 45, 165, 495, 1287], 16: [17, 153, 969, 4845, 20349], 32: [33, 561, 6545, 58905, 435897],
              64: [65, 2145, 47905, 814385, 11238513]}


@pytest.mark.parametrize("d", sorted(MATH_TABLE), ids=lambda d: f"d={d}")
def test_feature_dim_table(d):
    assert [sata.feature_dim(d, P) for P in range(2, 7)] == MATH_TABLE[d]


@pytest.mark.parametrize("d,P", [(1, 1), (1, 5), (2, 3), (7, 6), (64, 8), (100, 4)], ids=str)
def test_counts_and_hockey_stick(d, P):
    m = sata.monomial_counts(d, P)
    assert m == [math.comb(d + p - 1, p) for p in range(P)]
    assert sata.feature_dim(d, P) == sum(m) == math.comb(d + P - 1, P - 1)
    assert sata.state_size(d, 5, P) == sum(m) * 6


@pytest.mark.parametrize("d,P", [(1, 4), (2, 5), (3, 4), (5, 5), (8, 4), (13, 3)], ids=str)
def test_basis_is_colex_with_parent_and_last(d, P):
    basis = sata.get_basis(d, P)
    assert basis.sizes == tuple(sata.monomial_counts(d, P))
    assert basis.offsets[0] == 0 and basis.offsets[-1] == basis.dim == sata.feature_dim(d, P)
    lo = 0
    for p in range(P):
        rows = [tuple(r) for r in basis.multi_indices(p).tolist()]
        want = _colex(d, p)
        assert rows == want                                   # sorted, colex order, all multisets, no duplicates
        assert len(set(rows)) == len(rows) == math.comb(d + p - 1, p)
        assert all(list(r) == sorted(r) for r in rows)
        if p >= 2:  # each monomial is its parent (in the degree p-1 list) times its largest variable
            prev = _colex(d, p - 1)
            parent = basis.parents[p - 2].tolist()
            last = basis.last[lo: lo + len(rows)].tolist()
            weight = basis.weight[lo: lo + len(rows)].double()
            assert parent == [prev.index(r[:-1]) for r in want]
            assert last == [r[-1] for r in want]
            want_w = torch.tensor([r.count(r[-1]) ** -0.5 for r in want], dtype=torch.float64)
            torch.testing.assert_close(weight, want_w, rtol=1e-6, atol=0)
            # MATH.md: the degree-p monomials with largest index j are a prefix of the degree-(p-1) list
            for j in range(d):
                block = [parent[i] for i, r in enumerate(want) if r[-1] == j]
                assert block == list(range(math.comb(j + p - 1, p - 1)))
            lo += len(rows)
    assert lo == basis.dim - 1 - d if P > 2 else lo == 0


@pytest.mark.parametrize("d,p", [(1, 5), (2, 4), (3, 3), (4, 5), (6, 4), (10, 3), (16, 2)], ids=str)
def test_multiplicities_sum_to_d_power_p(d, p):
    rows = [tuple(r) for r in sata.get_basis(d, p + 1).multi_indices(p).tolist()]
    assert sum(_mult(r) for r in rows) == d**p


def test_get_basis_is_cached():
    assert sata.get_basis(7, 4) is sata.get_basis(7, 4)
    assert sata.get_basis(7, 4, dtype=torch.float64).weight.dtype == torch.float64


# state_size = D (Ev + 1); flops_per_token by the counting in its docstring:
# 2d (scale q, k) + 4 (D - 1 - d) (two multiplies per feature of degree >= 2, q and k) + 4 D (Ev + 1) + Ev
SIZE_CASES = [
    # d, Ev, P, state_size, flops_per_token
    (8, 8, 4, 165 * 9, 16 + 4 * 156 + 4 * 165 * 9 + 8),          # = 6588
    (16, 32, 3, 153 * 33, 32 + 4 * 136 + 4 * 153 * 33 + 32),
    (4, 4, 1, 1 * 5, 0 + 0 + 4 * 1 * 5 + 4),                      # P = 1: only the constant feature
    (4, 4, 2, 5 * 5, 8 + 0 + 4 * 5 * 5 + 4),                      # P = 2: degree 1 costs no products
    (2, 3, 3, 6 * 4, 4 + 4 * 3 + 4 * 6 * 4 + 3),
    (64, 64, 3, 2145 * 65, 128 + 4 * 2080 + 4 * 2145 * 65 + 64),
]


@pytest.mark.parametrize("d,Ev,P,size,flops", SIZE_CASES, ids=str)
def test_state_size_and_flops(d, Ev, P, size, flops):
    assert sata.state_size(d, Ev, P) == size
    assert sata.flops_per_token(d, Ev, P) == flops
    assert sata.flops_per_token(8, 8, 4) == 6588


@pytest.mark.parametrize("P", range(1, 9), ids=lambda P: f"P={P}")
def test_taylor_exp_is_the_truncated_sum(P):
    s = torch.linspace(-6, 6, 243, dtype=torch.float64)
    want = sum(s**p / math.factorial(p) for p in range(P))
    got = sata.taylor_exp(s, P)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    assert got.dtype == s.dtype and got.shape == s.shape
    s32 = s.float().reshape(3, 1, 81)
    torch.testing.assert_close(sata.taylor_exp(s32, P), want.float().reshape(3, 1, 81), rtol=1e-5, atol=1e-5)


def test_taylor_exp_sign_facts():
    """MATH.md section 4: odd P keeps T_P > 0 everywhere, even P goes negative below ~-1.6 (P = 4)."""
    s = torch.linspace(-30, 30, 6001, dtype=torch.float64)
    for P in (1, 3, 5, 7):
        assert (sata.taylor_exp(s, P) > 0).all()
    assert sata.taylor_exp(torch.tensor(-1.5, dtype=torch.float64), 4) > 0
    assert sata.taylor_exp(torch.tensor(-1.7, dtype=torch.float64), 4) < 0
    assert sata.taylor_exp(torch.tensor(-1.01, dtype=torch.float64), 2) < 0


def test_taylor_features_validates():
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        sata.taylor_features(torch.ones(3, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="scale"):
        sata.taylor_features(torch.ones(3), 3, scale=-1.0)
    with pytest.raises(ValueError, match="n_taylor"):
        sata.taylor_features(torch.ones(3), 0)
