"""Does a converted hybrid use context beyond its training length, and is its mix calibrated there?

    python benchmarks/hybrid_context_probe.py --model convert-hybrid/hybrid --json out.json

Scores held-out windows of ``--context`` tokens (``sata.integrations.corpus``'s held-out split, the windows
``sata convert`` evaluates) with the original SmolLM2-135M and with the converted hybrid, the hybrid once per
``--beta-scales`` factor applied to every layer's and head's mix beta (``taylor_mix``), and reports perplexity
over the whole window and over its first and second half. A model that uses far context scores the second
half better than the first (the original does); a hybrid whose far part only mis-weighs at lengths it was not
trained on would do better with a smaller or larger beta there. One thread unless ``--threads``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from _report import write_json


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="a converted checkpoint directory (sata convert)")
    p.add_argument("--context", type=int, default=4096, help="tokens per window")
    p.add_argument("--windows", type=int, default=2, help="held-out windows scored")
    p.add_argument("--beta-scales", default="1,0.5,0.25,2", help="factors applied to every beta, comma-separated")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args()


def halves(result: dict) -> dict:
    """Perplexity over the window and over each half of its positions."""
    nll = torch.tensor(result["nll_by_position"], dtype=torch.float64)
    mid = len(nll) // 2
    return {"ppl": result["ppl"], "first_half": math.exp(nll[:mid].mean()), "second_half": math.exp(nll[mid:].mean())}


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    import sata.integrations.hf  # noqa: F401  (registers attn_implementation="sata")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sata.integrations import adapted, convert, corpus
    from sata.integrations.evaluation import perplexity_by_position

    tok = AutoTokenizer.from_pretrained(args.model)
    windows = convert.token_windows(tok, corpus.split_text("heldout"), args.context, args.windows)
    rows = []

    def score(name: str, model, **extra) -> None:
        t0 = time.perf_counter()
        r = halves(perplexity_by_position(model, windows))
        rows.append(dict(model=name, **extra, **r, seconds=time.perf_counter() - t0))
        print(f"{name:<10} {str(extra.get('beta_scale', '')):>6} ppl {r['ppl']:8.3f}  first half {r['first_half']:8.3f}  "
              f"second half {r['second_half']:8.3f}", flush=True)

    original = convert.load_model()[0]
    score("original", original)
    del original
    hybrid = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sata").eval()
    adapters = [adapted.adapter_for(layer.self_attn) for layer in hybrid.model.layers]
    for scale in (float(x) for x in args.beta_scales.split(",")):
        with torch.no_grad():
            for ad in adapters:
                ad.log_beta.add_(math.log(scale))
        score("hybrid", hybrid, beta_scale=scale)
        with torch.no_grad():
            for ad in adapters:
                ad.log_beta.sub_(math.log(scale))
    if args.json:
        write_json(args.json, args, rows)


if __name__ == "__main__":
    main()
