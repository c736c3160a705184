"""``report.md`` of a replication run, written from its ``results.json`` content only (so every
number in the report is in the JSON; the report rounds them)."""

from __future__ import annotations

from .._files import write_atomic
from ..bench.tables import CONTAMINATED, count_contaminated, decode_table, fmt_bytes, fmt_time, render
from .figures import FIGURES

__all__ = ["decode_verdict", "summarise", "write_report"]

PART_TITLES = {
    "error": "1. Reconstruction error against softmax attention",
    "decode": "2. Time and memory per generated token",
    "costs": "3. Hidden-state size and FLOPs per token against a KV cache",
    "packing": "4. Tight packing against the full tensor power",
    "precision": "5. Scaling constants against floating-point resolution",
}


def _ctx(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("M", 10**6), ("K", 10**3)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n:,}"


def summarise(parts: dict) -> dict:
    """The headline numbers (they are also in the parts; gathered here for the summary table)."""
    s: dict = {}
    dec = parts.get("decode")
    if dec:
        s["decode"] = dec["summary"]
    err = parts.get("error")
    if err:
        s["error"] = [{k: c.get(k) for k in ("d_key", "n_taylor", "median_log10", "p95_log10", "max_abs",
                                             "vs_taylor_max_abs", "skipped")} for c in err["combos"]]
    return s


FLAT_BAND = 1.5    # clean medians of one method within this max/min ratio over all contexts: "a narrow band"


def decode_verdict(dec: dict) -> str:
    """What the decode measurements show, in words: only what the clean measurements support."""
    summary = [s for s in dec["summary"] if "skipped" not in s]
    where = f"decode, batch 1, model width {dec['width']}, {dec['n_taylor']} Taylor terms"
    if not summary:
        return f"{where}: nothing measured."
    tainted = sum(len(s[m].get("contaminated_contexts", [])) for s in summary for m in ("sata", "sdpa", "paper")
                  if m in s)
    said = []
    for m, name in (("sata", "sata"), ("paper", "the paper's formulation")):
        ratios = [c["max_over_min"] for s in summary if _spans_contexts(c := s.get(m, {}).get("clean"))]
        if not ratios:
            if any(m in s for s in summary):
                said.append(f"for {name}, too few clean measurements to tell")
            continue
        worst = max(ratios)
        said.append(f"for {name}, time per generated token "
                    + (f"stays within a narrow band however long the context (max/min over contexts at most "
                       f"x{worst:.2f})" if worst <= FLAT_BAND else
                       f"varies up to x{worst:.2f} between contexts (more than the x{FLAT_BAND:g} of a flat cost)"))
    growth = [c["growth"] for s in summary if _spans_contexts(c := s.get("sdpa", {}).get("clean"))]
    if growth:
        said.append(f"for conventional attention with a KV cache it grows up to x{max(growth):.3g} from the "
                    "shortest clean context to the longest")
    text = f"{where[0].upper()}{where[1:]}: " + "; ".join(said or ["no clean measurement"]) + "."
    if tainted:
        text += (f" {tainted} measurement(s) were contaminated by other processes on the machine (marked * in the "
                 "tables, left out of these numbers): rerun on a quiet machine for clean ones.")
    return text


def _spans_contexts(clean: dict | None) -> bool:
    """Clean measurements at two contexts at least (one tells nothing about a trend)."""
    return bool(clean) and clean["first_context"] != clean["last_context"]


def _decode_summary(summary: list[dict]) -> str:
    headers = ["head size", "heads", "sata per token, min - max (clean contexts)", "SDPA+KV per token, first -> last",
               "SDPA growth", "paper per token, min - max", "crossover (sata faster from)",
               "memory ratio sata/SDPA at 1M", "contaminated"]
    rows = []
    for s in summary:
        if "skipped" in s:
            rows.append([str(s["d_key"]), str(s["heads"]), "skipped", "-", "-", "-", "-", "-", "-"])
            continue
        clean = {m: (s.get(m) or {}).get("clean") for m in ("sata", "sdpa", "paper")}
        rows.append([str(s["d_key"]), str(s["heads"]), _band(clean["sata"]), _growth(clean["sdpa"]),
                     f"x{clean['sdpa']['growth']:.3g}" if _spans_contexts(clean["sdpa"]) else "-",
                     _band(clean["paper"]), _cross(s["crossover_vs_sdpa"]), _memory(s),
                     str(sum(len(s[m].get("contaminated_contexts", [])) for m in ("sata", "sdpa", "paper") if m in s))])
    return render(headers, rows, markdown=True)


def _band(e: dict | None) -> str:
    if not e:
        return "-"
    return (f"{fmt_time(e['min_seconds'])} - {fmt_time(e['max_seconds'])} "
            f"({_ctx(e['first_context'])} to {_ctx(e['last_context'])})")


def _growth(e: dict | None) -> str:
    if not e:
        return "-"
    return (f"{fmt_time(e['first_seconds'])} at {_ctx(e['first_context'])} -> {fmt_time(e['last_seconds'])} at "
            f"{_ctx(e['last_context'])}")


def _cross(x: dict) -> str:
    if x["status"] == "interpolated":
        return f"~{_ctx(x['context'])} tokens"
    return f"<= {_ctx(x['context'])} (every context)" if x["context"] else x["status"]


def _memory(s: dict) -> str:
    if "memory_ratio_at_1e6" in s:
        return f"{s['memory_ratio_at_1e6']:.2e}"
    if "memory_ratio_at_largest" in s:
        m = s["memory_ratio_at_largest"]
        return f"{m['ratio']:.2e} (at {_ctx(m['context'])})"
    return "-"


def _error_table(err: dict, key: str, fmt) -> str:
    heads = sorted({c["d_key"] for c in err["combos"]})
    terms = sorted({c["n_taylor"] for c in err["combos"]})
    cell = {(c["d_key"], c["n_taylor"]): c for c in err["combos"]}
    rows = []
    for d in heads:
        row = [str(d)]
        for P in terms:
            c = cell.get((d, P))
            row.append("skipped" if c is None or "skipped" in c else fmt(c[key]))
        rows.append(row)
    return render(["head size"] + [f"{P} terms" for P in terms], rows, markdown=True)


def write_report(path, results: dict) -> None:
    """``report.md`` of ``results`` (the content of ``results.json``)."""
    parts = results["parts"]
    lines = _header(results) + _summary(results) + _machine(results["machine"])
    sections = {"error": _error_section, "decode": _decode_section, "costs": _costs_section,
                "packing": _packing_section, "precision": _precision_section}
    for name, section in sections.items():
        if name in parts:
            lines += [f"## {PART_TITLES[name]}", "", *section(parts[name])]
    lines += ["## Figures", "", *[f"- `{name}`: {what}" for name, what in FIGURES.items()], "",
              "Every number above is in `results.json` (unrounded), with the settings and the machine.", ""]
    write_atomic(path, "\n".join(lines).encode())


def _header(results: dict) -> list[str]:
    cfg = results["config"]
    return [
        "# sata replicate: report",
        "",
        f"Reproduces the evaluation of Heinsen & Kozachkov, *Self-Attention at Constant Cost per Token via "
        f"Symmetry-Aware Taylor Approximation* (arXiv 2602.00294) with this library. Mode **{cfg['mode']}**, "
        f"device **{cfg['device']}**, sata inputs in **{cfg['dtype']}**.",
        "",
        "Command:",
        "",
        "```bash",
        results["command"],
        "```",
        "",
        f"Started {results['date']}; wall time of this invocation {results['wall_seconds']:.0f} s"
        + (" (resumed: earlier parts reused)" if results.get("resumed") else "") + "."
        + (f" Threads: {results['threads_note']}." if results.get("threads_note") else ""),
        "",
        *[f"> Warning: {w}\n" for w in results.get("warnings", [])],
        "Parts: " + ", ".join(f"{PART_TITLES[p].split('. ', 1)[1].lower()}: **{results['status'].get(p, 'not run')}**"
                              for p in PART_TITLES),
        "",
    ]


def _summary(results: dict) -> list[str]:
    s, parts = results["summary"], results["parts"]
    lines = ["## Summary", ""]
    if "decode" in s:
        lines += [f"{decode_verdict(parts['decode'])} Medians of repeated timings on {results['config']['device']}.",
                  "", _decode_summary(s["decode"]), ""]
    if "error" in s:
        err = parts["error"]
        lines += [f"Reconstruction error, median of log10 |Y - Yhat| against float64 causal softmax attention over "
                  f"{err['tokens']:,} tokens (lower is better; sata inputs in {err['dtype']}):", "",
                  _error_table(err, "median_log10", lambda x: f"{x:.2f}"), ""]
    return lines


def _machine(m: dict) -> list[str]:
    return ["## Machine", "",
            render(["item", "value"], [
                ["CPU", str(m["cpu"])], ["cores / torch threads", f"{m['cores']} / {m['torch_threads']}"],
                ["memory", fmt_bytes(m["memory_bytes"]) if m.get("memory_bytes") else "-"],
                ["load average at start", ", ".join(f"{x:.2f}" for x in m.get("load_average") or [])],
                ["device", m["device"] + (f" ({m['gpu']})" if m.get("gpu") else "")],
                ["platform", m["platform"]], ["python", m["python"]], ["torch", m["torch"]],
                ["sata", f"{m['sata']} (git {m['sata_git_commit'] or 'unknown'})"],
                *[[p, v or "not installed"] for p, v in m["packages"].items()],
            ], markdown=True), ""]


def _error_section(err: dict) -> list[str]:
    lines = [f"Inputs q, k, v ~ N(0, 1), {err['tokens']:,} tokens, model width {err['width']} "
             f"(width / head size heads), rounded to {err['dtype']}; Y = causal softmax attention of those inputs "
             "in float64; Yhat = sata, causal, streamed through its state in chunks. Sanity line: the same Yhat "
             "against the truncated-Taylor oracle in float64 (rounding only).", "",
             "![histograms](fig1a_error_histograms.png)", "", "![by position](fig1b_error_by_position.png)", "",
             "Median log10 |Y - Yhat| (vs softmax):", "", _error_table(err, "median_log10", lambda x: f"{x:.2f}"), "",
             "95th percentile of log10 |Y - Yhat| (vs softmax):", "",
             _error_table(err, "p95_log10", lambda x: f"{x:.2f}"), "",
             "Largest |Y - Yhat| (vs softmax):", "", _error_table(err, "max_abs", lambda x: f"{x:.2e}"), "",
             "Largest |Yhat - oracle| against the truncated-Taylor oracle in float64 (exactness; rounding of "
             f"{err['dtype']} only):", "", _error_table(err, "vs_taylor_max_abs", lambda x: f"{x:.1e}"), ""]
    skipped = [c for c in err["combos"] if "skipped" in c]
    if skipped:
        lines += ["Skipped combinations:", ""]
        lines += [f"- head size {c['d_key']}, {c['n_taylor']} terms (D = {c['features']:,} features, state "
                  f"{fmt_bytes(c['state_bytes'])}): {c['skipped']}" for c in skipped]
        lines += [""]
    return lines


def _decode_section(dec: dict) -> list[str]:
    lines = ["One decode step (a new query, key and value per head) after a context built by streaming prefill, "
             "timed round-robin for the three methods on the same tokens: sata (`sata_attention` with the "
             "context's state), conventional attention (SDPA over a preallocated KV cache, written in place), and "
             "the paper's formulation (one pass per Taylor term). Memory = bytes the context holds (KV cache or "
             "state) + the peak of bytes torch allocates during the step (CPU: torch profiler allocation events; "
             "CUDA: the caching allocator's peak).", "",
             "![decode](fig2_decode_time_memory.png)", ""]
    for run in dec["runs"]:
        if not run.get("rows"):
            lines += [f"Head size {run['d_key']}: skipped ({run.get('skipped', '')})", ""]
            continue
        lim = run["config"].get("stream_limit")
        lines += [f"**Head size {run['d_key']}, {run['heads']} heads** (streamed: "
                  + (f"first {_ctx(lim)} tokens; longer contexts repeat them, states scaled exactly)" if lim
                     else "every token)"), "", decode_table(run, markdown=True), ""]
    if count_contaminated(dec["runs"]):
        lines += [CONTAMINATED, ""]
    notes = [s for s in dec["summary"] if "sdpa_skipped_from" in s]
    lines += [f"- head size {s['d_key']}: SDPA skipped from {_ctx(s['sdpa_skipped_from'])} tokens: "
              f"{s['sdpa_skipped_reason']}" for s in notes]
    return lines + ([""] if notes else [])


def _costs_section(c: dict) -> list[str]:
    return ["From the formulas (they do not depend on the device): per head, a KV cache holds n (d_k + d_v) "
            "numbers and conventional decode costs 2 n d_k + 2 n d_v + 3 n FLOPs per token; sata holds "
            f"D (d_v + 1) numbers and costs `sata.flops_per_token` FLOPs, whatever n ({c['n_taylor']} terms).", "",
            "![costs](fig3a_state_flops_vs_kv_cache.png)", "", "![heatmaps](fig3b_multihead_heatmaps.png)", "",
            render(["head size", "state (numbers/head)", "FLOPs/token/head", "KV cache larger from",
                    "conventional FLOPs larger from"],
                   [[str(r["d_key"]), f"{r['state_numel']:,}", f"{r['sata_flops']:,}",
                     f"{r['state_equal_context']:,.0f} tokens", f"{r['flops_equal_context']:,.0f} tokens"]
                    for r in c["equal_cost_context"]], markdown=True), ""]


def _packing_section(packing: dict) -> list[str]:
    rows = packing["rows"]
    terms = sorted({r["term"] for r in rows})
    return ["State per term: C(d+p-1, p) (d_v+1) packed vs d^p (d_v+1) full; FLOPs per term: c N + 4 N (d_v+1) "
            "with N features, c = 4 packed, 2 full, 0 for p < 2.", "",
            "![packing](fig4_tight_packing.png)", "", "State ratio packed / full, per term:", "",
            render(["head size"] + [str(t) for t in terms],
                   [[str(d)] + [f"{r['state_ratio']:.2g}" for r in rows if r["d_key"] == d]
                    for d in sorted({r["d_key"] for r in rows})], markdown=True), ""]


def _precision_section(p: dict) -> list[str]:
    return ["alpha_p = 1 / (p! d^(p/2)) multiplies the degree-p term (scale 1/sqrt(d)). The paper's code "
            "applies it to one side; sata splits it as sqrt(alpha_p) on the query and the key features. First "
            "degree p whose constant falls below each format's resolution (torch.finfo(...).resolution):", "",
            "![precision](fig5_scaling_constants.png)", "",
            render(["head size", "format", "alpha_p < resolution from p", "sqrt(alpha_p) < resolution from p",
                    "alpha_p < smallest normal from p"],
                   [[str(r["d_key"]), r["format"], _p(r["alpha_below_resolution_from_degree"]),
                     _p(r["sqrt_alpha_below_resolution_from_degree"]),
                     _p(r["alpha_below_smallest_normal_from_degree"])] for r in p["first_below"]],
                   markdown=True), ""]


def _p(x) -> str:
    return "-" if x is None else str(x)
