"""Softmax versus SATA with many small heads: same parameters, same training tokens, same data.

Trains (or reuses) one byte-level LM per configuration with `sata train`'s loop, then measures in
one run, on this machine:

- validation bits per byte against steps (from each run's log) and against wall time
  (steps x the median time of a training step, measured here back to back for every
  configuration, so runs trained concurrently or on a busy machine compare fairly);
- generation cost per token after 1K, 10K and 100K tokens of context (the context is the
  validation text, prefilled through the model; then decode steps are timed; median), and the
  bytes of attention state carried.

Writes compare.json, compare.md and three PNG figures into --out.

    python benchmarks/train_compare.py --train --runs runs/compare --out docs/training
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sata.lm import LMConfig, TransformerLM
from sata.train.data import load_corpus
from sata.train.loop import TrainConfig, train

# name -> LMConfig fields besides d_model / n_layers (equal for all: equal parameter counts; a short
# convolution adds 4 x 256 parameters per layer, a learned query gain one per head)
CONFIGS = {
    "softmax-4x64": dict(attention="softmax", n_heads=4),
    "softmax-4x64-conv4": dict(attention="softmax", n_heads=4, short_conv=4),
    "sata-16x16-p3": dict(n_heads=16, n_taylor=3),
    "sata-16x16-p4": dict(n_heads=16, n_taylor=4),
    "sata-32x8-p3": dict(n_heads=32, n_taylor=3),
    "sata-32x8-p4": dict(n_heads=32, n_taylor=4),
    "sata-32x8-p5": dict(n_heads=32, n_taylor=5),
    "sata-32x8-p5-conv4": dict(n_heads=32, n_taylor=5, short_conv=4),
    "sata-16x16-p3-conv4": dict(n_heads=16, n_taylor=3, short_conv=4),
    "sata-16x16-p3-conv4-gain": dict(n_heads=16, n_taylor=3, short_conv=4, learn_scale=True),
    # hybrid: layers 0 and 2 sliding-window softmax over 64 tokens, layers 1 and 3 SATA
    "hybrid-16x16-p3-w64-conv4": dict(n_heads=16, n_taylor=3, short_conv=4, local_layers=[0, 2], local_window=64),
    # hybrid with one local layer of four (layer 0)
    "hybrid-16x16-p3-w64-conv4-l0": dict(n_heads=16, n_taylor=3, short_conv=4, local_layers=[0], local_window=64),
    # ablation: every layer sliding-window softmax over 64 tokens, no SATA (what does SATA add to the hybrid?)
    "local-16x16-w64-conv4": dict(attention="softmax", n_heads=16, short_conv=4, local_layers=[0, 1, 2, 3],
                                  local_window=64),
}


def run_config(name: str, args) -> TrainConfig:
    model = LMConfig(d_model=args.d_model, n_layers=args.n_layers, **{"attention": "sata", **CONFIGS[name]})
    return TrainConfig(out=str(Path(args.runs) / name), model=model, steps=args.steps, batch_size=args.batch_size,
                       seq_len=args.seq_len, eval_every=50, save_every=50)


def step_seconds(cfg: TrainConfig, corpus, repeats: int) -> float:
    """Median seconds of one training step (forward, backward, AdamW) of a fresh model."""
    return step_times(cfg, corpus, repeats)[0]


def step_times(cfg: TrainConfig, corpus, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds of one training step (forward, backward, AdamW) of a fresh model, after
    one untimed step. On a shared machine the wall time includes waiting for a core; the CPU time of a
    one-thread process is what an idle core would take."""
    torch.manual_seed(0)
    model = TransformerLM(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    walls, cpus = [], []
    for step in range(repeats + 1):
        x, y = corpus.batch(step, cfg.batch_size, cfg.seq_len, 0)
        t0, c0 = time.perf_counter(), time.process_time()
        logits, _ = model(x)
        F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls[1:]), statistics.median(cpus[1:])


@torch.no_grad()
def generation_cost(model: TransformerLM, text: torch.Tensor, contexts: list[int], steps: int, chunk: int) -> list[dict]:
    """Median seconds per generated token after each context length (prefilled in chunks)."""
    out, states, seen = [], None, 0
    g = torch.Generator().manual_seed(0)
    for n in contexts:
        while seen < n:                                                        # extend the context to n tokens
            L = min(chunk, n - seen)
            idx = torch.arange(seen, seen + L) % text.numel()
            _, states = model(text[idx].long()[None], states, return_states=True)
            seen += L
        st, times = states, []
        tok = torch.randint(0, 256, (1, 1), generator=g)
        for i in range(steps + 2):                                             # decode from a copy point: the
            t0 = time.perf_counter()                                           # context stays at n for the next row
            logits, st = model(tok, st, return_states=True)
            tok = logits[:, -1].argmax(-1, keepdim=True)
            times.append(time.perf_counter() - t0)
        out.append({"context": n, "ms_per_token": 1e3 * statistics.median(times[2:]),
                    "state_mib": model.state_nbytes(st) / 2**20})
        del st
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs/compare", help="folder of the training runs (one subfolder per config)")
    ap.add_argument("--out", default="docs/training", help="where figures, compare.json and compare.md go")
    ap.add_argument("--configs", default="softmax-4x64,sata-16x16-p3,sata-16x16-p4,sata-32x8-p3,sata-32x8-p4")
    ap.add_argument("--train", action="store_true", help="train configurations that have no finished run")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--contexts", default="1000,10000,100000")
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--step-repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--merge", action="store_true",
                    help="add these configurations to --out/compare.json instead of starting a new one")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; choose from {sorted(CONFIGS)}")
    contexts = [int(c) for c in args.contexts.split(",")]
    corpus = load_corpus()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"command": " ".join(["python", *sys.argv]), "machine": platform.processor() or platform.machine(),
               "torch": torch.__version__, "threads": args.threads, "data": corpus.describe(), "runs": {}}
    if args.merge and (out / "compare.json").is_file():
        previous = json.loads((out / "compare.json").read_text())
        results["runs"] = previous["runs"]
        results["command"] = previous["command"] + "\n" + results["command"]

    for name in names:
        cfg = run_config(name, args)
        log = Path(cfg.out) / "log.json"
        if not (Path(cfg.out) / "model" / "config.json").is_file():
            if not args.train:
                print(f"{name}: no finished run in {cfg.out}; pass --train", file=sys.stderr)
                return 2
            train(cfg, resume=(Path(cfg.out) / "checkpoint" / "trainer.pt").is_file(), corpus=corpus)
        rows = json.loads(log.read_text())["rows"]
        print(f"{name}: timing training steps and generation", file=sys.stderr, flush=True)
        sec = step_seconds(cfg, corpus, args.step_repeats)
        model = TransformerLM.from_pretrained(Path(cfg.out) / "model").eval()
        chunk = 512 if cfg.model.attention == "softmax" else 4096
        gen = generation_cost(model, corpus.validation, contexts, args.decode_steps, chunk)
        val = [(r["step"], r["val_bpb"]) for r in rows if r.get("val_bpb") is not None]
        results["runs"][name] = {"config": cfg.to_dict(), "parameters": model.num_parameters(),
                                 "step_seconds": sec, "val_bpb": val, "final_val_bpb": val[-1][1],
                                 "logged_elapsed_s": rows[-1]["elapsed_s"], "generation": gen}
        print(f"  val bpb {val[-1][1]:.4f}, {sec:.2f} s/step, generation "
              + ", ".join(f"{g['context']:,}: {g['ms_per_token']:.2f} ms" for g in gen), file=sys.stderr)

    base = results["runs"].get("softmax-4x64")
    lines = ["| configuration | parameters | val bits/byte | vs softmax | s/step | "
             + " | ".join(f"ms/token @{c // 1000}K" for c in contexts) + " | state MiB @100K | flat? |",
             "|---|---|---|---|---|" + "---|" * len(contexts) + "---|---|"]
    for name, r in results["runs"].items():
        rel = f"{100 * (r['final_val_bpb'] / base['final_val_bpb'] - 1):+.1f}%" if base else "-"
        ms = [g["ms_per_token"] for g in r["generation"]]
        r["generation_growth"] = ms[-1] / ms[0]
        lines.append(f"| {name} | {r['parameters']:,} | {r['final_val_bpb']:.4f} | {rel} | {r['step_seconds']:.2f} | "
                     + " | ".join(f"{m:.2f}" for m in ms)
                     + f" | {r['generation'][-1]['state_mib']:.1f} | {ms[-1] / ms[0]:.2f}x |")
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    (out / "compare.json").write_text(json.dumps(results, indent=1) + "\n")
    _figures(results, out, contexts)
    print("\n".join(lines))
    print(f"wrote {out}/compare.md, compare.json, bpb_vs_steps.png, bpb_vs_time.png, generation_cost.png")
    return 0


def _style(name: str) -> dict:
    """Softmax baselines in black (dashed with a convolution), the rest in colour."""
    if name.startswith("softmax"):
        return dict(color="black", marker="o", ms=3, ls="--" if "conv" in name else "-")
    return dict(marker=".", ms=4, ls=":" if name.startswith("local") else "-")


def _figures(results: dict, out: Path, contexts: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    for kind in ("steps", "time"):
        fig, ax = plt.subplots(figsize=(9.5, 4.8))
        for name, r in runs.items():
            s, b = zip(*r["val_bpb"])
            x = s if kind == "steps" else [v * r["step_seconds"] / 60 for v in s]
            ax.plot(x, b, **_style(name), label=name)
        ax.set(xlabel="step" if kind == "steps" else "training time, minutes (steps x measured s/step)",
               ylabel="validation bits per byte", title=f"byte-level LM on stdlib sources: bits per byte vs {kind}")
        lo = min(min(b for _, b in r["val_bpb"]) for r in runs.values())
        hi = max(r["val_bpb"][-1][1] for r in runs.values())                 # every run's end in view
        ax.set_ylim(lo * 0.97, max(hi * 1.05, lo * 1.6))
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"bpb_vs_{kind}.png", dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(9.5, 4.8))
    for name, r in runs.items():
        ax.plot([g["context"] for g in r["generation"]], [g["ms_per_token"] for g in r["generation"]],
                **_style(name), label=name)
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms per generated token",
           title="generation cost per token (median, batch 1)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "generation_cost.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
