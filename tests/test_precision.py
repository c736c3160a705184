"""sata.precision: compensated and float64 running states keep long sums accurate."""

from __future__ import annotations

import pytest
import torch

import sata
from sata.precision import CompensatedState, stream_attention


def _stream(n_seg: int, L: int, seed: int = 0, H: int = 2, E: int = 4, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_seg):
        yield tuple(torch.randn(1, H, L, E, generator=g, dtype=dtype) for _ in range(3))


def test_neumaier_add_keeps_what_float32_rounds_away():
    """1 + 4096 increments of 1e-8: float32 alone stays at 1, hi + lo carries them all."""
    big = sata.SATAState(kv=torch.ones(1, 1, 3), n_taylor=1, d_key=2, d_value=2, scale=1.0)
    tiny = sata.SATAState(kv=torch.full((1, 1, 3), 1e-8), n_taylor=1, d_key=2, d_value=2, scale=1.0, n_tokens=1)
    plain, comp = big, CompensatedState.from_state(big)
    for _ in range(4096):
        plain, comp = plain + tiny, comp.add(tiny)
    exact = 1 + 4096 * float(torch.tensor(1e-8, dtype=torch.float32))
    assert plain.kv[0, 0, 0].item() == 1.0
    # float32 lo has rounding of its own: the sum is good to a fraction of float32's eps, whatever n
    assert abs(comp.value().kv[0, 0, 0].item() - exact) < 1e-8
    assert comp.n_tokens == 4096


def test_from_state_keeps_float64_bits():
    kv = torch.tensor([[[1 + 2.0**-40, -3.0, 1e-30]]], dtype=torch.float64)
    st = sata.SATAState(kv=kv, n_taylor=1, d_key=2, d_value=2, scale=1.0, n_tokens=5)
    comp = CompensatedState.from_state(st)
    assert comp.hi.dtype == torch.float32 and comp.n_tokens == 5
    assert torch.equal(comp.value().kv, kv)


@pytest.mark.parametrize("kind", ["kahan", "float64"])
@pytest.mark.parametrize("is_causal", [True, False], ids=["causal", "noncausal"])
def test_stream_attention_equals_sata_attention(kind, is_causal):
    """Same outputs as sata_attention (float32 reads) and a state at least as accurate."""
    H, E = 2, 4
    st = CompensatedState.zeros((1,), H, E, E, 3) if kind == "kahan" else sata.SATAState.zeros((1,), H, E, E, 3, dtype=torch.float64)
    plain = ref = None
    for q, k, v in _stream(5, 300):
        y, st = stream_attention(q, k, v, state=st, n_taylor=3, is_causal=is_causal, block=64)
        y_plain, plain = sata.sata_attention(q, k, v, n_taylor=3, is_causal=is_causal, state=plain, return_state=True)
        torch.testing.assert_close(y, y_plain, rtol=1e-5, atol=1e-6)
        _, ref = sata.sata_attention(q.double(), k.double(), v.double(), n_taylor=3, is_causal=is_causal, state=ref,
                                     return_state=True)
    value = st.value() if kind == "kahan" else st
    assert value.n_tokens == plain.n_tokens == 1500
    err = lambda s: ((s.kv.double() - ref.kv).norm() / ref.kv.norm()).item()
    assert err(value) <= err(plain) and err(value) < 1e-7


def test_segment_state_blocks_and_mask_equal_one_call():
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(2, 3, 203, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 203, 2, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 203, generator=g) < 0.3
    q = torch.randn(2, 3, 203, 4, generator=g, dtype=torch.float64)
    st0 = sata.SATAState.zeros((2,), 3, 4, 2, 3, dtype=torch.float64)
    for block in (1, 50, 203, 1000):
        y, st = stream_attention(q, k, v, state=st0, n_taylor=3, key_padding_mask=mask, block=block)
        one = sata.accumulate_state(k, v, n_taylor=3, key_padding_mask=mask)
        torch.testing.assert_close(st.kv, one.kv, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(y, sata.naive_sata_attention(q, k, v, n_taylor=3, is_causal=True, key_padding_mask=mask),
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad", ["float32-state", "tensor", "block-0"])
def test_stream_attention_rejects_bad_arguments(bad):
    q = torch.randn(1, 2, 5, 4)
    state = sata.SATAState.zeros((1,), 2, 4, 4, 3, dtype=torch.float64)
    kw = {}
    if bad == "float32-state":
        state = sata.SATAState.zeros((1,), 2, 4, 4, 3)
    elif bad == "tensor":
        state = torch.zeros(3)
    else:
        kw["block"] = 0
    with pytest.raises((TypeError, ValueError), match="state|block"):
        stream_attention(q, q, q, state=state, n_taylor=3, **kw)
