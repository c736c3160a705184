"""transformers integration: attn_implementation="sata", SATACache generation, the memory guard.

Every model here is a tiny random one in float64, where SATA attention must equal the eager
oracle (``T_P`` applied to the score matrix) to rounding error.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sata  # noqa: E402
import sata.integrations.hf as sata_hf  # noqa: E402
from transformers import BertConfig, BertModel, DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

VOCAB = 97
PAD = 0


def tiny_llama(n_taylor: int | None = None, impl: str = "sata", **overrides) -> LlamaForCausalLM:
    """2 layers, GQA (4 query heads on 2 key/value heads), head size 8, rotary; float64."""
    torch.manual_seed(0)
    kw = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=PAD, bos_token_id=1, eos_token_id=None,
        attn_implementation=impl, initializer_range=0.15,   # scores of order 1, where the terms matter
    )
    kw.update(overrides)
    cfg = LlamaConfig(**kw)
    if n_taylor is not None:
        cfg.sata_n_taylor = n_taylor
    return LlamaForCausalLM(cfg).double().eval()


def tiny_bert(impl: str = "sata") -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=512, pad_token_id=PAD, attn_implementation=impl, initializer_range=0.15,
    )
    return BertModel(cfg).double().eval()


def left_padded(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.full((len(lengths), L), PAD)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, L - n :] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[i, L - n :] = 1
    return ids, mask


def with_impl(model, impl: str):
    model.set_attn_implementation(impl)
    return model


# --------------------------------------------------------------------------- exactness of the forward
@pytest.mark.parametrize("n_taylor", [2, 3, 4], ids=lambda p: f"P{p}")
def test_llama_logits_match_oracle(n_taylor):
    # 150 tokens cross the 64-token chunks, so the state path (phi(Q) S) is exercised, not only the
    # intra-chunk polynomial; left padding of 40 tokens on one row
    model = tiny_llama(n_taylor)
    ids, mask = left_padded([150, 110])
    with torch.no_grad():
        got = with_impl(model, "sata")(ids, attention_mask=mask).logits
        ref = with_impl(model, sata_hf.ORACLE_NAME)(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows, as generate() makes them (rotary angles are float32: positions must match)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def test_llama_padding_is_not_dropped():
    # the same prompt alone and left-padded in a batch: identical logits on its tokens
    model = tiny_llama()
    ids, mask = left_padded([150, 110])
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, position_ids=positions(mask)).logits
        alone = model(ids[1:, 40:]).logits
        unmasked = model(ids[1:], position_ids=positions(mask[1:])).logits
    torch.testing.assert_close(batch[1, 40:], alone[0], rtol=1e-9, atol=1e-10)
    assert (unmasked[0, 40:] - alone[0]).abs().max() > 1e-3  # the padding does matter when not masked


@pytest.mark.parametrize("n_taylor", [3, 4], ids=lambda p: f"P{p}")
def test_bert_matches_oracle_with_padding(n_taylor):
    model = tiny_bert()
    model.config.sata_n_taylor = n_taylor
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, VOCAB, (2, 100), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 70:] = 0                                      # right padding on the second row
    with torch.no_grad():
        got = with_impl(model, "sata")(ids, attention_mask=mask).last_hidden_state
        ref = with_impl(model, sata_hf.ORACLE_NAME)(ids, attention_mask=mask).last_hidden_state
        ids2 = ids.clone()
        ids2[1, 70:] = torch.randint(1, VOCAB, (30,), generator=g)   # other tokens under the padding
        other = with_impl(model, "sata")(ids2, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(other[1, :70], got[1, :70], rtol=1e-9, atol=1e-10)


def test_n_taylor_from_config_and_register():
    model = tiny_llama()
    ids, _ = left_padded([20])
    with torch.no_grad():
        p3 = model(ids).logits
        model.config.sata_n_taylor = 2
        p2 = model(ids).logits
        del model.config.sata_n_taylor
        name = sata_hf.register(2, name="sata_p2_test")
        model.set_attn_implementation(name)
        r2 = model(ids).logits
    assert (p3 - p2).abs().max() > 1e-3
    torch.testing.assert_close(r2, p2, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- generation
def greedy_by_recomputation(model, ids: torch.Tensor, n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decoding with no cache at all: the whole sequence recomputed for every token."""
    logits = []
    with torch.no_grad():
        for _ in range(n):
            step = model(ids, use_cache=False).logits[:, -1]
            logits.append(step)
            ids = torch.cat([ids, step.argmax(-1, keepdim=True)], dim=-1)
    return ids, logits


def greedy_with_cache(model, ids: torch.Tensor, n: int, cache) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Prefill, then one token per forward through ``cache``; float64 logits of every step (generate's are float32)."""
    logits = []
    with torch.no_grad():
        step = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
        for _ in range(n):
            logits.append(step)
            ids = torch.cat([ids, step.argmax(-1, keepdim=True)], dim=-1)
            step = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
    return ids, logits


def test_generate_with_sata_cache_equals_recomputation_and_oracle():
    model = tiny_llama()
    ids, _ = left_padded([90])                 # the prefill crosses a chunk boundary
    n = 24
    with torch.no_grad():
        generated = model.generate(ids, past_key_values=sata_hf.SATACache(model.config), max_new_tokens=n,
                                   do_sample=False)
    stepped, logits = greedy_with_cache(model, ids, n, sata_hf.SATACache(model.config))
    want, want_logits = greedy_by_recomputation(model, ids, n)
    assert torch.equal(generated, want)
    assert torch.equal(stepped, want)
    with_impl(model, sata_hf.ORACLE_NAME)
    _, oracle_logits = greedy_by_recomputation(model, ids, n)
    for step, (got, a, b) in enumerate(zip(logits, want_logits, oracle_logits)):
        torch.testing.assert_close(got, a, rtol=1e-9, atol=1e-10, msg=f"step {step} vs recomputation")
        torch.testing.assert_close(got, b, rtol=1e-9, atol=1e-10, msg=f"step {step} vs oracle")


def test_standard_kv_cache_path_equals_sata_cache():
    model = tiny_llama()
    ids, mask = left_padded([70, 45])
    with torch.no_grad():
        a = model.generate(ids, attention_mask=mask, past_key_values=sata_hf.SATACache(model.config),
                           max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True)
        b = model.generate(ids, attention_mask=mask, past_key_values=DynamicCache(config=model.config),
                           max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True)
        c = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, cache_implementation="static")
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.sequences, c)
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10)


def test_sampling_with_sata_cache_matches_kv_cache():
    model = tiny_llama()
    ids, _ = left_padded([30, 30], seed=3)
    outs = []
    for cache in (sata_hf.SATACache(model.config), DynamicCache(config=model.config)):
        torch.manual_seed(123)
        with torch.no_grad():
            outs.append(model.generate(ids, past_key_values=cache, max_new_tokens=20, do_sample=True, top_k=0,
                                       temperature=1.0))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0][0, 30:], outs[0][1, 30:])   # sampling did something


def test_left_padded_batch_equals_single_prompts():
    model = tiny_llama()
    lengths = [75, 40, 12]
    ids, mask = left_padded(lengths, seed=4)
    L, n = ids.shape[1], 20
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, past_key_values=sata_hf.SATACache(model.config),
                               max_new_tokens=n, do_sample=False)
        for i, length in enumerate(lengths):
            alone = model.generate(ids[i : i + 1, L - length :], past_key_values=sata_hf.SATACache(model.config),
                                   max_new_tokens=n, do_sample=False)
            assert torch.equal(batch[i, L:], alone[0, length:]), f"prompt {i} (length {length})"


def test_beam_search_with_sata_cache():
    model = tiny_llama()
    ids, mask = left_padded([20, 14], seed=5)
    with torch.no_grad():
        a = model.generate(ids, attention_mask=mask, past_key_values=sata_hf.SATACache(model.config),
                           max_new_tokens=8, num_beams=3, do_sample=False)
        b = model.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False)
    assert torch.equal(a, b)


# --------------------------------------------------------------------------- memory
class _Recorder(transformers.LogitsProcessor):
    def __init__(self, cache):
        self.cache, self.sizes = cache, []

    def __call__(self, input_ids, scores):
        self.sizes.append(self.cache.nbytes if hasattr(self.cache, "nbytes") else
                          sum(l.keys.nbytes + l.values.nbytes for l in self.cache.layers))
        return scores


def test_cache_memory_constant_over_2000_tokens():
    model = tiny_llama(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1,
                       intermediate_size=16).float()
    ids, _ = left_padded([8])
    cache = sata_hf.SATACache(model.config)
    rec = _Recorder(cache)
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=2000, min_new_tokens=2000, do_sample=False,
                             logits_processor=transformers.LogitsProcessorList([rec]))
    assert out.shape[1] == 8 + 2000 and len(rec.sizes) == 2000
    state = cache.states[0]
    assert state.n_tokens == 8 + 1999                         # the last token is emitted, never fed back
    assert set(rec.sizes) == {rec.sizes[0]}                   # bytes after prefill == bytes after 2,000 tokens
    assert rec.sizes[0] == cache.nbytes == sata.state_size(8, 8, 3) * 1 * 4
    # contrast: a KV cache grows by one key and value per layer and token
    kv = DynamicCache(config=model.config)
    rec_kv = _Recorder(kv)
    with torch.no_grad():
        model.generate(ids, past_key_values=kv, max_new_tokens=50, min_new_tokens=50, do_sample=False,
                       logits_processor=transformers.LogitsProcessorList([rec_kv]))
    growth = [b - a for a, b in zip(rec_kv.sizes, rec_kv.sizes[1:])]
    assert set(growth) == {2 * 8 * 4}                         # K and V, 1 head x 8 floats, per token


def test_memory_guard_checks_the_whole_model():
    # head size 64 with n_taylor=5: D = 814,385 features, 212 MB of state per key/value head and layer.
    # One call fits a 512 MiB budget, four layers of states do not.
    model = tiny_llama(5, hidden_size=64, num_attention_heads=1, num_key_value_heads=1, num_hidden_layers=4,
                       intermediate_size=8).float()
    ids = torch.randint(1, VOCAB, (1, 4))
    with sata.memory_budget("512M"):
        q = torch.zeros(1, 1, 1, 64)
        sata.sata_attention(q, q, q, n_taylor=5)              # one call: within budget
        with pytest.raises(sata.MemoryBudgetError, match=r"n_taylor=5.*4 layers.*n_taylor<=4 fits"):
            model(ids)
        with pytest.raises(sata.MemoryBudgetError, match="4 layers"):
            sata_hf.SATACache(model.config)


# --------------------------------------------------------------------------- refusals
def test_sata_cache_refuses_other_attention():
    model = tiny_llama(impl="sdpa")
    with pytest.raises(ValueError, match="set_attn_implementation"):
        sata_hf.SATACache(model.config)
    cache = sata_hf.SATACache()                               # no config: caught at the second step
    ids, _ = left_padded([5])
    with pytest.raises(RuntimeError, match="attn_implementation='sata'"), torch.no_grad():
        model.generate(ids, past_key_values=cache, max_new_tokens=3, do_sample=False)


def test_unsupported_mask_pattern_raises():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=8, attn_implementation="sata")
    model = MistralForCausalLM(cfg).eval()
    with pytest.raises(NotImplementedError, match="sliding window"), torch.no_grad():
        model(torch.randint(1, VOCAB, (1, 12)))
