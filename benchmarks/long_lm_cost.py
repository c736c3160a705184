"""Cost of the long-context byte LM's configurations (docs/RECALL.md, "Long-context byte LM"): training
seconds per step and generation milliseconds per token at 1K/10K/100K bytes of context.

Each configuration is a line ``NAME: <sata train flags>`` (benchmarks/long_lm.sh passes its own, so the
models measured are the models trained). Training: the median wall and CPU time of a step of a fresh model
(train_compare.step_times; on a shared machine the CPU time of this one-thread process is the idle-core
time). Generation, when RUNS/NAME/model exists: the median time of one decoded token after the context is
prefilled from the validation text, and the attention state carried (train_compare.generation_cost).

    python benchmarks/long_lm_cost.py --runs runs/long_lm --json runs/long_lm/cost.json \\
        --config "softmax: --d-model 128 --attention softmax --n-heads 2 ..." --config ...
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

import torch

from sata.cli import build_parser
from sata.lm import TransformerLM
from sata.train.cli import config_from_args
from sata.train.data import load_corpus
from train_compare import generation_cost, step_times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", required=True, help="NAME: sata train flags (model, batch, window)")
    p.add_argument("--runs", default=None, help="folder with NAME/model of trained runs (generation is timed on them)")
    p.add_argument("--step-repeats", type=int, default=3, help="timed training steps (after one untimed); 0 = none")
    p.add_argument("--contexts", default="1000,10000,100000", help="context lengths of the generation timing")
    p.add_argument("--decode-steps", type=int, default=32, help="timed tokens per context")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",") if c]
    corpus = load_corpus()
    results = {"command": " ".join(["python", *map(shlex.quote, sys.argv)]), "threads": args.threads,
               "load_average": os.getloadavg(), "configs": {}}
    print(f"# {args.threads} thread(s), load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"{'configuration':<14} {'parameters':>11} {'wall s/step':>12} {'CPU s/step':>11}  "
          + "".join(f"{f'ms/token @{c:,}':>18}" for c in contexts) + f"{f'state MiB @{contexts[-1]:,}':>20}")
    for spec in args.config:
        name, _, flags = (x.strip() for x in spec.partition(":"))
        cfg = config_from_args(build_parser().parse_args(["train", *shlex.split(flags)]))
        r = {"flags": flags, "parameters": TransformerLM(cfg.model).num_parameters()}
        if args.step_repeats:
            r["step_wall_s"], r["step_cpu_s"] = step_times(cfg, corpus, args.step_repeats)
        folder = Path(args.runs or "", name, "model")
        if args.runs and (folder / "config.json").is_file():
            model = TransformerLM.from_pretrained(folder).eval()
            chunk = 512 if model.config.attention == "softmax" else 4096   # softmax prefill scores: chunk x context
            r["generation"] = generation_cost(model, corpus.validation, contexts, args.decode_steps, chunk)
        results["configs"][name] = r
        gen = r.get("generation", [])
        print(f"{name:<14} {r['parameters']:>11,} {r.get('step_wall_s', float('nan')):>12.2f} "
              f"{r.get('step_cpu_s', float('nan')):>11.2f}  "
              + "".join(f"{g['ms_per_token']:>18.2f}" for g in gen)
              + (f"{gen[-1]['state_mib']:>20.2f}" if gen else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
