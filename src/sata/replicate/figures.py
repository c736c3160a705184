"""Figures of a replication run, drawn from its results (``results.json``) with matplotlib (Agg).

Each function takes a part's results and a device label and writes PNGs, returning their names.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..bench.tables import count_contaminated

__all__ = ["FIGURES", "plot_costs", "plot_decode", "plot_error", "plot_packing", "plot_precision"]

# file name -> what it shows (report and docs list them from here)
FIGURES = {
    "fig1a_error_histograms.png": "Reconstruction error vs float64 softmax attention: histograms per (head size, terms)",
    "fig1b_error_by_position.png": "Reconstruction error by token position: median and 5-95% band",
    "fig2_decode_time_memory.png": "Decode time and peak memory per generated token vs context length",
    "fig3a_state_flops_vs_kv_cache.png": "Hidden-state size and FLOPs per token relative to a KV cache, by context",
    "fig3b_multihead_heatmaps.png": "Total state size and FLOPs per token over (head size, model width)",
    "fig4_tight_packing.png": "Reduction from tight packing vs the full tensor power, per Taylor term",
    "fig5_scaling_constants.png": "Scaling constants 1/(p! d^(p/2)) vs float16/bfloat16/float32 resolution",
}

_HEAD_COLORS = {8: "C0", 16: "C1", 24: "C6", 32: "C2", 40: "C7", 48: "C8", 56: "C9", 64: "C3"}
_DPI = 130


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(d: int) -> str:
    return _HEAD_COLORS.get(d, "k")


def _save(fig, out: Path, name: str) -> str:
    fig.savefig(out / name, dpi=_DPI)
    _plt().close(fig)
    return name


def _tokens(n: float) -> str:
    for unit, size in (("M", 1e6), ("K", 1e3)):
        if n >= size:
            v = n / size
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{n:.0f}"


# ---------------------------------------------------------------------------- 1. error
def plot_error(res: dict, out: Path, device: str) -> list[str]:
    plt = _plt()
    combos = {(c["d_key"], c["n_taylor"]): c for c in res["combos"]}
    heads = sorted({d for d, _ in combos})
    terms = sorted({p for _, p in combos})
    if not heads or not terms:
        return []
    edges = res["hist_edges_log10"]
    width = edges[1] - edges[0]
    sub = (f"{res['tokens']:,} tokens, model width {res['width']}, sata inputs in {res['dtype']}, on {device}; "
           f"errors below 1e{res['floor_log10']:.0f} counted at 1e{res['floor_log10']:.0f}")

    # histograms: rows = terms, columns = head sizes
    fig, axes = plt.subplots(len(terms), len(heads), figsize=(3.2 * len(heads), 2.5 * len(terms) + 1.0),
                             sharex=True, squeeze=False, layout="constrained")
    for i, P in enumerate(terms):
        for j, d in enumerate(heads):
            ax = axes[i][j]
            c = combos.get((d, P))
            ax.set_title(f"head size {d}, {P} terms", fontsize=9)
            if c is None or "skipped" in c:
                ax.text(0.5, 0.5, "skipped:\n" + _wrap(c["skipped"] if c else "not run", 30), ha="center",
                        va="center", fontsize=7, transform=ax.transAxes, color="0.4")
                ax.set_yticks([])
            else:
                total = sum(c["hist_counts"]) * width
                ax.bar(edges[:-1], [x / total for x in c["hist_counts"]], width=width, align="edge",
                       color=_color(d), alpha=0.6, label="vs softmax (float64)")
                tot_t = sum(c["hist_counts_vs_taylor"]) * width
                ax.bar(edges[:-1], [x / tot_t for x in c["hist_counts_vs_taylor"]], width=width, align="edge",
                       color="0.5", alpha=0.35, label="vs truncated-Taylor oracle (float64)")
                ax.axvline(c["median_log10"], color=_color(d), lw=1.2, label="median vs softmax")
                ax.grid(axis="y", alpha=0.3)
            ax.set_xlim(res["floor_log10"], 1)
            if i == len(terms) - 1:
                ax.set_xlabel(r"$\log_{10}|Y-\hat{Y}|$")
            if j == 0:
                ax.set_ylabel("density")
    handles, labels = _first_legend(axes)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8)
    fig.suptitle("Elementwise error of sata vs conventional causal softmax attention (float64)\n" + sub, fontsize=10)
    names = [_save(fig, out, "fig1a_error_histograms.png")]

    # by position: rows = head sizes, columns = terms
    fig, axes = plt.subplots(len(heads), len(terms), figsize=(3.2 * len(terms), 2.4 * len(heads) + 1.0),
                             sharey=True, squeeze=False, layout="constrained")
    for i, d in enumerate(heads):
        for j, P in enumerate(terms):
            ax = axes[i][j]
            c = combos.get((d, P))
            ax.set_title(f"head size {d}, {P} terms", fontsize=9)
            ax.set_xlim(0, res["tokens"])
            ax.xaxis.set_major_formatter(_tick_tokens())
            if c is None or "skipped" in c:
                ax.text(0.5, 0.5, "skipped:\n" + _wrap(c["skipped"] if c else "not run", 30), ha="center",
                        va="center", fontsize=7, transform=ax.transAxes, color="0.4")
            else:
                bp = c["by_position"]
                x = bp["position"]
                ax.fill_between(x, bp["p5_log10"], bp["p95_log10"], color=_color(d), alpha=0.25, lw=0,
                                label="5% to 95%, vs softmax")
                ax.plot(x, bp["median_log10"], color=_color(d), lw=1.2, label="median, vs softmax")
                ax.plot(x, bp["vs_taylor_median_log10"], color="0.4", lw=1, ls="--",
                        label="median, vs Taylor oracle")
                ax.grid(alpha=0.3)
            ax.set_ylim(res["floor_log10"], 1)
            if i == len(heads) - 1:
                ax.set_xlabel("token position")
            if j == 0:
                ax.set_ylabel(r"$\log_{10}|Y-\hat{Y}|$")
    handles, labels = _first_legend(axes)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8)
    fig.suptitle("Error of sata vs causal softmax attention (float64) by token position\n" + sub, fontsize=10)
    names.append(_save(fig, out, "fig1b_error_by_position.png"))
    return names


def _first_legend(axes):
    for row in axes:
        for ax in row:
            h, l = ax.get_legend_handles_labels()
            if h:
                return h, l
    return [], []


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def _tick_tokens():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda x, _: _tokens(x))


# ---------------------------------------------------------------------------- 2. decode
def plot_decode(res: dict, out: Path, device: str) -> list[str]:
    plt = _plt()
    from matplotlib.lines import Line2D

    runs = [r for r in res["runs"] if r.get("rows")]
    if not runs:
        return []
    styles = {"sata": ("-", "o", "sata"), "sdpa": ("--", "s", "SDPA + KV cache"), "paper": (":", "^", "paper's formulation")}
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2), layout="constrained")
    for run in runs:
        d, col = run["d_key"], _color(run["d_key"])
        for m, (ls, mk, _) in styles.items():
            pts = [(r["context"], r[m]["time"]["median"], r[m].get("peak_bytes")) for r in run["rows"]
                   if "time" in r.get(m, {})]
            if not pts:
                continue
            x = [p[0] for p in pts]
            axes[0].plot(x, [p[1] * 1e3 for p in pts], ls=ls, marker=mk, ms=3, color=col)
            bad = [(r["context"], r[m]["time"]["median"]) for r in run["rows"] if r.get(m, {}).get("time", {}).get("contaminated")]
            if bad:
                axes[0].plot([b[0] for b in bad], [b[1] * 1e3 for b in bad], ls="none", marker="x", ms=9, color="r")
            if all(p[2] is not None for p in pts):
                axes[1].plot(x, [p[2] / 2**20 for p in pts], ls=ls, marker=mk, ms=3, color=col)
        ratio = [(r["context"], r["sata_over_sdpa"]) for r in run["rows"] if "sata_over_sdpa" in r]
        if ratio:
            axes[2].plot([p[0] for p in ratio], [p[1] for p in ratio], marker="o", ms=3, color=col)
    axes[1].text(0.02, 0.97, "SDPA lines coincide: same model width,\nso the same KV cache for every head size",
                 transform=axes[1].transAxes, fontsize=7, color="0.3", ha="left", va="top")
    axes[2].axhline(1, color="k", lw=0.8)
    axes[2].text(0.02, 0.03, "below 1: sata faster", transform=axes[2].transAxes, fontsize=8, color="0.3")
    titles = ["time per generated token (median)", "peak memory per generated token\n(context held + allocated in the step)",
              "time ratio, sata / SDPA + KV cache"]
    ylabels = ["milliseconds per token", "MiB", "ratio (log scale)"]
    for ax, t, yl in zip(axes, titles, ylabels):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens in context")
        ax.set_ylabel(yl)
        ax.set_title(t, fontsize=10)
        ax.grid(which="major", alpha=0.3)
    head_handles = [Line2D([], [], color=_color(r["d_key"]), label=f"head size {r['d_key']} ({r['heads']} heads)")
                    for r in runs]
    method_handles = [Line2D([], [], color="k", ls=ls, marker=mk, ms=3, label=lab) for ls, mk, lab in styles.values()]
    if count_contaminated(runs):
        method_handles.append(Line2D([], [], ls="none", marker="x", ms=9, color="r",
                                     label="contaminated (machine busy): not a result"))
    axes[0].legend(handles=head_handles + method_handles, fontsize=7, loc="upper left")
    axes[2].legend(handles=head_handles, fontsize=7, loc="upper right")
    limits: dict = {}
    for r in runs:
        if r["config"].get("stream_limit"):
            limits.setdefault(r["config"]["stream_limit"], []).append(str(r["d_key"]))
    note = ("\ncontexts built by streaming prefill of the first "
            + ", ".join(f"{_tokens(n)} tokens (head size {', '.join(ds)})" for n, ds in sorted(limits.items()))
            + "; longer contexts repeat that segment (states scale exactly)" if limits
            else "; every context built by streaming prefill")
    fig.suptitle(f"Decode: time and peak memory per generated token vs context, on {device}\n"
                 f"batch 1, model width {res['width']}, {res['n_taylor']} Taylor terms, {res['dtype']}{note}", fontsize=10)
    return [_save(fig, out, "fig2_decode_time_memory.png")]


# ---------------------------------------------------------------------------- 3. costs
def plot_costs(res: dict, out: Path, device: str) -> list[str]:
    plt = _plt()
    from matplotlib.colors import LogNorm

    P = res["n_taylor"]
    heads = sorted({r["d_key"] for r in res["by_context"]})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained", sharey=True)
    for d in heads:
        rows = [r for r in res["by_context"] if r["d_key"] == d]
        x = [r["context"] for r in rows]
        axes[0].plot(x, [r["state_ratio"] for r in rows], color=_color(d), label=f"head size {d}")
        axes[1].plot(x, [r["flops_ratio"] for r in rows], color=_color(d), label=f"head size {d}")
    for ax, what in zip(axes, ("hidden-state size", "FLOPs per generated token")):
        ax.axhline(1, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens in context")
        ax.set_ylabel("ratio, sata / conventional (KV cache)")
        ax.set_title(f"{what}, per head, {P} Taylor terms", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("sata's fixed state and FLOPs per token relative to conventional attention with a KV cache "
                 "(from the formulas; device-independent)", fontsize=10)
    names = [_save(fig, out, "fig3a_state_flops_vs_kv_cache.png")]

    widths = sorted({r["width"] for r in res["heatmap"]})
    hs = sorted({r["d_key"] for r in res["heatmap"]})
    cell = {(r["width"], r["d_key"]): r for r in res["heatmap"]}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.8), layout="constrained")
    for ax, key, lab in zip(axes, ("state_numel", "flops_per_token"), ("numbers in the state", "FLOPs per token")):
        grid = [[cell[(w, d)][key] for d in hs] for w in widths]
        flat = [v for row in grid for v in row if v > 0]
        im = ax.pcolormesh(range(len(hs) + 1), range(len(widths) + 1), grid,
                           norm=LogNorm(vmin=min(flat), vmax=max(flat)), cmap="viridis", edgecolors="white", lw=0.5)
        for i, w in enumerate(widths):
            for j, d in enumerate(hs):
                v = grid[i][j]
                ax.text(j + 0.5, i + 0.5, _short(v), ha="center", va="center", fontsize=7,
                        color="white" if v < math.sqrt(min(flat) * max(flat)) else "black")
        ax.set_xticks([j + 0.5 for j in range(len(hs))], [str(d) for d in hs])
        ax.set_yticks([i + 0.5 for i in range(len(widths))], [str(w) for w in widths])
        ax.set_xlabel("head size")
        ax.set_ylabel("model width (heads = width // head size)")
        ax.set_title(f"all heads: {lab}, {P} Taylor terms", fontsize=10)
        fig.colorbar(im, ax=ax, label=lab, shrink=0.85)
    fig.suptitle("sata's state size and FLOPs per generated token for multi-head configurations "
                 "(from the formulas; independent of context length)",
                 fontsize=10)
    names.append(_save(fig, out, "fig3b_multihead_heatmaps.png"))
    return names


def _short(v: float) -> str:
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if v >= size:
            return f"{v / size:.3g}{unit}"
    return f"{v:.3g}"


# ---------------------------------------------------------------------------- 4. packing
def plot_packing(res: dict, out: Path, device: str) -> list[str]:
    plt = _plt()
    heads = sorted({r["d_key"] for r in res["rows"]})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained", sharey=True)
    for d in heads:
        rows = [r for r in res["rows"] if r["d_key"] == d]
        x = [r["term"] for r in rows]
        axes[0].plot(x, [r["state_ratio"] for r in rows], marker="o", color=_color(d), label=f"head size {d}")
        axes[1].plot(x, [r["flops_ratio"] for r in rows], marker="o", color=_color(d), label=f"head size {d}")
    for ax, what in zip(axes, ("hidden-state size", "FLOPs per token")):
        ax.set_yscale("log")
        ax.set_xlabel("Taylor term (term p+1 holds the degree-p monomials)")
        ax.set_ylabel("ratio, tightly packed / full tensor power")
        ax.set_title(f"{what} of one term: C(d+p-1, p) vs d^p entries", fontsize=10)
        ax.set_xticks(sorted({r["term"] for r in res["rows"]}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="", loc="lower left")
    fig.suptitle("Reduction achieved by tight packing of the symmetric tensor powers (from the formulas)", fontsize=10)
    return [_save(fig, out, "fig4_tight_packing.png")]


# ---------------------------------------------------------------------------- 5. precision
def plot_precision(res: dict, out: Path, device: str) -> list[str]:
    plt = _plt()
    heads = sorted({r["d_key"] for r in res["rows"]})
    fig, ax = plt.subplots(figsize=(9, 5.4), layout="constrained")
    from matplotlib.lines import Line2D

    for d in heads:
        rows = [r for r in res["rows"] if r["d_key"] == d]
        x = [r["term"] for r in rows]
        ax.plot(x, [r["alpha"] for r in rows], marker="o", color=_color(d))
        ax.plot(x, [r["sqrt_alpha"] for r in rows], ls="--", marker=".", color=_color(d), alpha=0.7)
    handles = [Line2D([], [], color=_color(d), label=f"head size {d}") for d in heads] + [
        Line2D([], [], color="k", marker="o", label=r"$\alpha_p = 1/(p!\,d^{p/2})$ (paper, one side)"),
        Line2D([], [], color="k", ls="--", marker=".", label=r"$\sqrt{\alpha_p}$ (sata, per side)")]
    fstyles = {"bfloat16": "tab:purple", "float16": "tab:brown", "float32": "tab:gray"}
    from matplotlib.transforms import blended_transform_factory

    left = blended_transform_factory(ax.transAxes, ax.transData)   # x in axes fraction, y in data
    for name, f in res["formats"].items():
        ax.axhline(f["resolution"], color=fstyles[name], lw=1.5)
        ax.text(0.01, f["resolution"] * 1.3, f"{name} resolution {f['resolution']:.0e}", ha="left",
                va="bottom", fontsize=8, color=fstyles[name], transform=left)
    fp16 = res["formats"]["float16"]
    ax.axhline(fp16["smallest_normal"], color=fstyles["float16"], lw=1, ls=":")
    ax.text(0.01, fp16["smallest_normal"] * 0.75, f"float16 smallest normal {fp16['smallest_normal']:.1e}",
            ha="left", va="top", fontsize=8, color=fstyles["float16"], transform=left)
    ax.set_yscale("log")
    ax.set_xlabel("Taylor term (term p+1 holds degree p)")
    ax.set_ylabel("value (log scale)")
    ax.set_xticks(sorted({r["term"] for r in res["rows"]}))
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=8, loc="lower left")
    ax.set_title("Scaling constants of each Taylor term vs the resolution of floating-point formats\n"
                 "(solid: the paper's constant on one side; dashed: sata splits it over query and key)", fontsize=10)
    return [_save(fig, out, "fig5_scaling_constants.png")]
