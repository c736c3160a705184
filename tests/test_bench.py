"""sata.bench: the baselines are right (against the oracle and SDPA), the measuring tools measure,
and ``sata bench`` runs end to end and writes what it promises."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sata
from sata import cli
from sata.bench.baselines import KVCacheAttention, PaperTaylorAttention, sdpa_causal
from sata.bench.compare import agreement, crossover
from sata.bench.decode import DecodeConfig, _scaled_state, run_decode
from sata.bench.tables import decode_table
from sata.bench.timing import LoadProbe, Timing, peak_memory, time_interleaved

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _qkv(shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return tuple(scale * torch.randn(*shape, dtype=torch.float64, generator=g) for _ in range(3))


# ---------------------------------------------------------------------------- the paper's formulation
# even P: T_P(s) < 0 for s below ~-1.6, where the paper's code divides by a tiny normaliser and the
# oracle returns 0; small inputs keep every weight positive so both define the same thing
@pytest.mark.parametrize("n_taylor,scale", [(1, 1.0), (2, 0.3), (3, 1.0), (4, 0.5), (5, 1.0)],
                         ids=["P1", "P2-small", "P3", "P4-small", "P5"])
def test_paper_causal_matches_oracle_float64(n_taylor, scale):
    q, k, v = _qkv((2, 3, 40, 8), scale=scale)
    y, _ = PaperTaylorAttention(8, n_taylor).causal(q, k, v)
    ref = sata.naive_sata_attention(q, k, v, n_taylor=n_taylor, is_causal=True)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n_taylor", [3, 4], ids=["P3", "P4"])
def test_paper_decode_continues_prefill_and_absorb_equals_causal_state(n_taylor):
    q, k, v = _qkv((1, 2, 30, 6), seed=1, scale=0.5)
    paper = PaperTaylorAttention(6, n_taylor)
    y, state = paper.causal(q[:, :, :20], k[:, :, :20], v[:, :, :20])
    steps = []
    for t in range(20, 30):
        yt, state = paper.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)
        steps.append(yt)
    ref = sata.naive_sata_attention(q, k, v, n_taylor=n_taylor, is_causal=True)
    torch.testing.assert_close(torch.cat([y, *steps], dim=2), ref, rtol=1e-10, atol=1e-12)
    absorbed = paper.absorb(k, v)
    for (num, den), (num2, den2) in zip(state, absorbed):
        torch.testing.assert_close(num, num2)
        torch.testing.assert_close(den, den2)


def test_paper_multiplicities_and_constants():
    paper = PaperTaylorAttention(5, 4)
    for term in paper.terms:
        # every ordered multi-index counted once: sum of multiplicities = d^p
        assert int(term.multiplicity.sum()) == 5 ** term.p
        assert term.index.shape == (sata.monomial_counts(5, 4)[term.p], term.p)
        assert term.alpha == pytest.approx(5 ** (-term.p / 2) / [1, 1, 2, 6][term.p])


# ---------------------------------------------------------------------------- conventional
def test_kv_cache_decode_matches_causal_sdpa():
    q, k, v = (t.float() for t in _qkv((2, 4, 24, 8), seed=2))
    cache = KVCacheAttention(2, 4, 8, 8, capacity=32)
    y = cache.prefill(q[:, :, :16], k[:, :, :16], v[:, :, :16])
    steps = [cache.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1]) for t in range(16, 24)]
    torch.testing.assert_close(torch.cat([y, *steps], dim=2), sdpa_causal(q, k, v), rtol=1e-5, atol=1e-6)
    assert cache.length == 24
    assert cache.context_nbytes() == 2 * 4 * 24 * 16 * 4
    storage = cache.k.untyped_storage().data_ptr()
    cache.step(q[:, :, :1], k[:, :, :1], v[:, :, :1])
    assert cache.k.untyped_storage().data_ptr() == storage      # written in place, never reallocated


def test_kv_cache_refuses_to_overflow():
    cache = KVCacheAttention(1, 1, 4, 4, capacity=2)
    x = torch.zeros(1, 1, 3, 4)
    with pytest.raises(ValueError, match="capacity"):
        cache.extend(x, x)


# ---------------------------------------------------------------------------- measuring
def test_timing_quartiles():
    t = Timing.from_samples([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (t.median, t.q25, t.q75, t.n, t.iqr) == (3.0, 2.0, 4.0, 5, 2.0)


def test_timing_says_when_it_was_contaminated():
    assert Timing.from_samples([1.0, 1.05, 1.1, 0.98, 1.02]).contaminated is None
    spread = Timing.from_samples([1.0, 1.0, 3.0, 3.0, 1.1])               # q75/q25 = 3
    assert "repeats spread x3.00" in spread.contaminated
    loaded = dataclasses.replace(Timing.from_samples([1.0] * 5), load=2.5)
    assert "reference workload ran x2.50 slower" in loaded.contaminated
    assert loaded.to_dict()["contaminated"] == loaded.contaminated


def test_load_probe_compares_with_its_quiet_time():
    probe = LoadProbe()
    quiet = probe.quiet_seconds()
    assert 0 < quiet < 0.01
    assert probe.load(3 * quiet) == pytest.approx(3.0)
    assert probe.load(quiet / 2) == 1.0 and probe.quiet_seconds() == quiet / 2   # a faster run lowers the quiet time


def test_time_interleaved_probes_the_machine_beside_the_functions(monkeypatch):
    t = time_interleaved({"f": lambda: sum(range(100))}, warmup=1, min_repeat=5, min_time=0.0)["f"]
    assert t.load is not None and t.load >= 1.0
    monkeypatch.setattr(LoadProbe, "quiet_seconds", lambda self: 1e-12)      # as if the machine had been idle, far faster
    t = time_interleaved({"f": lambda: sum(range(100))}, warmup=1, min_repeat=5, min_time=0.0)["f"]
    assert "reference workload" in t.contaminated
    assert time_interleaved({"f": lambda: None}, min_repeat=2, min_time=0.0, probe=False)["f"].load is None


def test_time_interleaved_repeats_every_function():
    calls = {"a": 0, "b": 0}
    fns = {name: (lambda name=name: calls.__setitem__(name, calls[name] + 1)) for name in calls}
    t = time_interleaved(fns, warmup=1, min_repeat=7, min_time=0.0)
    assert t["a"].n == t["b"].n == 7
    assert calls == {"a": 8, "b": 8}


def test_peak_memory_sees_a_temporary_allocation():
    n = 4 * 2**20

    def fn():
        x = torch.ones(n, dtype=torch.float32)      # 16 MiB, freed before returning
        return float(x.sum())

    peak, result = peak_memory(fn, "cpu")
    assert result == n
    assert peak is not None and 16 * 2**20 <= peak < 20 * 2**20


def test_peak_memory_keeps_the_profilers_lines_off_stderr_and_passes_the_rest():
    """The torch profiler (kineto) writes start/stop lines to file descriptor 2 on every use; they
    must not reach the terminal, while what the measured code writes there must."""
    code = ("import os, sys, torch\n"
            "from sata.bench.timing import peak_memory\n"
            "def fn():\n"
            "    print('from python', file=sys.stderr)\n"
            "    os.write(2, b'from C\\n')\n"
            "    return torch.ones(256, 1024)\n"
            "print(peak_memory(fn)[0], peak_memory(fn)[0])\n")
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1048576", "1048576"]
    assert r.stderr.splitlines() == ["from python", "from C"] * 2


@pytest.mark.parametrize("ours,theirs,expected", [
    ([2.0, 1.0, 0.5], [1.0, 1.0, 1.0], {"context": 100, "status": "interpolated"}),
    ([0.5, 0.5, 0.5], [1.0, 1.0, 1.0], {"context": 10, "status": "faster at every measured context"}),
    ([2.0, 2.0, 2.0], [1.0, 1.0, 1.0], {"context": None, "status": "not reached up to 1000"}),
], ids=["interpolated", "always-faster", "never"])
def test_crossover(ours, theirs, expected):
    got = crossover([10, 100, 1000], ours, theirs)
    assert {k: got[k] for k in expected} == expected


def test_crossover_interpolates_in_log_space():
    # ratio 4 at 1e3, 1/4 at 1e5: equal at 1e4
    assert crossover([1000, 100000], [4.0, 1.0], [1.0, 4.0])["context"] == 10000


def test_agreement():
    a = torch.tensor([1.0, 2.0, 3.0, 100.0])
    got = agreement(a, torch.tensor([1.0, 2.0, 3.5, 1.0]))
    assert got["max_abs_diff"] == 99.0 and got["frac_close"] == 0.5 and got["median_abs_diff"] == 0.0


# ---------------------------------------------------------------------------- decode sweep
def test_repeated_segment_state_is_exact():
    """Long contexts in quick runs repeat a streamed segment; its state is r times the segment's."""
    _, k, v = _qkv((1, 2, 50, 4), seed=3)
    seg = sata.accumulate_state(k, v, n_taylor=3)
    streamed = sata.accumulate_state(torch.cat([k] * 4, dim=2), torch.cat([v] * 4, dim=2), n_taylor=3)
    scaled = _scaled_state(seg, 4, 200)
    torch.testing.assert_close(scaled.kv, streamed.kv, rtol=1e-12, atol=1e-12)
    assert scaled.n_tokens == streamed.n_tokens == 200
    assert scaled.kv.stride() == seg.kv.stride()       # same layout: the decode kernel reads it in place


def test_run_decode_measures_all_methods_and_skips_what_does_not_fit():
    cfg = DecodeConfig(n_heads=2, d_key=4, n_taylor=3, contexts=(32, 64, 128), stream_limit=32, min_time=0.0,
                       min_repeat=2, max_bytes=2 * 4 * 100 * 8)   # a KV cache of < 100 tokens
    res = run_decode(cfg, progress=False)
    rows = {r["context"]: r for r in res["rows"]}
    assert [r["streamed_tokens"] for r in res["rows"]] == [32, 32, 32]
    for n in (32, 64):
        for m in ("sata", "sdpa", "paper"):
            assert rows[n][m]["time"]["median"] > 0 and rows[n][m]["peak_bytes"] >= rows[n][m]["held_bytes"]
        # sata and the paper's formulation compute the same attention
        assert rows[n]["sata"]["vs_paper"]["frac_close"] == 1.0
    assert "over the memory limit" in rows[128]["sdpa"]["skipped"]
    assert rows[64]["sdpa"]["held_bytes"] == 2 * 65 * 8 * 4
    assert rows[64]["sata"]["held_bytes"] == 2 * sata.state_size(4, 4, 3) * 4


# The interface of the paper's own code (github.com/glassroom/sata_attention, not shipped here): a module whose
# terms hold prev_H_S [B, H, 1, m_p, Ev] and prev_H_Z [B, H, 1, m_p, 1], stepped by forward(q, k, v, continue_prev).
# This stand-in computes through PaperTaylorAttention from exactly that layout, so the bench's plumbing (loading
# the file, setting the module's state, timing and comparing its step) is tested; the real file agrees with sata to
# 6e-8 in float32 (docs/PERFORMANCE.md).
_PAPER_CODE_STAND_IN = """
import torch
from sata.bench.baselines import PaperTaylorAttention


class SymmetryAwareTaylorApproximatedAttention(torch.nn.Module):
    def __init__(self, d_key, d_val, is_causal, n_taylor=4):
        super().__init__()
        self.formulation = PaperTaylorAttention(d_key, n_taylor)
        self.tptts = torch.nn.ModuleList(torch.nn.Module() for _ in range(n_taylor))

    def forward(self, Q, K, V, continue_prev=False):
        state = [(t.prev_H_S[:, :, 0], t.prev_H_Z[:, :, 0, :, 0]) for t in self.tptts]
        y, new = self.formulation.step(Q, K, V, state)
        for t, (num, den) in zip(self.tptts, new):
            t.prev_H_S, t.prev_H_Z = num[:, :, None], den[:, :, None, :, None]
        return y
"""


def test_run_decode_times_the_papers_code_from_the_same_state(tmp_path):
    path = tmp_path / "sata_attention.py"
    path.write_text(_PAPER_CODE_STAND_IN)
    cfg = DecodeConfig(n_heads=2, d_key=4, n_taylor=3, contexts=(32, 64), stream_limit=32, min_time=0.0, min_repeat=2,
                       paper_code=str(path))
    assert cfg.methods == ("sata", "sdpa", "paper", "paper_code")
    res = run_decode(cfg, progress=False)
    for row in res["rows"]:
        assert row["paper_code"]["time"]["median"] > 0 and row["sata_over_paper_code"] > 0
        assert row["sata"]["vs_paper_code"]["max_abs_diff"] < 1e-5      # the same attention from the same state
    table = decode_table(res)
    assert "paper code" in table and "sata/paper code" in table
    assert "paper code" not in decode_table(run_decode(dataclasses.replace(cfg, paper_code=None, methods=("sata",)),
                                                       progress=False))


def test_paper_code_bad_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="--paper-code .*no such file"):
        run_decode(DecodeConfig(n_heads=2, d_key=4, contexts=(8,), paper_code=str(tmp_path / "missing.py")),
                   progress=False)
    other = tmp_path / "other.py"
    other.write_text("x = 1\n")
    with pytest.raises(ValueError, match="no SymmetryAwareTaylorApproximatedAttention"):
        run_decode(DecodeConfig(n_heads=2, d_key=4, contexts=(8,), paper_code=str(other)), progress=False)
    assert cli.main(["bench", "prefill", "--tiny", "--paper-code", str(other), "--no-progress"]) == 2


# ---------------------------------------------------------------------------- the command
def _threads():
    return ["--threads", str(torch.get_num_threads())]


def test_bench_all_tiny_writes_json_and_markdown(tmp_path, capsys):
    js, md = tmp_path / "bench.json", tmp_path / "PERFORMANCE.md"
    assert cli.main(["bench", "all", "--tiny", "--no-progress", "--json", str(js), "--markdown", str(md),
                     *_threads()]) == 0
    out = capsys.readouterr().out
    data = json.loads(js.read_text())
    assert {"command", "date", "machine", "targets"} <= set(data)
    rows = data["targets"]["rows"]
    assert [r["id"] for r in rows] == ["1a", "1b", "1c", "2", "3", "4a", "4b", "5", "6"]
    assert all(r["status"] in ("PASS", "FAIL", "NOT MEASURED") for r in rows)
    m = data["targets"]["measurements"]
    assert m["copy_bandwidth"]["bytes_per_s"] > 0 and m["matmul"]["flops_per_s"] > 0
    assert {"decode", "constant", "serving", "prefill", "training", "scaling"} <= set(m)
    assert m["training"]["peak_bytes"] >= m["training"]["reference_bytes"] / 8
    text = md.read_text()
    assert "sata bench all" in text and "--tiny" in text and "| 1a |" in text and "crossover" in text
    assert "Targets (issue 4)" in out and "sata/SDPA" in out


def test_bench_decode_subcommand(tmp_path):
    js = tmp_path / "d.json"
    assert cli.main(["bench", "decode", "--tiny", "--no-progress", "--heads", "2", "--head-size", "4",
                     "--contexts", "16,48", "--json", str(js), *_threads()]) == 0
    data = json.loads(js.read_text())
    assert [r["context"] for r in data["decode"]["rows"]] == [16, 48]
    assert data["decode"]["config"]["n_heads"] == 2


@pytest.mark.parametrize("what, module, fn", [("decode", "sata.bench.decode", "_measure"),
                                              ("prefill", "sata.bench.prefill", "_prefill_row")])
def test_bench_ctrl_c_at_the_first_context_of_the_window_mode(what, module, fn, tmp_path, monkeypatch, capsys):
    """Nothing finished: empty tables (no window section), the files say so, exit 130."""
    import importlib

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(module), fn, interrupt)
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    assert cli.main(["bench", what, "--tiny", "--no-progress", "--heads", "2", "--head-size", "4", "--window", "4",
                     "--sinks", "1", "--contexts", "16,48", "--json", str(js), "--markdown", str(md),
                     *_threads()]) == 130
    assert json.loads(js.read_text())[what]["rows"] == []
    assert "Interrupted (Ctrl-C): the tables hold the 0 sizes finished" in md.read_text()
    assert "interrupted: the tables and files hold the 0 finished" in capsys.readouterr().err


@pytest.mark.parametrize("what, module, fn", [("decode", "sata.bench.decode", "_measure"),
                                              ("prefill", "sata.bench.prefill", "_prefill_row")])
def test_bench_ctrl_c_keeps_the_finished_contexts(what, module, fn, tmp_path, monkeypatch, capsys):
    """Ctrl-C during the second context: the first is printed and written, and the exit status says interrupted."""
    import importlib

    mod = importlib.import_module(module)
    real, calls = getattr(mod, fn), []

    def measure_then_interrupt(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(mod, fn, measure_then_interrupt)
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    assert cli.main(["bench", what, "--tiny", "--no-progress", "--heads", "2", "--head-size", "4",
                     "--contexts", "16,48,64", "--json", str(js), "--markdown", str(md), *_threads()]) == 130
    res = json.loads(js.read_text())[what]
    key = "context" if what == "decode" else "length"
    assert res["interrupted"] is True and [r[key] for r in res["rows"]] == [16] and len(calls) == 2
    assert "interrupted: the tables and files hold the 1 finished" in capsys.readouterr().err
    assert md.read_text().count("\n| 16 |") == 1 and "Interrupted (Ctrl-C): the tables hold the 1 sizes" in md.read_text()
    # called from Python (sata replicate, the targets) without partial=True, Ctrl-C still stops the caller
    calls.clear()
    small = dict(n_heads=2, d_key=4, n_taylor=2, min_time=0.01, min_repeat=1, methods=("sata",))
    with pytest.raises(KeyboardInterrupt):
        if what == "decode":
            mod.run_decode(mod.DecodeConfig(contexts=(16, 48), **small), progress=False)
        else:
            mod.run_prefill(mod.PrefillConfig(lengths=(16, 48), **small), progress=False)


def test_bench_and_replicate_print_no_profiler_lines(tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for argv in (["bench", "decode", "--tiny", "--heads", "2", "--contexts", "16,32"],
                 ["replicate", "--tiny", "--parts", "decode", "--out", str(tmp_path / "rep")]):
        r = subprocess.run([sys.executable, "-m", "sata.cli", *argv], env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        noise = [line for line in (r.stdout + r.stderr).splitlines() if "USDT" in line or ".cpp:" in line]
        assert noise == [], noise[:3]


@pytest.mark.parametrize("what", ["decode", "prefill"])
def test_bench_window_flags_reach_the_op(what, tmp_path, capsys):
    """--window covering every context makes sata's window mode exact softmax: it agrees with SDPA where the
    plain op does not; the JSON records the settings and the plain op's timings beside the window mode's."""
    js = tmp_path / "w.json"
    assert cli.main(["bench", what, "--tiny", "--no-progress", "--heads", "2", "--head-size", "4", "--contexts",
                     "16,48", "--window", "64", "--sinks", "2", "--recentre", "0.5", "--json", str(js),
                     *_threads()]) == 0
    out = capsys.readouterr().out
    res = json.loads(js.read_text())[what]
    c = res["config"]
    assert (c["window"], c["sinks"], c["recentre"]) == (64, 2, 0.5) and "plain" in c["methods"]
    for r in res["rows"]:
        assert r["sata"]["vs_sdpa"]["frac_close"] == 1.0          # window >= context: softmax
        assert r["sata"]["vs_plain"]["frac_close"] < 1.0          # not the plain op
        assert r["plain"]["time"]["median"] > 0 and r["sata_over_plain"] > 0
    if what == "decode":  # the state held: the plain state, the window and sink buffers, the key centre
        H, E, W, S = 2, 4, 64, 2
        floats = H * sata.state_size(E, E, c["n_taylor"], window=W, sinks=S) + H * E
        assert res["rows"][0]["sata"]["held_bytes"] == 4 * floats + W + 8 * S
    assert "Window mode (window=64, sinks=2, recentre=0.5" in out and "window/plain" in out


def test_bench_window_flags_default_off_and_checked(capsys):
    assert DecodeConfig().methods == ("sata", "sdpa", "paper") and DecodeConfig().hybrid == {}
    assert DecodeConfig(sinks=4).methods == ("sata", "plain", "sdpa", "paper")
    assert cli.main(["bench", "decode", "--tiny", "--window", "-1"]) == 2
    assert "window must be a non-negative int" in capsys.readouterr().err
    assert cli.main(["bench", "targets", "--tiny", "--sinks", "2"]) == 2
    assert "apply to decode and prefill" in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["decode", "--heads", "0"], "--heads must be a positive integer, got 0"),
    (["decode", "--n-taylor", "0"], "--n-taylor must be a positive integer"),
    (["prefill", "--batch", "-1"], "--batch must be a positive integer"),
    (["decode", "--threads", "0"], "--threads must be a positive integer"),
    (["decode", "--contexts", "64,abc"], "--contexts must be comma-separated positive integers"),
    (["decode", "--contexts", "0"], "--contexts must be comma-separated positive integers"),
    (["decode", "--json", "/proc/sata-bench.json"], "--json /proc/sata-bench.json: not a file that can be written"),
    (["decode", "--markdown", "."], "--markdown .: not a file that can be written"),
    (["mqar", "--preset", "smoke", "--results", "FILE/r.jsonl"], "r.jsonl: not a file that can be written"),
], ids=["heads-0", "n_taylor-0", "batch-negative", "threads-0", "contexts-str", "contexts-0", "json-unwritable",
        "markdown-dir", "results-under-a-file"])
def test_bench_bad_numbers_and_paths_are_refused_before_any_work(argv, match, capsys, tmp_path):
    """0 used to mean the default (a different configuration than asked, exit 0); bad paths failed after the work."""
    (tmp_path / "FILE").write_text("")
    argv = [a.replace("FILE", str(tmp_path / "FILE")) for a in argv]
    assert cli.main(["bench", *argv, "--tiny", "--no-progress"]) == 2
    assert match in capsys.readouterr().err


def test_a_subcommand_refusal_exits_2(tmp_path, capsys):
    assert cli.main(["convert", "--quick", "--n-taylor", "2", "--out", str(tmp_path)]) == 2
    assert "n_taylor >= 3" in capsys.readouterr().err


# ---------------------------------------------------------------------------- sata bench generate
def test_bench_generate_quick_tiny_llama(tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    from sata.bench.generate import VARIANTS

    assert cli.main(["bench", "generate", "--model", "tiny-llama", "--quick", "--contexts", "64,160", "--steps", "3",
                     "--no-progress", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    run = json.loads((tmp_path / "generate.json").read_text())
    assert (tmp_path / "generate.png").stat().st_size > 10_000
    rows = run["generate"]["rows"]
    assert [r["context"] for r in rows] == [64, 160]
    for row in rows:
        v = row["variants"]
        assert list(v) == list(VARIANTS)
        assert v["sdpa_dynamic"]["vs_dynamic"] == 1.0
        for name, r in v.items():
            assert r["time"]["n"] == 3 and r["p10"] <= r["time"]["median"] <= r["p90"], name
            assert r["tokens_per_s"] == pytest.approx(1 / r["time"]["median"])
            assert r["filled_by"] == "prefill"
            assert f"{row['context']:,}" in text and name in text
        # tiny-llama: 2 layers, 2 key/value heads of 16; SATA: D = C(18, 2) = 153 features x 17 columns (float32)
        assert v["sata"]["cache_bytes"] == v["sata"]["cache_bytes_after"] == 2 * 2 * 153 * 17 * 4
        window = 2 * 2 * (64 + 4) * 2 * 16 * 4                               # keys and values of window and sinks
        assert window < v["sata_window"]["cache_bytes_after"] - v["sata"]["cache_bytes_after"] < 2 * window
        # DynamicCache: keys and values of every token, the prompt's and those of 2 warm-up + 3 timed steps
        assert v["sdpa_dynamic"]["cache_bytes_after"] == 2 * 2 * 2 * 16 * 4 * (row["context"] + 5)
        assert v["sdpa_static"]["cache_bytes"] == 2 * 2 * 2 * 16 * 4 * (row["context"] + 3 + 4)
    # constant state, growing KV cache
    assert rows[0]["variants"]["sata"]["cache_bytes_after"] == rows[1]["variants"]["sata"]["cache_bytes_after"]
    assert rows[1]["variants"]["sdpa_dynamic"]["cache_bytes_after"] > rows[0]["variants"]["sdpa_dynamic"]["cache_bytes_after"]


def test_bench_generate_random_fill_above_the_limit():
    pytest.importorskip("transformers")
    from sata.bench.generate import GenerateConfig, load_model, run_generate

    res = run_generate(GenerateConfig(model="tiny-llama", contexts=(32, 96), steps=2, prefill_limit=64), progress=False,
                       model=load_model("tiny-llama"))
    fills = [{name: r["filled_by"] for name, r in row["variants"].items()} for row in res["rows"]]
    assert fills[0] == dict.fromkeys(fills[0], "prefill")
    assert fills[1] == dict.fromkeys(fills[1], "random")
    for row in res["rows"]:      # the sizes a prefill leaves
        v = row["variants"]
        assert v["sdpa_dynamic"]["cache_bytes"] == 2 * 2 * 2 * 16 * 4 * row["context"]
        assert v["sata"]["cache_bytes"] == 2 * 2 * 153 * 17 * 4
        assert v["sata_window"]["cache_bytes"] == res["rows"][0]["variants"]["sata_window"]["cache_bytes"]
        for r in v.values():
            assert r["time"]["n"] == 2 and r["time"]["median"] > 0
