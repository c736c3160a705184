"""A sequence split into calls equals one call: states carry exactly, are values, merge, persist.

Streaming semantics: causal, query i of a call sees the state plus the passed keys <= i; non-causal,
every query of a call sees the state plus all keys passed to that call (not later calls).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sata
from conftest import (TORCH_CAUSAL_MODES, assert_rel, attend, mode_params, needs_kernels, qkv, rand, rel_err,
                      streamed_oracle)

CAUSAL = [pytest.param(True, id="causal"), pytest.param(False, id="noncausal")]
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def _stream(q, k, v, cuts, *, is_causal, mode="auto", state=None, **kw):
    """Run the sequence as calls over ``[cuts[i], cuts[i+1])``; return outputs and the final state."""
    outs = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        y, state = attend(mode, q[..., a:b, :], k[..., a:b, :], v[..., a:b, :], is_causal=is_causal, state=state,
                          return_state=True, **kw)
        outs.append(y)
    return torch.cat(outs, dim=-2), state


def _expected(q, k, v, cuts, *, is_causal, **kw):
    """The oracle under streaming semantics: causal = one causal call; non-causal = each segment's
    queries over every key up to the end of its segment."""
    if is_causal:
        return sata.naive_sata_attention(q, k, v, is_causal=True, **kw)
    return torch.cat([sata.naive_sata_attention(q[..., a:b, :], k[..., :b, :], v[..., :b, :], **kw)
                      for a, b in zip(cuts[:-1], cuts[1:])], dim=-2)


# prefill, token-by-token decode, another prefill, more decode, an empty call
SPLIT = [0, 17, 18, 19, 20, 21, 31, 31, 32, 45]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("causal", CAUSAL)
def test_prefill_decode_prefill_equals_one_call(causal, dtype):
    q, k, v = qkv((2,), 4, 45, 4, 3, Hkv=2, dtype=dtype, seed=1)
    kw = dict(n_taylor=3, enable_gqa=True)
    y, st_ = _stream(q, k, v, SPLIT, is_causal=causal, **kw)
    assert y.dtype == dtype
    assert_rel(y, _expected(q.double(), k.double(), v.double(), SPLIT, is_causal=causal, **kw), TOL[dtype])
    if causal:
        y1, st1 = sata.sata_attention(q, k, v, is_causal=True, return_state=True, **kw)
        assert_rel(y, y1, TOL[dtype], "vs one call")
        assert_rel(st_.kv, st1.kv, 1e-12 if dtype == torch.float64 else 1e-5, "state vs one call")
    assert st_.n_tokens == 45 and st_.dtype == dtype


@pytest.mark.parametrize("mode,causal", [("recurrent", True), ("chunked", True), ("chunked_torch", True),
                                         ("quadratic", True), ("quadratic", False), ("parallel", False),
                                         pytest.param("prefill_kernel", True, marks=needs_kernels),
                                         pytest.param("prefill_kernel", False, marks=needs_kernels)],
                         ids=str)
def test_every_path_streams(mode, causal):
    q, k, v = qkv((), 2, 45, 3, 2, seed=2)
    y, st_ = _stream(q, k, v, SPLIT, is_causal=causal, mode=mode, n_taylor=4)
    assert_rel(y, _expected(q, k, v, SPLIT, is_causal=causal, n_taylor=4), 1e-10)
    assert_rel(st_.kv, sata.accumulate_state(k, v, n_taylor=4).kv, 1e-12)


@settings(max_examples=20, deadline=None)
@given(cuts=st.lists(st.integers(0, 40), max_size=8), causal=st.booleans(), P=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_any_split(cuts, causal, P, seed):
    cuts = [0, *sorted(cuts), 40]
    q, k, v = qkv((1,), 2, 40, 3, 2, seed=seed)
    y, st_ = _stream(q, k, v, cuts, is_causal=causal, n_taylor=P)
    assert_rel(y, _expected(q, k, v, cuts, is_causal=causal, n_taylor=P), 1e-10)
    assert_rel(st_.kv, sata.accumulate_state(k, v, n_taylor=P).kv, 1e-12)


# ------------------------------------------------------------------ a state is a value
STATE_MODES = [("recurrent", True, 5), ("chunked", True, 9), ("chunked_torch", True, 9), ("parallel", False, 9),
               ("quadratic", True, 9), ("quadratic", False, 9), ("auto_torch", True, 9),
               ("prefill_kernel", True, 9), ("prefill_kernel", False, 9), ("decode_kernel", True, 1),
               ("decode_kernel", False, 1), ("auto", True, 1), ("auto", True, 9), ("auto", False, 1)]


@pytest.mark.parametrize("mode,causal,L", [pytest.param(*c, marks=needs_kernels if "kernel" in c[0] else (),
                                                        id=f"{c[0]}-{'causal' if c[1] else 'noncausal'}-L={c[2]}")
                                           for c in STATE_MODES])
@pytest.mark.parametrize("dtype,state_dtype", [(torch.float32, torch.float32), (torch.float32, torch.float64),
                                               (torch.float64, torch.float64)], ids=["f32", "f32-f64state", "f64"])
def test_passed_state_is_unchanged(mode, causal, L, dtype, state_dtype):
    q, k, v = qkv((2,), 2, L, 4, 3, dtype=dtype, seed=3)
    state = sata.accumulate_state(rand(2, 2, 6, 4, dtype=dtype, seed=4), rand(2, 2, 6, 3, dtype=dtype, seed=5),
                                  n_taylor=3).to(dtype=state_dtype)
    before = state.kv.clone()
    y1, st1 = attend(mode, q, k, v, n_taylor=3, is_causal=causal, state=state, return_state=True)
    assert torch.equal(state.kv, before) and state.n_tokens == 6       # bit-identical, count untouched
    assert st1.kv.data_ptr() != state.kv.data_ptr()
    y2, st2 = attend(mode, q, k, v, n_taylor=3, is_causal=causal, state=state, return_state=True)
    assert torch.equal(y1, y2) and torch.equal(st1.kv, st2.kv)         # still valid: the same call again
    assert torch.equal(state.kv, before)


@pytest.mark.parametrize("mode,causal", [pytest.param(m, c, id=f"{m}-{'causal' if c else 'noncausal'}",
                                                        marks=needs_kernels if "kernel" in m else ())
                                           for m, c in (("recurrent", True), ("chunked", True), ("parallel", False),
                                                        ("quadratic", True), ("quadratic", False),
                                                        ("prefill_kernel", True), ("prefill_kernel", False))])
def test_call_without_tokens_returns_a_new_state(mode, causal):
    """No new keys: the returned state equals the passed one but owns its storage (a state is a value)."""
    k = rand(2, 2, 6, 4, seed=30)
    state = sata.accumulate_state(k, k, n_taylor=3)
    y, st_ = attend(mode, k[..., :0, :], k[..., :0, :], k[..., :0, :], n_taylor=3, is_causal=causal, state=state,
                    return_state=True)
    assert y.shape == (2, 2, 0, 4) and st_.n_tokens == 6
    assert torch.equal(st_.kv, state.kv) and st_.kv.data_ptr() != state.kv.data_ptr()


def test_state_add_merges_segments():
    k, v = rand(2, 3, 30, 4, seed=6), rand(2, 3, 30, 5, seed=7)
    a = sata.accumulate_state(k[..., :11, :], v[..., :11, :], n_taylor=4)
    b = sata.accumulate_state(k[..., 11:, :], v[..., 11:, :], n_taylor=4)
    whole = sata.accumulate_state(k, v, n_taylor=4)
    merged = a + b
    assert_rel(merged.kv, whole.kv, 1e-13)
    assert merged.n_tokens == 30 and merged.config == whole.config
    q = rand(2, 3, 8, 4, seed=8)
    assert_rel(sata.sata_attention(q, q, rand(2, 3, 8, 5, seed=9), n_taylor=4, state=merged),
               sata.sata_attention(q, q, rand(2, 3, 8, 5, seed=9), n_taylor=4, state=whole), 1e-12)
    other = sata.accumulate_state(k, v, n_taylor=3)
    with pytest.raises(ValueError, match="n_taylor"):
        a + other


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_save_load_round_trip_bit_exact(dtype, tmp_path):
    q, k, v = qkv((2,), 2, 33, 4, 3, dtype=dtype, seed=10)
    _, state = sata.sata_attention(q, k, v, n_taylor=4, is_causal=True, return_state=True)
    path = tmp_path / "sub" / "s.sata"
    state.save(path)
    loaded = sata.SATAState.load(path, expected=state)
    assert torch.equal(loaded.kv, state.kv) and loaded.kv.dtype == dtype
    assert loaded.config == state.config and loaded.n_tokens == state.n_tokens == 33
    q1, k1, v1 = qkv((2,), 2, 1, 4, 3, dtype=dtype, seed=11)
    a = sata.sata_attention(q1, k1, v1, n_taylor=4, is_causal=True, state=state, return_state=True)
    b = sata.sata_attention(q1, k1, v1, n_taylor=4, is_causal=True, state=loaded, return_state=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1].kv, b[1].kv)
    assert [p.name for p in path.parent.iterdir()] == ["s.sata"]      # no temporary files left


def test_load_refuses_bad_files(tmp_path):
    state = sata.accumulate_state(rand(1, 2, 5, 3, seed=12), rand(1, 2, 5, 3, seed=13), n_taylor=3)
    path = tmp_path / "s.sata"
    state.save(path)
    other = sata.accumulate_state(rand(1, 2, 5, 3, seed=12), rand(1, 2, 5, 3, seed=13), n_taylor=4)
    with pytest.raises(sata.StateFileError, match="n_taylor"):
        sata.SATAState.load(path, expected=other)
    with pytest.raises(sata.StateFileError, match="no SATA state file"):
        sata.SATAState.load(tmp_path / "missing.sata")
    data = path.read_bytes()
    (tmp_path / "trunc.sata").write_bytes(data[: len(data) // 2])
    with pytest.raises(sata.StateFileError):
        sata.SATAState.load(tmp_path / "trunc.sata")
    torch.save({"format": "sata.SATAState", "version": 1, "config": {}, "sha256": "0", "kv": state.kv}, tmp_path / "bad.sata")
    with pytest.raises(sata.StateFileError, match="checksum"):
        sata.SATAState.load(tmp_path / "bad.sata")


# ------------------------------------------------------------------ gradients through states
@pytest.mark.parametrize("mode", mode_params(TORCH_CAUSAL_MODES))
def test_gradient_reaches_first_chunk_without_detach(mode):
    q, k, v = (t.requires_grad_(True) for t in qkv((1,), 2, 24, 3, 2, seed=14))
    cot = rand(1, 2, 24, 2, seed=15)
    cuts = [0, 10, 11, 24]
    y, _ = _stream(q, k, v, cuts, is_causal=True, mode=mode, n_taylor=3)
    loss = (y[..., 10:, :] * cot[..., 10:, :]).sum()                  # later chunks only
    gq, gk, gv = torch.autograd.grad(loss, (q, k, v))
    q0, k0, v0 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    y0 = sata.naive_sata_attention(q0, k0, v0, n_taylor=3, is_causal=True)
    rq, rk, rv = torch.autograd.grad((y0[..., 10:, :] * cot[..., 10:, :]).sum(), (q0, k0, v0))
    assert gk[..., :10, :].abs().max() > 1e-3                          # reached the first chunk's keys
    for name, a, b in (("q", gq, rq), ("k", gk, rk), ("v", gv, rv)):
        assert_rel(a, b, 1e-9, f"grad {name}")


@pytest.mark.parametrize("mode", mode_params(TORCH_CAUSAL_MODES))
def test_truncated_bptt_with_detach(mode):
    """Detaching the state between chunks stops the gradient there; within a chunk it is the
    oracle's gradient with the earlier keys held constant."""
    q, k, v = (t.requires_grad_(True) for t in qkv((1,), 2, 24, 3, 2, seed=16))
    state = None
    for a, b in ((0, 10), (10, 11), (11, 24)):
        if state is not None:
            state = state.detach()
            assert not state.kv.requires_grad
        y, state = attend(mode if b - a > 1 else "recurrent", q[..., a:b, :], k[..., a:b, :], v[..., a:b, :],
                          n_taylor=3, is_causal=True, state=state, return_state=True)
        assert state.kv.requires_grad
        gq, gk, gv = torch.autograd.grad(y.square().sum(), (q, k, v))
        if a:
            assert gk[..., :a, :].abs().max() == 0 and gv[..., :a, :].abs().max() == 0
        seg = [t[..., a:b, :].detach().clone().requires_grad_(True) for t in (q, k, v)]
        y0 = streamed_oracle(*seg, k[..., :a, :].detach(), v[..., :a, :].detach(), is_causal=True, n_taylor=3)
        assert_rel(y, y0, 1e-10)
        for name, g, g0 in zip("qkv", (gq, gk, gv), torch.autograd.grad(y0.square().sum(), seg)):
            assert_rel(g[..., a:b, :], g0, 1e-9, f"grad {name}")


@pytest.mark.parametrize("mode", mode_params(["recurrent", "chunked", "chunked_torch", "prefill_kernel", "auto",
                                              "auto_torch"]))
def test_float64_state_with_float32_inputs(mode):
    q, k, v = qkv((1,), 2, 30, 4, 3, dtype=torch.float32, seed=17)
    state = sata.SATAState.zeros((1,), 2, 4, 3, 3, dtype=torch.float64)
    y, st_ = _stream(q, k, v, [0, 12, 13, 30], is_causal=True, mode=mode, n_taylor=3, state=state)
    assert y.dtype == torch.float32 and st_.dtype == torch.float64
    assert_rel(y, sata.naive_sata_attention(q.double(), k.double(), v.double(), n_taylor=3, is_causal=True), 1e-5)
    assert_rel(st_.kv, sata.accumulate_state(k.double(), v.double(), n_taylor=3).kv, 1e-6)




@pytest.mark.parametrize("mode,causal", [
    pytest.param("recurrent", True, id="recurrent"),
    pytest.param("chunked", True, id="chunked"),
    pytest.param("chunked_torch", True, id="chunked_torch"),
    pytest.param("parallel", False, id="parallel"),
    pytest.param("quadratic", False, id="quadratic"),
    *[pytest.param(m, c, id=f"{m}-{n}", marks=needs_kernels) for m in ("prefill_kernel", "decode_kernel")
      for c, n in ((True, "causal"), (False, "noncausal"))],
    pytest.param("auto", True, id="auto-causal"),
    pytest.param("auto_torch", True, id="auto_torch-causal"),
])
def test_float64_state_keeps_its_precision(mode, causal):
    """A float64 state that has seen ~1e6 tokens' worth of mass must still absorb a float32 chunk's
    increment to float32 accuracy *of the increment* (that is what a float64 state is for)."""
    k, v, q = qkv((1,), 2, 200, 4, 4, dtype=torch.float32, seed=18)
    empty = sata.SATAState.zeros((1,), 2, 4, 4, 3, dtype=torch.float64)
    big = sata.SATAState(kv=empty.kv + 1e6, n_taylor=3, d_key=4, d_value=4, scale=empty.scale, n_tokens=10**6)
    L = 1 if mode in ("recurrent", "decode_kernel") else 200
    _, st_ = attend(mode, q[..., :L, :], k[..., :L, :], v[..., :L, :], n_taylor=3, is_causal=causal, state=big,
                    return_state=True)
    increment = st_.kv - big.kv
    want = sata.accumulate_state(k[..., :L, :].double(), v[..., :L, :].double(), n_taylor=3).kv
    # float32 rounding of the increment itself is ~1e-7 relative; the state's own ulp in float32 is 0.06
    assert rel_err(increment, want) < 1e-5




@pytest.mark.parametrize("L,layout", [
    pytest.param(1, "made", id="decode-D-contiguous"),
    pytest.param(1, "loaded", id="decode-F-contiguous"),
    pytest.param(9, "made", id="prefill-D-contiguous"),
    pytest.param(9, "loaded", id="prefill-F-contiguous"),
])
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64], ids=["f32-state", "f64-state"])
def test_inplace_updates_the_passed_state(L, causal, state_dtype, layout):
    """``inplace=True``: the documented exception to "never modified": the result is written into
    ``state.kv`` (same storage) and equals the out-of-place result."""
    q, k, v = qkv((2,), 2, L, 4, 3, dtype=torch.float32, seed=19)
    pk, pv = rand(2, 2, 5, 4, dtype=torch.float32, seed=20), rand(2, 2, 5, 3, dtype=torch.float32, seed=21)
    base = sata.accumulate_state(pk, pv, n_taylor=3).to(dtype=state_dtype)
    if layout == "loaded":  # the layout SATAState.load returns
        base = sata.SATAState(kv=base.kv.contiguous(), n_taylor=3, d_key=4, d_value=3, scale=0.5, n_tokens=5)
    ref_y, ref_st = sata.sata_attention(q, k, v, n_taylor=3, is_causal=causal, state=base.clone(), return_state=True)
    state = base.clone()
    ptr = state.kv.data_ptr()
    y, st_ = sata.sata_attention(q, k, v, n_taylor=3, is_causal=causal, state=state, return_state=True, inplace=True)
    assert st_.kv.data_ptr() == ptr and st_.n_tokens == state.n_tokens == 5 + L   # the passed state advanced too
    assert torch.equal(y, ref_y)
    assert_rel(state.kv, ref_st.kv, 1e-6 if state_dtype == torch.float32 else 1e-12)


def test_inplace_refuses_what_it_cannot_do():
    q, k, v = qkv((1,), 2, 1, 4, 3, dtype=torch.float32, seed=22)
    state = sata.accumulate_state(k, v, n_taylor=3)
    with pytest.raises(ValueError, match="inplace=True updates a state"):
        sata.sata_attention(q, k, v, n_taylor=3, state=state, inplace=True)
    with pytest.raises(ValueError, match="inplace=True updates a state"):
        sata.sata_attention(q, k, v, n_taylor=3, return_state=True, inplace=True)
    grad_state = sata.SATAState(kv=state.kv.clone().requires_grad_(True), n_taylor=3, d_key=4, d_value=3, scale=0.5)
    with pytest.raises(ValueError, match="inplace=True cannot be used under autograd"):
        sata.sata_attention(q, k, v, n_taylor=3, state=grad_state, return_state=True, inplace=True)


@pytest.mark.parametrize("L", [1, 9], ids=["decode", "prefill"])
def test_inplace_with_inputs_requiring_grad_is_refused(L):
    q, k, v = qkv((1,), 2, L, 4, 3, dtype=torch.float32, seed=23)
    state = sata.accumulate_state(k, v, n_taylor=3)
    q.requires_grad_(True)
    with pytest.raises(ValueError, match="inplace"):
        sata.sata_attention(q, k, v, n_taylor=3, is_causal=True, state=state, return_state=True, inplace=True)
