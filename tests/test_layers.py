"""Attention layers and the small LM: identity with the oracle, modes agree, explicit state, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import sata
from sata.layers import KVCache, RotaryEmbedding, SATAAttention, ShortConv, SoftmaxAttention
from sata.lm import LMConfig, TransformerLM

GEOMETRIES = [  # (d_model, n_heads, head_dim, n_kv_heads)
    pytest.param((32, 4, 8, 4), id="mha-4x8"),
    pytest.param((32, 4, 8, 2), id="gqa-4q-2kv"),
    pytest.param((24, 2, 6, 1), id="mqa-2q-1kv-d6"),
]


def _layer(cls, geom, **kw):
    d_model, h, e, hkv = geom
    torch.manual_seed(0)
    return cls(d_model, h, e, hkv, **kw).double()


def _rope_ref(x: torch.Tensor, offset: int, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding written out pair by pair (rotate-half convention)."""
    E = x.shape[-1]
    out = x.clone()
    for t in range(x.shape[-2]):
        for i in range(E // 2):
            a = (offset + t) * base ** (-2 * i / E)
            x1, x2 = x[..., t, i], x[..., t, i + E // 2]
            out[..., t, i] = x1 * math.cos(a) - x2 * math.sin(a)
            out[..., t, i + E // 2] = x2 * math.cos(a) + x1 * math.sin(a)
    return out


def _oracle_layer(layer: SATAAttention, x: torch.Tensor, n_taylor: int, **hybrid) -> torch.Tensor:
    """Projections, rotary, the O(n^2) oracle (with the window-mode arguments ``hybrid``) and the output
    projection, written out."""
    B, L, _ = x.shape
    H, Hkv, E = layer.n_heads, layer.n_kv_heads, layer.head_dim
    q = (x @ layer.q_proj.weight.T).view(B, L, H, E).transpose(1, 2)
    k = (x @ layer.k_proj.weight.T).view(B, L, Hkv, E).transpose(1, 2)
    v = (x @ layer.v_proj.weight.T).view(B, L, Hkv, E).transpose(1, 2)
    q, k = _rope_ref(q, 0), _rope_ref(k, 0)
    y = sata.naive_sata_attention(q, k, v, n_taylor=n_taylor, is_causal=True, enable_gqa=H != Hkv, **hybrid)
    return y.transpose(1, 2).reshape(B, L, H * E) @ layer.o_proj.weight.T


# ---------------------------------------------------------------------------- identity
class TestIdentity:
    @pytest.mark.parametrize("geom", GEOMETRIES)
    @pytest.mark.parametrize("n_taylor", [2, 3, 4], ids=lambda p: f"P{p}")
    def test_sata_layer_matches_oracle_forward_and_backward(self, geom, n_taylor):
        layer = _layer(SATAAttention, geom, n_taylor=n_taylor)
        x = torch.randn(2, 13, geom[0], dtype=torch.float64, requires_grad=True)
        y, _ = layer(x)
        ref = _oracle_layer(layer, x, n_taylor)
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
        g = torch.randn_like(y)
        got = torch.autograd.grad(y, [x, *layer.parameters()], g)
        want = torch.autograd.grad(ref, [x, *layer.parameters()], g)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)

    def test_rotary_matches_pairwise_reference_and_is_relative(self):
        rot = RotaryEmbedding(8).double()
        x = torch.randn(2, 5, 8, dtype=torch.float64)
        torch.testing.assert_close(rot(x, 7), _rope_ref(x, 7), rtol=1e-12, atol=1e-12)
        q, k = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
        s1 = rot(q[None], 10) @ rot(k[None], 3).T
        s2 = rot(q[None], 1000) @ rot(k[None], 993).T
        torch.testing.assert_close(s1, s2, rtol=1e-10, atol=1e-12)

    @pytest.mark.parametrize("geom", GEOMETRIES)
    def test_softmax_layer_matches_explicit_softmax(self, geom):
        layer = _layer(SoftmaxAttention, geom, rope=False)
        x = torch.randn(2, 9, geom[0], dtype=torch.float64)
        y, _ = layer(x)
        B, L, _ = x.shape
        H, Hkv, E = layer.n_heads, layer.n_kv_heads, layer.head_dim
        q = (x @ layer.q_proj.weight.T).view(B, L, H, E).transpose(1, 2)
        k = (x @ layer.k_proj.weight.T).view(B, L, Hkv, E).transpose(1, 2).repeat_interleave(H // Hkv, 1)
        v = (x @ layer.v_proj.weight.T).view(B, L, Hkv, E).transpose(1, 2).repeat_interleave(H // Hkv, 1)
        s = (q @ k.mT) / math.sqrt(E)
        s = s.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
        ref = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, L, H * E) @ layer.o_proj.weight.T
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)

    def test_sata_layer_converges_to_softmax_layer(self):
        # same weights, small scores: more Taylor terms approach the softmax layer
        geom = (32, 4, 8, 4)
        soft = _layer(SoftmaxAttention, geom)
        x = 0.3 * torch.randn(1, 16, 32, dtype=torch.float64)
        ref, _ = soft(x)
        errs = []
        for p in (2, 3, 4, 6):
            layer = _layer(SATAAttention, geom, n_taylor=p)
            layer.load_state_dict(soft.state_dict())
            errs.append((layer(x)[0] - ref).abs().max().item())
        assert all(b < a for a, b in zip(errs, errs[1:])), errs
        assert errs[-1] < 1e-6


# ---------------------------------------------------------------------------- streaming
class TestStreaming:
    @pytest.mark.parametrize("cls", [SATAAttention, SoftmaxAttention], ids=["sata", "softmax"])
    @pytest.mark.parametrize("geom", GEOMETRIES)
    def test_prefill_then_decode_equals_full(self, cls, geom):
        layer = _layer(cls, geom, **({"n_taylor": 3} if cls is SATAAttention else {}))
        x = torch.randn(2, 20, geom[0], dtype=torch.float64)
        full, _ = layer(x, return_state=False)
        y1, st = layer(x[:, :7])
        ys = [y1]
        y2, st = layer(x[:, 7:12], st)                                  # a chunk after the prefill
        ys.append(y2)
        for t in range(12, 20):
            yt, st = layer(x[:, t:t + 1], st)
            ys.append(yt)
        torch.testing.assert_close(torch.cat(ys, 1), full, rtol=1e-10, atol=1e-12)
        assert st.n_tokens == 20

    @pytest.mark.parametrize("cls", [SATAAttention, SoftmaxAttention], ids=["sata", "softmax"])
    def test_passed_state_is_never_modified(self, cls):
        layer = _layer(cls, (32, 4, 8, 2))
        x = torch.randn(1, 10, 32, dtype=torch.float64)
        _, st = layer(x)
        a, st_a = layer(x[:, :1], st)
        b, st_b = layer(x[:, 1:2], st)            # branch from the same state
        a2, _ = layer(x[:, :1], st)
        torch.testing.assert_close(a, a2, rtol=0, atol=0)
        assert st.n_tokens == 10 and st_a.n_tokens == st_b.n_tokens == 11

    @pytest.mark.parametrize("attention", ["sata", "softmax"])
    def test_lm_decode_equals_full_forward(self, attention):
        torch.manual_seed(0)
        m = TransformerLM(LMConfig(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, attention=attention)).double()
        t = torch.randint(0, 256, (2, 24))
        full, _ = m(t)
        logits, st = m(t[:, :10], return_states=True)
        outs = [logits]
        for i in range(10, 24):
            logits, st = m(t[:, i:i + 1], st, return_states=True)
            outs.append(logits)
        torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-11)

    def test_sata_state_size_is_constant_and_cache_grows(self):
        torch.manual_seed(0)
        sizes = {}
        for attention in ("sata", "softmax"):
            m = TransformerLM(LMConfig(d_model=32, n_layers=2, n_heads=4, attention=attention))
            _, st = m(torch.randint(0, 256, (1, 8)), return_states=True)
            first = m.state_nbytes(st)
            for _ in range(200):
                _, st = m(torch.randint(0, 256, (1, 1)), st, return_states=True)
            sizes[attention] = (first, m.state_nbytes(st))
        assert sizes["sata"][0] == sizes["sata"][1] == 2 * sata.state_size(8, 8, 3) * 4 * 4
        assert sizes["softmax"][1] > 10 * sizes["softmax"][0]

    def test_kv_cache_fork_copies_instead_of_overwriting(self):
        c = KVCache.empty(1, 2, 4, capacity=8)
        k = torch.randn(1, 2, 3, 4)
        c1 = c.append(k, k)
        a = c1.append(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4))
        b = c1.append(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))   # fork from c1
        assert a.keys[0, 0, -1].eq(1).all() and b.keys[0, 0, -1].eq(0).all()
        torch.testing.assert_close(a.keys[:, :, :3], k)

    def test_state_gradients_flow_for_truncated_bptt(self):
        layer = _layer(SATAAttention, (32, 4, 8, 4))
        x = torch.randn(1, 12, 32, dtype=torch.float64, requires_grad=True)
        _, st = layer(x[:, :6])
        y, _ = layer(x[:, 6:], st)
        (gx,) = torch.autograd.grad(y.sum(), x)
        assert gx[:, :6].abs().sum() > 0                               # through the state
        _, st = layer(x[:, :6])
        y, _ = layer(x[:, 6:], st.detach())
        (gx,) = torch.autograd.grad(y.sum(), x)
        assert gx[:, :6].abs().sum() == 0                              # truncated


# ---------------------------------------------------------------------------- window mode
WINDOW_LAYERS = [  # SATAAttention window-mode arguments
    pytest.param(dict(window=5, sinks=2), id="w5-s2"),
    pytest.param(dict(window=4, sinks=1, recentre=0.5, taylor_mix=0.5), id="w4-s1-rec0.5"),
    pytest.param(dict(window=5, sinks=2, recentre=0.0, learn_mix=True, learn_recentre=True), id="w5-s2-learned"),
    pytest.param(dict(window=0, sinks=0, recentre=0.3, learn_recentre=True), id="recentre-only-learned"),
]


def _randomise_window_params(layer: SATAAttention) -> dict:
    """Move the learnable beta and alpha off their starts (per head, distinct) and return the layer's
    window-mode arguments as the oracle takes them."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in (layer.mix_param, layer.recentre_param):
            if p is not None:
                p.add_(0.5 * torch.rand(p.shape, generator=g, dtype=p.dtype))
    return {k: v for k, v in layer._window_args().items()}


class TestWindowMode:
    @pytest.mark.parametrize("geom", GEOMETRIES)
    @pytest.mark.parametrize("hybrid", WINDOW_LAYERS)
    def test_layer_matches_oracle_forward_and_backward(self, geom, hybrid):
        layer = _layer(SATAAttention, geom, n_taylor=3, **hybrid)
        args = _randomise_window_params(layer)
        x = torch.randn(2, 17, geom[0], dtype=torch.float64, requires_grad=True)
        y, st = layer(x)
        ref = _oracle_layer(layer, x, 3, **args)
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
        assert (st.window, st.sinks) == (hybrid.get("window", 0), hybrid.get("sinks", 0))
        g = torch.randn_like(y)
        params = [x, *layer.parameters()]
        got = torch.autograd.grad(y, params, g)
        want = torch.autograd.grad(ref, params, g)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
        for p in (layer.mix_param, layer.recentre_param):     # the learned parameters do receive gradients
            if p is not None:
                (gp,) = torch.autograd.grad(layer(x)[0], p, g)
                assert gp.abs().min() > 1e-8

    @pytest.mark.parametrize("geom", GEOMETRIES)
    def test_prefill_then_decode_equals_full(self, geom):
        # the window (5) and the sinks (2) cross the call boundaries; rotary positions follow the state
        layer = _layer(SATAAttention, geom, n_taylor=3, window=5, sinks=2, recentre=0.5, learn_mix=True)
        _randomise_window_params(layer)
        x = torch.randn(2, 20, geom[0], dtype=torch.float64)
        with torch.no_grad():
            full, _ = layer(x, return_state=False)
            ys, st = [], None
            for a, b in [(0, 1), (1, 7), (7, 12), *((t, t + 1) for t in range(12, 20))]:
                y, st = layer(x[:, a:b], st)
                ys.append(y)
        torch.testing.assert_close(torch.cat(ys, 1), full, rtol=1e-10, atol=1e-12)
        assert st.n_tokens == 20 and st.nbytes == layer(x[:, :1])[1].nbytes     # constant size

    def test_learned_mix_starts_at_taylor_mix_and_stays_non_negative(self):
        geom = (32, 4, 8, 2)
        fixed = _layer(SATAAttention, geom, window=3, sinks=1, taylor_mix=0.7, recentre=0.2)
        learned = _layer(SATAAttention, geom, window=3, sinks=1, taylor_mix=0.7, recentre=0.2, learn_mix=True,
                         learn_recentre=True)
        x = torch.randn(1, 12, 32, dtype=torch.float64)
        torch.testing.assert_close(learned(x)[0], fixed(x)[0], rtol=1e-9, atol=1e-10)   # [H] tensors vs floats
        with torch.no_grad():
            learned.mix_param.fill_(-800.0)                   # softplus underflows to 0: a sliding window
        zero = _layer(SATAAttention, geom, window=3, sinks=1, taylor_mix=0.0, recentre=0.2)
        assert learned._window_args()["taylor_mix"].min() >= 0
        torch.testing.assert_close(learned(x)[0], zero(x)[0], rtol=1e-9, atol=1e-10)
        assert "window=3, sinks=1, taylor_mix=learned, recentre=learned" in repr(learned)

    def test_plain_layer_passes_no_window_arguments(self):
        assert _layer(SATAAttention, (32, 4, 8, 4))._window_args() == {}

    @pytest.mark.parametrize(
        "kw, match",
        [
            (dict(window=-1), "SATAAttention: window must be a non-negative int"),
            (dict(taylor_mix=-0.5, window=2), "SATAAttention: taylor_mix must be >= 0"),
            (dict(recentre=0.5, n_taylor=2), "SATAAttention: recentre=0.5 .* needs n_taylor >= 3"),
            (dict(learn_mix=True), "learn_mix=True needs window > 0 or sinks > 0"),
            (dict(learn_mix=True, window=4, taylor_mix=0.0), "taylor_mix, which must be a float > 0"),
            (dict(learn_recentre=True, window=4), "learn_recentre=True needs a starting recentre"),
            (dict(learn_recentre=True, window=4, recentre=0.0, n_taylor=2), "learn_recentre=True .* n_taylor >= 3"),
        ],
        ids=["negative-window", "negative-mix", "alpha-P2", "mix-without-window", "mix-from-zero",
             "recentre-without-start", "recentre-P2"],
    )
    def test_bad_window_arguments_name_the_fix(self, kw, match):
        with pytest.raises(ValueError, match=match):
            SATAAttention(32, 4, **kw)


# ---------------------------------------------------------------------------- persistence
def test_lm_save_and_load_round_trip_bit_exactly(tmp_path):
    torch.manual_seed(0)
    m = TransformerLM(LMConfig(d_model=32, n_layers=2, n_heads=4, attention="sata", n_taylor=4))
    m.save_pretrained(tmp_path / "m")
    m2 = TransformerLM.from_pretrained(tmp_path / "m")
    assert m2.config == m.config
    for (n, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n
    t = torch.randint(0, 256, (1, 9))
    assert torch.equal(m(t)[0], m2(t)[0])


# ---------------------------------------------------------------------------- bad input
class TestBadInput:
    def test_state_of_the_other_attention_type(self):
        sata_layer, soft_layer = _layer(SATAAttention, (32, 4, 8, 4)), _layer(SoftmaxAttention, (32, 4, 8, 4))
        x = torch.randn(1, 3, 32, dtype=torch.float64)
        _, st = sata_layer(x)
        with pytest.raises(TypeError, match="state must be a KVCache"):
            soft_layer(x, st)

    def test_state_of_another_head_size(self):
        a = _layer(SATAAttention, (32, 4, 8, 4))
        b = _layer(SATAAttention, (32, 2, 16, 2))
        x = torch.randn(1, 3, 32, dtype=torch.float64)
        _, st = a(x)
        with pytest.raises(ValueError, match="state"):
            b(x, st)

    @pytest.mark.parametrize("shape", [(3, 32), (1, 3, 31)], ids=["2d", "width"])
    def test_input_shape(self, shape):
        with pytest.raises(ValueError, match="x must be \\[batch, length, d_model=32\\]"):
            _layer(SATAAttention, (32, 4, 8, 4))(torch.randn(*shape, dtype=torch.float64))

    @pytest.mark.parametrize("kw, match", [
        (dict(d_model=30, n_heads=4), "not divisible by n_heads"),
        (dict(d_model=32, n_heads=4, n_kv_heads=3), "n_kv_heads=3 must divide n_heads=4"),
        (dict(d_model=32, n_heads=4, head_dim=7), "even head_dim"),
    ], ids=["width", "gqa", "rope-odd"])
    def test_layer_arguments(self, kw, match):
        with pytest.raises(ValueError, match=match):
            SATAAttention(**kw)

    @pytest.mark.parametrize("kw, match", [
        (dict(attention="linear"), "attention must be one of"),
        (dict(n_taylor=0), "n_taylor must be a positive int"),
        (dict(d_model=30, n_heads=4), "set head_dim"),
    ], ids=["attention", "n_taylor", "width"])
    def test_lm_config(self, kw, match):
        with pytest.raises(ValueError, match=match):
            LMConfig(**kw)

    def test_lm_tokens_and_states(self):
        m = TransformerLM(LMConfig(d_model=32, n_layers=2, n_heads=4))
        with pytest.raises(ValueError, match="integer tensor"):
            m(torch.randn(1, 4))
        with pytest.raises(ValueError, match="one state per layer"):
            m(torch.zeros(1, 4, dtype=torch.long), [None])

    def test_from_pretrained_on_a_folder_without_a_model(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="does not hold a sata model"):
            TransformerLM.from_pretrained(tmp_path)

    def test_lm_refuses_a_state_that_would_not_fit(self):
        # 2 layers of 64-dim heads at n_taylor=8: C(71, 7) features per head
        m = TransformerLM(LMConfig(d_model=128, n_layers=1, n_heads=2, n_taylor=8))
        with pytest.raises(sata.MemoryBudgetError):
            m(torch.zeros(1, 2, dtype=torch.long), return_states=True)


def test_rotary_frequencies_survive_a_cast_to_bfloat16():
    rot = RotaryEmbedding(16)
    x = torch.randn(1, 2, 5, 16)
    ref = rot(x.double(), offset=50_000)
    rot_bf16 = rot.to(torch.bfloat16)
    got = rot_bf16(x.bfloat16(), offset=50_000).double()
    # only the bfloat16 rounding of x and of cos/sin, not of the frequencies (which would scramble the angles)
    torch.testing.assert_close(got, ref, rtol=0.02, atol=0.03)


def test_token_ids_outside_the_vocabulary_are_refused():
    m = TransformerLM(LMConfig(d_model=16, n_layers=1, n_heads=2, vocab_size=100))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 100\)"):
        m(torch.tensor([[1, 2, 100]]))


def test_layer_in_half_precision_keeps_float32_state():
    layer = SATAAttention(32, 4, n_taylor=3).to(torch.bfloat16)
    y, st = layer(torch.randn(1, 5, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and st.kv.dtype == torch.float32
    assert torch.isfinite(y).all()


# ---------------------------------------------------------------------------- short convolution
class TestShortConv:
    def test_matches_a_written_out_causal_convolution_and_streams(self):
        torch.manual_seed(0)
        conv = ShortConv(3, 4).double()
        with torch.no_grad():
            conv.weight.normal_()
        x = torch.randn(2, 9, 3, dtype=torch.float64)
        y, tail = conv(x)
        w = conv.weight[:, 0]                                           # [C, K]
        ref = torch.zeros_like(x)
        for t in range(9):
            for j in range(4):
                if t - 3 + j >= 0:
                    ref[:, t] += w[:, j] * x[:, t - 3 + j]
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        y1, st = conv(x[:, :5])
        y2, st = conv(x[:, 5:6], st)
        y3, st = conv(x[:, 6:], st)
        torch.testing.assert_close(torch.cat([y1, y2, y3], 1), y, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(st, tail, rtol=0, atol=0)

    def test_starts_as_the_identity(self):
        x = torch.randn(1, 5, 3)
        assert torch.equal(ShortConv(3, 4)(x)[0], x)
        m = TransformerLM(LMConfig(d_model=32, n_layers=1, n_heads=4, short_conv=4))
        assert torch.equal(m.blocks[0].conv.weight[:, 0, -1], torch.ones(32))
        assert m.blocks[0].conv.weight[:, 0, :-1].abs().sum() == 0

    @pytest.mark.parametrize("attention", ["sata", "softmax"])
    def test_lm_with_short_conv_decodes_like_a_full_pass(self, attention):
        torch.manual_seed(0)
        m = TransformerLM(LMConfig(d_model=32, n_layers=2, n_heads=4, attention=attention, short_conv=4)).double()
        with torch.no_grad():
            for b in m.blocks:
                b.conv.weight.normal_()
        t = torch.randint(0, 256, (2, 16))
        full, _ = m(t)
        logits, st = m(t[:, :2], return_states=True)                    # shorter than the kernel
        outs = [logits]
        for i in range(2, 16):
            logits, st = m(t[:, i:i + 1], st, return_states=True)
            outs.append(logits)
        torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-11)
        assert m.state_nbytes(st) > 0

    def test_bad_kernel_and_state(self):
        with pytest.raises(ValueError, match="short_conv must be 0"):
            LMConfig(short_conv=1)
        with pytest.raises(ValueError, match="state must be \\[batch, kernel_size - 1, channels\\]"):
            ShortConv(3, 4)(torch.randn(1, 2, 3), torch.zeros(1, 2, 3))


# ---------------------------------------------------------------------------- sliding window / hybrid
class TestSlidingWindow:
    def test_window_matches_banded_softmax_and_streams_with_a_bounded_cache(self):
        layer = _layer(SoftmaxAttention, (32, 4, 8, 2), window=5)
        x = torch.randn(2, 23, 32, dtype=torch.float64)
        full, _ = layer(x, return_state=False)
        ref_layer = _layer(SoftmaxAttention, (32, 4, 8, 2))             # same weights, no window
        ys = []
        for t in range(23):                                             # reference: each token alone over its window
            lo = max(0, t - 4)
            y, _ = ref_layer(x[:, lo:t + 1])                            # rotary is relative: positions shift freely
            ys.append(y[:, -1:])
        torch.testing.assert_close(full, torch.cat(ys, 1), rtol=1e-10, atol=1e-12)
        y1, st = layer(x[:, :7])
        outs = [y1]
        for t in range(7, 23):
            yt, st = layer(x[:, t:t + 1], st)
            outs.append(yt)
            assert st.n_stored <= 10
        torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-12)
        assert st.n_tokens == 23

    @pytest.mark.parametrize("L, window", [(23, 5), (20, 5), (6, 5), (40, 1)])
    def test_banded_blocks_equal_dense_masked_softmax_forward_and_backward(self, L, window):
        """The training path's band blocks (O(L window)) against dense masked attention, in float64."""
        from sata.layers import _local_attention

        g = torch.Generator().manual_seed(L)
        q = torch.randn(2, 4, L, 8, dtype=torch.float64, generator=g, requires_grad=True)
        k = torch.randn(2, 2, L, 8, dtype=torch.float64, generator=g, requires_grad=True)
        v = torch.randn(2, 2, L, 3, dtype=torch.float64, generator=g, requires_grad=True)
        i = torch.arange(L)
        allowed = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)       # [L, L]
        s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 0.3                       # [2, 4, L, L]
        ref = s.masked_fill(~allowed, float("-inf")).softmax(-1) @ v.repeat_interleave(2, 1)
        out = _local_attention(q, k, v, window, 0.3)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        w = torch.randn_like(ref)
        grads = torch.autograd.grad((out * w).sum(), (q, k, v))
        ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

    def test_hybrid_lm_decodes_like_a_full_pass_with_constant_state(self):
        torch.manual_seed(0)
        cfg = LMConfig(d_model=32, n_layers=3, n_heads=4, attention="sata", local_layers=[0, 2], local_window=6,
                       short_conv=3)
        m = TransformerLM(cfg).double()
        assert isinstance(m.blocks[0].attn, SoftmaxAttention) and isinstance(m.blocks[1].attn, SATAAttention)
        t = torch.randint(0, 256, (1, 40))
        full, _ = m(t)
        logits, st = m(t[:, :9], return_states=True)
        outs, sizes = [logits], []
        for i in range(9, 40):
            logits, st = m(t[:, i:i + 1], st, return_states=True)
            outs.append(logits)
            sizes.append(m.state_nbytes(st))
        torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-11)
        assert max(sizes[10:]) <= max(sizes[:10])                      # bounded: no growth with the context

    def test_bad_window(self):
        with pytest.raises(ValueError, match="window must be a positive int"):
            SoftmaxAttention(32, 4, window=0)
        with pytest.raises(ValueError, match="local_layers must be layer indices"):
            LMConfig(n_layers=2, local_layers=[2])


def test_learned_query_gain_scales_the_scores_and_starts_at_one():
    torch.manual_seed(0)
    m = TransformerLM(LMConfig(d_model=32, n_layers=1, n_heads=4, learn_scale=True)).double()
    layer = m.blocks[0].attn
    assert torch.equal(layer.log_gain, torch.zeros(4, dtype=torch.float64))
    x = torch.randn(1, 7, 32, dtype=torch.float64)
    plain = _layer(SATAAttention, (32, 4, 8, 4), n_taylor=3)
    gained = _layer(SATAAttention, (32, 4, 8, 4), n_taylor=3, learn_scale=True)
    with torch.no_grad():
        gained.log_gain.fill_(math.log(2.0))
    ref = SATAAttention(32, 4, 8, 4, n_taylor=3, scale=2.0 / math.sqrt(8)).double()
    ref.load_state_dict(plain.state_dict())
    torch.testing.assert_close(gained(x)[0], ref(x)[0], rtol=1e-10, atol=1e-12)
    assert layer.log_gain.dim() == 1                                   # a vector: not weight-decayed
