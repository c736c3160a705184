"""MQAR results: best learning rate per configuration, Pareto frontiers, table and figure."""

from __future__ import annotations

import textwrap

from .._files import make_parent
from .mqar_model import model_state_bytes
from .tables import fmt_bytes, render

__all__ = ["ANCHORS", "best_per_config", "frontier", "plot", "table"]

# Published points of the Based paper's recall figure (Zoology's repository, arxiv24_based_figure2;
# mean accuracy over its test slices, d_model 128), at Zoology's state accounting
ANCHORS = [
    {"label": "Based f=16", "mixer": "based", "accuracy": 0.985,
     "state_bytes": model_state_bytes("based", 128, 512, {"feature_dim": 16})},
    {"label": "Based f=24", "mixer": "based", "accuracy": 0.99,
     "state_bytes": model_state_bytes("based", 128, 512, {"feature_dim": 24})},
    {"label": "window 8", "mixer": "sliding", "accuracy": 0.08,
     "state_bytes": model_state_bytes("sliding", 128, 512, {"window": 8})},
    {"label": "window 512", "mixer": "sliding", "accuracy": 0.94,
     "state_bytes": model_state_bytes("sliding", 128, 512, {"window": 512})},
    {"label": "attention", "mixer": "softmax", "accuracy": 1.0,
     "state_bytes": model_state_bytes("softmax", 128, 512, {})},
]


def _config_key(r: dict) -> tuple:
    return r["mixer"], r["d_model"], tuple(sorted(r["params"].items()))


def best_per_config(records: list[dict]) -> list[dict]:
    """Per configuration, the run of the best test accuracy (diverged runs lose), sorted by mixer and state."""
    best: dict[tuple, dict] = {}
    score = lambda r: -1.0 if r["accuracy"] is None else r["accuracy"]
    for r in records:
        k = _config_key(r)
        if k not in best or score(r) > score(best[k]):
            best[k] = {**r, "lrs_tried": sorted({x["lr"] for x in records if _config_key(x) == k})}
    return sorted(best.values(), key=lambda r: (r["mixer"], r["state_bytes"], r["label"]))


def frontier(best: list[dict]) -> dict[str, list[dict]]:
    """Per mixer, the configurations no smaller state beats: accuracy rises strictly along the frontier."""
    out: dict[str, list[dict]] = {}
    for r in sorted(best, key=lambda r: (r["state_bytes"], -(r["accuracy"] or 0.0))):
        if r["accuracy"] is None:
            continue
        line = out.setdefault(r["mixer"], [])
        if not line or r["accuracy"] > line[-1]["accuracy"]:
            line.append(r)
    return out


def table(best: list[dict], markdown: bool = False) -> str:
    """One row per configuration at its best learning rate: state, accuracy (mean and per test slice)."""
    slices = list(dict.fromkeys(s for r in best for s in r["slices"]))
    headers = ["mixer", "d_model", "config", "state", "lr", "accuracy", *slices, "stopped", "steps", "train"]
    rows = []
    for r in best:
        acc = "diverged" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        rows.append([r["mixer"], str(r["d_model"]), r["label"].split(" ", 2)[-1], fmt_bytes(r["state_bytes"]),
                     f"{r['lr']:g}", acc, *(f"{r['slices'][s]:.3f}" if s in r["slices"] else "-" for s in slices),
                     r["stopped"], str(r["steps"]), f"{r['train_s']:.0f} s"])
    return render(headers, rows, markdown)


def plot(best: list[dict], path: str, title: str = "", anchors: bool = True) -> None:
    """Accuracy against state bytes (log x): a marker per configuration, the frontier per mixer,
    and (``anchors``) the published points (hollow black; they belong to Zoology's test slices)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    style = {"softmax": ("tab:blue", "s"), "sliding": ("tab:orange", "v"), "based": ("tab:green", "D"),
             "sata": ("tab:red", "o")}
    for mixer, line in frontier(best).items():
        color, marker = style.get(mixer, (None, "o"))
        pts = [r for r in best if r["mixer"] == mixer and r["accuracy"] is not None]
        ax.scatter([r["state_bytes"] for r in pts], [r["accuracy"] for r in pts], color=color, marker=marker, s=30,
                   label=mixer, zorder=3)
        ax.plot([r["state_bytes"] for r in line], [r["accuracy"] for r in line], color=color, drawstyle="steps-post",
                lw=1.5, zorder=2)
    for a in ANCHORS if anchors else []:
        ax.scatter([a["state_bytes"]], [a["accuracy"]], facecolors="none", edgecolors="black", s=60, lw=1.2, zorder=5)
        ax.annotate(a["label"], (a["state_bytes"], a["accuracy"]), textcoords="offset points", xytext=(5, -11),
                    fontsize=7)
    if anchors:
        ax.scatter([], [], facecolors="none", edgecolors="black", label="published (Based paper, d_model 128)")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.04)
    ax.set_xlabel("state bytes (Zoology's accounting: short conv + mixer, float32)")
    ax.set_ylabel("MQAR accuracy (mean over test slices)")
    ax.set_title(textwrap.fill(title, 110), fontsize=9)   # a long task description wraps instead of leaving the figure
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)   # large states with low accuracy: the corner no run is expected in
    fig.tight_layout()
    fig.savefig(make_parent(path), dpi=130)
    plt.close(fig)
