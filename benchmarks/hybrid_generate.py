"""Generation of a converted hybrid through ``SATACache`` over thousands of tokens: time per token and cache bytes
as the context grows (issue 17: cache bytes constant, time per token flat within 15% from 1K to 8K).

    python benchmarks/hybrid_generate.py --model convert-hybrid/hybrid --tokens 8192 --json out.json

Loads a checkpoint written by ``sata convert`` (``attn_implementation="sata"``), feeds a short prompt, then
generates greedily one token per forward pass with ``SATACache``, timing every step (``torch.no_grad``, one
thread unless ``--threads``). At each checkpoint context (1K, 2K, 4K, 8K, ...) it reports the median time per
token over the ``--around`` steps before it and the cache's bytes. Timings of one run on a possibly shared
machine: read the ratios to the 1K row, not the absolute times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from _report import write_json

PROMPT = "The Python language reference describes the syntax and the core semantics of the language."


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="a converted checkpoint directory (sata convert)")
    p.add_argument("--tokens", type=int, default=8192, help="context length to generate up to")
    p.add_argument("--around", type=int, default=64, help="timed steps before each checkpoint context")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args()


def checkpoints(tokens: int) -> list[int]:
    """1K, 2K, 4K, ... up to ``tokens`` (and ``tokens`` itself)."""
    out, c = [], 1024
    while c < tokens:
        out.append(c)
        c *= 2
    return out + [tokens]


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sata.integrations.hf as sata_hf

    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sata").eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    ids = tok(PROMPT, return_tensors="pt").input_ids                          # [1, L0]
    cache = sata_hf.SATACache(model.config)
    marks = checkpoints(args.tokens)
    times: list[float] = []
    rows = []
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, use_cache=True).logits
        context = ids.shape[1]
        with tqdm(total=args.tokens, initial=context, desc="generate", unit="tok") as bar:
            while context < args.tokens:
                nxt = logits[:, -1:].argmax(-1)                                 # [1, 1]
                t0 = time.perf_counter()
                logits = model(nxt, past_key_values=cache, use_cache=True).logits
                times.append(time.perf_counter() - t0)
                context += 1
                bar.update(1)
                if context in marks:
                    recent = times[-args.around:]
                    rows.append(dict(context=context, median_ms=1e3 * statistics.median(recent),
                                     p10_ms=1e3 * sorted(recent)[len(recent) // 10],
                                     p90_ms=1e3 * sorted(recent)[9 * len(recent) // 10], cache_bytes=cache.nbytes))
                    bar.set_postfix(ms=f"{rows[-1]['median_ms']:.1f}", cache=rows[-1]["cache_bytes"])
    base = rows[0]
    for r in rows:
        r["vs_first"] = r["median_ms"] / base["median_ms"]
    print(f"# {args.model}: greedy generation through SATACache, {args.threads} thread(s), median of the "
          f"{args.around} steps before each context; load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'context':>8} {'ms/token':>9} {'p10':>7} {'p90':>7} {'vs first':>9} {'cache bytes':>13}")
    for r in rows:
        print(f"{r['context']:>8} {r['median_ms']:>9.1f} {r['p10_ms']:>7.1f} {r['p90_ms']:>7.1f} {r['vs_first']:>9.3f} "
              f"{r['cache_bytes']:>13,}")
    if args.json:
        write_json(args.json, args, rows)

if __name__ == "__main__":
    main()
