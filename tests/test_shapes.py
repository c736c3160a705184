"""Every shape a user passes to SDPA works: batch dims, heads, GQA, head sizes, lengths (down to 0),
padding masks, scales, dtypes and memory layouts, on every path."""

from __future__ import annotations

import pytest
import torch

import sata
from conftest import (CAUSAL_MODES, NONCAUSAL_MODES, assert_rel, attend, mode_params, needs_kernels, qkv, rand,
                      streamed_oracle)

CAUSAL = [pytest.param(True, id="causal"), pytest.param(False, id="noncausal")]
ALL_MODES = [pytest.param(m, c, id=f"{m}-{'causal' if c else 'noncausal'}", marks=needs_kernels if "kernel" in m else ())
             for c, ms in ((True, CAUSAL_MODES), (False, NONCAUSAL_MODES)) for m in ms]


@pytest.mark.parametrize("mode,causal", ALL_MODES)
@pytest.mark.parametrize("lead", [(), (1,), (3,), (2, 2)], ids=lambda b: "batch=" + "x".join(map(str, b)) if b else "no-batch")
def test_batch_dims(lead, mode, causal):
    q, k, v = qkv(lead, 2, 11, 3, 4, seed=1)
    y, st = attend(mode, q, k, v, n_taylor=3, is_causal=causal, return_state=True)
    assert y.shape == (*lead, 2, 11, 4)
    assert st.kv.shape == (*lead, 2, sata.feature_dim(3, 3), 5) and st.batch_shape == lead
    assert_rel(y, sata.naive_sata_attention(q, k, v, n_taylor=3, is_causal=causal), 1e-10)
    # each batch element is independent: the same as calling on it alone
    if lead:
        i = (0,) * len(lead)
        assert_rel(y[i], attend(mode, q[i], k[i], v[i], n_taylor=3, is_causal=causal), 1e-12)


@pytest.mark.parametrize("mode,causal", ALL_MODES)
@pytest.mark.parametrize("Hq,Hkv", [(6, 1), (6, 2), (6, 3), (4, 4)], ids=str)
def test_gqa_is_repeated_kv_heads_with_one_state_per_kv_head(Hq, Hkv, mode, causal):
    q, k, v = qkv((2,), Hq, 9, 4, 3, Hkv=Hkv, seed=2)
    y, st = attend(mode, q, k, v, n_taylor=4, is_causal=causal, enable_gqa=True, return_state=True)
    g = Hq // Hkv
    k_rep, v_rep = k.repeat_interleave(g, dim=-3), v.repeat_interleave(g, dim=-3)      # SDPA's convention
    assert_rel(y, sata.naive_sata_attention(q, k_rep, v_rep, n_taylor=4, is_causal=causal), 1e-10)
    assert st.n_heads == Hkv
    assert_rel(st.kv, sata.accumulate_state(k, v, n_taylor=4).kv, 1e-12)


@pytest.mark.parametrize("mode,causal", ALL_MODES)
@pytest.mark.parametrize("E,Ev", [(3, 1), (3, 7), (1, 2), (4, 15), (4, 16), (2, 31), (2, 33), (2, 40)],
                         ids=str)
def test_value_size_differs_from_key_size(E, Ev, mode, causal):
    q, k, v = qkv((1,), 2, 35, E, Ev, seed=3)
    y = attend(mode, q, k, v, n_taylor=3, is_causal=causal)
    assert y.shape == (1, 2, 35, Ev)
    assert_rel(y, sata.naive_sata_attention(q, k, v, n_taylor=3, is_causal=causal), 1e-10)


@pytest.mark.parametrize("mode", mode_params(NONCAUSAL_MODES))
@pytest.mark.parametrize("Lq,Lk", [(1, 50), (50, 1), (7, 33), (40, 3)], ids=str)
def test_noncausal_lq_differs_from_lk(Lq, Lk, mode):
    q, k, v = qkv((2,), 3, Lq, 4, Lk=Lk, seed=4)
    y = attend(mode, q, k, v, n_taylor=3)
    assert y.shape == (2, 3, Lq, 4)
    assert_rel(y, sata.naive_sata_attention(q, k, v, n_taylor=3), 1e-10)


SINGLE = ALL_MODES + [pytest.param("decode_kernel", c, id=f"decode_kernel-{'causal' if c else 'noncausal'}",
                                   marks=needs_kernels) for c in (True, False)]


@pytest.mark.parametrize("mode,causal", SINGLE)
@pytest.mark.parametrize("with_state", [False, True], ids=["no-state", "state"])
def test_single_token(mode, causal, with_state):
    q, k, v = qkv((2,), 2, 1, 4, 3, seed=5)
    pk, pv = rand(2, 2, 4, 4, seed=6), rand(2, 2, 4, 3, seed=7)
    state = sata.accumulate_state(pk, pv, n_taylor=3) if with_state else None
    y, st = attend(mode, q, k, v, n_taylor=3, is_causal=causal, state=state, return_state=True)
    if with_state:
        assert_rel(y, streamed_oracle(q, k, v, pk, pv, is_causal=causal, n_taylor=3), 1e-10)
    else:  # one key: the output is its value
        assert_rel(y, v, 1e-12)
    assert st.n_tokens == (5 if with_state else 1)


ZERO_MODES = [*ALL_MODES]


@pytest.mark.parametrize("mode,causal", ZERO_MODES)
@pytest.mark.parametrize("with_state", [False, True], ids=["no-state", "state"])
def test_zero_length_call(mode, causal, with_state):
    """Lq = Lk = 0: an empty output; the state passes through unchanged."""
    q, k, v = qkv((2,), 2, 0, 4, 3, seed=8)
    state = sata.accumulate_state(rand(2, 2, 4, 4, seed=9), rand(2, 2, 4, 3, seed=10), n_taylor=3) if with_state else None
    y, st = attend(mode, q, k, v, n_taylor=3, is_causal=causal, state=state, return_state=True)
    assert y.shape == (2, 2, 0, 3)
    want = state.kv if with_state else torch.zeros(2, 2, sata.feature_dim(4, 3), 4, dtype=torch.float64)
    assert torch.equal(st.kv, want) and st.n_tokens == (4 if with_state else 0)


@pytest.mark.parametrize("mode", mode_params(NONCAUSAL_MODES))
@pytest.mark.parametrize("with_state", [False, True], ids=["no-state", "state"])
def test_zero_queries_or_zero_keys(mode, with_state):
    pk, pv = rand(2, 2, 4, 4, seed=11), rand(2, 2, 4, 3, seed=12)
    state = sata.accumulate_state(pk, pv, n_taylor=3) if with_state else None
    # no queries: nothing to output, the keys still enter the state
    q, k, v = qkv((2,), 2, 0, 4, 3, Lk=6, seed=13)
    y, st = attend(mode, q, k, v, n_taylor=3, state=state, return_state=True)
    assert y.shape == (2, 2, 0, 3) and st.n_tokens == 6 + 4 * with_state
    K, V = (torch.cat([pk, k], -2), torch.cat([pv, v], -2)) if with_state else (k, v)
    assert_rel(st.kv, sata.accumulate_state(K, V, n_taylor=3).kv, 1e-12)
    # no keys: queries see only the state; without one every normaliser is 0 and the output is 0
    q, k, v = qkv((2,), 2, 5, 4, 3, Lk=0, seed=14)
    for return_state in (False, True):
        res = attend(mode, q, k, v, n_taylor=3, state=state, return_state=return_state)
        y = res[0] if return_state else res
        if with_state:
            assert_rel(y, sata.naive_sata_attention(q, pk, pv, n_taylor=3), 1e-10)
        else:
            assert torch.equal(y, torch.zeros(2, 2, 5, 3, dtype=torch.float64))


@pytest.mark.parametrize("mode,causal", ALL_MODES)
def test_zero_batch(mode, causal):
    q, k, v = qkv((0,), 2, 5, 4, 3, seed=15)
    y, st = attend(mode, q, k, v, n_taylor=3, is_causal=causal, return_state=True)
    assert y.shape == (0, 2, 5, 3) and st.kv.shape == (0, 2, sata.feature_dim(4, 3), 4)


# ------------------------------------------------------------------ key padding
def _mask(B, L, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, L, generator=g) < 0.3
    m[0, 0] = True                                   # the very first key padded too
    return m


@pytest.mark.parametrize("mode,causal", ALL_MODES)
def test_padded_keys_change_neither_output_nor_state(mode, causal):
    B, L = 3, 21
    q, k, v = qkv((B,), 2, L, 4, 3, seed=16)
    mask = _mask(B, L, 17)
    y, st = attend(mode, q, k, v, n_taylor=3, is_causal=causal, key_padding_mask=mask, return_state=True)
    assert_rel(y, sata.naive_sata_attention(q, k, v, n_taylor=3, is_causal=causal, key_padding_mask=mask), 1e-10)
    assert st.n_tokens == L
    for b in range(B):  # independently: the same as the sequence with the padded keys removed
        keep = ~mask[b]
        assert_rel(st.kv[b], sata.accumulate_state(k[b][:, keep], v[b][:, keep], n_taylor=3).kv, 1e-12, "state")
        if causal:  # kept query i sees the kept keys <= i, i.e. its row of the shortened causal call
            want = sata.naive_sata_attention(q[b][:, keep], k[b][:, keep], v[b][:, keep], n_taylor=3, is_causal=True)
            assert_rel(y[b][:, keep], want, 1e-10)
        else:
            assert_rel(y[b], sata.naive_sata_attention(q[b], k[b][:, keep], v[b][:, keep], n_taylor=3), 1e-10)


NAN_MODES = ALL_MODES + [
    pytest.param("decode_kernel", True, id="decode_kernel", marks=needs_kernels),
]


@pytest.mark.parametrize("mode,causal", NAN_MODES)
@pytest.mark.parametrize("bad", ["inf", "nan"])
def test_nonfinite_padded_key_does_not_leak(mode, causal, bad):
    L = 1 if mode == "decode_kernel" else 12
    q, k, v = qkv((2,), 2, L, 4, 3, seed=18)
    mask = torch.zeros(2, L, dtype=torch.bool)
    mask[:, L // 2] = True
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, :, L // 2] = float(bad)
    v_bad[:, :, L // 2] = float(bad)
    state = sata.accumulate_state(rand(2, 2, 3, 4, seed=19), rand(2, 2, 3, 3, seed=20), n_taylor=3)
    y, st = attend(mode, q, k_bad, v_bad, n_taylor=3, is_causal=causal, key_padding_mask=mask, state=state,
                   return_state=True)
    y0, st0 = attend(mode, q, k, v, n_taylor=3, is_causal=causal, key_padding_mask=mask, state=state, return_state=True)
    assert torch.isfinite(st.kv).all() and torch.isfinite(y).all()
    assert_rel(y, y0, 1e-12)
    assert_rel(st.kv, st0.kv, 1e-12)


def test_oracle_ignores_nan_in_padded_value():
    q, k, v = qkv((1,), 1, 6, 3, seed=21)
    mask = torch.zeros(1, 6, dtype=torch.bool)
    mask[0, 2] = True
    v_bad = v.clone()
    v_bad[..., 2, :] = float("nan")
    y = sata.naive_sata_attention(q, k, v_bad, n_taylor=3, key_padding_mask=mask)
    assert torch.isfinite(y).all()
    assert_rel(y, sata.naive_sata_attention(q, k, v, n_taylor=3, key_padding_mask=mask), 1e-12)


def test_all_keys_padded_gives_zero():
    q, k, v = qkv((2,), 2, 5, 4, 3, seed=22)
    mask = torch.ones(2, 5, dtype=torch.bool)
    for causal in (False, True):
        y, st = sata.sata_attention(q, k, v, n_taylor=3, is_causal=causal, key_padding_mask=mask, return_state=True)
        assert torch.equal(y, torch.zeros_like(y)) and torch.equal(st.kv, torch.zeros_like(st.kv))


# ------------------------------------------------------------------ scale, dtypes, layouts
@pytest.mark.parametrize("mode,causal", ALL_MODES)
@pytest.mark.parametrize("scale", [-0.7, -0.0, 0.0, 0.25, 2.0], ids=lambda s: f"scale={s}")
def test_scales(scale, mode, causal):
    q, k, v = qkv((2,), 2, 13, 4, 3, seed=23)
    y = attend(mode, q, k, v, n_taylor=3, is_causal=causal, scale=scale)
    assert_rel(y, sata.naive_sata_attention(q, k, v, n_taylor=3, is_causal=causal, scale=scale), 1e-10)
    if scale == 0.0:  # T_P(0) = 1: plain (causal) averages of the values, independent of the oracle
        n = torch.arange(1, 14, dtype=torch.float64)[:, None]
        want = v.cumsum(-2) / n if causal else v.mean(-2, keepdim=True).expand_as(v)
        assert_rel(y, want, 1e-12)


def test_negative_scale_state_continues():
    q, k, v = qkv((1,), 2, 20, 4, 3, seed=24)
    y, st = sata.sata_attention(q[..., :8, :], k[..., :8, :], v[..., :8, :], n_taylor=3, is_causal=True, scale=-0.5,
                                return_state=True)
    y2 = sata.sata_attention(q[..., 8:, :], k[..., 8:, :], v[..., 8:, :], n_taylor=3, is_causal=True, scale=-0.5,
                             state=st)
    assert_rel(torch.cat([y, y2], -2), sata.naive_sata_attention(q, k, v, n_taylor=3, is_causal=True, scale=-0.5), 1e-10)


STATE_DTYPE = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float32,
               torch.float64: torch.float64}


@pytest.mark.parametrize("mode,causal", ALL_MODES)
@pytest.mark.parametrize("dtype", list(STATE_DTYPE), ids=lambda d: str(d).removeprefix("torch."))
def test_output_and_state_dtypes(dtype, mode, causal):
    q, k, v = qkv((1,), 2, 6, 4, 3, dtype=dtype, seed=25)
    y, st = attend(mode, q, k, v, n_taylor=3, is_causal=causal, return_state=True)
    assert y.dtype == dtype and st.dtype == STATE_DTYPE[dtype]
    assert sata.accumulate_state(k, v, n_taylor=3).dtype == STATE_DTYPE[dtype]
    st64 = sata.SATAState.zeros((1,), 2, 4, 3, 3, dtype=torch.float64)
    y2, st2 = attend(mode if dtype == torch.float64 or "kernel" not in mode else "auto", q, k, v, n_taylor=3,
                     is_causal=causal, state=st64, return_state=True)
    assert y2.dtype == dtype and st2.dtype == torch.float64


@pytest.mark.parametrize("mode,causal", ALL_MODES)
def test_non_contiguous_inputs(mode, causal):
    """The common [B, L, H, E] projection layout, transposed to [B, H, L, E] without a copy."""
    q, k, v = (t.transpose(1, 2) for t in qkv((2,), 9, 3, 4, seed=26))     # [2, 9, 3, 4] -> [2, 3, 9, 4]
    assert not q.is_contiguous()
    y = attend(mode, q, k, v, n_taylor=3, is_causal=causal)
    assert_rel(y, sata.naive_sata_attention(q.contiguous(), k.contiguous(), v.contiguous(), n_taylor=3,
                                            is_causal=causal), 1e-12)
    state = sata.accumulate_state(k, v, n_taylor=3)
    F_major = sata.SATAState(kv=state.kv.contiguous(), n_taylor=3, d_key=4, d_value=4, scale=0.5, n_tokens=9)
    q1, k1, v1 = qkv((2,), 3, 1, 4, seed=27)
    assert_rel(sata.sata_attention(q1, k1, v1, n_taylor=3, is_causal=causal, state=F_major),
               sata.sata_attention(q1, k1, v1, n_taylor=3, is_causal=causal, state=state), 1e-12)


@pytest.mark.parametrize("mode,causal", ALL_MODES)
def test_non_contiguous_key_padding_mask(mode, causal):
    q, k, v = qkv((3,), 2, 40, 4, 3, seed=28)
    mask = _mask(3, 40, 29)
    mask_t = mask.T.contiguous().T                       # same values, column-major strides
    assert torch.equal(mask, mask_t) and not mask_t.is_contiguous()
    y, st = attend(mode, q, k, v, n_taylor=3, is_causal=causal, key_padding_mask=mask_t, return_state=True)
    assert_rel(y, sata.naive_sata_attention(q, k, v, n_taylor=3, is_causal=causal, key_padding_mask=mask), 1e-10)
    assert_rel(st.kv, sata.accumulate_state(k, v, n_taylor=3, key_padding_mask=mask).kv, 1e-12)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("heads_at_once", [1, 2, 3], ids=lambda h: f"{h}-kv-heads-at-once")
@pytest.mark.parametrize("causal", CAUSAL)
def test_prefill_kernel_converts_heads_in_groups(heads_at_once, dtype, causal):
    """Inputs the kernel cannot read in place (other dtypes, strided last dim) are converted in
    segments of tokens (here 32 and 5: every segment budget below fits fewer than 32 tokens), the last
    segment smaller; GQA query heads travel with theirs."""
    B, Hkv, G, L, E, Ev = 2, 3, 2, 37, 4, 3
    q, k, v = qkv((B,), Hkv * G, L, E, Ev, Hkv=Hkv, dtype=dtype, seed=30)
    if dtype == torch.float64:  # float64 is read in place unless the last dimension is strided
        q = torch.stack([q, q], -1)[..., 0]
    per_head = B * (G * L * E + L * (E + Ev)) * 4
    y, st = attend("prefill_kernel", q, k, v, n_taylor=3, is_causal=causal, enable_gqa=True, return_state=True,
                   segment_bytes=heads_at_once * per_head)
    want = sata.naive_sata_attention(q.double(), k.double(), v.double(), n_taylor=3, is_causal=causal, enable_gqa=True)
    assert_rel(y, want, {torch.float16: 2**-11 + 1e-4, torch.bfloat16: 2**-8 + 1e-4, torch.float64: 1e-10}[dtype])
    assert_rel(st.kv, sata.accumulate_state(k.double(), v.double(), n_taylor=3).kv, 1e-5)
