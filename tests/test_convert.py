"""The conversion pipeline of issue 17: the adapted hybrid against the oracle, its decode state, its home in
a HF model and checkpoint, the corpus split, and `sata convert --quick` end to end."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")

import sata  # noqa: E402
import sata.integrations.hf as sata_hf  # noqa: E402
from sata.integrations import adapted, convert_cli, corpus, hybrid_convert  # noqa: E402
from sata import _kernels  # noqa: E402
from conftest import needs_kernels  # noqa: E402

KW = dict(n_taylor=3, window=16, sinks=3)


def _qkv(B=2, Hq=4, Hkv=2, L=200, E=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (1.5 * torch.randn(B, H, L, E, generator=g, dtype=torch.float64) for H in (Hq, Hkv))
    v = torch.randn(B, Hkv, L, E, generator=g, dtype=torch.float64)
    return q, k, v


def _adapter(Hq=4, Hkv=2, E=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    ad = adapted.QKAdapter(Hq, Hkv, E).double()
    with torch.no_grad():
        ad.q_map.add_(0.3 * torch.randn(ad.q_map.shape, generator=g, dtype=torch.float64))
        ad.k_map.add_(0.3 * torch.randn(ad.k_map.shape, generator=g, dtype=torch.float64))
        ad.alpha.copy_(torch.rand(Hq, generator=g, dtype=torch.float64))
        ad.log_beta.copy_(torch.randn(Hq, generator=g, dtype=torch.float64) * 0.5)
    return ad


def test_identity_maps_are_the_window_mode_forward_and_backward():
    """With q' = q, k' = k the adapted hybrid is sata's window mode: the O(n^2) oracle, values and gradients."""
    q, k, v = (x.requires_grad_() for x in _qkv())
    alpha = torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=torch.float64, requires_grad=True)
    beta = torch.tensor([0.2, 1.0, 1.5, 3.0], dtype=torch.float64, requires_grad=True)
    y = adapted.adapted_attention(q, k, v, q, k, scale=0.4, alpha=alpha, beta=beta, **KW)
    ref = sata.naive_sata_attention(q, k, v, is_causal=True, enable_gqa=True, scale=0.4, taylor_mix=beta,
                                    recentre=alpha, **KW)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    w = torch.randn_like(y)
    got = torch.autograd.grad((y * w).sum(), (q, k, v, alpha, beta))
    want = torch.autograd.grad((ref * w).sum(), (q, k, v, alpha, beta))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_maps_change_only_the_far_part():
    """Within the window (no far keys yet) the maps do nothing; beyond it they do."""
    q, k, v = _qkv(L=64)
    ad = _adapter()
    y = adapted.adapted_attention(q, k, v, ad.map_q(q), ad.map_k(k), scale=0.4, alpha=ad.alpha, beta=ad.beta, **KW)
    plain = adapted.adapted_attention(q, k, v, q, k, scale=0.4, alpha=ad.alpha, beta=ad.beta, **KW)
    first_far = KW["window"] + KW["sinks"]                           # query W + S - 1 has none yet
    torch.testing.assert_close(y[:, :, :first_far], plain[:, :, :first_far], rtol=1e-12, atol=1e-12)
    assert (y[:, :, first_far:] - plain[:, :, first_far:]).abs().max() > 1e-3


def _decode(state, q, k, v, ad, start: int, switch: int, inplace: bool, kw):
    """Tokens ``start ..`` of ``q, k, v`` one by one from ``state``: through the fused decode kernel while it is a
    ``SATAState`` (converted to an ``AdaptedState`` at token ``switch``), else the PyTorch step. Outputs, bytes."""
    outs, sizes = [], []
    for t in range(start, q.shape[2]):
        q1, k1, v1 = q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1]
        if isinstance(state, sata.SATAState) and t == switch:
            state = adapted.to_adapted_state(state)
        if isinstance(state, sata.SATAState):
            step = adapted.kernel_decode_step(state, q1, k1, v1, ad, **kw)
            assert step is not None, "the fused decode kernel did not serve the step"
            y, state = step
        else:
            y, state = adapted.decode_step(state, q1, k1, v1, ad, inplace=inplace, **kw)
        outs.append(y)
        sizes.append(state.nbytes)
    return outs, sizes


@needs_kernels
def test_kernel_decode_follows_alpha_and_beta_changed_in_place():
    """The fused decode step keeps the adapter's validated settings between tokens; changing alpha or beta in place
    (a training step, a loaded checkpoint) is seen at the next token: outputs equal the PyTorch step's."""
    q, k, v = _qkv()
    ad = _adapter()
    kw = dict(scale=0.4, **KW)
    with torch.no_grad():
        head = [t[:, :, :40] for t in (q, k, v)]
        _, state = adapted.prefill(*head, ad.map_q(head[0]), ad.map_k(head[1]), alpha=ad.alpha, beta=ad.beta,
                                   kernel_state=True, **kw)
        for t, change in zip(range(40, 46), [None, "beta", None, "alpha", "both", None]):
            if change in ("beta", "both"):
                ad.log_beta.add_(0.5)
            if change in ("alpha", "both"):
                ad.alpha.mul_(-1.0).add_(0.25)
            q1, k1, v1 = q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1]
            want, _ = adapted.decode_step(adapted.to_adapted_state(state), q1, k1, v1, ad, **kw)
            got, state = adapted.kernel_decode_step(state, q1, k1, v1, ad, **kw)
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=f"token {t} after changing {change}")


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_inputs_continue_a_kernel_state_through_the_pytorch_step(dtype):
    """A half-precision stream decoded by the fused kernel keeps its ring in float32; continued through the PyTorch
    step (autograd, after ``to_adapted_state``) it computes in float32 as the kernel does: the same outputs within
    one rounding of the half output (it raised a dtype error)."""
    q, k, v = (t.to(dtype) for t in _qkv())
    ad = _adapter().float()
    kw = dict(scale=0.4, **KW)
    with torch.no_grad():
        head = [t[:, :, :40] for t in (q, k, v)]
        _, state = adapted.prefill(*head, ad.map_q(head[0]), ad.map_k(head[1]), alpha=ad.alpha, beta=ad.beta,
                                   kernel_state=True, **kw)
        for t in range(40, 44):
            q1, k1, v1 = q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1]
            want, _ = adapted.decode_step(adapted.to_adapted_state(state), q1, k1, v1, ad, **kw)
            got, state = adapted.kernel_decode_step(state, q1, k1, v1, ad, **kw)
            assert want.dtype == got.dtype == dtype
            torch.testing.assert_close(want.float(), got.float(), rtol=2 * torch.finfo(dtype).eps, atol=1e-3,
                                       msg=f"token {t}")


@pytest.mark.parametrize("start", ["start_state", "prefill", "prefill-inplace",
                                   *(pytest.param(m, marks=needs_kernels) for m in ("kernel", "kernel-then-torch"))])
@pytest.mark.parametrize("prefill", [1, 3, 40, 120])
def test_decode_state_matches_the_quadratic_form(prefill, start):
    """Decoding from the state of a prefill (built alone, or by the chunked form of the prefill's output), into new
    states or in place, or through the fused decode kernel (and from its state, converted, through PyTorch), gives
    the quadratic form's outputs; a step that is not in place leaves its state as it was."""
    q, k, v = _qkv()
    ad = _adapter()
    kw = dict(scale=0.4, **KW)
    with torch.no_grad():
        full = adapted.quadratic_attention(q, k, v, ad.map_q(q), ad.map_k(k), alpha=ad.alpha, beta=ad.beta, **kw)
        head = [t[:, :, :prefill] for t in (q, k, v)]
        if start.startswith("prefill") or start.startswith("kernel"):
            y0, state = adapted.prefill(*head, ad.map_q(head[0]), ad.map_k(head[1]), alpha=ad.alpha, beta=ad.beta,
                                        kernel_state=start.startswith("kernel"), **kw)
            torch.testing.assert_close(y0, full[:, :, :prefill], rtol=1e-10, atol=1e-12)
        else:
            state = adapted.start_state(head[1], head[2], ad.map_k(head[1]), **kw)
        first = state
        first_far = state.far.clone() if isinstance(state, adapted.AdaptedState) else None
        switch = (prefill + q.shape[2]) // 2 if start == "kernel-then-torch" else q.shape[2]
        outs, sizes = _decode(state, q, k, v, ad, prefill, switch, start.endswith("inplace"), kw)
        if first_far is not None and not start.endswith("inplace"):
            assert torch.equal(first.far, first_far)                           # the passed state is kept
        offset = adapted.adapted_attention(q[:, :, prefill:], k, v, ad.map_q(q[:, :, prefill:]), ad.map_k(k),
                                           alpha=ad.alpha, beta=ad.beta, q_offset=prefill, **kw)
    torch.testing.assert_close(torch.cat(outs, 2), full[:, :, prefill:], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(offset, full[:, :, prefill:], rtol=1e-12, atol=1e-12)
    steady = max(KW["window"] + KW["sinks"], switch - prefill if switch < q.shape[2] else 0)
    assert len(set(sizes[steady:])) == 1                 # constant once window and sinks fill (and in one state type)


@needs_kernels
@pytest.mark.parametrize("window, sinks", [(0, 3), (5, 0), (1, 1)], ids=["sinks-only", "window-only", "W1-S1"])
@pytest.mark.parametrize("prefill", [1, 7])
def test_kernel_decode_edge_cases(window, sinks, prefill):
    """Kernel decoding (then PyTorch after converting the state) without a window, without sinks, and with a
    window of one, against the quadratic form in float64."""
    q, k, v = _qkv(L=40)
    ad = _adapter()
    kw = dict(scale=0.4, n_taylor=3, window=window, sinks=sinks)
    with torch.no_grad():
        full = adapted.quadratic_attention(q, k, v, ad.map_q(q), ad.map_k(k), alpha=ad.alpha, beta=ad.beta, **kw)
        head = [t[:, :, :prefill] for t in (q, k, v)]
        _, state = adapted.prefill(*head, ad.map_q(head[0]), ad.map_k(head[1]), alpha=ad.alpha, beta=ad.beta,
                                   kernel_state=True, **kw)
        outs, _ = _decode(state, q, k, v, ad, prefill, 30, False, kw)
    torch.testing.assert_close(torch.cat(outs, 2), full[:, :, prefill:], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("L, window, sinks", [
    pytest.param(200, 16, 3, id="L200-W16-S3"),
    pytest.param(130, 0, 2, id="L130-sinks-only"),
    pytest.param(70, 64, 0, id="L70-window-only"),
    pytest.param(5, 16, 3, id="L5-shorter-than-window"),
])
def test_chunked_form_is_the_quadratic_form_forward_and_backward(L, window, sinks, monkeypatch):
    """The linear-time form of a whole sequence (taken from CHUNKED_FROM tokens on) equals the quadratic oracle
    to 1e-10 in float64, outputs and the gradients of q, k, v, both maps, alpha and beta."""
    q, k, v = (x.requires_grad_() for x in _qkv(L=L))
    ad = _adapter()
    kw = dict(scale=0.4, n_taylor=3, window=window, sinks=sinks)
    params = (q, k, v, ad.q_map, ad.k_map, ad.alpha, ad.log_beta)
    ys = []
    for start in (10**9, 1):  # quadratic, then chunked
        monkeypatch.setattr(adapted, "CHUNKED_FROM", start)
        ys.append(adapted.adapted_attention(q, k, v, ad.map_q(q), ad.map_k(k), alpha=ad.alpha, beta=ad.beta, **kw))
    torch.testing.assert_close(ys[1], ys[0], rtol=1e-10, atol=1e-12)
    w = torch.randn_like(ys[0])
    want, got = (torch.autograd.grad((y * w).sum(), params) for y in ys)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@needs_kernels
@pytest.mark.parametrize("B, Hq, Hkv, L, E, window, sinks", [
    pytest.param(2, 4, 2, 200, 8, 16, 3, id="gqa-W16-S3"),
    pytest.param(1, 3, 3, 150, 16, 64, 0, id="E16-window-only"),
    pytest.param(1, 2, 1, 97, 8, 0, 2, id="sinks-only"),
])
def test_chunked_form_through_the_prefill_kernel(B, Hq, Hkv, L, E, window, sinks, monkeypatch):
    """Without autograd the chunked form runs the fused prefill kernel with the far part's own queries and keys:
    the quadratic form's outputs and the PyTorch path's far state, to 1e-10 in float64."""
    q, k, v = _qkv(B=B, Hq=Hq, Hkv=Hkv, L=L, E=E)
    ad = _adapter(Hq=Hq, Hkv=Hkv, E=E)
    kw = dict(scale=0.4, n_taylor=3, window=window, sinks=sinks, alpha=ad.alpha, beta=ad.beta)
    calls = []
    real = _kernels.WindowPrefillPlan.__call__
    monkeypatch.setattr(_kernels.WindowPrefillPlan, "__call__", lambda self, *a, **k_: calls.append(1) or real(self, *a, **k_))
    with torch.no_grad():
        qa, ka = ad.map_q(q), ad.map_k(k)
        want = adapted.quadratic_attention(q, k, v, qa, ka, **kw)
        y, far, _ = adapted._chunked(q, k, v, qa, ka, return_far=True, **kw)
        assert calls, "the fused prefill kernel was not used"
        _, far_torch, _ = adapted._chunked(q, k, v, qa, ka, return_far=True, kernels=False, **kw)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(far, far_torch, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- in a HF model
def _tiny_hybrid(dtype=torch.float64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.6)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    hc = hybrid_convert.HybridConfig(window=6, sinks=2, recentre=0.5, taylor_mix=0.8)
    hybrid_convert.configure(model, hc)
    for i, layer in enumerate(model.model.layers):
        with torch.no_grad():
            layer.self_attn.sata_adapter.q_map.add_(0.2 * torch.randn_like(layer.self_attn.sata_adapter.q_map))
    model.to(dtype)
    model.set_attn_implementation("sata")
    return model


def test_hybrid_model_generates_with_sata_cache_like_recomputation():
    from transformers import DynamicCache

    model = _tiny_hybrid()
    ids = torch.randint(1, 97, (1, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = sata_hf.SATACache(model.config)
        a = model.generate(ids, past_key_values=cache, max_new_tokens=20, do_sample=False)
        b = model.generate(ids, past_key_values=DynamicCache(config=model.config), max_new_tokens=20, do_sample=False)
        full = model(a, use_cache=False).logits                                    # no cache: the quadratic form
        c2 = sata_hf.SATACache(model.config)
        step = [model(a[:, :30], past_key_values=c2).logits[:, -1]]
        sizes = []
        for t in range(30, a.shape[1] - 1):
            step.append(model(a[:, t:t + 1], past_key_values=c2).logits[:, -1])
            sizes.append(c2.nbytes)
    assert torch.equal(a, b)
    torch.testing.assert_close(torch.stack(step, 1), full[:, 29:-1], rtol=1e-9, atol=1e-10)
    assert len(set(sizes)) == 1


def test_hybrid_checkpoint_roundtrip(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _tiny_hybrid(torch.float32)
    ids = torch.randint(1, 97, (1, 40), generator=torch.Generator().manual_seed(4))
    hybrid_convert.add_lora(model, rank=2)
    with torch.no_grad():
        for a in hybrid_convert._attention_modules(model):
            a.q_proj.parametrizations.weight[0].B.normal_()
        before = model(ids).logits
        hybrid_convert.save(model, None, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["sata_qk_adapter"] and cfg["sata_window"] == 6 and cfg["sata_sinks"] == 2
    assert len(cfg["sata_layer_recentre"]) == 2 and len(cfg["sata_layer_taylor_mix"][0]) == 4
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sata").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, before, rtol=1e-5, atol=1e-5)
        # saved again once its adapters are attached (submodules): they go into model.safetensors, and load
        loaded.save_pretrained(tmp_path / "again")
        resaved = AutoModelForCausalLM.from_pretrained(tmp_path / "again", attn_implementation="sata").eval()
        torch.testing.assert_close(resaved(ids).logits, before, rtol=1e-5, atol=1e-5)
        # maps changed after loading, saved beside a stale adapter file: the saved model's own maps win
        loaded.model.layers[0].self_attn.sata_adapter.q_map.add_(0.25)
        changed_logits = loaded(ids).logits
        loaded.save_pretrained(tmp_path / "tuned")
        shutil.copy(tmp_path / adapted.ADAPTER_FILE, tmp_path / "tuned" / adapted.ADAPTER_FILE)
        tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned", attn_implementation="sata").eval()
        torch.testing.assert_close(tuned(ids).logits, changed_logits, rtol=1e-5, atol=1e-5)
    # a rewritten adapter file is read again by a later load in the same process (it was cached by path)
    from safetensors.torch import load_file, save_file
    maps = load_file(tmp_path / adapted.ADAPTER_FILE)
    save_file({k: t + 0.5 * (k == "0.q_map") for k, t in maps.items()}, tmp_path / adapted.ADAPTER_FILE)
    changed = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sata").eval()
    with torch.no_grad():
        assert (changed(ids).logits - before).abs().max() > 1e-2
    torch.testing.assert_close(changed.model.layers[0].self_attn.sata_adapter.q_map, maps["0.q_map"] + 0.5)
    (tmp_path / adapted.ADAPTER_FILE).unlink()
    again = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sata").eval()
    with pytest.raises(FileNotFoundError, match="sata_adapters.safetensors"):
        again(ids)


def test_lora_fold_is_exact():
    model = _tiny_hybrid()
    hybrid_convert.add_lora(model, rank=3)
    ids = torch.randint(1, 97, (1, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for a in hybrid_convert._attention_modules(model):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(a, name).parametrizations.weight[0].B.normal_(std=0.1)
        before = model(ids).logits
        hybrid_convert.fold_lora(model)
        after = model(ids).logits
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in model.modules())
    torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- data and the tool
def test_corpus_split_by_document_is_deterministic_and_long_enough():
    docs = corpus.documents()
    held = [n for n in docs if corpus._is_heldout(n)]
    assert 0.1 < len(held) / len(docs) < 0.3
    train, heldout = corpus.split_text("train"), corpus.split_text("heldout")
    assert heldout == corpus.split_text("heldout")
    assert not set(train.split("\n\n")) & set(heldout.split("\n\n"))
    assert len(heldout) > 150_000 and len(train) > 600_000                    # > 10 windows of 4,096 tokens held out
    with pytest.raises(ValueError, match="split must be"):
        corpus.split_text("eval")


def _args(tmp_path, *extra):
    """The arguments as `sata convert` parses them (the CLI adds its own entries, which must not break the run)."""
    from sata.cli import build_parser

    return build_parser().parse_args(["convert", "--quick", "--out", str(tmp_path), *extra])


def test_convert_quick_end_to_end_and_reload(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from sata.integrations import convert, evaluation

    assert convert_cli.main(_args(tmp_path)) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["rows"]) == {"original", "plain_sata", "hybrid", "window_only"}
    assert (tmp_path / "report.md").exists() and (tmp_path / "ppl_by_position.png").stat().st_size > 1000
    _, tok, _ = convert_cli._tiny()
    held = convert.token_windows(tok, corpus.split_text("heldout"), 192, 2)
    for kind in ("hybrid", "window_only"):
        row = results["rows"][kind]
        assert row["cache_bytes"][0] == row["cache_bytes"][1] > 0
        model = AutoModelForCausalLM.from_pretrained(tmp_path / kind.replace("_", "-"), attn_implementation="sata")
        again = evaluation.perplexity_by_position(model.eval(), held)["ppl"]
        assert again == pytest.approx(row["ppl"]["192"]["ppl"], rel=1e-5), kind
    # a second run resumes from the checkpoints: nothing retrained, the same numbers
    capsys.readouterr()
    assert convert_cli.main(_args(tmp_path)) == 0
    assert "loading the converted model" in capsys.readouterr().out
    rerun = json.loads((tmp_path / "results.json").read_text())
    for kind in results["rows"]:
        assert rerun["rows"][kind]["ppl"] == results["rows"][kind]["ppl"]


@pytest.mark.parametrize("extra, match", [
    pytest.param(("--window", "200"), "--window is now", id="window-over-context"),
    pytest.param(("--n-taylor", "2"), "n_taylor >= 3", id="n-taylor-2"),
    pytest.param(("--taylor-mix", "0"), "--baseline window-only", id="taylor-mix-0"),
    pytest.param(("--window", "0", "--sinks", "0"), "no exact keys", id="no-exact-keys"),
    pytest.param(("--window", "-1"), "--window must be >= 0", id="negative-window"),
    pytest.param(("--sinks", "-3"), "--sinks must be >= 0", id="negative-sinks"),
    pytest.param(("--lora-rank", "-1"), "--lora-rank must be >= 1", id="negative-lora-rank"),
    pytest.param(("--batch", "0"), "--batch must be >= 1", id="batch-0"),
    pytest.param(("--transfer-steps", "-1"), "--transfer-steps must be >= 0", id="negative-transfer-steps"),
    pytest.param(("--distill-steps", "-1"), "--distill-steps must be >= 0", id="negative-distill-steps"),
    pytest.param(("--passkey-trials", "0"), "--passkey-trials must be >= 1", id="passkey-trials-0"),
    pytest.param(("--eval-windows", "0"), "--eval-windows must be >= 1", id="eval-windows-0"),
    pytest.param(("--distill-lr", "0"), "--distill-lr must be a finite number > 0", id="distill-lr-0"),
    pytest.param(("--transfer-lr", "inf"), "--transfer-lr must be a finite number > 0", id="transfer-lr-inf"),
    pytest.param(("--taylor-mix", "nan"), "--taylor-mix must be a finite number > 0", id="taylor-mix-nan"),
    pytest.param(("--recentre", "nan"), "--recentre must be a finite number", id="nan-recentre"),
    pytest.param(("--eval-contexts", "0"), "token counts >= 1", id="eval-context-0"),
    pytest.param(("--eval-contexts", "abc"), "comma-separated token counts", id="eval-contexts-text"),
    pytest.param(("--passkey-contexts", ","), "token counts >= 1", id="passkey-contexts-empty"),
])
def test_convert_bad_flags(tmp_path, extra, match):
    """Refused before any work, and before --out records the settings (a corrected rerun there is not refused)."""
    with pytest.raises(SystemExit, match=match):
        convert_cli.main(_args(tmp_path, *extra))
    assert not (tmp_path / "stages" / "settings.json").exists()


def test_convert_refuses_an_out_directory_of_other_settings(tmp_path):
    """A run's directory holds checkpoints and evaluations of its settings: another run there would mix them."""
    (tmp_path / "stages").mkdir()
    args = _args(tmp_path)
    convert_cli._quick_defaults(args)
    convert_cli._same_settings(args, tmp_path / "stages" / "settings.json")    # the first run's record
    with pytest.raises(SystemExit, match=r"--distill-steps 4 there, 6 now.*another --out"):
        convert_cli.main(_args(tmp_path, "--distill-steps", "6"))
    with pytest.raises(SystemExit, match=r"--eval-windows 2 there, 3 now"):
        convert_cli.main(_args(tmp_path, "--eval-windows", "3", "--threads", "2"))


def test_stages_resume_after_interruption(tmp_path, monkeypatch):
    """Killed mid-stage, the stages restart from their checkpoints and end where an uninterrupted run ends."""
    import copy

    teacher = _tiny_hybrid(torch.float32)
    teacher.set_attn_implementation("sdpa")
    windows = torch.randint(1, 97, (5, 48), generator=torch.Generator().manual_seed(6))
    hc = hybrid_convert.HybridConfig(window=6, sinks=2, transfer_steps=3, distill_steps=5, lora_rank=2)

    def run(ckpt, interrupt=None):
        student = copy.deepcopy(teacher)
        for a in hybrid_convert._attention_modules(student):
            del a.sata_adapter
        hybrid_convert.configure(student, hc)
        student.set_attn_implementation("sata")
        hybrid_convert.transfer(student, windows[:3], hc, ckpt / "transfer.pt", progress=False)
        hybrid_convert.distill(student, teacher, windows, hc, ckpt / "distill.pt", progress=False, save_every=2)
        return student

    whole = run(tmp_path / "a")
    real_layer, real_kl = hybrid_convert.transfer_layer, hybrid_convert._kl
    calls = {"layer": 0, "kl": 0}

    def layer_then_fail(model, i, *a, **k):
        if i == 1 and calls["layer"] == 0:
            calls["layer"] = 1
            raise KeyboardInterrupt
        return real_layer(model, i, *a, **k)

    def kl_then_fail(*a):
        calls["kl"] += 1
        if calls["kl"] == 4:                                                   # after the checkpoint of step 2
            raise KeyboardInterrupt
        return real_kl(*a)

    (tmp_path / "b").mkdir()
    monkeypatch.setattr(hybrid_convert, "transfer_layer", layer_then_fail)
    monkeypatch.setattr(hybrid_convert, "_kl", kl_then_fail)
    for _ in range(3):                     # killed in (a), then killed in (b), then to the end
        try:
            resumed = run(tmp_path / "b")
            break
        except KeyboardInterrupt:
            pass
    assert calls == {"layer": 1, "kl": 4 + 3}                                  # steps 3..5 redone, 1..2 not
    for (n, p), q in zip(whole.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)
