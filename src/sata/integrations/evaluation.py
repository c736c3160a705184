"""What `sata convert` measures: perplexity by token position over long windows, and passkey retrieval.

- :func:`perplexity_by_position`: every held-out window of ``L`` tokens scored alone, every token with all
  its predecessors in the window; the summed negative log-likelihood per position, so the figure shows
  where each model stops using its context.
- :func:`passkey`: a 5-digit number stated once in repeated filler at a random depth, asked for at the end
  (Mohtashami & Jaggi 2023), greedy, exact match of the first five digits generated.
"""

from __future__ import annotations

import math
import random

import torch

from sata.integrations.hybrid_convert import next_token_nll

__all__ = ["FILLER", "passkey", "passkey_prompt", "perplexity_by_position"]

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
          "I will quiz you about the important information there. ")
_QUESTION = "What is the pass key? The pass key is"


@torch.no_grad()
def perplexity_by_position(model, windows: torch.Tensor, progress=None) -> dict:
    """``{"ppl": float, "tokens": int, "nll_by_position": [L - 1]}`` over ``windows [N, L]`` (mean NLL per position)."""
    total = torch.zeros(windows.shape[1] - 1, dtype=torch.float64)
    for ids in windows.split(1):
        total += next_token_nll(model, ids).double().sum(0)
        if progress is not None:
            progress.update(1)
    by_pos = total / len(windows)
    return {"ppl": math.exp(by_pos.mean().item()), "tokens": int(total.numel() * len(windows)),
            "nll_by_position": by_pos.tolist()}


def passkey_prompt(tokenizer, context: int, depth: float, key: str) -> torch.Tensor:
    """Token ids ``[1, ~context]``: intro, filler, the key sentence at ``depth`` (0..1) of the filler, the question."""
    enc = lambda text: tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    needle = enc(f"The pass key is {key}. Remember it. {key} is the pass key. ")
    intro, question, filler = enc(_INTRO), enc(_QUESTION), enc(FILLER)
    n_fill = max(0, context - len(intro) - len(needle) - len(question))
    fill = filler.repeat(n_fill // len(filler) + 1)[:n_fill]
    at = int(depth * n_fill)
    return torch.cat([intro, fill[:at], needle, fill[at:], question])[None]


@torch.no_grad()
def passkey(model, tokenizer, context: int, trials: int, seed: int = 0, progress=None) -> dict:
    """Exact-match accuracy of greedy passkey retrieval at ``context`` tokens over ``trials`` (key, depth) draws."""
    rng = random.Random(f"{seed}-{context}")
    hits, answers = 0, []
    for _ in range(trials):
        key, depth = str(rng.randrange(10_000, 100_000)), rng.random()
        ids = passkey_prompt(tokenizer, context, depth, key)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             past_key_values=_cache(model), pad_token_id=getattr(tokenizer, "eos_token_id", None))
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        digits = "".join(ch for ch in text if ch.isdigit())[:5]
        hits += digits == key
        answers.append({"key": key, "depth": round(depth, 3), "answer": text})
        if progress is not None:
            progress.update(1)
    return {"context": context, "trials": trials, "accuracy": hits / trials, "answers": answers}


def _cache(model):
    """A :class:`~sata.integrations.hf.SATACache` for a SATA model (the standard caches would fold every earlier key
    into a state again at each token), else None (the model's default cache)."""
    import sata.integrations.hf as sata_hf

    impl = getattr(model.config, "_attn_implementation", None)
    return sata_hf.SATACache(model.config) if impl == "sata" else None
