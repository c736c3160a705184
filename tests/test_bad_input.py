"""Bad input gets a clear error naming the argument; over-budget configurations are refused before
allocating; NaN propagates (never silently becomes a number); non-positive normalisers give 0."""

from __future__ import annotations

import time

import pytest
import torch

import sata
from conftest import assert_rel, attend, mode_params, qkv, rand

F64 = torch.float64


def _t(*shape, dtype=F64):
    return torch.zeros(*shape, dtype=dtype)


def _state(**over):
    """A state for q/k [2, 3, L, 4], v [2, 3, L, 5], n_taylor=3, default scale; fields overridden."""
    cfg = dict(batch_shape=(2,), n_heads=3, d_key=4, d_value=5, n_taylor=3, scale=None, dtype=F64)
    cfg.update(over)
    return sata.SATAState.zeros(cfg.pop("batch_shape"), cfg.pop("n_heads"), cfg.pop("d_key"), cfg.pop("d_value"),
                                cfg.pop("n_taylor"), cfg.pop("scale"), **cfg)


GOOD = dict(query=_t(2, 3, 6, 4), key=_t(2, 3, 6, 4), value=_t(2, 3, 6, 5))

# (id, overrides of the call, exception, pattern the message must contain)
CASES = [
    ("query-2d", dict(query=_t(6, 4)), ValueError, "query must be .*at least 3 dims"),
    ("value-2d", dict(value=_t(6, 5)), ValueError, "value must be"),
    ("query-not-tensor", dict(query=[[[0.0]]]), TypeError, "query must be a torch.Tensor"),
    ("key-int", dict(key=torch.zeros(2, 3, 6, 4, dtype=torch.long)), TypeError, "key has dtype torch.int64"),
    ("value-bool", dict(value=torch.zeros(2, 3, 6, 5, dtype=torch.bool)), TypeError, "value has dtype torch.bool"),
    ("query-complex", dict(query=torch.zeros(2, 3, 6, 4, dtype=torch.complex64)), TypeError, "query has dtype"),
    ("mixed-dtypes", dict(key=_t(2, 3, 6, 4, dtype=torch.float32)), TypeError, "share one dtype"),
    ("mixed-devices", dict(key=torch.zeros(2, 3, 6, 4, dtype=F64, device="meta")), ValueError, "one device"),
    ("head-size", dict(key=_t(2, 3, 6, 3)), ValueError, "query and key must have the same head size"),
    ("kv-heads", dict(value=_t(2, 2, 6, 5)), ValueError, "key and value must have the same number of heads"),
    ("kv-length", dict(value=_t(2, 3, 5, 5)), ValueError, "key and value must have the same length"),
    ("batch-dims", dict(key=_t(1, 3, 6, 4), value=_t(1, 3, 6, 5)), ValueError, "batch dimensions differ"),
    ("ndims", dict(query=_t(1, 2, 3, 6, 4)), ValueError, "same number of dims"),
    ("q-heads-no-gqa", dict(query=_t(2, 6, 6, 4)), ValueError, "enable_gqa=True"),
    ("gqa-not-multiple", dict(query=_t(2, 4, 6, 4), enable_gqa=True), ValueError, "multiple of the key/value heads"),
    ("gqa-not-bool", dict(enable_gqa=1), TypeError, "enable_gqa must be a bool"),
    ("causal-lq-ne-lk", dict(query=_t(2, 3, 5, 4), is_causal=True), ValueError, "is_causal=True needs as many queries"),
    ("causal-not-bool", dict(is_causal="yes"), TypeError, "is_causal must be a bool"),
    ("n_taylor=0", dict(n_taylor=0), ValueError, "n_taylor must be a positive int"),
    ("n_taylor=-1", dict(n_taylor=-1), ValueError, "n_taylor must be a positive int"),
    ("n_taylor=2.0", dict(n_taylor=2.0), ValueError, "n_taylor must be a positive int"),
    ("n_taylor=True", dict(n_taylor=True), ValueError, "n_taylor must be a positive int"),
    ("n_taylor=None", dict(n_taylor=None), ValueError, "n_taylor must be a positive int"),
    ("n_taylor=str", dict(n_taylor="3"), ValueError, "n_taylor must be a positive int"),
    ("scale-str", dict(scale="0.5"), TypeError, "scale must be a float"),
    ("scale-tensor", dict(scale=torch.tensor(0.5)), TypeError, "scale must be a float"),
    ("scale-nan", dict(scale=float("nan")), ValueError, "scale must be finite"),
    ("scale-inf", dict(scale=float("inf")), ValueError, "scale must be finite"),
    ("mask-dtype", dict(key_padding_mask=torch.zeros(2, 6)), TypeError, "key_padding_mask must be a bool tensor"),
    ("mask-shape", dict(key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)), ValueError, "key_padding_mask must have shape"),
    ("mask-device", dict(key_padding_mask=torch.zeros(2, 6, dtype=torch.bool, device="meta")), ValueError, "key_padding_mask is on meta"),
    ("state-type", dict(state=torch.zeros(3)), TypeError, "state must be a sata.SATAState"),
    ("state-d_key", dict(state=_state(d_key=3)), ValueError, "state comes from another configuration: .*d_key=3"),
    ("state-d_value", dict(state=_state(d_value=4)), ValueError, "another configuration: .*d_value=4"),
    ("state-n_taylor", dict(state=_state(n_taylor=4)), ValueError, "another configuration: .*n_taylor=4"),
    ("state-heads", dict(state=_state(n_heads=2)), ValueError, "another configuration: .*n_heads=2"),
    ("state-scale", dict(state=_state(scale=0.3)), ValueError, "another configuration: .*scale=0.3"),
    ("state-batch", dict(state=_state(batch_shape=(3,))), ValueError, "another configuration: .*batch_shape=\\[3\\]"),
    ("state-f32-with-f64", dict(state=_state(dtype=torch.float32)), TypeError, "float32 state cannot continue with float64"),
    ("state-device", dict(state=_state(device="meta")), ValueError, "state is on meta"),
]


@pytest.mark.parametrize("fn,over,exc,pattern", [
    pytest.param(fn, *c[1:], id=f"{c[0]}-{fn}")
    for c in CASES for fn in ("sata_attention", "naive_sata_attention")
    if fn == "sata_attention" or "state" not in c[1]                   # the oracle takes no state
])
def test_bad_input_names_the_argument(fn, over, exc, pattern):
    kw = {**GOOD, **over}
    with pytest.raises(exc, match=pattern):
        getattr(sata, fn)(**kw)


@pytest.mark.parametrize("over,exc,pattern", [
    pytest.param(dict(key=_t(3, 6, 4)), ValueError, "batch dimensions differ|same number of dims", id="key-dims"),
    pytest.param(dict(n_taylor=0), ValueError, "n_taylor", id="n_taylor"),
    pytest.param(dict(state=_state(d_value=4)), ValueError, "d_value=4", id="state"),
    pytest.param(dict(key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)), ValueError, "key_padding_mask", id="mask"),
])
def test_accumulate_state_validates(over, exc, pattern):
    kw = {"key": GOOD["key"], "value": GOOD["value"], **over}
    with pytest.raises(exc, match=pattern):
        sata.accumulate_state(**kw)


def test_errors_repeat_after_a_good_call():
    """Validation is cached per configuration: a good call must not let a later bad one through."""
    sata.sata_attention(**GOOD, n_taylor=3)
    with pytest.raises(ValueError, match="n_taylor"):
        sata.sata_attention(**GOOD, n_taylor=0)
    st = _state()
    sata.sata_attention(**GOOD, n_taylor=3, state=st)
    with pytest.raises(ValueError, match="d_value=4"):
        sata.sata_attention(**GOOD, n_taylor=3, state=_state(d_value=4))


# ------------------------------------------------------------------ memory budget
def _vm(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("d,P,H", [(64, 6, 8), (64, 8, 1), (32, 8, 4)], ids=str)
def test_over_budget_refused_quickly_without_allocating(d, P, H, causal):
    q = torch.zeros(1, H, 4, d)
    with open("/proc/self/clear_refs", "w") as f:       # reset the peak resident size of this process
        f.write("5")
    before, t0 = _vm("VmRSS"), time.perf_counter()
    with pytest.raises(sata.MemoryBudgetError, match=f"n_taylor={P} with d_key={d}.*GiB.*memory budget of 4.0 GiB") as e:
        sata.sata_attention(q, q, q, n_taylor=P, is_causal=causal)
    assert isinstance(e.value, ValueError)
    assert time.perf_counter() - t0 < 1.0
    assert _vm("VmHWM") - before < 32 * 2**20


def test_an_empty_state_counts_its_window_and_sinks_against_the_budget():
    # 2 heads of 8, n_taylor 3: a 3.2 KiB far state; window 4096 adds 256 KiB of keys and values
    with sata.memory_budget("64K"):
        sata.SATAState.zeros((1,), 2, 8, 8, 3, window=16)
        with pytest.raises(sata.MemoryBudgetError, match="window=4096, sinks=0"):
            sata.SATAState.zeros((1,), 2, 8, 8, 3, window=4096)
    with pytest.raises(sata.MemoryBudgetError, match="window=1000000000"):      # refused, not a failed allocation
        sata.SATAState.zeros((1,), 2, 8, 8, 3, window=10**9)
    for bad in (-1, None, 2.0):
        with pytest.raises(ValueError, match="sinks must be a non-negative int"):
            sata.SATAState.zeros((1,), 2, 8, 8, 3, sinks=bad)


def test_budget_is_overridable():
    q = torch.zeros(1, 2, 3, 8)
    y = sata.sata_attention(q, q, q, n_taylor=3)                                     # D = 45: fits any budget
    with sata.memory_budget("2K"):
        with pytest.raises(sata.MemoryBudgetError, match="2.0 KiB"):
            sata.sata_attention(q, q, q, n_taylor=3)
        with pytest.raises(sata.MemoryBudgetError):
            sata.SATAState.zeros((1,), 2, 8, 8, 3)
    assert torch.equal(sata.sata_attention(q, q, q, n_taylor=3), y)                 # restored
    prev = sata.set_memory_budget("1M")
    try:
        assert sata.get_memory_budget() == 2**20
        with pytest.raises(sata.MemoryBudgetError):
            sata.sata_attention(torch.zeros(1, 64, 3, 16), torch.zeros(1, 64, 3, 16), torch.zeros(1, 64, 3, 16), n_taylor=4)
    finally:
        sata.set_memory_budget(prev)
    assert sata.get_memory_budget() == prev


@pytest.mark.parametrize("value,exc", [(0, ValueError), (-5, ValueError), ("lots", ValueError), (True, TypeError)],
                         ids=["zero", "negative", "word", "bool"])
def test_bad_budget_values(value, exc):
    with pytest.raises(exc, match="memory budget"):
        sata.set_memory_budget(value)


# ------------------------------------------------------------------ NaN and non-positive normalisers
ALL_TORCH = [pytest.param(m, True, id=f"{m}-causal") for m in ["recurrent", "chunked"]] + \
            [pytest.param("parallel", False, id="parallel-noncausal")]
FORWARD_PATHS = ALL_TORCH + [pytest.param("prefill_kernel", c, id=f"prefill_kernel-{n}", marks=mp.marks)
                             for c, n in ((True, "causal"), (False, "noncausal"))
                             for mp in mode_params(["prefill_kernel"])] + \
    [pytest.param("auto", c, id=f"auto-{n}") for c, n in ((True, "causal"), (False, "noncausal"))] + \
    [pytest.param("oracle", c, id=f"oracle-{n}") for c, n in ((True, "causal"), (False, "noncausal"))]


def _run(mode, q, k, v, causal, **kw):
    if mode == "oracle":
        return sata.naive_sata_attention(q, k, v, is_causal=causal, **kw)
    return attend(mode, q, k, v, is_causal=causal, **kw)


@pytest.mark.parametrize("mode,causal", FORWARD_PATHS)
def test_nan_value_propagates_to_dependent_rows(mode, causal):
    """NaN in v_j reaches every output row that attends to key j (documented: like SDPA)."""
    q, k, v = qkv((1,), 2, 12, 4, seed=1)
    v[..., 7, 1] = float("nan")
    y = _run(mode, q, k, v, causal, n_taylor=3)
    rows = torch.isnan(y).any(-1)                                        # [1, 2, 12]
    assert rows[..., 7:].all()
    if not causal:
        assert rows.all()


# `z > 0` is False for a NaN normaliser (features._normalize_rows, decode.cpp, prefill.cpp): rows that
# depend on a NaN query/key output 0 instead of NaN; fix: treat `~(z <= 0)` as positive


@pytest.mark.parametrize("mode,causal", FORWARD_PATHS)
@pytest.mark.parametrize("where", ["query", "key"])
def test_nan_query_or_key_propagates(where, mode, causal):
    q, k, v = qkv((1,), 2, 12, 4, seed=2)
    (q if where == "query" else k)[..., 7, 0] = float("nan")
    y = _run(mode, q, k, v, causal, n_taylor=3)
    rows = torch.isnan(y).any(-1)
    if where == "query":
        assert rows[..., 7].all() and not rows[..., :7].any() and not rows[..., 8:].any()
    else:
        assert rows[..., 7:].all() and (not rows[..., :7].any() if causal else rows.all())


FAST_CAUSAL = [p for p in FORWARD_PATHS if p.values[1] and p.values[0] != "oracle"]


@pytest.mark.parametrize("mode,causal", FAST_CAUSAL)
@pytest.mark.parametrize("where", ["key", "value"])
def test_nan_does_not_touch_earlier_chunks(where, mode, causal):
    """A NaN at position 70 leaves every row of earlier chunks exact (chunks of 32 or 64 tokens).

    Rows before it inside its own chunk may see NaN from a NaN *value* (the masked intra-chunk
    product computes 0 * NaN, as SDPA's math backend and the oracle do for every row)."""
    q, k, v = qkv((1,), 2, 80, 4, seed=3)
    (k if where == "key" else v)[..., 70, 0] = float("nan")
    y = _run(mode, q, k, v, True, n_taylor=3)
    assert torch.isfinite(y[..., :64, :]).all()
    assert_rel(y[..., :64, :], _run(mode, q[..., :64, :], k[..., :64, :], v[..., :64, :], True, n_taylor=3), 1e-12)
    if where == "key":   # a key enters the scores only in rows that attend to it
        assert torch.isfinite(y[..., :70, :]).all()


def _negative_normaliser_inputs(P):
    """Rows whose normaliser sum_j T_P(s_ij) is <= 0 (even P): query aligned against its keys."""
    E = 2
    k = torch.tensor([[1.0, 0.0], [0.9, 0.1], [1.0, 0.2]], dtype=F64)[None, None]        # [1, 1, 3, 2]
    q = torch.tensor([[-3.0, 0.0], [-2.5, 0.0], [0.5, 0.0]], dtype=F64)[None, None]      # s = -3, -2.5..., positive
    v = rand(1, 1, 3, 3, seed=4)
    return q, k, v, E


@pytest.mark.parametrize("mode,causal", FORWARD_PATHS)
@pytest.mark.parametrize("P", [2, 4], ids=lambda P: f"P={P}")
def test_nonpositive_normaliser_gives_zero_not_inf(P, mode, causal):
    q, k, v, E = _negative_normaliser_inputs(P)
    scale = 1.0
    z = sata.taylor_exp(scale * q @ k.mT, P)
    if causal:
        z = z.tril()
    z = z.sum(-1)                                                              # [1, 1, 3]
    assert (z[..., :2] <= 0).all() and (z[..., 2] > 0).all()                   # the rows this test is about
    y = _run(mode, q, k, v, causal, n_taylor=P, scale=scale)
    assert torch.isfinite(y).all()
    assert torch.equal(y[..., :2, :], torch.zeros_like(y[..., :2, :]))
    assert_rel(y, sata.naive_sata_attention(q, k, v, n_taylor=P, scale=scale, is_causal=causal), 1e-12)


BACKWARD_PATHS = [pytest.param(m, c, id=f"{m}-{'causal' if c else 'noncausal'}")
                  for m, c in (("recurrent", True), ("chunked", True), ("auto", True), ("parallel", False), ("auto", False))]


@pytest.mark.parametrize("mode,causal", BACKWARD_PATHS)
@pytest.mark.parametrize("P", [2, 4], ids=lambda P: f"P={P}")
def test_nonpositive_normaliser_backward_is_finite(P, mode, causal):
    q, k, v, _ = _negative_normaliser_inputs(P)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    y = attend(mode, q, k, v, n_taylor=P, scale=1.0, is_causal=causal)
    y.square().sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    # rows with a non-positive normaliser are constant 0: no gradient flows from them
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    attend(mode, q2, k2, v2, n_taylor=P, scale=1.0, is_causal=causal)[..., :2, :].sum().backward()
    assert torch.equal(q2.grad, torch.zeros_like(q2.grad)) and torch.equal(v2.grad, torch.zeros_like(v2.grad))
