"""sata replicate: the float64 references are right, the statistics are right, and a tiny run
writes every figure, report.md and results.json; Ctrl-C keeps finished parts and --resume
continues from them."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import sata
from sata import cli
from sata.replicate import costs, decode, report
from sata.replicate.config import QUICK, preset
from sata.replicate.decode import stream_limit
from sata.replicate.error import FLOOR, error_stats, reference_attention
from sata.replicate.figures import FIGURES
from sata.replicate.report import decode_verdict

PNG = b"\x89PNG\r\n\x1a\n"


def _qkv(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, dtype=torch.float64, generator=g) for _ in range(3))


# ---------------------------------------------------------------------------- references and statistics
def test_blocked_softmax_reference_matches_sdpa():
    q, k, v = _qkv((3, 50, 8))
    y = reference_attention(q, k, v, kernel="softmax", block=16)
    torch.testing.assert_close(y, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_taylor", [3, 4], ids=["P3", "P4"])
def test_blocked_taylor_reference_matches_oracle(n_taylor):
    q, k, v = _qkv((3, 50, 8), seed=1)
    y = reference_attention(q, k, v, kernel="taylor", n_taylor=n_taylor, block=16)
    ref = sata.naive_sata_attention(q, k, v, n_taylor=n_taylor, is_causal=True)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


def test_error_stats_locate_a_known_error():
    y = torch.zeros(2, 64, 4, dtype=torch.float64)
    y_hat = y.clone()
    y_hat[:, 32:] = 1e-3                               # second half of the tokens off by 1e-3
    stats = error_stats(y, y_hat, y_hat, block=16)
    assert stats["max_abs"] == pytest.approx(1e-3)
    assert stats["median_log10"] == pytest.approx((FLOOR - 3) / 2)   # half the elements exact, half at 1e-3
    assert stats["by_position"]["median_log10"] == pytest.approx([FLOOR, FLOOR, -3, -3])
    assert stats["vs_taylor_max_abs"] == 0.0
    assert sum(stats["hist_counts"]) == y.numel()


def test_stream_limit_divides_every_longer_context():
    for d in QUICK.decode_heads:
        lim = stream_limit(QUICK, d)
        assert lim in (10**3, 10**4, 10**5, 10**6)
        assert all(n % lim == 0 for n in QUICK.decode_contexts if n > lim)


def test_analytic_parts_match_the_formulas():
    cfg = preset("tiny")
    c = costs.run_costs(cfg)
    row = next(r for r in c["by_context"] if r["d_key"] == 8 and r["context"] == 1000)
    assert row["state_ratio"] == pytest.approx(sata.state_size(8, 8, cfg.cost_terms) / (2 * 8 * 1000))
    p = costs.run_packing(cfg)
    r = next(r for r in p["rows"] if r["d_key"] == 8 and r["degree"] == 3)
    assert r["state_ratio"] == pytest.approx(math.comb(10, 3) / 8**3)
    pr = costs.run_precision(cfg)
    a = next(r for r in pr["rows"] if r["d_key"] == 16 and r["degree"] == 2)
    assert a["alpha"] == pytest.approx(1 / (2 * 16))
    bf16 = next(r for r in pr["first_below"] if r["d_key"] == 16 and r["format"] == "bfloat16")
    assert bf16["alpha_below_resolution_from_degree"] == 3   # 1/(3! 16^1.5) = 2.6e-3 < 1e-2 < 1/(2! 16)


def _decode_run(d, times_us, contaminated=()):
    """A decode part's run for head size ``d`` with sata and SDPA medians at contexts 1K, 10K, 100K."""
    rows = []
    for n, (ts, tk) in zip((1000, 10000, 100000), times_us):
        row = {"context": n}
        for m, t in (("sata", ts), ("sdpa", tk)):
            why = "repeats spread x3.00" if (n, m) in contaminated else None
            row[m] = {"time": {"median": t * 1e-6, "contaminated": why}, "peak_bytes": 1000}
        rows.append(row)
    return {"d_key": d, "heads": 64 // d, "rows": rows}


def _decode_part(*runs):
    return {"width": 64, "n_taylor": 4, "runs": list(runs), "summary": [decode._summarise(r) for r in runs]}


def test_decode_summary_claims_a_narrow_band_only_when_clean_measurements_show_one():
    flat = _decode_part(_decode_run(8, [(14.1, 30), (14.5, 200), (14.3, 2000)]))
    text = decode_verdict(flat)
    assert "stays within a narrow band" in text and "x1.03" in text and "contaminated" not in text
    # the busy machine: one sata step stalled at 7.96 ms; detected, it is left out and said
    busy = _decode_part(_decode_run(8, [(14.1, 30), (7960, 200), (14.3, 2000)], contaminated={(10000, "sata")}))
    text = decode_verdict(busy)
    assert "stays within a narrow band" in text and "1 measurement(s) were contaminated" in text
    table = report._decode_summary(busy["summary"])
    assert "7.96 ms" not in table and "14.1 us - 14.3 us" in table
    # not detected (or real): no narrow band is claimed
    text = decode_verdict(_decode_part(_decode_run(8, [(14.1, 30), (7960, 200), (14.3, 2000)])))
    assert "narrow band" not in text and "varies up to x564.54" in text
    # a machine so busy that one clean context is left per method: no trend is read into it
    tainted = {(n, m) for n in (1000, 10000) for m in ("sata", "sdpa")}
    busy = _decode_part(_decode_run(8, [(14.1, 30), (7960, 200), (14.3, 2000)], contaminated=tainted))
    text = decode_verdict(busy)
    assert "for sata, too few clean measurements to tell" in text
    assert "narrow band" not in text and "grows" not in text and "4 measurement(s) were contaminated" in text
    assert "| x" not in report._decode_summary(busy["summary"])             # no growth column from one point


# ---------------------------------------------------------------------------- the command
def _run(out, *extra):
    return cli.main(["replicate", "--tiny", "--out", str(out), "--no-progress",
                     "--threads", str(torch.get_num_threads()), *extra])


def test_replicate_tiny_writes_figures_report_and_results(tmp_path, monkeypatch):
    out = tmp_path / "rep"
    # Ctrl-C during part 4: parts 1-3 are on disk, the report says what is missing
    def interrupt(cfg):
        raise KeyboardInterrupt
    monkeypatch.setattr(costs, "run_packing", interrupt)
    assert _run(out) == 130
    first = json.loads((out / "results.json").read_text())
    assert first["status"] == {"error": "done", "decode": "done", "costs": "done", "packing": "not run",
                               "precision": "not run"}
    assert "not run" in (out / "report.md").read_text()
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("*.json")}
    assert any(n.startswith("error") for n in kept) and any(n.startswith("decode") for n in kept)

    # --resume finishes the rest without recomputing what was kept
    monkeypatch.undo()
    assert _run(out, "--resume") == 0
    for name, mtime in kept.items():
        if name != "_config.json":
            assert (out / "parts" / name).stat().st_mtime_ns == mtime, name

    results = json.loads((out / "results.json").read_text())
    assert set(results["status"].values()) == {"done"}
    assert {"command", "date", "config", "machine", "parts", "summary", "figures", "wall_seconds"} <= set(results)
    assert results["command"].startswith("sata replicate") and "--tiny" in results["command"]
    assert results["machine"]["torch"] == torch.__version__
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data[:8] == PNG and len(data) > 10_000, name
    report = (out / "report.md").read_text()
    for name in FIGURES:
        assert name in report, name
    # the summary numbers of the issue
    summ = results["summary"]["decode"]
    assert {s["d_key"] for s in summ} == {8, 16}
    for s in summ:
        assert s["sata"]["last_seconds"] > 0 and s["sdpa"]["last_seconds"] > 0
        assert "status" in s["crossover_vs_sdpa"] and "memory_ratio_at_largest" in s
    err = results["parts"]["error"]["combos"]
    assert len(err) == 4 and all(-16 <= c["median_log10"] < 0 for c in err)
    assert all(c["vs_taylor_max_abs"] < 1e-4 for c in err)        # exact up to float32 rounding
    assert f"{err[0]['median_log10']:.2f}" in report               # report numbers come from results.json


def test_resume_refuses_other_settings(tmp_path, capsys):
    out = tmp_path / "rep"
    assert _run(out, "--parts", "precision") == 0
    assert _run(out, "--parts", "precision", "--dtype", "float64", "--resume") == 2
    assert "other settings" in capsys.readouterr().err


def test_unknown_part_is_refused(tmp_path, capsys):
    assert _run(tmp_path, "--parts", "errors") == 2
    assert "unknown part" in capsys.readouterr().err


def test_a_fresh_run_deletes_only_its_own_files(tmp_path, capsys):
    """Without --resume earlier parts are forgotten: only the store's own files, and never a parts/ folder it did not
    write (it used to remove the whole folder, whatever it held)."""
    out = tmp_path / "rep"
    (out / "parts").mkdir(parents=True)
    (out / "parts" / "mine.txt").write_text("a user's file")
    assert _run(out, "--parts", "precision") == 2
    assert "not written by sata replicate" in capsys.readouterr().err
    assert (out / "parts" / "mine.txt").exists()
    (out / "parts" / "mine.txt").unlink()
    assert _run(out, "--parts", "precision") == 0                  # a store of its own: a fresh run replaces it
    (out / "parts" / "notes.txt").write_text("kept")
    assert _run(out, "--parts", "precision") == 0
    assert (out / "parts" / "notes.txt").read_text() == "kept"
