"""The window mode (MATH.md section 6): exact softmax on a window and sinks, the re-centred Taylor state beside it.

Grouped by what they prove: the oracle's special cases (identity with softmax / sliding window / the plain op),
every split of a stream equals one call (fast paths against the oracle, float64, 1e-10), gradients (gradcheck
including taylor_mix and recentre), states (merge, save/load, accumulate), float32 and half inputs, bad input.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as Fn

import sata
from sata.ops import force_path
from conftest import assert_rel, qkv, rand

CAUSAL = [pytest.param(True, id="causal"), pytest.param(False, id="noncausal")]
HYBRIDS = [
    pytest.param(dict(window=5, sinks=2), id="w5-s2"),
    pytest.param(dict(window=5, sinks=2, recentre=0.5, taylor_mix=0.7), id="w5-s2-rec0.5"),
    pytest.param(dict(window=1, sinks=0, recentre=0.0), id="w1-rec-mean"),
    pytest.param(dict(window=0, sinks=3), id="sinks-only"),
    pytest.param(dict(window=0, sinks=0, recentre=1.0), id="recentre-only"),
    pytest.param(dict(window=9, sinks=4, recentre=0.3, taylor_mix=2.0), id="w9-s4"),
]


def _softmax(q, k, v, keep):
    return Fn.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def _positions(Lq, Lk, causal, window, sinks):
    i, j = torch.arange(Lq)[:, None], torch.arange(Lk)[None, :]
    gap = i - j if causal else (i - j).abs()
    keep = ((gap >= 0) & (gap < window)) | (j < sinks)
    return keep & (j <= i) if causal else keep


# ---------------------------------------------------------------- the oracle's special cases
@pytest.mark.parametrize("causal", CAUSAL)
def test_window_covering_everything_is_softmax(causal):
    q, k, v = qkv((2,), 3, 40, 8, 5)
    for fn in (sata.naive_sata_attention, sata.sata_attention):
        y = fn(q, k, v, n_taylor=3, is_causal=causal, window=40, sinks=2, recentre=0.5, taylor_mix=3.0)
        assert_rel(y, Fn.scaled_dot_product_attention(q, k, v, is_causal=causal), 1e-10, fn.__name__)


@pytest.mark.parametrize("causal", CAUSAL)
def test_taylor_mix_zero_is_sliding_window_with_sinks(causal):
    q, k, v = qkv((2,), 3, 40, 8, 5, seed=3)
    keep = _positions(40, 40, causal, 6, 3)
    for fn in (sata.naive_sata_attention, sata.sata_attention):
        y = fn(q, k, v, n_taylor=3, is_causal=causal, window=6, sinks=3, taylor_mix=0.0, recentre=0.2)
        assert_rel(y, _softmax(q, k, v, keep), 1e-10, fn.__name__)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "pytorch"])
def test_taylor_mix_zero_heads_take_their_maximum_from_the_exact_part(kernels):
    """float32, exact scores ~100 below the far part's centre (0 here): a head whose taylor_mix is 0 must not
    scale its exact part by e^{m_exact - c}, which underflows to an output of 0. Every path (prefill with a state,
    decode steps, the oracle; a per-head tensor with one head at 0) gives the sliding window with sinks there;
    the other head keeps its far part. The gradient with respect to a taylor_mix of 0 is e^{c - m_exact} times
    the far part's pull (~1e51 here: beyond float32), in float64 the one-sided difference quotient."""
    g = torch.Generator().manual_seed(5)
    L, W, S = 24, 3, 1
    q = torch.full((1, 2, L, 4), 9.0)
    k = -6.0 + 0.3 * torch.randn(1, 2, L, 4, generator=g)                      # scores -110 .. -100
    v = torch.randn(1, 2, L, 2, generator=g)
    beta = torch.tensor([0.0, 0.5])
    kw = dict(n_taylor=3, is_causal=True, window=W, sinks=S)
    band = _positions(L, L, True, W, S)
    window_only = _softmax(q.double(), k.double(), v.double(), band)[:, 0].float()
    hybrid = sata.naive_sata_attention(q.double(), k.double(), v.double(), taylor_mix=beta.double(), **kw)[:, 1].float()
    with force_path(kernels=kernels):
        steps, st = [], None
        for t in range(L):
            y, st = sata.sata_attention(q[..., t:t + 1, :], k[..., t:t + 1, :], v[..., t:t + 1, :], state=st,
                                        return_state=True, taylor_mix=beta, **kw)
            steps.append(y)
        outs = {"prefill": sata.sata_attention(q, k, v, taylor_mix=beta, return_state=True, **kw)[0],
                "decode": torch.cat(steps, -2),
                "oracle": sata.naive_sata_attention(q, k, v, taylor_mix=beta, **kw)}
    for name, y in outs.items():
        assert_rel(y[:, 0], window_only, 1e-5, f"{name}, taylor_mix 0")
        assert_rel(y[:, 1], hybrid, 1e-4, f"{name}, taylor_mix 0.5")
    q, k, v, beta = q.double(), k.double(), v.double(), beta.double()
    leaf = beta.clone().requires_grad_()
    w = torch.randn(1, 2, L, 2, generator=g, dtype=torch.float64)
    loss = lambda b: (sata.sata_attention(q, k, v, taylor_mix=b, **kw) * w).sum()
    grad, = torch.autograd.grad(loss(leaf), leaf)
    assert torch.isfinite(grad).all() and abs(grad[0]) > 1e30, grad
    eps = 1e-6 / abs(grad[0].item())                                            # a step that moves the loss ~1e-6
    with torch.no_grad():
        quotient = (loss(beta + torch.tensor([eps, 0.0], dtype=torch.float64)) - loss(beta)) / eps
    assert_rel(grad[0], quotient, 1e-4, "d/d taylor_mix at 0")


@pytest.mark.parametrize("causal", CAUSAL)
def test_taylor_mix_zero_without_a_state_skips_the_far_part(causal, monkeypatch):
    """The window-only model's training: taylor_mix the number 0 and no state returned runs the exact part alone
    (the far part is never computed); forward and gradients equal the sliding window with sinks (SDPA) and the
    path that keeps the far state for a returned state."""
    from sata._paths import window as window_path
    q, k, v = (t.requires_grad_() for t in qkv((2,), 3, 40, 8, 5, seed=7))
    kw = dict(n_taylor=3, is_causal=causal, window=6, sinks=3, taylor_mix=0.0, recentre=0.2)
    expected = _softmax(q, k, v, _positions(40, 40, causal, 6, 3))
    grads = lambda y: torch.autograd.grad(y.square().sum(), (q, k, v), retain_graph=True)
    with_state = sata.sata_attention(q, k, v, return_state=True, **kw)[0]
    used = []
    for name in ("_scan", "_centre", "absorb"):
        monkeypatch.setattr(window_path, name, lambda *a, _n=name, **k: used.append(_n))
    y = sata.sata_attention(q, k, v, **kw)
    assert not used, f"the far part ran: {used}"
    for got, want, what in ((y, expected, "vs SDPA"), (y, with_state, "vs the path keeping the far state")):
        assert_rel(got, want, 1e-10, what)
        for g, h, name in zip(grads(got), grads(want), "qkv"):
            assert_rel(g, h, 1e-10, f"d{name} {what}")


@pytest.mark.parametrize("causal", CAUSAL)
def test_no_window_no_centre_is_the_plain_op(causal):
    q, k, v = qkv((2,), 3, 30, 4, 5, seed=4)
    plain = sata.naive_sata_attention(q, k, v, n_taylor=4, is_causal=causal)
    for beta in (1.0, 0.25, torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)):
        assert_rel(sata.naive_sata_attention(q, k, v, n_taylor=4, is_causal=causal, taylor_mix=beta), plain, 1e-14)
        assert_rel(sata.sata_attention(q, k, v, n_taylor=4, is_causal=causal, taylor_mix=beta), plain, 1e-10)


def test_recentred_series_is_the_series_of_the_shifted_scores():
    """One query, no exact keys: weights T_P(s - c) with c the mean (minus alpha sd) of its scores."""
    q, k, v = qkv((), 1, 1, 6, 3, Lk=25, seed=5)
    s = (q @ k.mT)[0, 0] / 6**0.5
    for alpha in (0.0, 0.7):
        c = s.mean() - alpha * s.std(unbiased=False)
        w = sata.taylor_exp(s - c, 5)
        y = sata.naive_sata_attention(q, k, v, n_taylor=5, recentre=alpha)
        assert_rel(y[0, 0], (w / w.sum()) @ v[0], 1e-12, f"alpha={alpha}")


def test_sinks_skip_padded_keys():
    """A left-padded row takes its own first kept keys as sinks."""
    q, k, v = qkv((2,), 2, 24, 4, 3, seed=6)
    mask = torch.zeros(2, 24, dtype=torch.bool)
    mask[1, :7] = True
    y = sata.naive_sata_attention(q, k, v, n_taylor=3, is_causal=True, window=4, sinks=2, taylor_mix=0.0,
                                  key_padding_mask=mask)
    keep = _positions(24, 24, True, 4, 0).repeat(2, 1, 1)                      # [2, Lq, Lk]
    keep[0, :, :2] = True
    keep[1, :, 7:9] = True
    keep &= torch.ones(24, 24, dtype=torch.bool).tril() & ~mask[:, None, :]
    expected = _softmax(q, k, v, keep[:, None])
    assert_rel(y[0], expected[0], 1e-10)
    assert_rel(y[1, :, 7:], expected[1, :, 7:], 1e-10)       # rows of padded queries are not defined


# ---------------------------------------------------------------- fast paths equal the oracle
def _stream(q, k, v, cuts, *, state=None, mask=None, **kw):
    outs = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        m = None if mask is None else mask[..., a:b]
        y, state = sata.sata_attention(q[..., a:b, :], k[..., a:b, :], v[..., a:b, :], key_padding_mask=m,
                                       state=state, return_state=True, **kw)
        outs.append(y)
    return torch.cat(outs, dim=-2), state


def _noncausal_expected(q, k, v, cuts, mask=None, **kw):
    """Non-causal streaming: each call's queries see every key up to the end of the call, at their positions."""
    outs = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        Q = torch.cat([q.new_zeros(*q.shape[:-2], a, q.shape[-1]), q[..., a:b, :]], dim=-2)
        m = None if mask is None else mask[..., :b]
        outs.append(sata.naive_sata_attention(Q, k[..., :b, :], v[..., :b, :], key_padding_mask=m, **kw)[..., a:, :])
    return torch.cat(outs, dim=-2)


# one call; prefill then tokens then prefill (windows and sinks cross call boundaries); tiny calls throughout
SPLITS = [
    pytest.param([0, 45], id="one-call"),
    pytest.param([0, 17, 18, 19, 20, 21, 31, 31, 32, 45], id="prefill-decode-prefill"),
    pytest.param([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 30, 45], id="tokens-first"),
]


@pytest.mark.parametrize("cuts", SPLITS)
@pytest.mark.parametrize("hybrid", HYBRIDS)
@pytest.mark.parametrize("causal", CAUSAL)
def test_stream_equals_oracle(causal, hybrid, cuts):
    q, k, v = qkv((2,), 4, 45, 4, 3, Hkv=2, seed=7)
    kw = dict(n_taylor=3, enable_gqa=True, is_causal=causal, **hybrid)
    y, st = _stream(q, k, v, cuts, **kw)
    if causal:
        expected = sata.naive_sata_attention(q, k, v, **kw)
    else:
        expected = _noncausal_expected(q, k, v, cuts, **kw)
    assert_rel(y, expected, 1e-10)
    assert st.n_tokens == 45 and st.window == hybrid.get("window", 0) and st.sinks == hybrid.get("sinks", 0)


@pytest.mark.parametrize("causal", CAUSAL)
def test_padding_and_per_head_parameters(causal):
    q, k, v = qkv((3,), 4, 33, 4, 3, Hkv=2, seed=8)
    mask = torch.zeros(3, 33, dtype=torch.bool)
    mask[1, :9] = True                      # left padding
    mask[2, 12:15] = True                   # a hole
    kw = dict(n_taylor=3, enable_gqa=True, is_causal=causal, window=4, sinks=3,
              taylor_mix=torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=torch.float64),
              recentre=torch.tensor([0.0, 0.3, 0.6, 1.0], dtype=torch.float64))
    cuts = [0, 33] if not causal else [0, 5, 6, 7, 20, 21, 33]
    y, _ = _stream(q, k, v, cuts, mask=mask, **kw)
    expected = sata.naive_sata_attention(q, k, v, key_padding_mask=mask, **kw)
    rows = ~mask[:, None, :, None]        # outputs of padded queries are not defined
    assert_rel(y * rows, expected * rows, 1e-10)


@pytest.mark.parametrize("n_taylor", [2, 4, 5])
def test_other_term_counts(n_taylor):
    q, k, v = qkv((1,), 2, 30, 3, 2, seed=9)
    kw = dict(n_taylor=n_taylor, is_causal=True, window=3, sinks=1, recentre=0.0 if n_taylor == 2 else 0.8)
    y, _ = _stream(q, k, v, [0, 10, 11, 30], **kw)
    assert_rel(y, sata.naive_sata_attention(q, k, v, **kw), 1e-10)


@pytest.mark.parametrize("causal", CAUSAL)
def test_gradients_match_the_oracle(causal):
    q, k, v = qkv((1,), 2, 13, 3, 2, seed=10)
    alpha = torch.tensor([0.2, 0.9], dtype=torch.float64)
    beta = torch.tensor([0.6, 1.3], dtype=torch.float64)
    inputs = [t.clone().requires_grad_() for t in (q, k, v, alpha, beta)]

    def fast(q, k, v, a, b):
        return sata.sata_attention(q, k, v, n_taylor=3, is_causal=causal, window=3, sinks=2, recentre=a, taylor_mix=b)

    def ref(q, k, v, a, b):
        return sata.naive_sata_attention(q, k, v, n_taylor=3, is_causal=causal, window=3, sinks=2, recentre=a,
                                         taylor_mix=b)

    assert torch.autograd.gradcheck(fast, inputs, fast_mode=True)
    go = rand(1, 2, 13, 2, seed=11)
    g_fast = torch.autograd.grad((fast(*inputs) * go).sum(), inputs)
    g_ref = torch.autograd.grad((ref(*inputs) * go).sum(), inputs)
    for name, a, b in zip("q k v recentre taylor_mix".split(), g_fast, g_ref):
        assert_rel(a, b, 1e-10, name)


@pytest.mark.parametrize("window", [5, 150], ids=["band-in-a-block", "band-over-blocks"])
@pytest.mark.parametrize("causal", CAUSAL)
def test_many_blocks_equal_the_oracle_forward_and_backward(causal, window, monkeypatch):
    """The PyTorch path cut into blocks of 64 queries (every real model's length is), the band of a block read from the
    blocks after it: outputs and gradients equal the oracle's."""
    from sata._paths import window as window_path

    monkeypatch.setattr(window_path, "_BLOCK_BYTES", 1)    # the smallest block: one chunk of 64 queries
    seen = []
    blocks = window_path._blocks
    monkeypatch.setattr(window_path, "_blocks", lambda run, fn, args, carry, *rest: seen.append(len(args)) or
                        blocks(run, fn, args, carry, *rest))
    q, k, v = qkv((1,), 2, 200, 3, 2, seed=14)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    kw = dict(n_taylor=3, is_causal=causal, window=window, sinks=2, recentre=0.4, taylor_mix=0.8)
    y = sata.sata_attention(*leaves, **kw)
    ref = sata.naive_sata_attention(*leaves, **kw)
    assert_rel(y, ref, 1e-10)
    go = rand(*y.shape, seed=15)
    for name, a, b in zip("qkv", torch.autograd.grad((y * go).sum(), leaves), torch.autograd.grad((ref * go).sum(), leaves)):
        assert_rel(a, b, 1e-10, name)
    assert seen and max(seen) == 4                          # 200 queries in blocks of 64: the blocks were exercised


def test_gradients_flow_through_a_state():
    q, k, v = qkv((1,), 2, 20, 3, 2, seed=12)
    kw = dict(n_taylor=3, is_causal=True, window=4, sinks=2, recentre=0.5)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    _, st = sata.sata_attention(*(t[..., :11, :] for t in leaves), return_state=True, **kw)
    y = sata.sata_attention(*(t[..., 11:, :] for t in leaves), state=st, **kw)
    ref = sata.naive_sata_attention(*leaves, **kw)[..., 11:, :]
    go = rand(*y.shape, seed=13)
    for a, b in zip(torch.autograd.grad((y * go).sum(), leaves), torch.autograd.grad((ref * go).sum(), leaves)):
        assert_rel(a, b, 1e-10)


# ---------------------------------------------------------------- states
def test_merged_segment_states_continue_the_stream():
    q, k, v = qkv((2,), 2, 50, 4, 3, seed=14)
    kw = dict(n_taylor=3, is_causal=True, window=6, sinks=3, recentre=0.5)
    expected = sata.naive_sata_attention(q, k, v, **kw)
    for cut_a, cut_b in [(1, 30), (13, 17), (2, 4), (20, 40)]:
        _, a = sata.sata_attention(q[..., :cut_a, :], k[..., :cut_a, :], v[..., :cut_a, :], return_state=True, **kw)
        b = sata.accumulate_state(k[..., cut_a:cut_b, :], v[..., cut_a:cut_b, :], window=6, sinks=3)
        y = sata.sata_attention(q[..., cut_b:, :], k[..., cut_b:, :], v[..., cut_b:, :], state=a + b, **kw)
        assert_rel(y, expected[..., cut_b:, :], 1e-10, f"a=[0,{cut_a}) b=[{cut_a},{cut_b})")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_merge_ignores_a_nonfinite_padded_key_leaving_the_window(bad):
    """A padded key in the earlier segment's window that the merged window no longer holds goes to the far state
    with weight 0: selected away, not multiplied by 0 (NaN * 0 is NaN), as continuing the stream does."""
    q, k, v = qkv((2,), 2, 12, 4, 3, seed=41)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, 3] = mask[1, 2] = True
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[0, :, 3], v_bad[1, :, 2] = bad, bad
    kw = dict(n_taylor=3, window=2, sinks=1)
    seg = lambda lo, hi, st=None: sata.accumulate_state(k_bad[..., lo:hi, :], v_bad[..., lo:hi, :],
                                                        key_padding_mask=mask[:, lo:hi], state=st, **kw)
    merged = seg(0, 4) + seg(4, 9)
    assert torch.isfinite(merged.kv).all()
    assert_rel(merged.kv, seg(4, 9, seg(0, 4)).kv, 1e-12)
    y = sata.sata_attention(q[..., 9:, :], k[..., 9:, :], v[..., 9:, :], state=merged, is_causal=True,
                            key_padding_mask=mask[:, 9:], **kw)
    ref = sata.naive_sata_attention(q, k, v, key_padding_mask=mask, is_causal=True, **kw)[..., 9:, :]
    assert_rel(y, ref, 1e-10)


def test_merging_states_of_other_settings_says_which_is_which():
    a = sata.accumulate_state(*qkv((1,), 2, 6, 4, 3, seed=45)[1:], n_taylor=3, window=3)
    b = sata.accumulate_state(*qkv((1,), 2, 6, 4, 3, seed=46)[1:], n_taylor=3, window=2)
    with pytest.raises(ValueError, match=r"window=3 in this state, 2 in the other\): a state continues, merges"):
        a + b


def test_recentred_stream_without_exact_keys_keeps_its_key_centre():
    """A re-centred stream without window or sinks still holds centred keys: continuing it with the series around
    0, accumulating into it, or merging it must use the centre (the plain path would silently drop it)."""
    q, k, v = qkv((2,), 2, 40, 4, 3, seed=31)
    kw = dict(n_taylor=3, is_causal=True)
    _, st = sata.sata_attention(q[..., :20, :], k[..., :20, :], v[..., :20, :], recentre=0.0, return_state=True, **kw)
    assert st.exact is None and st.key_centre is not None
    y = sata.sata_attention(q[..., 20:, :], k[..., 20:, :], v[..., 20:, :], state=st, **kw)
    assert_rel(y, sata.naive_sata_attention(q, k, v, **kw)[..., 20:, :], 1e-10, "continued around 0")
    _, streamed = sata.sata_attention(q[..., 20:, :], k[..., 20:, :], v[..., 20:, :], state=st, recentre=0.0,
                                      return_state=True, **kw)
    acc = sata.accumulate_state(k[..., 20:, :], v[..., 20:, :], n_taylor=3, state=st)
    assert_rel(acc.kv, streamed.kv, 1e-12, "accumulated")
    _, later = sata.sata_attention(q[..., 20:, :], k[..., 20:, :], v[..., 20:, :], recentre=0.0, return_state=True, **kw)
    merged = st + later                              # the later segment has its own centre: translated exactly
    assert_rel(merged.kv, streamed.kv, 1e-10, "merged")
    assert torch.equal(merged.key_centre, st.key_centre)


def test_accumulate_equals_attention_state():
    q, k, v = qkv((2,), 2, 30, 4, 3, seed=15)
    _, st = sata.sata_attention(q, k, v, n_taylor=3, is_causal=True, window=5, sinks=2, return_state=True)
    acc = sata.accumulate_state(k, v, n_taylor=3, window=5, sinks=2)
    assert_rel(acc.kv, st.kv, 1e-12)
    for a, b in zip(acc.exact.tensors(), st.exact.tensors()):
        assert torch.equal(a, b)


def test_save_load_round_trip(tmp_path):
    q, k, v = qkv((2,), 2, 30, 4, 3, seed=16)
    kw = dict(n_taylor=3, is_causal=True, window=5, sinks=2)
    _, st = sata.sata_attention(q[..., :20, :], k[..., :20, :], v[..., :20, :], return_state=True, **kw)
    st.save(tmp_path / "w.sata")
    back = sata.SATAState.load(tmp_path / "w.sata", expected=st)
    assert back.config == st.config and back.nbytes == st.nbytes
    y1 = sata.sata_attention(q[..., 20:, :], k[..., 20:, :], v[..., 20:, :], state=st, **kw)
    y2 = sata.sata_attention(q[..., 20:, :], k[..., 20:, :], v[..., 20:, :], state=back, **kw)
    assert torch.equal(y1, y2)


def test_state_does_not_grow_and_input_state_is_kept():
    q, k, v = qkv((1,), 2, 40, 4, 3, seed=17)
    kw = dict(n_taylor=3, is_causal=True, window=8, sinks=2, return_state=True)
    _, st = sata.sata_attention(q[..., :10, :], k[..., :10, :], v[..., :10, :], **kw)
    size, before = st.nbytes, [t.clone() for t in (st.kv, *st.exact.tensors())]
    for t in range(10, 40):
        _, st2 = sata.sata_attention(q[..., t:t + 1, :], k[..., t:t + 1, :], v[..., t:t + 1, :], state=st, **kw)
        assert st2.nbytes == size
    for a, b in zip(before, (st.kv, *st.exact.tensors())):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["float32", "bfloat16", "float16"])
def test_low_precision_inputs(dtype):
    q, k, v = qkv((2,), 2, 40, 8, 4, seed=18, dtype=dtype)
    kw = dict(n_taylor=3, is_causal=True, window=6, sinks=2, recentre=0.5)
    y, st = _stream(q, k, v, [0, 20, 21, 40], **kw)
    assert y.dtype == dtype and st.dtype == torch.float32 and st.exact.win_k.dtype == torch.float32
    expected = sata.naive_sata_attention(q.double(), k.double(), v.double(), **kw)
    assert_rel(y, expected, {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype])


@pytest.mark.parametrize("kw", [dict(window=2), dict(window=2, sinks=1, recentre=0.0), dict(sinks=2)],
                         ids=["w2", "w2-s1-mean", "s2"])
def test_no_tokens_give_an_empty_output_in_every_function(kw):
    q = torch.zeros(1, 2, 0, 4, dtype=torch.float64)
    for fn in (sata.sata_attention, sata.naive_sata_attention):
        y = fn(q, q, q, is_causal=True, **kw)
        assert y.shape == (1, 2, 0, 4)


def test_state_size_counts_window_and_sinks():
    assert sata.state_size(8, 8, 4) == 165 * 9
    assert sata.state_size(8, 8, 4, window=64, sinks=4) == 165 * 9 + 68 * 16
    st = sata.SATAState.zeros((1,), 2, 8, 8, 4, window=64, sinks=4)
    floats = sum(t.numel() for t in (st.kv, st.exact.win_k, st.exact.win_v, st.exact.sink_k, st.exact.sink_v))
    assert floats == 2 * sata.state_size(8, 8, 4, window=64, sinks=4)


# ---------------------------------------------------------------- bad input
BAD = [
    pytest.param(dict(window=-1), "window must be a non-negative int", id="negative-window"),
    pytest.param(dict(window=2.5), "window must be a non-negative int", id="float-window"),
    pytest.param(dict(sinks=True), "sinks must be a non-negative int", id="bool-sinks"),
    pytest.param(dict(taylor_mix=-0.1), "taylor_mix must be >= 0", id="negative-mix"),
    pytest.param(dict(taylor_mix=torch.tensor([1.0, -1.0])), "taylor_mix must be >= 0", id="negative-mix-head"),
    pytest.param(dict(taylor_mix=torch.ones(3)), r"shape \[2\]", id="mix-wrong-heads"),
    pytest.param(dict(recentre=0.0, n_taylor=1), "recentre needs n_taylor >= 2", id="recentre-P1"),
    pytest.param(dict(recentre=0.5, n_taylor=2), "needs n_taylor >= 3", id="alpha-P2"),
    pytest.param(dict(recentre=torch.zeros(2, requires_grad=True), n_taylor=2, window=2),
                 "requires grad needs n_taylor >= 3", id="learned-alpha-P2"),
    pytest.param(dict(recentre=float("nan")), "finite", id="nan-recentre"),
    pytest.param(dict(recentre="mean"), "recentre must be a finite float", id="str-recentre"),
    pytest.param(dict(window=None), "window must be a non-negative int", id="none-window"),
    pytest.param(dict(sinks=None), "sinks must be a non-negative int", id="none-sinks"),
    pytest.param(dict(taylor_mix=0.0), "taylor_mix=0 without a window or sinks", id="mix0-alone"),
    pytest.param(dict(taylor_mix=0.0, recentre=0.0), "taylor_mix=0 without a window or sinks", id="mix0-recentre"),
    pytest.param(dict(taylor_mix=torch.tensor([1.0, 0.0]), recentre=0.0), "taylor_mix=0 without", id="mix0-head"),
]


@pytest.mark.parametrize("kw,match", BAD)
@pytest.mark.parametrize("fn", [sata.sata_attention, sata.naive_sata_attention], ids=["op", "oracle"])
def test_bad_arguments_name_the_fix(fn, kw, match):
    q, k, v = qkv((1,), 2, 6, 4, 3, dtype=torch.float32)
    kw = {"n_taylor": 3, **kw}
    with pytest.raises((ValueError, TypeError), match=match):
        fn(q, k, v, is_causal=True, **kw)


def test_a_recentre_parameter_at_two_terms_is_refused_only_where_it_would_learn():
    """n_taylor=2 cannot give d/d alpha: a recentre tensor that requires grad is refused under autograd, and
    accepted (as the plain number 0) in an inference call."""
    q, k, v = qkv((1,), 2, 8, 4, 3, seed=47)
    alpha = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    kw = dict(n_taylor=2, is_causal=True, window=2)
    with pytest.raises(ValueError, match="requires grad needs n_taylor >= 3"):
        sata.sata_attention(q, k, v, recentre=alpha, **kw)
    with torch.no_grad():
        y = sata.sata_attention(q, k, v, recentre=alpha, **kw)
    assert_rel(y, sata.sata_attention(q, k, v, recentre=0.0, **kw), 1e-14)


def test_numpy_numbers_are_numbers():
    """window / sinks of any integer type and taylor_mix / recentre of any real type (numpy's, as read from a
    config or a sweep) are the same settings as Python's; a NaN setting is a ValueError like a NaN tensor's."""
    import numpy as np

    q, k, v = qkv((1,), 2, 12, 4, 3, seed=44)
    kw = dict(n_taylor=3, is_causal=True)
    want = sata.sata_attention(q, k, v, window=3, sinks=1, taylor_mix=0.5, recentre=0.5, **kw)
    got = sata.sata_attention(q, k, v, window=np.int64(3), sinks=np.int32(1), taylor_mix=np.float32(0.5),
                              recentre=np.float32(0.5), **kw)
    assert torch.equal(got, want)
    for bad in (float("nan"), np.float64("inf")):
        with pytest.raises(ValueError, match="recentre must be a finite float"):
            sata.sata_attention(q, k, v, window=3, recentre=bad, **kw)


@pytest.mark.parametrize("L", [1, 7], ids=["decode", "prefill"])
def test_inplace_writes_into_the_passed_state(L):
    q, k, v = qkv((1,), 2, 20 + L, 4, 3, seed=18)
    kw = dict(n_taylor=3, is_causal=True, window=5, sinks=2, recentre=0.0, return_state=True)
    _, st = sata.sata_attention(q[..., :20, :], k[..., :20, :], v[..., :20, :], **kw)
    rest = (q[..., 20:, :], k[..., 20:, :], v[..., 20:, :])
    y_ref, ref = sata.sata_attention(*rest, state=st.clone(), **kw)
    mine = st.clone()
    buffers = (mine.kv, *mine.exact.tensors())
    y, new = sata.sata_attention(*rest, state=mine, inplace=True, **kw)
    assert_rel(y, y_ref, 1e-12)
    assert new.n_tokens == ref.n_tokens == 20 + L
    for t, want in zip(buffers, (ref.kv, *ref.exact.tensors())):  # the passed state's own tensors hold the result
        assert_rel(t.double(), want.double(), 1e-12)
    assert new.kv.data_ptr() == mine.kv.data_ptr()
    assert mine.n_tokens == 20 + L                                  # and its count: the object is the new state


@pytest.mark.parametrize("call", ["padded", "empty", "accumulate-padded"])
@pytest.mark.parametrize("kernels", [True, False], ids=["kernel", "torch"])
def test_a_returned_state_shares_no_buffer_with_the_passed_one(call, kernels):
    """A call that leaves a buffer as it was (all keys padded: no free sink filled; no keys: the far state) must
    still return buffers of its own: an in-place step on the returned state rewrote the passed one before."""
    q, k, v = qkv((1,), 2, 12, 4, 3, seed=26)
    kw = dict(n_taylor=3, window=2, sinks=3, recentre=0.5)
    with force_path(kernels=kernels):
        _, st0 = sata.sata_attention(q[..., :2, :], k[..., :2, :], v[..., :2, :], is_causal=True, return_state=True, **kw)
        before = st0.clone()
        part = (q[..., 2:5, :], k[..., 2:5, :], v[..., 2:5, :]) if call != "empty" else (q[..., :0, :], k[..., :0, :], v[..., :0, :])
        pad = torch.ones(1, part[1].shape[-2], dtype=torch.bool)
        if call == "accumulate-padded":
            st1 = sata.accumulate_state(*part[1:], key_padding_mask=pad, state=st0, n_taylor=3, window=2, sinks=3)
        else:
            _, st1 = sata.sata_attention(*part, key_padding_mask=pad, state=st0, is_causal=True, return_state=True, **kw)
        mine = [st1.kv, *st1.exact.tensors()]
        theirs = [st0.kv, *st0.exact.tensors()]
        assert not any(a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() for a, b in zip(mine, theirs))
        sata.sata_attention(q[..., 5:6, :], k[..., 5:6, :], v[..., 5:6, :], state=st1, is_causal=True,
                            return_state=True, inplace=True, **kw)
    for (name, a), (_, b) in zip([("kv", st0.kv), *st0.exact.named()], [("kv", before.kv), *before.exact.named()]):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernel", "torch"])
def test_a_state_kept_after_an_inplace_step_continues_the_stream(kernels):
    """A caller who keeps the passed object after ``inplace=True`` (instead of the returned one) holds the advanced
    state, count included: the ring's slot follows the count, and a stale count read the wrong window silently."""
    q, k, v = qkv((1,), 2, 16, 4, 3, seed=24)
    kw = dict(n_taylor=3, is_causal=True, window=3, sinks=1)
    ref = sata.naive_sata_attention(q, k, v, **kw)
    _, st = sata.sata_attention(q[..., :6, :], k[..., :6, :], v[..., :6, :], return_state=True, **kw)
    outs = []
    with force_path(kernels=kernels):
        for t in range(6, 16):
            y, _ = sata.sata_attention(q[..., t:t + 1, :], k[..., t:t + 1, :], v[..., t:t + 1, :], state=st,
                                       return_state=True, inplace=True, **kw)   # the returned state dropped
            outs.append(y)
    assert st.n_tokens == 16
    assert_rel(torch.cat(outs, -2), ref[..., 6:, :], 1e-10)


def test_state_from_another_window_is_refused():
    q, k, v = qkv((1,), 2, 6, 4, 3, dtype=torch.float32)
    _, st = sata.sata_attention(q, k, v, n_taylor=3, is_causal=True, window=4, return_state=True)
    with pytest.raises(ValueError, match="window=4, sinks=0 but the call asks for window=8"):
        sata.sata_attention(q, k, v, n_taylor=3, is_causal=True, window=8, state=st)
    with pytest.raises(ValueError, match="window=4"):
        sata.sata_attention(q, k, v, n_taylor=3, is_causal=True, state=st)
    _, plain = sata.sata_attention(q, k, v, n_taylor=3, is_causal=True, return_state=True)
    with pytest.raises(ValueError, match="window=0, sinks=0 but the call asks for window=4"):
        sata.sata_attention(q, k, v, n_taylor=3, is_causal=True, window=4, state=plain)
    with pytest.raises(ValueError, match="another configuration"):
        plain + st


def test_a_window_beyond_the_budget_is_refused_before_allocating():
    q, k, v = qkv((1,), 2, 4, 4, 3, dtype=torch.float32)
    with pytest.raises(sata.MemoryBudgetError, match="window=100000000"):
        sata.sata_attention(q, k, v, n_taylor=3, is_causal=True, window=10**8)


def test_autograd_beyond_the_budget_is_refused_before_the_blocks_run():
    """Under autograd every checkpointed block keeps the far state it starts from until the backward pass: four
    blocks of 192 tokens, a 42 KiB state each, against a 300 KiB budget (half of it for saved states)."""
    q, k, v = qkv((1,), 1, 768, 64, 4, dtype=torch.float32, seed=25)
    kw = dict(n_taylor=3, is_causal=True, window=2, sinks=1, recentre=0.0)
    q.requires_grad_(True)
    with sata.memory_budget(300 * 2**10), pytest.raises(sata.MemoryBudgetError, match="backward pass of the window"):
        sata.sata_attention(q, k, v, **kw)
    with sata.memory_budget(2**20):                                # twice the saved states: runs
        sata.sata_attention(q, k, v, **kw).sum().backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("L", [1, 7], ids=["decode", "prefill"])
def test_inplace_refuses_what_it_cannot_do(L):
    q, k, v = qkv((1,), 2, L, 4, 3, dtype=torch.float32, seed=19)
    kw = dict(n_taylor=3, is_causal=True, window=4, sinks=1)
    _, st = sata.sata_attention(q, k, v, return_state=True, **kw)
    with pytest.raises(ValueError, match="inplace=True updates a state"):
        sata.sata_attention(q, k, v, inplace=True, return_state=True, **kw)
    with pytest.raises(ValueError, match="inplace=True updates a state"):
        sata.sata_attention(q, k, v, state=st, inplace=True, **kw)
    with pytest.raises(ValueError, match="inplace=True cannot be used under autograd"):
        sata.sata_attention(q.requires_grad_(True), k, v, state=st, return_state=True, inplace=True, **kw)
    with pytest.raises(ValueError, match="inplace=True cannot be used under autograd"):
        sata.sata_attention(q.detach(), k, v, state=st, return_state=True, inplace=True, **kw,
                            taylor_mix=torch.ones(2, requires_grad=True))


def test_noncausal_window_needs_aligned_queries():
    q, k, v = qkv((1,), 2, 6, 4, 3, Lk=9)
    with pytest.raises(ValueError, match="need Lq == Lk"):
        sata.sata_attention(q, k, v, n_taylor=3, window=2)


# ---------------------------------------------------------------- fuzz (profile "ci": derandomized; "long": random)
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as hst  # noqa: E402


@settings(max_examples=40)
@given(data=hst.data())
def test_fuzz_window_streams_equal_oracle(data):
    """Random shapes, windows, sinks, centres, mixes, masks and splits, float64, against the oracle."""
    draw = data.draw
    B, Hkv, g = draw(hst.sampled_from([(), (1,), (2,)])), draw(hst.integers(1, 2)), draw(hst.integers(1, 2))
    E, Ev, P = draw(hst.integers(1, 4)), draw(hst.integers(1, 3)), draw(hst.integers(1, 5))
    L = draw(hst.integers(1, 24))
    causal = draw(hst.booleans())
    kw = dict(n_taylor=P, is_causal=causal, enable_gqa=True, window=draw(hst.integers(0, 9)),
              sinks=draw(hst.integers(0, 4)), taylor_mix=draw(hst.sampled_from([1.0, 0.0, 0.3, 2.5])))
    if P >= 2 and draw(hst.booleans()):
        kw["recentre"] = 0.0 if P == 2 else draw(hst.sampled_from([0.0, 0.5, 1.0, -0.5]))
    seed = draw(hst.integers(0, 2**16))
    q, k, v = qkv(B, Hkv * g, L, E, Ev, Hkv=Hkv, seed=seed, scale=draw(hst.sampled_from([0.5, 1.0, 2.0])))
    mask = None
    if draw(hst.booleans()):
        mask = torch.rand(*B, L, generator=torch.Generator().manual_seed(seed)) < 0.3
    cuts = sorted({0, L, *draw(hst.lists(hst.integers(0, L), max_size=4))}) if causal else [0, L]
    y, st = _stream(q, k, v, cuts, mask=mask, **kw)
    expected = sata.naive_sata_attention(q, k, v, key_padding_mask=mask, **kw)
    rows = torch.ones(*B, 1, L, 1, dtype=torch.bool) if mask is None else ~mask[..., None, :, None]
    if P % 2 == 0:  # an even series can cancel its normaliser: compare where the oracle's rows are well scaled
        rows = rows & (expected.abs().amax(-1, keepdim=True) < 1e3)
    assert torch.isfinite(y).all()
    assert_rel(y * rows, expected * rows, 1e-9)
    assert st.n_tokens == L


# ---------------------------------------------------------------- numerics of the centre
def _offset_scores(L=384, E=16, H=2, seed=0):
    """Queries and keys whose scores sit far from 0 with a large spread (-90..-5 here), like trained models'."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(H, 1, E, generator=g, dtype=torch.float64) * 2.5
    q = torch.randn(1, H, L, E, generator=g, dtype=torch.float64) * 1.5 - 1.2 * mu
    k = torch.randn(1, H, L, E, generator=g, dtype=torch.float64) + mu
    v = torch.randn(1, H, L, E, generator=g, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize("n_taylor", [3, 4, 5])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_float32_holds_on_offset_scores(n_taylor, alpha):
    """The key centre keeps the series' coefficients small: float32 within 1e-4 of float64 on every row.
    (Without it the coefficients a_m(c) cancel: 7.5e-4 at n_taylor=4, 9.4e-3 at 5 on these inputs, alpha=0.)"""
    q, k, v = _offset_scores()
    kw = dict(n_taylor=n_taylor, is_causal=True, window=64, sinks=4, recentre=alpha)
    y64 = sata.sata_attention(q, k, v, **kw)
    y32, st = sata.sata_attention(q.float(), k.float(), v.float(), return_state=True, **kw)
    row_err = (y32.double() - y64).abs().amax(-1) / y64.abs().amax(-1)
    assert float(row_err.max()) < 1e-4, float(row_err.max())
    assert st.key_centre is not None and st.key_centre.dtype == torch.float32


def test_key_centre_leaves_the_sinks_out():
    """A new re-centred stream's key centre is the mean of its first call's kept keys after the first ``sinks`` kept
    ones (which never enter the Taylor part), per row; 0 for a row with no such key."""
    q, k, v = qkv((3,), 2, 9, 4, 3, seed=43)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    mask[1, :4] = True                                  # left padding: row 1's sinks are keys 4 and 5
    mask[2, :7] = True                                  # row 2 keeps two keys, both sinks
    _, st = sata.sata_attention(q, k, v, n_taylor=3, is_causal=True, window=3, sinks=2, recentre=0.0,
                                key_padding_mask=mask, return_state=True)
    assert_rel(st.key_centre[0], k[0, :, 2:].mean(-2), 1e-14, "unpadded row")
    assert_rel(st.key_centre[1], k[1, :, 6:].mean(-2), 1e-14, "left-padded row")
    assert st.key_centre[2].eq(0).all()


def test_float32_holds_when_the_stream_starts_with_one_outlier_key():
    """A stream whose first call is one key (a decode loop from scratch), a trained model's outlier first token:
    it is a sink, not the centre of every later key (which cost float32 2e-4 at n_taylor=3 here, 0.28 at 5)."""
    g = torch.Generator().manual_seed(17)
    q = torch.randn(1, 4, 400, 16, generator=g, dtype=torch.float64) * 2 + 1.0
    k = torch.randn(1, 4, 400, 16, generator=g, dtype=torch.float64) * 1.5 + 2.0
    v = torch.randn(1, 4, 400, 16, generator=g, dtype=torch.float64)
    k[..., 0, :] = -8.0
    kw = dict(n_taylor=3, is_causal=True, window=16, sinks=4, recentre=0.0)
    ref = sata.naive_sata_attention(q, k, v, **kw)
    qf, kf, vf = q.float(), k.float(), v.float()
    y0, st = sata.sata_attention(qf[..., :1, :], kf[..., :1, :], vf[..., :1, :], return_state=True, **kw)
    y1 = sata.sata_attention(qf[..., 1:, :], kf[..., 1:, :], vf[..., 1:, :], state=st, **kw)
    row_err = (torch.cat([y0, y1], -2).double() - ref).abs().amax(-1) / ref.abs().amax(-1)
    assert float(row_err.max()) < 5e-5, float(row_err.max())


@pytest.mark.parametrize("inplace", [False, True], ids=["new_state", "inplace"])
@pytest.mark.parametrize("kernels", [True, False], ids=["kernel", "pytorch"])
def test_decoded_stream_is_centred_on_its_first_window(kernels, inplace):
    """A stream started by a short call and decoded token by token: its key centre is re-estimated, row by row, while
    its Taylor part is empty, and fixed when the first key enters it: the mean of the kept non-sink keys up to that
    token (window 8, 2 sinks: keys 2..10 of an unpadded row, 5..13 of a row left-padded by 3). It was the first
    call's mean (keys 2..3), or 0 where the first call's keys were all sinks."""
    q, k, v = qkv((2,), 2, 18, 4, 4, seed=45)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[1, :3] = True
    kw = dict(n_taylor=3, is_causal=True, window=8, sinks=2, recentre=0.0)
    with force_path(kernels=kernels), torch.no_grad():
        _, st = sata.sata_attention(q[..., :4, :], k[..., :4, :], v[..., :4, :], key_padding_mask=mask,
                                    return_state=True, **kw)
        first = st.key_centre
        for t in range(4, 17):
            _, st = sata.sata_attention(q[..., t:t + 1, :], k[..., t:t + 1, :], v[..., t:t + 1, :], state=st,
                                        return_state=True, inplace=inplace, **kw)
    assert_rel(st.key_centre[0], k[0, :, 2:11].mean(-2), 1e-13, "unpadded row")
    assert_rel(st.key_centre[1], k[1, :, 5:14].mean(-2), 1e-13, "left-padded row")
    assert (st.key_centre is first) == inplace  # in place: the passed state's own centre, updated
    full_mask = torch.cat([mask, torch.zeros(2, 14, dtype=torch.bool)], -1)
    ref = sata.naive_sata_attention(q, k, v, **kw, key_padding_mask=full_mask)
    with force_path(kernels=kernels), torch.no_grad():  # the centre changes nothing but rounding
        y, _ = sata.sata_attention(q[..., 17:, :], k[..., 17:, :], v[..., 17:, :], state=st, return_state=True, **kw)
    assert_rel(y, ref[..., 17:, :], 1e-10)


@pytest.mark.parametrize("n_taylor", [3, 4, 5])
def test_float32_holds_on_offset_scores_decoded_from_scratch(n_taylor):
    """A decode loop from the stream's first token (its first keys are sinks): the centre is the first window's mean
    key, so float32 holds as after a long prefill. (Centred on 0, as it was: 2.7e-4 at n_taylor=4, 3.9e-3 at 5.)"""
    q, k, v = _offset_scores(L=160)
    kw = dict(n_taylor=n_taylor, is_causal=True, window=64, sinks=4, recentre=0.0)
    y64 = sata.sata_attention(q, k, v, **kw)
    qf, kf, vf = q.float(), k.float(), v.float()
    ys, st = [], None
    with torch.no_grad():
        for t in range(q.shape[-2]):
            y, st = sata.sata_attention(qf[..., t:t + 1, :], kf[..., t:t + 1, :], vf[..., t:t + 1, :], state=st,
                                        return_state=True, inplace=st is not None, **kw)
            ys.append(y)
    row_err = (torch.cat(ys, -2).double() - y64).abs().amax(-1) / y64.abs().amax(-1)
    assert float(row_err.max()) < 1e-4, float(row_err.max())


def test_exact_weights_below_the_smallest_normal_are_flushed():
    """Float32 scores 86, 88 and 100 below the maximum: e^-86 is kept, the subnormal e^-88 and e^-100 (each
    ~60x slower to compute on x86, < 1.2e-38 beside the maximum's weight 1) are 0; a masked score, even NaN,
    weighs 0 and gets no gradient; the maximum carries none (it cancels in every use)."""
    from sata.hybrid import exact_part
    s = torch.tensor([[0.0, -1.0, -86.0, -88.0, -100.0, float("nan")]], requires_grad=True)
    exact = torch.tensor([[True] * 5 + [False]])
    m, w, den = exact_part(s, exact, torch.eye(6))                             # num = the weights themselves
    assert m.item() == 0.0 and not m.requires_grad
    expected = torch.exp(torch.tensor([0.0, -1.0, -86.0], dtype=torch.float64))
    assert_rel(w[0, :3], expected, 1e-6)
    assert w[0, 3:].eq(0).all() and den.item() == w.sum().item()
    (w.sum() + den).backward()
    assert torch.isfinite(s.grad).all() and s.grad[0, 3:].eq(0).all() and s.grad[0, 0] == 2.0


def test_without_the_key_centre_float32_cancels():
    """The centre is what holds float32 above: the same stream started from an explicit state (no centre)
    loses three orders of magnitude at n_taylor=5."""
    q, k, v = _offset_scores()
    kw = dict(n_taylor=5, is_causal=True, window=64, sinks=4, recentre=0.0)
    y64 = sata.sata_attention(q, k, v, **kw)
    start = sata.SATAState.zeros(q.shape[:-3], k.shape[-3], k.shape[-1], v.shape[-1], 5, window=64, sinks=4)
    y32 = sata.sata_attention(q.float(), k.float(), v.float(), state=start, **kw).double()
    assert float(((y32 - y64).abs().amax(-1) / y64.abs().amax(-1)).max()) > 1e-3


@pytest.mark.parametrize("d,n_taylor", [(3, 4), (5, 3), (2, 5), (1, 3)])
def test_translated_state_is_the_state_of_moved_keys(d, n_taylor):
    from sata._merge import translate
    from sata.basis import get_basis
    from sata.features import _phi

    x, w, delta = rand(9, d, seed=20), rand(9, 3, seed=21), rand(d, seed=22)
    basis = get_basis(d, n_taylor, "cpu", torch.float64)
    assert_rel(translate(_phi(x, basis).mT @ w, delta, n_taylor), _phi(x + delta, basis).mT @ w, 1e-13)
