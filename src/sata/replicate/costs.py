"""Parts 3-5, computed from the formulas (no timing): state size and FLOPs per token against a KV
cache, multi-head heatmaps, the saving of tight packing, and the scaling constants against the
resolution of floating-point formats.

Counting conventions (stated in the report):

- KV cache per head: ``n (d_k + d_v)`` numbers; sata state per head: ``D (d_v + 1)``
  (:func:`sata.state_size`), ``D = C(d + P - 1, P - 1)``.
- FLOPs per generated token per head: conventional decode ``2 n d_k + 2 n d_v + 3 n`` (scores,
  weighted sum, softmax); sata :func:`sata.flops_per_token` (features, state update, read-out).
- Per Taylor term ``p`` with ``N`` features (``m_p`` packed, ``d^p`` full tensor power): state
  ``N (d_v + 1)``; FLOPs ``c N + 4 N (d_v + 1)`` with ``c = 4`` packed (parent x variable x weight,
  query and key) and ``c = 2`` full (one multiply per entry of the outer product), ``c = 0`` for
  ``p < 2``.
"""

from __future__ import annotations

import math

import torch

import sata

from .config import ReplicateConfig

__all__ = ["run_costs", "run_packing", "run_precision"]


def conventional_flops_per_token(n: int, d_key: int, d_value: int) -> int:
    return 2 * n * d_key + 2 * n * d_value + 3 * n


def run_costs(cfg: ReplicateConfig) -> dict:
    P = cfg.cost_terms
    by_context = []
    crossovers = []
    for d in cfg.decode_heads:
        state = sata.state_size(d, d, P)
        flops = sata.flops_per_token(d, d, P)
        for n in cfg.cost_contexts:
            kv = n * 2 * d
            conv = conventional_flops_per_token(n, d, d)
            by_context.append({"d_key": d, "context": n, "kv_cache_numel": kv, "state_numel": state,
                               "state_ratio": state / kv, "conventional_flops": conv, "sata_flops": flops,
                               "flops_ratio": flops / conv})
        crossovers.append({"d_key": d, "state_numel": state, "sata_flops": flops,
                           "state_equal_context": state / (2 * d),
                           "flops_equal_context": flops / (4 * d + 3)})
    heat = []
    for W in cfg.heatmap_widths:
        for d in cfg.heatmap_heads:
            H = W // d
            heat.append({"width": W, "d_key": d, "heads": H, "state_numel": H * sata.state_size(d, d, P),
                         "flops_per_token": H * sata.flops_per_token(d, d, P)})
    return {"n_taylor": P, "by_context": by_context, "equal_cost_context": crossovers, "heatmap": heat}


def run_packing(cfg: ReplicateConfig) -> dict:
    rows = []
    for d in cfg.decode_heads:
        tot = {"packed_state": 0, "full_state": 0, "packed_flops": 0, "full_flops": 0}
        for p in range(cfg.max_terms):
            m, full = math.comb(d + p - 1, p), d**p
            feat = (4 * m, 2 * full) if p >= 2 else (0, 0)
            r = {"d_key": d, "degree": p, "term": p + 1, "packed_features": m, "full_features": full,
                 "packed_state": m * (d + 1), "full_state": full * (d + 1),
                 "packed_flops": feat[0] + 4 * m * (d + 1), "full_flops": feat[1] + 4 * full * (d + 1)}
            for k in tot:
                tot[k] += r[k]
            r["state_ratio"] = r["packed_state"] / r["full_state"]
            r["flops_ratio"] = r["packed_flops"] / r["full_flops"]
            r["cumulative_state_ratio"] = tot["packed_state"] / tot["full_state"]
            r["cumulative_flops_ratio"] = tot["packed_flops"] / tot["full_flops"]
            rows.append(r)
    return {"rows": rows}


_FORMATS = (("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32))


def run_precision(cfg: ReplicateConfig) -> dict:
    formats = {name: {"resolution": float(torch.finfo(t).resolution), "eps": float(torch.finfo(t).eps),
                      "smallest_normal": float(torch.finfo(t).tiny),
                      "smallest_subnormal": float(torch.finfo(t).smallest_normal * torch.finfo(t).eps)}
               for name, t in _FORMATS}
    rows, first_below = [], []
    for d in cfg.decode_heads:
        for p in range(cfg.max_terms):
            alpha = 1.0 / (math.factorial(p) * d ** (p / 2))
            rows.append({"d_key": d, "degree": p, "term": p + 1, "alpha": alpha, "sqrt_alpha": math.sqrt(alpha)})
        for name, f in formats.items():
            below = lambda x, lim: next((r["degree"] for r in rows if r["d_key"] == d and r[x] < lim), None)
            first_below.append({"d_key": d, "format": name,
                                "alpha_below_resolution_from_degree": below("alpha", f["resolution"]),
                                "alpha_below_smallest_normal_from_degree": below("alpha", f["smallest_normal"]),
                                "sqrt_alpha_below_resolution_from_degree": below("sqrt_alpha", f["resolution"])})
    return {"formats": formats, "rows": rows, "first_below": first_below}
