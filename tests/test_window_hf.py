"""The window mode through transformers: config.sata_window / sata_sinks / sata_taylor_mix / sata_recentre.

Tiny random models in float64: the "sata" attention equals the "sata_oracle" one (sata.naive_sata_attention with
the window arguments), with padding, with every cache; SATACache decoding equals one-pass prefill; its bytes stay
constant; the special cases (window covering everything, taylor_mix 0) equal softmax attention.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sata  # noqa: E402
import sata.integrations.hf as sata_hf  # noqa: E402
from test_hf import VOCAB, left_padded, positions, tiny_bert, tiny_llama, with_impl  # noqa: E402
from transformers import DynamicCache  # noqa: E402

HYBRIDS = [
    pytest.param(dict(sata_window=8, sata_sinks=2, sata_recentre=0.0), id="w8-s2-mean"),
    pytest.param(dict(sata_window=5, sata_sinks=3, sata_recentre=[0.0, 0.3, 0.6, 1.0],
                      sata_taylor_mix=[0.5, 1.0, 1.5, 2.0]), id="w5-s3-per-head"),
    pytest.param(dict(sata_window=6, sata_sinks=0), id="w6-plain-taylor"),
    pytest.param(dict(sata_window=0, sata_sinks=4, sata_recentre=0.5), id="sinks-only"),
]


def windowed(model, **fields):
    for name, value in fields.items():
        setattr(model.config, name, value)
    return model


def greedy_with_cache(model, ids, n, cache, mask=None):
    """Prefill, then one token per forward through ``cache``: the logits of every position after the prompt."""
    logits = []
    with torch.no_grad():
        out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True).logits
        step = out[:, -1]
        for _ in range(n):
            logits.append(step)
            ids = torch.cat([ids, step.argmax(-1, keepdim=True)], dim=-1)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
            step = model(ids[:, -1:], attention_mask=mask, past_key_values=cache, use_cache=True).logits[:, -1]
    return ids, torch.stack(logits, 1)


# --------------------------------------------------------------------------- the attention functions
@pytest.mark.parametrize("fields", HYBRIDS)
def test_llama_logits_match_oracle(fields):
    # 150 tokens cross the 64-token chunks; 40 tokens of left padding on one row (its own sinks)
    model = windowed(tiny_llama(), **fields)
    ids, mask = left_padded([150, 110])
    with torch.no_grad():
        got = with_impl(model, "sata")(ids, attention_mask=mask).logits
        ref = with_impl(model, sata_hf.ORACLE_NAME)(ids, attention_mask=mask).logits
        plain = with_impl(windowed(tiny_llama(), sata_window=0, sata_sinks=0), "sata")(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0], ref[0], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(got[1, 40:], ref[1, 40:], rtol=1e-9, atol=1e-10)   # padded queries: undefined
    assert (got - plain).abs().max() > 1e-3                                      # the window mode did something


def test_window_covering_everything_is_the_softmax_model():
    model = windowed(tiny_llama(), sata_window=64, sata_sinks=2, sata_recentre=0.5)
    ids, mask = left_padded([60, 45])
    pos = positions(mask)
    with torch.no_grad():
        got = model(ids, attention_mask=mask, position_ids=pos).logits
        want = with_impl(model, "sdpa")(ids, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(got[1, 15:], want[1, 15:], rtol=1e-9, atol=1e-10)


def test_taylor_mix_zero_is_a_sliding_window_with_sinks():
    # the softmax model under an explicit mask: the last 6 positions and the first 2 tokens
    model = windowed(tiny_llama(), sata_window=6, sata_sinks=2, sata_taylor_mix=0.0, sata_recentre=0.3)
    ids = torch.randint(1, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    i, j = torch.arange(40)[:, None], torch.arange(40)[None, :]
    keep = (j <= i) & ((i - j < 6) | (j < 2))
    with torch.no_grad():
        got = model(ids).logits
        want = with_impl(model, "sdpa")(ids, attention_mask=keep[None, None].expand(2, 1, 40, 40)).logits
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_bert_bidirectional_window_matches_oracle():
    model = windowed(tiny_bert(), sata_window=7, sata_sinks=2, sata_recentre=0.5)
    ids = torch.randint(1, VOCAB, (2, 90), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 70:] = 0
    with torch.no_grad():
        got = with_impl(model, "sata")(ids, attention_mask=mask).last_hidden_state
        ref = with_impl(model, sata_hf.ORACLE_NAME)(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)


# --------------------------------------------------------------------------- caches and generation
@pytest.mark.parametrize("fields", HYBRIDS[:2])
def test_sata_cache_decoding_equals_one_pass_prefill(fields):
    # prefill 37 tokens, then 24 tokens one at a time: the window (8) and the far state cross every step
    model = windowed(tiny_llama(), **fields)
    ids, _ = left_padded([37], seed=6)
    cache = sata_hf.SATACache(model.config)
    seq, stepped = greedy_with_cache(model, ids, 24, cache)
    with torch.no_grad():
        full = model(seq[:, :-1]).logits[:, 36:]                      # one forward over the whole sequence
    torch.testing.assert_close(stepped, full, rtol=1e-9, atol=1e-10)
    st = cache.states[0]
    assert (st.window, st.sinks, st.n_tokens) == (fields["sata_window"], fields["sata_sinks"], 37 + 24)


def test_every_cache_and_the_oracle_agree_in_generation():
    # left padding: each row's sinks are its own first tokens. SATACache keeps states; DynamicCache hands all
    # keys to the attention, which folds the earlier ones into a window-mode state; the oracle recomputes.
    model = windowed(tiny_llama(), sata_window=6, sata_sinks=2, sata_recentre=0.5)
    ids, mask = left_padded([30, 22], seed=7)
    seq, a = greedy_with_cache(model, ids, 16, sata_hf.SATACache(model.config), mask)
    seq_b, b = greedy_with_cache(model, ids, 16, DynamicCache(config=model.config), mask)
    with_impl(model, sata_hf.ORACLE_NAME)
    seq_c, c = greedy_with_cache(model, ids, 16, DynamicCache(config=model.config), mask)
    assert torch.equal(seq, seq_b) and torch.equal(seq, seq_c)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-10)


def test_generate_beam_search_and_static_cache():
    # beam search reorders the states' window and sink buffers along with the Taylor state
    model = windowed(tiny_llama(), sata_window=5, sata_sinks=2, sata_recentre=0.0)
    ids, mask = left_padded([20, 14], seed=5)
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        beams = [model.generate(ids, past_key_values=sata_hf.SATACache(model.config), num_beams=3, **kw),
                 model.generate(ids, num_beams=3, **kw)]
        greedy = [model.generate(ids, past_key_values=sata_hf.SATACache(model.config), **kw),
                  model.generate(ids, cache_implementation="static", **kw)]
    assert torch.equal(*beams)
    assert torch.equal(*greedy)


def test_cache_bytes_constant_over_many_decode_steps():
    W, S = 16, 4
    model = windowed(tiny_llama(), sata_window=W, sata_sinks=S, sata_recentre=0.5)
    ids, _ = left_padded([10], seed=8)
    cache = sata_hf.SATACache(model.config)
    sizes = []
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        for t in range(64):        # the 16-slot ring wraps 4 times
            sizes.append(cache.nbytes)
            model(torch.tensor([[1 + t % (VOCAB - 1)]]), past_key_values=cache, use_cache=True)
    # per layer: Taylor state and window/sink keys and values (float64), a flag per window slot, a position per sink
    # two kv heads: states and buffers (float64), a flag per window slot, a position per sink, the key centre
    per_layer = 2 * sata.state_size(8, 8, 3, window=W, sinks=S) * 8 + W * 1 + S * 8 + 2 * 8 * 8
    assert set(sizes) == {cache.nbytes} == {2 * per_layer}
    assert cache.states[0].n_tokens == 74
    assert sata_hf.check_model_budget(model.config, 1, 3, torch.float64) == 2 * 2 * sata.state_size(8, 8, 3, window=W, sinks=S) * 8


# --------------------------------------------------------------------------- configuration
def test_window_args_from_config():
    model = tiny_llama()
    assert sata_hf.window_args(model.config, 3, 4) == {}
    model.config.sata_taylor_mix = 0.5                      # alone it cancels in the normaliser: the plain op
    assert sata_hf.window_args(model.config, 3, 4) == {}
    windowed(model, sata_window=8, sata_recentre=[0.0, 0.1, 0.2, 0.3])
    args = sata_hf.window_args(model.config, 3, 4)
    assert args["window"] == 8 and args["sinks"] == 0 and args["taylor_mix"] == 0.5
    assert torch.equal(args["recentre"], torch.tensor([0.0, 0.1, 0.2, 0.3], dtype=torch.float64))


@pytest.mark.parametrize(
    "fields, error, match",
    [
        (dict(sata_window=-2), ValueError, r"config\.sata_window .*window must be a non-negative int"),
        (dict(sata_window=4, sata_taylor_mix=-1.0), ValueError, "taylor_mix must be >= 0"),
        (dict(sata_window=4, sata_taylor_mix=[1.0, 2.0]), ValueError, r"shape \[4\]"),
        (dict(sata_recentre=0.5, sata_n_taylor=2), ValueError, "needs n_taylor >= 3"),
        (dict(sata_sinks=2, sata_taylor_mix=float("inf")), ValueError, "taylor_mix must be a finite float"),
        (dict(sata_sinks="4"), ValueError, r"config\.sata_window .*sinks must be a non-negative int"),
    ],
    ids=["negative-window", "negative-mix", "mix-wrong-heads", "alpha-P2", "inf-mix", "sinks-str"],
)
def test_bad_config_names_the_field(fields, error, match):
    model = windowed(tiny_llama(), **fields)
    with pytest.raises(error, match=match), torch.no_grad():
        model(torch.randint(1, VOCAB, (1, 5)))
    with pytest.raises(error, match=match):                           # the cache's budget check reads them first
        sata_hf.SATACache(model.config)


def test_a_deepcopy_of_the_cache_is_a_snapshot():
    """The SATACache docstring's snapshot: continuing the copy and the original gives the same tokens as one run
    (the copy's states once shared the original's window buffers through the kernel's cached pointers)."""
    import copy

    model = windowed(tiny_llama(), sata_window=6, sata_sinks=2)
    ids = torch.randint(3, VOCAB, (1, 20))
    g = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, past_key_values=sata_hf.SATACache(model.config), max_new_tokens=12, **g)
        cache = sata_hf.SATACache(model.config)
        out = model.generate(ids, past_key_values=cache, max_new_tokens=4, **g)
        snapshot = copy.deepcopy(cache)
        a = model.generate(out, past_key_values=cache, max_new_tokens=8, **g)
        b = model.generate(out, past_key_values=snapshot, max_new_tokens=8, **g)
    assert torch.equal(a, ref) and torch.equal(b, ref)


def test_a_refused_call_leaves_the_cache_usable():
    """A bad request (here another batch size) is refused before the states change; the cache then continues as if
    it had not happened (it counted the refused keys and then refused every later call)."""
    model = windowed(tiny_llama(), sata_window=4, sata_sinks=2, sata_recentre=0.0)
    ids = torch.randint(1, VOCAB, (1, 13))
    cache = sata_hf.SATACache(model.config)
    with torch.no_grad():
        model(ids[:, :12], past_key_values=cache)
        with pytest.raises(ValueError, match="another configuration"):
            model(torch.randint(1, VOCAB, (2, 1)), past_key_values=cache)
        assert cache.get_seq_length() == 12
        step = model(ids[:, 12:], past_key_values=cache).logits
        fresh = sata_hf.SATACache(model.config)
        model(ids[:, :12], past_key_values=fresh)
        torch.testing.assert_close(step, model(ids[:, 12:], past_key_values=fresh).logits, rtol=0, atol=0)


def test_dense_tensor_mask_is_refused_in_window_mode():
    model = windowed(tiny_llama(), sata_window=4)
    keep = torch.ones(10, 10, dtype=torch.bool).tril()[None, None]
    for impl in ("sata", sata_hf.ORACLE_NAME):
        with pytest.raises(NotImplementedError, match="2D padding mask"), torch.no_grad():
            with_impl(model, impl)(torch.randint(1, VOCAB, (1, 10)), attention_mask=keep)
