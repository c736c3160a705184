"""Tables of benchmark results, as aligned text for the terminal or as Markdown."""

from __future__ import annotations

__all__ = ["CONTAMINATED", "count_contaminated", "decode_table", "fmt_bytes", "fmt_time", "prefill_table", "render",
           "scaling_table", "targets_table", "window_table"]

CONTAMINATED = ("* contaminated: other processes slowed this measurement (its repeats spread, or a reference "
                "workload timed beside it ran slower than on the quiet machine): not a result; rerun on a quiet machine")


def count_contaminated(result) -> int:
    """Timings marked contaminated anywhere in a (JSON-ready) result."""
    if isinstance(result, dict):
        own = 1 if result.get("contaminated") else 0
        return own + sum(count_contaminated(v) for k, v in result.items() if k != "contaminated")
    if isinstance(result, list):
        return sum(count_contaminated(v) for v in result)
    return 0


def render(headers: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    """Aligned text (or a Markdown table) of string cells."""
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    # numbers right-aligned, text left-aligned
    numeric = [bool(rows) and all(r[i][:1].isdigit() or r[i] in ("-", "skipped") for r in rows) for i in range(len(headers))]
    fmt = lambda cells: "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)])


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, f in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= f:
            return f"{seconds / f:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1000 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError


def _ctx(n: int) -> str:
    for unit, size in (("M", 2**20), ("K", 2**10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n:,}"


def _t(entry: dict | None) -> str:
    if not isinstance(entry, dict):
        return "-"
    if "skipped" in entry:
        return "skipped"
    return fmt_time(entry["time"]["median"]) + (" *" if entry["time"].get("contaminated") else "")


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def decode_table(res: dict, markdown: bool = False) -> str:
    """One row per context: medians per method, ratios sata/baseline, peak memory per token."""
    code = any("paper_code" in r for r in res["rows"])   # the paper's own code was timed too (--paper-code)
    headers = ["context", "streamed", "sata", "SDPA+KV", "paper", *(["paper code"] if code else []), "sata/SDPA",
               "sata/paper", *(["sata/paper code"] if code else []), "sata mem", "SDPA mem", "paper mem"]
    rows = []
    for r in res["rows"]:
        mem = lambda m: fmt_bytes(r[m].get("peak_bytes", r[m].get("held_bytes"))) if "time" in r.get(m, {}) else "-"
        rows.append([_ctx(r["context"]), _ctx(r["streamed_tokens"]), _t(r.get("sata")), _t(r.get("sdpa")),
                     _t(r.get("paper")), *([_t(r.get("paper_code"))] if code else []), _ratio(r.get("sata_over_sdpa")),
                     _ratio(r.get("sata_over_paper")), *([_ratio(r.get("sata_over_paper_code"))] if code else []),
                     mem("sata"), mem("sdpa"), mem("paper")])
    return render(headers, rows, markdown)


def prefill_table(res: dict, markdown: bool = False) -> str:
    """One row per prompt length: medians per method, ratios, sata's FLOP rate."""
    headers = ["length", "sata", "SDPA causal", "paper", "sata/SDPA", "sata/paper", "sata GFLOP/s", "sata mem",
               "paper mem"]
    rows = []
    for r in res["rows"]:
        s = r.get("sata", {})
        rate = s.get("method_flops_per_s")
        mem = lambda m: fmt_bytes(r[m].get("transient_peak_bytes")) if "time" in r.get(m, {}) else "-"
        rows.append([_ctx(r["length"]), _t(r.get("sata")), _t(r.get("sdpa")), _t(r.get("paper")),
                     _ratio(r.get("sata_over_sdpa")), _ratio(r.get("sata_over_paper")),
                     "-" if rate is None else f"{rate / 1e9:.3g}", mem("sata"), mem("paper")])
    return render(headers, rows, markdown)


def window_table(res: dict, markdown: bool = False) -> str:
    """The window mode (``sata``) beside the plain op (``plain``) of a decode or prefill sweep, one row per length."""
    n_key = "context" if "context" in res["rows"][0] else "length"
    headers = [n_key, "window mode", "plain op", "window/plain", "window/SDPA", "window mem", "plain mem"]
    mem = lambda e: fmt_bytes(e.get("peak_bytes", e.get("transient_peak_bytes", e.get("held_bytes")))) \
        if "time" in (e or {}) else "-"
    rows = [[_ctx(r[n_key]), _t(r.get("sata")), _t(r.get("plain")), _ratio(r.get("sata_over_plain")),
             _ratio(r.get("sata_over_sdpa")), mem(r.get("sata")), mem(r.get("plain"))] for r in res["rows"]]
    return render(headers, rows, markdown)


def targets_table(res: dict, markdown: bool = False) -> str:
    headers = ["#", "target", "measured", "status", "configuration", "note"]
    rows = [[r["id"], r["target"], r["measured"], r["status"], r["at"], r["note"]] for r in res["rows"]]
    return render(headers, rows, markdown)


def scaling_table(res: dict, markdown: bool = False) -> str:
    headers = ["head size", "terms", "heads", "features D", "state", "FLOPs/token", "decode", "prefill/token",
               "decode rel.", "prefill rel.", "FLOPs rel."]
    rows = []
    for e in res["table"]:
        if "skipped" in e:
            rows.append([str(e["d_key"]), str(e["n_taylor"]), str(e["heads"]), f"{e['features']:,}",
                         fmt_bytes(e["state_bytes"]), f"{e['flops_per_token']:.3g}", "skipped", "skipped", "-", "-", "-"])
            continue
        rows.append([str(e["d_key"]), str(e["n_taylor"]), str(e["heads"]), f"{e['features']:,}",
                     fmt_bytes(e["state_bytes"]), f"{e['flops_per_token']:.3g}", fmt_time(e.get("decode_seconds")),
                     fmt_time(e.get("prefill_seconds_per_token")) if "prefill_seconds_per_token" in e else "skipped",
                     _ratio(e.get("decode_seconds_rel")), _ratio(e.get("prefill_seconds_per_token_rel")),
                     _ratio(e.get("flops_rel"))])
    return render(headers, rows, markdown)
