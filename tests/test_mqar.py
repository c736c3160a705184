"""sata.bench.mqar: the generator is Zoology's MQAR, every mixer computes what it claims (against
the O(n^2) oracle in float64, forward and backward), the state accounting is Zoology's and equals
the state SATA really keeps, the model reads only the past, training learns, and ``sata bench
mqar`` runs end to end, resumes, and writes output that parses."""

import dataclasses
import json
import math

import pytest
import torch

import sata
from sata import cli
from sata.bench import mqar
from sata.bench.mqar import MQARPoint, MQARTask
from sata.bench.mqar_data import mqar_batch, slice_generator
from sata.bench.mqar_model import SATA, Based, MQARModel, SATAWindow, SlidingWindow, Softmax, model_state_bytes
from sata.bench.mqar_report import ANCHORS, best_per_config, frontier


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- the generator
@pytest.mark.parametrize("L,N,V", [(64, 4, 8192), (128, 32, 8192), (16, 4, 32)])
def test_examples_have_zoology_layout(L, N, V):
    b = mqar_batch(50, L, N, vocab_size=V, generator=_gen())
    assert b.inputs.shape == (50, L) and b.positions.shape == b.answers.shape == (50, N)
    keys, values = b.inputs[:, 0 : 2 * N : 2], b.inputs[:, 1 : 2 * N : 2]
    assert int(keys.min()) >= 1 and int(keys.max()) < V // 2
    assert int(values.min()) >= V // 2 and int(values.max()) < V
    for row in range(50):
        assert len(set(keys[row].tolist())) == N and len(set(values[row].tolist())) == N       # unique
        assert len(set(b.positions[row].tolist())) == N                                        # each slot once
    assert bool(((b.positions - 2 * N) % 2 == 0).all()) and int(b.positions.min()) >= 2 * N
    assert int(b.positions.max()) <= L - 2
    torch.testing.assert_close(b.inputs.gather(1, b.positions), keys)      # key i queried at positions[:, i]
    torch.testing.assert_close(b.answers, values)                           # ... and answered by its value
    assert int(b.inputs.min()) >= 0 and int(b.inputs.max()) < V


def test_examples_are_deterministic_per_seed_and_split():
    a = mqar_batch(8, 64, 4, generator=slice_generator(0, "test", 64, 4))
    b = mqar_batch(8, 64, 4, generator=slice_generator(0, "test", 64, 4))
    c = mqar_batch(8, 64, 4, generator=slice_generator(0, "valid", 64, 4))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.positions, b.positions)
    assert not torch.equal(a.inputs, c.inputs)


@pytest.mark.parametrize("power_a", [0.01, 0.5])
def test_query_slots_follow_the_power_law(power_a):
    # one pair: the slot is one draw of P(g) ~ (g + 1)^(a - 1), g < space
    space, n = 8, 40_000
    b = mqar_batch(n, 2 + 2 * space, 1, vocab_size=64, power_a=power_a, generator=_gen(1))
    slots = (b.positions[:, 0] - 2) // 2
    freq = torch.bincount(slots, minlength=space).double() / n
    p = torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    p /= p.sum()
    assert float((freq - p).abs().max()) < 4 * math.sqrt(0.25 / n)
    assert freq[0] > freq[-1]


@pytest.mark.parametrize("kwargs,match", [
    (dict(n=2, seq_len=63, n_pairs=4), "seq_len must be even"),
    (dict(n=2, seq_len=64, n_pairs=17), "seq_len >= 4 n_pairs"),
    (dict(n=2, seq_len=64, n_pairs=4, vocab_size=64), "vocab_size=64 is too small"),
    (dict(n=2, seq_len=64, n_pairs=0), "n_pairs must be a positive int"),
    (dict(n=2, seq_len=64, n_pairs=4, power_a=0.0), "power_a must be > 0"),
])
def test_bad_slices_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mqar_batch(**kwargs)


# ---------------------------------------------------------------------------- the mixers
def _x(B=2, L=24, d=16, seed=0):
    return torch.randn(B, L, d, dtype=torch.float64, generator=_gen(seed), requires_grad=True)


def _heads(t, H):
    B, L, _ = t.shape
    return t.view(B, L, H, -1).transpose(1, 2)


def _merge(y):
    B, H, L, E = y.shape
    return y.transpose(1, 2).reshape(B, L, H * E)


@pytest.mark.parametrize("P,E,H", [(3, 4, None), (2, 8, None), (4, 4, 2), (3, 6, 1), (5, 2, None)])
def test_sata_mixer_matches_oracle_forward_and_backward(P, E, H):
    d = 16
    m = SATA(d, n_taylor=P, head_dim=E, n_heads=H).double()
    H = m.n_heads
    x = _x(d=d)
    y = m(x)
    q, k, v = _heads(m.q_proj(x), H), _heads(m.k_proj(x), H), _heads(m.v_proj(x), H)
    ref = m.out_proj(_merge(sata.naive_sata_attention(q, k, v, n_taylor=P, is_causal=True)))
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, m.q_proj.weight), g)
    rx, rw = torch.autograd.grad(ref, (x, m.q_proj.weight), g)
    torch.testing.assert_close(gx, rx, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gw, rw, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("f,H", [(4, 1), (3, 2)])
def test_based_mixer_is_the_order_three_taylor_oracle(f, H):
    # phi(q).phi(k) with the unpacked square = T_3(q.k / sqrt(f)): the oracle at P = 3, scale 1/sqrt(f)
    d = 8
    m = Based(d, feature_dim=f, n_heads=H).double()
    assert m.features(torch.zeros(1, f, dtype=torch.float64)).shape[-1] == 1 + f + f * f
    x = _x(d=d, seed=1)
    y = m(x)
    q, k, v = _heads(m.q_proj(x), H), _heads(m.k_proj(x), H), _heads(m.v_proj(x), H)
    ref = m.out_proj(_merge(sata.naive_sata_attention(q, k, v, n_taylor=3, is_causal=True)))
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0], rtol=1e-9, atol=1e-11)


def test_sata_with_three_terms_in_one_head_is_based():
    d, f = 16, 4
    based, sata_ = Based(d, feature_dim=f).double(), SATA(d, n_taylor=3, head_dim=f, n_heads=1).double()
    sata_.load_state_dict(based.state_dict())
    x = _x(d=d, seed=2)
    torch.testing.assert_close(sata_(x), based(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("P,E,H,W,S", [(3, 4, None, 5, 2), (4, 4, 2, 3, 0), (2, 8, None, 7, 1)],
                         ids=["P3-W5-S2", "P4-W3-gqa-free", "P2-W7-S1"])
def test_sata_window_mixer_matches_oracle_forward_and_backward(P, E, H, W, S):
    d = 16
    m = SATAWindow(d, n_taylor=P, head_dim=E, n_heads=H, window=W, sinks=S).double()
    with torch.no_grad():                               # away from the start values, so they are really read
        m.mix_param.copy_(torch.linspace(-1.0, 1.0, m.n_heads))
        if m.recentre is not None:
            m.recentre.copy_(torch.linspace(0.0, 0.8, m.n_heads))
    x = _x(d=d, seed=5)
    y = m(x)
    q, k, v = _heads(m.q_proj(x), m.n_heads), _heads(m.k_proj(x), m.n_heads), _heads(m.v_proj(x), m.n_heads)
    ref = m.out_proj(_merge(sata.naive_sata_attention(
        q, k, v, n_taylor=P, is_causal=True, window=W, sinks=S, taylor_mix=torch.nn.functional.softplus(m.mix_param),
        recentre=m.recentre)))
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(y)
    params = (x, m.mix_param) + (() if m.recentre is None else (m.recentre,))
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    assert P < 3 or m.recentre.shape == (m.n_heads,)


def test_sata_window_state_accounting_adds_the_exact_keys():
    d, E, W, S = 64, 8, 16, 2
    floats = SATAWindow.state_floats(d, 512, n_taylor=3, head_dim=E, window=W, sinks=S)
    assert floats == SATA.state_floats(d, 512, n_taylor=3, head_dim=E) + (d // E) * (W + S) * (E + E)
    assert floats == (d // E) * sata.state_size(E, E, 3, window=W, sinks=S)
    assert model_state_bytes("sata+window", d, 512, {"n_taylor": 3, "head_dim": E, "window": W, "sinks": S}) == \
        4 * (3 * d + floats)


def _softmax_ref(m: Softmax, x, window):
    B, L, d = x.shape
    q, k, v = (_heads(t, m.n_heads) for t in m.qkv(x).split(d, dim=-1))
    s = q @ k.transpose(-1, -2) / math.sqrt(m.head_dim)
    i = torch.arange(L)
    ok = (i[None] <= i[:, None]) & (i[None] > i[:, None] - (window or L))
    return m.out_proj(_merge(s.masked_fill(~ok, -math.inf).softmax(-1) @ v))


@pytest.mark.parametrize("window,H", [(None, 1), (None, 2), (5, 1), (1, 2), (40, 1)])
def test_softmax_and_sliding_window_match_reference(window, H):
    d = 8
    m = (Softmax(d, n_heads=H) if window is None else SlidingWindow(d, window=window, n_heads=H)).double().eval()
    x = _x(d=d, seed=3)
    ref = _softmax_ref(m, x, window)
    torch.testing.assert_close(m(x), ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(m(x), x, g)[0], torch.autograd.grad(ref, x, g)[0],
                               rtol=1e-9, atol=1e-11)


def test_attention_dropout_only_while_training():
    m = Softmax(8).double()
    x = _x(d=8)
    m.train()
    assert not torch.allclose(m(x), m(x))
    m.eval()
    torch.testing.assert_close(m(x), m(x))


@pytest.mark.parametrize("cls,kwargs,match", [
    (SATA, dict(d_model=16, head_dim=32), "head_dim=32 > d_model=16"),
    (SATA, dict(d_model=16, head_dim=4, n_heads=3), "not divisible by n_heads=3"),
    (SATA, dict(d_model=16, n_taylor=0), "n_taylor must be a positive int"),
    (Based, dict(d_model=16, feature_dim=0), "feature_dim must be a positive int"),
    (SlidingWindow, dict(d_model=16, window=0), "window must be a positive int"),
    (SATAWindow, dict(d_model=16, head_dim=4, window=0), "window must be a positive int"),
    (SATAWindow, dict(d_model=16, head_dim=4, sinks=-1), "sinks must be a non-negative int"),
    (Softmax, dict(d_model=16, dropout=1.0), "dropout must be in"),
])
def test_bad_mixer_parameters_are_refused(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


# ---------------------------------------------------------------------------- state accounting
def test_state_accounting_reproduces_the_published_state_sizes():
    # the Based paper's recall figure, d_model 128: Based f=16 ~80 KB, f=24 ~169 KB, attention ~525 KB
    assert model_state_bytes("based", 128, 512, {"feature_dim": 16}) == 4 * (128 * 3 + 153 * 129) == 80_484
    assert model_state_bytes("based", 128, 512, {"feature_dim": 24}) == 169_236
    assert model_state_bytes("softmax", 128, 512, {}) == 525_824
    assert model_state_bytes("sliding", 128, 512, {"window": 64}) == 4 * (128 * 3 + 2 * 128 * 64)
    # Based as implemented keeps the unpacked square: 273 features where the packed basis has 153
    assert model_state_bytes("based", 128, 512, {"feature_dim": 16}, as_implemented=True) == 4 * (384 + 273 * 129)
    assert {a["state_bytes"] for a in ANCHORS} >= {80_484, 169_236, 525_824}


@pytest.mark.parametrize("P,E,H", [(3, 16, None), (4, 8, 1), (2, 32, None), (5, 4, 2)])
def test_sata_state_accounting_is_the_state_it_keeps(P, E, H):
    d = 64
    m = SATA(d, n_taylor=P, head_dim=E, n_heads=H)
    x = torch.randn(1, 5, d)
    q, k, v = _heads(m.q_proj(x), m.n_heads), _heads(m.k_proj(x), m.n_heads), _heads(m.v_proj(x), m.n_heads)
    _, state = sata.sata_attention(q, k, v, n_taylor=P, is_causal=True, return_state=True)
    floats = SATA.state_floats(d, 512, n_taylor=P, head_dim=E, n_heads=H)
    assert state.kv.numel() == floats == m.n_heads * sata.state_size(E, d // m.n_heads, P)
    assert model_state_bytes("sata", d, 512, {"n_taylor": P, "head_dim": E, "n_heads": H}) == 4 * (3 * d + floats)


def test_sata_in_based_layout_counts_as_based():
    assert model_state_bytes("sata", 128, 512, {"n_taylor": 3, "head_dim": 16, "n_heads": 1}) == 80_484


# ---------------------------------------------------------------------------- the model
@pytest.mark.parametrize("mixer,params", [("softmax", {}), ("sliding", {"window": 3}), ("based", {"feature_dim": 4}),
                                          ("sata", {"n_taylor": 3, "head_dim": 4}),
                                          ("sata+window", {"n_taylor": 3, "head_dim": 4, "window": 4, "sinks": 1})])
def test_model_logits_at_query_positions_see_only_the_past(mixer, params):
    torch.manual_seed(0)
    model = MQARModel(64, 16, mixer, params).double().eval()
    b = mqar_batch(3, 32, 4, vocab_size=64, generator=_gen(4))
    everywhere = torch.arange(32).expand(3, 32)
    full = model(b.inputs, everywhere)                                                    # [3, 32, 64]
    at = model(b.inputs, b.positions)                                                     # [3, 4, 64]
    torch.testing.assert_close(at, full.gather(1, b.positions[..., None].expand(-1, -1, 64)))
    # change every token after position 20: logits up to 20 do not move, later ones do
    changed = b.inputs.clone()
    changed[:, 21:] = (changed[:, 21:] + 1) % 64
    after = model(changed, everywhere)
    torch.testing.assert_close(after[:, :21], full[:, :21], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(after[:, 21:], full[:, 21:])


def test_model_embeddings_are_tied_and_there_is_no_mlp():
    model = MQARModel(64, 16, "sata", {"n_taylor": 3, "head_dim": 4})
    names = [n for n, _ in model.named_parameters()]
    assert not any("mlp" in n or "lm_head" in n or "pos" in n for n in names)
    assert len(model.layers) == 2


# ---------------------------------------------------------------------------- training
@pytest.fixture
def one_thread():
    # tiny models: a second thread only waits, and on a busy machine spins (10x slower)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_training_learns_recall_that_a_blind_window_cannot(one_thread):
    # 2 pairs in 16 tokens over a vocabulary of 32 (chance ~1/16 among the values): softmax solves it
    # in seconds; a window of 2 tokens never sees the pairs from most query positions
    task = MQARTask(vocab_size=32, train_slices=((16, 2),), train_weights=(1,), test_slices=((16, 2),),
                    n_test=200, n_valid=50, batch_size=32, steps=300, eval_every=50, target=0.99)
    rec = mqar.train_run(task, MQARPoint.make("softmax", 32, dropout=0.0), 1e-2)
    assert rec["accuracy"] > 0.9, rec
    assert rec["stopped"] in ("target", "budget") and 0 < rec["steps"] <= 300
    assert rec["final_loss"] < 1.0
    blind = mqar.train_run(task, MQARPoint.make("sliding", 32, window=2), 1e-2)
    assert blind["accuracy"] < 0.2 and blind["stopped"] == "budget" and blind["steps"] == 300


def test_a_non_finite_loss_ends_the_run_as_diverged(monkeypatch):
    task = mqar.PRESETS["smoke"].task
    monkeypatch.setattr(mqar, "_loss", lambda model, b: torch.tensor(float("nan"), requires_grad=True))
    rec = mqar.train_run(task, MQARPoint.make("softmax", 16), 1e-3)
    assert rec["stopped"] == "diverged" and rec["accuracy"] is None and rec["steps"] == 1


def test_sweep_resumes_and_skips_the_other_rates_of_a_solved_configuration(tmp_path, monkeypatch):
    task, calls = mqar.PRESETS["smoke"].task, []

    def fake_run(task, point, lr, **kw):
        calls.append((point.mixer, lr))
        return {"key": mqar.run_key(task, point, lr), "stopped": "target" if point.mixer == "softmax" else "budget"}

    monkeypatch.setattr(mqar, "train_run", fake_run)
    points = [MQARPoint.make("softmax", 16), MQARPoint.make("sata", 16, head_dim=4)]
    records = mqar.run_sweep(task, points, [1e-3, 3e-3], tmp_path / "r.jsonl", progress=False)
    assert calls == [("softmax", 1e-3), ("sata", 1e-3), ("sata", 3e-3)] and len(records) == 3
    calls.clear()
    assert len(mqar.run_sweep(task, points, [1e-3, 3e-3, 1e-2], tmp_path / "r.jsonl", progress=False)) == 4
    assert calls == [("sata", 1e-2)]                   # only the new rate of the unsolved configuration
    other = dataclasses.replace(task, steps=5)         # another task: nothing of the first counts
    calls.clear()
    mqar.run_sweep(other, points[:1], [1e-3], tmp_path / "r.jsonl", progress=False)
    assert calls == [("softmax", 1e-3)]


def test_processes_sharing_a_results_file_claim_runs(tmp_path, monkeypatch):
    import subprocess

    task, calls, res = mqar.PRESETS["smoke"].task, [], tmp_path / "r.jsonl"
    monkeypatch.setattr(mqar, "train_run", lambda task, point, lr, **kw: calls.append(point.mixer) or
                        {"key": mqar.run_key(task, point, lr), "stopped": "budget"})
    live, dead = MQARPoint.make("softmax", 16), MQARPoint.make("sata", 16, head_dim=4)
    gone = subprocess.Popen(["true"])
    gone.wait()
    mqar._append(res, {"claim": mqar.run_key(task, live, 1e-3), "pid": 1})            # init: always alive
    mqar._append(res, {"claim": mqar.run_key(task, dead, 1e-3), "pid": gone.pid})     # its process has ended
    records = mqar.run_sweep(task, [live, dead], [1e-3], res, progress=False)
    assert calls == ["sata"] and [r["key"] for r in records] == [mqar.run_key(task, dead, 1e-3)]
    assert not mqar._take(res, mqar.run_key(task, dead, 1e-3))                          # done: not again


def test_best_per_config_and_frontier():
    def r(mixer, state, acc, lr, **params):
        return {"mixer": mixer, "d_model": 8, "params": params, "label": f"{mixer} {params}", "state_bytes": state,
                "accuracy": acc, "lr": lr}

    runs = [r("sata", 100, 0.5, 1e-3, P=2), r("sata", 100, 0.7, 3e-3, P=2), r("sata", 200, 0.6, 1e-3, P=3),
            r("sata", 300, None, 1e-3, P=4), r("sata", 300, 0.9, 3e-3, P=4), r("based", 150, 0.8, 1e-3, f=4),
            r("sata", 400, None, 1e-3, P=5)]
    best = best_per_config(runs)
    acc = {(b["mixer"], b["state_bytes"]): b["accuracy"] for b in best}
    assert acc == {("sata", 100): 0.7, ("sata", 200): 0.6, ("sata", 300): 0.9, ("based", 150): 0.8,
                   ("sata", 400): None}
    assert [b["lrs_tried"] for b in best if b["state_bytes"] == 100] == [[1e-3, 3e-3]]
    front = frontier(best)
    assert [x["state_bytes"] for x in front["sata"]] == [100, 300]      # 200 is beaten by 100; 400 diverged
    assert [x["state_bytes"] for x in front["based"]] == [150]


def test_points_parse_and_refuse_bad_specs():
    p = MQARPoint.parse("sata:d_model=64,n_taylor=3,head_dim=16,n_heads=1")
    assert p == MQARPoint.make("sata", 64, n_taylor=3, head_dim=16, n_heads=1)
    assert p.label == "sata d=64 P=3 E=16 H=1" and p.state_bytes(MQARTask()) == 4 * (192 + 153 * 65)
    with pytest.raises(ValueError, match="unknown mixer 'mamba'"):
        MQARPoint.parse("mamba:d_model=64")
    with pytest.raises(ValueError, match="give d_model"):
        MQARPoint.parse("sata:n_taylor=3")
    with pytest.raises(ValueError, match="train_weights must be 1 positive"):
        MQARTask(train_slices=((64, 4),), train_weights=(1, 2))


def test_acceptance_preset_is_part_of_the_full_sweep():
    full, acc = mqar.PRESETS["full"], mqar.PRESETS["acceptance"]
    assert acc.task == full.task and acc.lrs == full.lrs
    keys = lambda preset: {mqar.run_key(preset.task, p, lr) for p in preset.points for lr in preset.lrs}
    assert keys(acc) <= keys(full) and len(acc.points) == 22     # the same runs: one results file serves both
    budget = 40_242                                               # half of Based f=16 at d_model 128 (80,484 B)
    assert mqar.PRESETS["acceptance"].points[0].state_bytes(acc.task) == 2 * budget
    small = [p for p in acc.points if p.mixer == "sata" and p.state_bytes(acc.task) <= budget]
    assert len(small) >= 7


def test_full_preset_covers_the_issue_within_its_state_cap():
    preset = mqar.PRESETS["full"]
    mixers = {p.mixer for p in preset.points}
    assert mixers == {"softmax", "sliding", "based", "sata", "sata+window"}
    sata_points = [p.kwargs for p in preset.points if p.mixer == "sata"]
    assert {k["n_taylor"] for k in sata_points} == {2, 3, 4, 5}
    assert {k["head_dim"] for k in sata_points} == {5, 8, 10, 16, 32, 64}
    assert {"n_taylor": 3, "head_dim": 10, "n_heads": 16} in sata_points            # the largest within 40 KB
    assert {"n_taylor": 3, "head_dim": 16, "n_heads": 1} in sata_points              # Based's map, packed
    assert sorted(p.kwargs["window"] for p in preset.points if p.mixer == "sliding") == [8, 16, 32, 64, 128, 256, 512]
    assert all(p.state_bytes(preset.task) <= 600_000 for p in preset.points)
    assert preset.task.train_slices == ((64, 4), (128, 8), (256, 16), (256, 32))
    assert {(256, 64), (512, 128)} <= set(preset.task.test_slices)


# ---------------------------------------------------------------------------- the command
def test_bench_mqar_smoke_end_to_end_and_resume(tmp_path, capsys, one_thread):
    res, js, md, fig = (tmp_path / n for n in ("r.jsonl", "s.json", "t.md", "f.png"))
    argv = ["bench", "mqar", "--preset", "smoke", "--no-progress", "--threads", "1", "--results", str(res),
            "--json", str(js), "--markdown", str(md), "--figure", str(fig)]
    assert cli.main(argv) == 0
    assert len(mqar.read_results(res)) == 5
    summary = json.loads(js.read_text())
    assert summary["preset"] == "smoke" and len(summary["runs"]) == 5 and len(summary["best"]) == 5
    for b in summary["best"]:
        assert 0.0 <= b["accuracy"] <= 1.0 and set(b["slices"]) == {"16x2", "32x4"}
        assert b["state_bytes"] > 0 and b["steps"] == 4
    assert set(summary["frontier"]) == {"softmax", "sliding", "based", "sata", "sata+window"}
    assert "| mixer |" in md.read_text() and fig.stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "sata" in out and "P=3 E=4" in out
    # resumed: nothing retrained, a torn last line (an interrupted write) is ignored
    res.write_text(res.read_text() + '{"key": "torn')
    before = res.read_text()
    assert cli.main(argv) == 0
    assert res.read_text() == before and len(json.loads(js.read_text())["runs"]) == 5
    assert "1 line(s) are not JSON" in capsys.readouterr().err


def test_bench_mqar_report_reads_the_results_file_and_trains_nothing(tmp_path, capsys, monkeypatch, one_thread):
    res, js = tmp_path / "r.jsonl", tmp_path / "s.json"
    base = ["bench", "mqar", "--preset", "smoke", "--no-progress", "--threads", "1", "--results", str(res)]
    assert cli.main(base + ["--mixers", "sliding"]) == 0                       # one of the preset's five runs
    capsys.readouterr()
    monkeypatch.setattr(mqar, "train_run", lambda *a, **k: pytest.fail("--report trained a run"))
    before = res.read_text()
    assert cli.main(base + ["--report", "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "1 of 5 runs in" in out and "sliding" in out.split("MQAR accuracy", 1)[1]
    assert res.read_text() == before
    summary = json.loads(js.read_text())
    assert [b["mixer"] for b in summary["best"]] == ["sliding"] and len(summary["runs"]) == 1


def test_bench_mqar_list_estimate_and_bad_options(capsys, one_thread):
    assert cli.main(["bench", "mqar", "--preset", "full", "--list", "--mixers", "based", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "based d=128 f=16" in out and "78.6 KiB" in out and "sata" not in out.split("\n", 1)[1]
    assert cli.main(["bench", "mqar", "--preset", "smoke", "--estimate", "--point", "sata:d_model=16,head_dim=4",
                     "--threads", "1"]) == 0
    assert "sweep: 1 runs, at most" in capsys.readouterr().out
    assert cli.main(["bench", "mqar", "--point", "sata:d_model=16,head_dim=5"]) == 2
    assert "not divisible" in capsys.readouterr().err
    assert cli.main(["bench", "mqar", "--mixers", "mamba"]) == 2
    assert cli.main(["bench", "mqar", "--test-slices", "64x40"]) == 2
    assert "seq_len >= 4 n_pairs" in capsys.readouterr().err
