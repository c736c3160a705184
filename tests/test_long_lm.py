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
