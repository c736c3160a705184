"""Generation of a converted hybrid through ``SATACache`` over thousands of tokens: time per token and cache bytes
as the context grows (issue 17: cache bytes constant, time per token flat within 15% from 1K to 8K).

    python benchmarks/hybrid_generate.py --model convert-hybrid/hybrid --tokens 8192 --json out.json
    python benchmarks/hybrid_generate.py --model convert-hybrid/hybrid --tokens 8192 --interleave 40

Loads a checkpoint written by ``sata convert`` (``attn_implementation="sata"``) and times one-token forward
passes through ``SATACache`` (``torch.no_grad``, one thread unless ``--threads``), at the contexts 1K, 2K, 4K,
... up to ``--tokens``:

- streaming (default): a short prompt, then greedy generation up to ``--tokens``, every step timed; per
  context the median over the ``--around`` steps before it, and the cache's bytes there;
- ``--interleave N``: one cache per context, each filled by a prefill of that many tokens (random token ids:
  the cost does not depend on them), then N greedy steps per context taken round-robin, so a busy spell of
  the machine hits every context alike; the cache's bytes after the prefill and after the steps.

Timings on a possibly shared machine: read the ratios to the first row, not the absolute times.
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
    p.add_argument("--interleave", type=int, default=0, metavar="N",
                   help="N steps per context after a prefill to each, round-robin (0: stream from a short prompt)")
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

    import sata.integrations.hf  # noqa: F401  (registers attn_implementation="sata")

    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sata").eval()
    with torch.no_grad():
        if args.interleave:
            rows = interleaved(model, checkpoints(args.tokens), args.interleave)
            how = f"prefill to each context, then {args.interleave} steps per context round-robin"
        else:
            rows = stream(model, AutoTokenizer.from_pretrained(args.model), args.tokens, args.around)
            how = f"streaming from a short prompt, median of the {args.around} steps before each context"
    for r in rows:
        r["vs_first"] = r["median_ms"] / rows[0]["median_ms"]
    print(f"# {args.model}: greedy steps through SATACache, {args.threads} thread(s), {how}; "
          f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'context':>8} {'ms/token':>9} {'p10':>7} {'p90':>7} {'vs first':>9}  cache bytes")
    for r in rows:
        size = " -> ".join(f"{b:,}" for b in r["cache_bytes"]) if isinstance(r["cache_bytes"], list) else f"{r['cache_bytes']:,}"
        print(f"{r['context']:>8} {r['median_ms']:>9.1f} {r['p10_ms']:>7.1f} {r['p90_ms']:>7.1f} {r['vs_first']:>9.3f}  {size}")
    if args.json:
        write_json(args.json, args, rows)


def _row(context: int, times: list[float], cache_bytes) -> dict:
    ts = sorted(times)
    return dict(context=context, median_ms=1e3 * statistics.median(ts), p10_ms=1e3 * ts[len(ts) // 10],
                p90_ms=1e3 * ts[9 * len(ts) // 10], cache_bytes=cache_bytes)


def _step(model, cache, logits) -> tuple[torch.Tensor, float]:
    """One greedy token through the model and ``cache``: the new logits and the seconds it took."""
    nxt = logits[:, -1:].argmax(-1)                                               # [1, 1]
    t0 = time.perf_counter()
    logits = model(nxt, past_key_values=cache, use_cache=True).logits
    return logits, time.perf_counter() - t0


def stream(model, tok, tokens: int, around: int) -> list[dict]:
    """Generate from a short prompt up to ``tokens``; a row at each checkpoint context."""
    import sata.integrations.hf as sata_hf

    ids = tok(PROMPT, return_tensors="pt").input_ids                              # [1, L0]
    cache = sata_hf.SATACache(model.config)
    marks, times, rows = checkpoints(tokens), [], []
    logits = model(ids, past_key_values=cache, use_cache=True).logits
    context = ids.shape[1]
    with tqdm(total=tokens, initial=context, desc="generate", unit="tok") as bar:
        while context < tokens:
            logits, dt = _step(model, cache, logits)
            times.append(dt)
            context += 1
            bar.update(1)
            if context in marks:
                rows.append(_row(context, times[-around:], cache.nbytes))
                bar.set_postfix(ms=f"{rows[-1]['median_ms']:.1f}", cache=rows[-1]["cache_bytes"])
    return rows


def interleaved(model, contexts: list[int], steps: int, seed: int = 0) -> list[dict]:
    """A cache per context filled by a prefill of random tokens, then ``steps`` greedy steps per context,
    round-robin; cache bytes after the prefill and after the steps."""
    import sata.integrations.hf as sata_hf

    gen = torch.Generator().manual_seed(seed)
    caches, logits, before = {}, {}, {}
    for c in tqdm(contexts, desc="prefill", unit="context"):
        ids = torch.randint(model.config.vocab_size, (1, c), generator=gen)       # [1, c]
        caches[c] = sata_hf.SATACache(model.config)
        logits[c] = model(ids, past_key_values=caches[c], use_cache=True).logits[:, -1:]
        before[c] = caches[c].nbytes
    times = {c: [] for c in contexts}
    for _ in tqdm(range(steps), desc="steps (all contexts)", unit="round"):
        for c in contexts:
            logits[c], dt = _step(model, caches[c], logits[c])
            times[c].append(dt)
    return [_row(c, times[c], [before[c], caches[c].nbytes]) for c in contexts]


if __name__ == "__main__":
    main()
