"""The long-context byte LM of issue 18: the window mode of the LM's SATA layers, the local-window-only
model, and ``sata evaluate`` (bits/byte at any context and by position)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sata.cli import build_parser
from sata.cli import main as cli_main
from sata.lm import LMConfig, TransformerLM
from sata.train.cli import config_from_args

WINDOWED = dict(d_model=32, n_layers=2, n_heads=2, n_taylor=3, short_conv=3, window=4, sinks=1, taylor_mix=0.7,
                recentre=0.3, learn_mix=True, learn_recentre=True)


def _windowed_model(seed: int = 0) -> TransformerLM:
    """A tiny windowed model whose learned beta and alpha differ per head and from their starts."""
    torch.manual_seed(seed)
    m = TransformerLM(LMConfig(**WINDOWED)).double()
    with torch.no_grad():
        for b in m.blocks:
            b.attn.mix_param.add_(torch.tensor([0.4, -0.3], dtype=torch.float64))
            b.attn.recentre_param.add_(torch.tensor([-0.5, 0.6], dtype=torch.float64))
    return m.eval()


# ---------------------------------------------------------------------------- the window mode in the LM
class TestWindowedLM:
    def test_full_sequence_equals_token_by_token_through_the_states(self):
        m = _windowed_model()
        tokens = torch.randint(0, 256, (2, 23), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            full, _ = m(tokens)                                               # [2, 23, 256]
            states, steps = None, []
            for t in range(tokens.shape[1]):
                logits, states = m(tokens[:, t:t + 1], states, return_states=True)
                steps.append(logits)
            # and in uneven chunks (prefill, then more, then one)
            chunks, states = [], None
            for a, b in ((0, 9), (9, 22), (22, 23)):
                logits, states = m(tokens[:, a:b], states, return_states=True)
                chunks.append(logits)
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-9)
        torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=0, atol=1e-9)
        # the window and the Taylor part both matter: a plain model with the same weights differs
        plain = TransformerLM(LMConfig(**{**WINDOWED, "window": 0, "sinks": 0, "recentre": None, "learn_mix": False,
                                          "learn_recentre": False, "taylor_mix": 1.0})).double().eval()
        plain.load_state_dict(m.state_dict(), strict=False)
        with torch.no_grad():
            assert (plain(tokens)[0] - full).abs().max() > 1e-3

    def test_learned_mix_and_recentre_receive_gradients_and_start_where_told(self):
        torch.manual_seed(0)
        m = TransformerLM(LMConfig(**WINDOWED))
        for b in m.blocks:
            torch.testing.assert_close(torch.nn.functional.softplus(b.attn.mix_param.detach()), torch.full((2,), 0.7))
            torch.testing.assert_close(b.attn.recentre_param.detach(), torch.full((2,), 0.3))
        tokens = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
        logits, _ = m(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        for b in m.blocks:
            for p in (b.attn.mix_param, b.attn.recentre_param):
                assert p.grad is not None and bool(torch.isfinite(p.grad).all()) and p.grad.abs().min() > 0

    def test_config_round_trip_and_old_configs_still_load(self, tmp_path):
        m = _windowed_model().float()
        m.save_pretrained(tmp_path / "new")
        back = TransformerLM.from_pretrained(tmp_path / "new").eval()
        assert back.config == m.config and back.config.recentre == 0.3 and back.config.learn_mix
        tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            torch.testing.assert_close(back(tokens)[0], m(tokens)[0], rtol=0, atol=0)
        # a config.json written before the window mode existed
        torch.manual_seed(0)
        TransformerLM(LMConfig(d_model=16, n_layers=1, n_heads=2)).save_pretrained(tmp_path / "old")
        raw = json.loads((tmp_path / "old" / "config.json").read_text())
        for k in ("window", "sinks", "taylor_mix", "recentre", "learn_mix", "learn_recentre"):
            del raw[k]
        (tmp_path / "old" / "config.json").write_text(json.dumps(raw))
        old = TransformerLM.from_pretrained(tmp_path / "old")
        assert (old.config.window, old.config.recentre, old.config.learn_mix) == (0, None, False)
        assert not old.blocks[0].attn.windowed

    def test_mixer_names_the_configuration(self):
        assert LMConfig(**WINDOWED).mixer == "sata P=3 + window 4 + sinks 1 (mix, recentre learned), conv 3"
        assert LMConfig(attention="softmax", n_layers=2, local_layers=[0, 1]).mixer == "local window 64"
        assert LMConfig(attention="softmax").mixer == "softmax"

    @pytest.mark.parametrize("kw, match", [
        (dict(learn_mix=True), "LMConfig: learn_mix=True needs window > 0 or sinks > 0"),
        (dict(window=8, learn_mix=True, taylor_mix=0.0), "taylor_mix, which must be a float > 0"),
        (dict(window=8, learn_recentre=True), "LMConfig: learn_recentre=True needs a starting recentre"),
        (dict(window=8, recentre=0.5, n_taylor=2), "needs n_taylor >= 3"),
        (dict(window=-1), "LMConfig: window must be a non-negative int"),
        (dict(taylor_mix=-0.5, window=4), "LMConfig: taylor_mix must be >= 0"),
        (dict(window=8, attention="softmax"), "attention='softmax'; for sliding-window softmax use local_layers"),
        (dict(window=8, local_layers=[0, 1, 2, 3]), "local_layers makes every layer sliding-window softmax"),
        (dict(window=8, learn_mix="yes"), "LMConfig.learn_mix must be a bool"),
    ], ids=["mix-no-window", "mix-zero", "recentre-none", "recentre-terms", "window", "taylor-mix", "softmax",
            "all-local", "not-bool"])
    def test_bad_window_settings_are_refused(self, kw, match):
        with pytest.raises((ValueError, TypeError), match=match):
            LMConfig(**kw)


# ---------------------------------------------------------------------------- the command line
def _model_config(argv: list[str]) -> LMConfig:
    return config_from_args(build_parser().parse_args(["train", *argv])).model


def test_cli_flags_reach_the_config():
    c = _model_config(["--window", "64", "--sinks", "2", "--taylor-mix", "0.5", "--recentre", "0", "--learn-mix",
                       "--learn-recentre", "--short-conv", "4"])
    assert (c.window, c.sinks, c.taylor_mix, c.recentre, c.learn_mix, c.learn_recentre, c.short_conv) == (
        64, 2, 0.5, 0.0, True, True, 4)
    local = _model_config(["--attention", "softmax", "--local-layers", "all", "--local-window", "32", "--n-layers", "3"])
    assert local.local_layers == [0, 1, 2] and local.mixer == "local window 32"
    assert _model_config(["--local-layers", "0", "2"]).local_layers == [0, 2]


@pytest.mark.parametrize("argv, match", [
    (["--attention", "softmax", "--window", "64"], "use local_layers"),
    (["--learn-mix"], "learn_mix=True needs window > 0"),
    (["--local-layers", "all", "1"], "--local-layers: 'all' stands alone"),
], ids=["softmax-window", "learn-mix", "all-and-index"])
def test_cli_bad_window_flags_exit_2_with_a_message(tmp_path, argv, match, capsys):
    assert cli_main(["train", *argv, "--out", str(tmp_path)]) == 2
    assert match in capsys.readouterr().err


def test_cli_local_layers_rejects_words(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--local-layers", "every"])
    assert "expected a layer index or 'all'" in capsys.readouterr().err


# ---------------------------------------------------------------------------- sata evaluate
@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
    """Three tiny random byte models (softmax, local window only, SATA + window) and a small text folder."""
    root = tmp_path_factory.mktemp("evaluate")
    data = root / "data"
    data.mkdir()
    src = Path(__file__).resolve().parents[1] / "src" / "sata"
    for f in sorted(src.rglob("*.py"))[:40]:
        (data / f"{f.parent.name}_{f.name}").write_bytes(f.read_bytes())
    configs = {"softmax": dict(attention="softmax"), "local": dict(attention="softmax", local_layers=[0, 1],
                                                                      local_window=8),
               "hybrid": dict(window=8, recentre=0.0, learn_mix=True, learn_recentre=True)}
    paths = {}
    for i, (name, kw) in enumerate(configs.items()):
        torch.manual_seed(i)
        TransformerLM(LMConfig(d_model=16, n_layers=2, n_heads=2, short_conv=3, **kw)).save_pretrained(
            root / name / "model")
        paths[name] = root / name / "model"
    return data, paths


def _direct_bpb(model: TransformerLM, windows: torch.Tensor) -> torch.Tensor:
    """Per-position bits/byte [T] of ``windows [n, T + 1]`` in one pass, the training loss's way."""
    with torch.no_grad():
        logits, _ = model(windows[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none")  # [n, T]
    return loss.double().mean(0) / torch.log(torch.tensor(2.0, dtype=torch.float64))


def test_evaluate_equals_a_direct_computation_of_the_loss(eval_setup, tmp_path, capsys):
    from sata.train.data import load_corpus
    from sata.train.evaluate import position_bins

    data, paths = eval_setup
    # into a folder not made yet; the figure without a suffix: written as given, as PNG
    js, md, png = tmp_path / "new" / "r.json", tmp_path / "r.md", tmp_path / "figure"
    argv = ["evaluate", *map(str, paths.values()), "--data", str(data), "--context", "100", "40", "--max-bytes", "500",
            "--bins", "8", "--chunk", "30", "--no-progress", "--json", str(js), "--markdown", str(md), "--figure", str(png)]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    res = json.loads(js.read_text())
    assert [m["name"] for m in res["models"]] == ["softmax", "local", "hybrid"]
    assert [c["context"] for c in res["contexts"]] == [40, 100]
    corpus = load_corpus([str(data)])
    for c in res["contexts"]:
        T = c["context"]
        windows = corpus.validation_windows(T, 500)
        assert c["windows"] == windows.shape[0] == 500 // T and c["bytes"] == windows.shape[0] * T
        edges = position_bins(T, 8)
        assert c["bins"]["start"] == edges[:-1].tolist() and c["bins"]["end"][-1] == T
        for name, path in paths.items():
            direct = _direct_bpb(TransformerLM.from_pretrained(path).eval(), windows)            # [T]
            assert c["bpb"][name] == pytest.approx(direct.mean().item(), rel=1e-6)
            binned = [direct[a:b].mean().item() for a, b in zip(edges[:-1], edges[1:])]
            assert c["bpb_by_position"][name] == pytest.approx(binned, rel=1e-6)
            if T == 100:
                assert c["bpb_beyond"][name] == pytest.approx(direct[40:].mean().item(), rel=1e-6)
            assert f"{c['bpb'][name]:.4f}" in printed and f"{c['bpb'][name]:.4f}" in md.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    from sata.train.evaluate import figure

    figure(res, tmp_path / "f.svg")                                # a suffix matplotlib knows: that format
    assert b"<svg" in (tmp_path / "f.svg").read_bytes()[:1000]
    assert res["models"][1]["mixer"] == "local window 8, conv 3"


def test_position_bins_are_log_spaced_and_cover_the_window():
    from sata.train.evaluate import position_bins

    e = position_bins(2048, 64).tolist()
    assert e[0] == 0 and e[-1] == 2048 and e == sorted(set(e)) and len(e) <= 65
    assert e[1] == 1 and e[-1] - e[-2] > 50 * (e[2] - e[1])   # fine at the start, coarse at the end
    assert position_bins(5, 64).tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("extra, match", [
    (["--context", "1"], "--context must be window lengths >= 2"),
    (["--context", "40", "40"], "lists a length twice"),
    (["--chunk", "0"], "--chunk must be a positive integer"),
    (["--context", "100000000"], "needs more validation bytes"),
    (["A=MODEL", "A=MODEL"], "the name 'A' is given twice"),
    (["/nonexistent/model"], "does not hold a sata model"),
    (["--figure", "."], "--figure .: not a file that can be written"),
    (["--json=/proc/sata-eval.json"], "--json /proc/sata-eval.json: not a file that can be written"),
    (["--markdown=new-folder/"], "--markdown new-folder/: not a file that can be written"),
], ids=["context", "twice", "chunk", "too-long", "names", "missing", "figure-a-folder", "json-unwritable",
        "markdown-a-folder-name"])
def test_evaluate_bad_input_exits_2_with_a_message(eval_setup, extra, match, capsys):
    data, paths = eval_setup
    models = [a.replace("MODEL", str(paths["softmax"])) for a in extra if a.startswith(("A=", "/"))]
    opts = [a for a in extra if not a.startswith(("A=", "/"))]
    assert cli_main(["evaluate", *(models or [str(paths["softmax"])]), "--data", str(data), "--no-progress",
                     "--max-bytes", "200", *opts]) == 2
    assert match in capsys.readouterr().err


def test_a_checkpoint_from_before_the_window_fields_still_resumes(tmp_path):
    """Its saved settings lack the new LMConfig fields; they take their defaults (today's model)."""
    from sata.train.data import load_corpus
    from sata.train.loop import TrainConfig, train

    src = Path(__file__).resolve().parents[1] / "src" / "sata"
    data = tmp_path / "data"
    data.mkdir()
    for f in sorted(src.rglob("*.py"))[:30]:
        (data / f"{f.parent.name}_{f.name}").write_bytes(f.read_bytes())
    cfg = TrainConfig(out=str(tmp_path / "run"), data=[str(data)], model=LMConfig(d_model=16, n_layers=1, n_heads=2),
                      steps=3, batch_size=2, seq_len=16, warmup=1, eval_every=3, eval_tokens=64, save_every=1)
    corpus = load_corpus([str(data)])
    train(cfg, corpus=corpus, progress=False, stop_after=1)
    path = tmp_path / "run" / "checkpoint" / "trainer.pt"
    saved = torch.load(path, weights_only=True)
    for k in ("window", "sinks", "taylor_mix", "recentre", "learn_mix", "learn_recentre"):
        del saved["train_config"]["model"][k]
    torch.save(saved, path)
    assert train(cfg, corpus=corpus, progress=False, resume=True)["step"] == 3
    with pytest.raises(ValueError, match="different settings"):
        train(TrainConfig(**{**cfg.__dict__, "model": LMConfig(d_model=16, n_layers=1, n_heads=2, window=4)}),
              corpus=corpus, progress=False, resume=True)
