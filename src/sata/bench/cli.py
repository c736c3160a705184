"""Benchmark sata against SDPA with a KV cache and the paper's formulation (speed and memory).

    sata bench decode   [--quick]   time and memory per generated token by context length
    sata bench prefill  [--quick]   causal prefill by prompt length
    sata bench targets  [--quick]   issue 4's targets 1-6, PASS/FAIL (includes both sweeps)
    sata bench all      [--quick]   the same as targets, printing every table
    sata bench mqar     [--preset]  recall accuracy against state size (sata.bench.mqar)
    sata bench generate [--model]   a Hugging Face model generating, SATACache against KV caches (sata.bench.generate)

Every comparison is measured in one run on the same inputs; we report medians of repeated
timings after warm-up, and ratios sata / baseline. ``--quick`` uses smaller contexts (minutes on
2 cores) and says so in every row; without it the sizes are those of the targets (1M-token
decode, 1e7-token streaming, 64K-token prefill and training: allow an hour on 2 cores).
"""

from __future__ import annotations

import argparse
import datetime
import sys

_DTYPES = ("float32", "float64", "float16", "bfloat16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", nargs="?", default="all", choices=("decode", "prefill", "targets", "all", "mqar", "generate"),
                        help="what to measure")
    parser.add_argument("--quick", action="store_true", help="smaller contexts: a few minutes on 2 CPU cores")
    parser.add_argument("--json", metavar="FILE", help="write every measurement to this JSON file")
    parser.add_argument("--markdown", metavar="FILE", help="write the tables as Markdown (for docs/PERFORMANCE.md)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=_DTYPES, help="dtype of queries, keys and values")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for everything (default: one-token decode steps on 1 thread, the rest "
                             "one per core)")
    parser.add_argument("--max-memory", default=None,
                        help="most memory a baseline's context may take, e.g. 8G (default: min(8G, half the free RAM))")
    parser.add_argument("--only", default=None, help="targets to run, e.g. 1,4 (targets/all only)")
    parser.add_argument("--batch", type=int, default=None, help="decode/prefill: batch size (default 1)")
    parser.add_argument("--heads", type=int, default=None, help="decode/prefill: heads (default 64)")
    parser.add_argument("--head-size", type=int, default=None, help="decode/prefill: head size (default 8)")
    parser.add_argument("--n-taylor", type=int, default=None, help="decode/prefill: Taylor terms (default 4)")
    parser.add_argument("--contexts", default=None, help="decode/prefill: comma-separated lengths, e.g. 1024,65536")
    parser.add_argument("--window", type=int, default=0, metavar="W",
                        help="decode/prefill: time sata's window mode (W recent keys exact) against SDPA and the plain op")
    parser.add_argument("--sinks", type=int, default=0, metavar="S", help="decode/prefill: window mode, first S keys exact")
    parser.add_argument("--recentre", type=float, default=None, metavar="A",
                        help="decode/prefill: window mode, the re-centred series (alpha)")
    parser.add_argument("--paper-code", default=None, metavar="FILE",
                        help="decode: also time the paper's own code, its sata_attention.py (github.com/glassroom/"
                             "sata_attention, not shipped here), from the same state")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)   # tests: seconds, meaningless numbers
    from .generate import add_arguments as generate_arguments
    from .mqar import add_arguments as mqar_arguments

    mqar_arguments(parser)
    generate_arguments(parser)


def _max_memory(text: str | None) -> int:
    from sata.budget import _parse

    from .timing import mem_available

    if text is not None:
        return _parse(text)
    avail = mem_available()
    return min(8 * 2**30, avail // 2) if avail else 4 * 2**30


def _bad_option(args: argparse.Namespace) -> str | None:
    """What is wrong with the numbers, sizes and output paths the user gave (checked before any work), or None;
    the options a command does not have are skipped (``sata replicate`` shares this check)."""
    from sata._files import unwritable

    for name in ("threads", "batch", "heads", "head_size", "n_taylor"):
        value = getattr(args, name, None)
        if value is not None and value < 1:  # (0 would otherwise silently mean the default)
            return f"--{name.replace('_', '-')} must be a positive integer, got {value}"
    for name in ("max_memory", "memory_budget"):
        text = getattr(args, name, None)
        if text is not None:
            from sata.budget import _parse

            try:
                _parse(text)
            except ValueError:
                return f"--{name.replace('_', '-')} must be a positive size such as 16G or 512M, got {text!r}"
    if getattr(args, "contexts", None):
        try:
            lengths = [int(x) for x in args.contexts.split(",")]
        except ValueError:
            lengths = [0]
        if any(n < 1 for n in lengths):
            return f"--contexts must be comma-separated positive integers, e.g. 1024,65536; got {args.contexts!r}"
    for name in ("json", "markdown", "figure", "results"):
        path = getattr(args, name, None)
        if path is not None and (why := unwritable(f"--{name}", path)):
            return why
    return None


def main(args: argparse.Namespace) -> int:
    import torch

    from .decode import DecodeConfig, run_decode
    from .prefill import PrefillConfig, run_prefill
    from .tables import CONTAMINATED, count_contaminated, decode_table, prefill_table, scaling_table, targets_table
    from .targets import FULL, QUICK, TINY, run_targets
    from .timing import LATENCY_THREADS, busy_warning, command_line, machine_info, set_threads, threads_note, write_json

    problem = _bad_option(args)
    if problem:
        print(f"sata bench: {problem}", file=sys.stderr)
        return 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("sata bench: --device cuda requested but CUDA is not available; use --device cpu", file=sys.stderr)
        return 2
    try:
        import tqdm  # noqa: F401
    except ImportError:
        print("sata bench needs tqdm for its progress bars: pip install 'sata-attention[plot]'", file=sys.stderr)
        return 2
    if args.what == "mqar":
        from .mqar import main as mqar_main

        return mqar_main(args)
    if args.what == "generate":
        from .generate import main as generate_main

        return generate_main(args)
    threads = set_threads(args.threads)
    latency = args.threads or LATENCY_THREADS
    sizes = TINY if args.tiny else QUICK if args.quick else FULL
    dtype = getattr(torch, args.dtype)
    max_bytes = _max_memory(args.max_memory)
    progress = not args.no_progress
    contexts = tuple(int(x) for x in args.contexts.split(",")) if args.contexts else None
    shape = {"batch": args.batch or 1, "n_heads": args.heads or sizes.heads, "d_key": args.head_size or sizes.d_key,
             "n_taylor": args.n_taylor or sizes.n_taylor, "window": args.window, "sinks": args.sinks,
             "recentre": args.recentre}
    if args.window or args.sinks or args.recentre is not None:
        problem = _check_window(args.what, shape)
        if problem:
            print(f"sata bench: {problem}", file=sys.stderr)
            return 2
    if args.paper_code is not None and args.what != "decode":
        print("sata bench: --paper-code times the paper's decode step: use it with `sata bench decode`", file=sys.stderr)
        return 2
    common = {"device": args.device, "dtype": dtype, "max_bytes": max_bytes}
    run = {"command": command_line("bench", args, add_arguments), "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "sizes": sizes.name, "what": args.what, "max_memory_bytes": max_bytes,
           "machine": machine_info(args.device), "threads": {"bulk": threads, "one_token_decode": latency},
           "threads_note": threads_note(threads, latency, args.threads is not None)}
    print(f"sata bench {args.what} ({sizes.name} sizes) on {run['machine']['cpu']}, {args.device}, {args.dtype}; "
          f"baseline memory limit {max_bytes / 2**30:.1f} GiB; {run['threads_note']}", flush=True)
    if sizes is FULL and args.what in ("targets", "all"):
        print("full sizes (1M-token decode, 1e7-token stream, 64K-token prefill and training): allow an hour "
              "on 2 cores; --quick takes minutes", flush=True)
    run["warning"] = busy_warning(run["machine"])
    if run["warning"]:
        print(f"warning: {run['warning']}", file=sys.stderr, flush=True)

    sections = []   # (title, text table, markdown table)
    if args.what == "decode":
        cfg = DecodeConfig(**shape, contexts=contexts or sizes.decode_contexts, stream_limit=sizes.decode_stream_limit,
                           min_time=sizes.min_time, threads=latency if shape["batch"] == 1 else None,
                           paper_code=args.paper_code, **common)
        res = run["decode"] = run_decode(cfg, progress, partial=True)
        sections.append((_decode_title(res), decode_table(res), decode_table(res, True)))
        _window_section(sections, res)
    elif args.what == "prefill":
        cfg = PrefillConfig(**shape, lengths=contexts or sizes.prefill_lengths, paper_max_length=sizes.paper_prefill_max,
                            min_time=sizes.min_time, **common)
        res = run["prefill"] = run_prefill(cfg, progress, partial=True)
        sections.append((_prefill_title(res), prefill_table(res), prefill_table(res, True)))
        _window_section(sections, res)
    else:
        only = tuple(x.strip() for x in args.only.split(",")) if args.only else None
        res = run["targets"] = run_targets(sizes, only=only, progress=progress, latency_threads=latency, **common)
        m = res["measurements"]
        bw, mm = m["copy_bandwidth"]["bytes_per_s"], m["matmul"]["flops_per_s"]
        sections.append((f"Targets (issue 4), {sizes.name} sizes; this machine: copy bandwidth {bw / 1e9:.1f} GB/s, "
                         f"fp32 matmul {mm / 1e9:.1f} GFLOP/s ({m['matmul']['size']}^3)",
                         targets_table(res), targets_table(res, True)))
        if "decode" in m:
            sections.append((_decode_title(m["decode"]), decode_table(m["decode"]), decode_table(m["decode"], True)))
        if "prefill" in m:
            sections.append((_prefill_title(m["prefill"]), prefill_table(m["prefill"]),
                             prefill_table(m["prefill"], True)))
        if "scaling" in m:
            sections.append((f"Scaling at model width {m['scaling']['width']} (target 6; prefill over "
                             f"{m['scaling']['prefill_length']} tokens; rel. = relative to the smallest head, same terms)",
                             scaling_table(m["scaling"]), scaling_table(m["scaling"], True)))

    for title, text, _ in sections:
        print(f"\n{title}\n{text}")
    run["contaminated_timings"] = count_contaminated(run)
    if run["contaminated_timings"]:
        print(f"\n{CONTAMINATED} ({run['contaminated_timings']} timings)")
    if args.json:
        write_json(args.json, run)
        print(f"\nwrote {args.json}")
    if args.markdown:
        _write_markdown(args.markdown, run, sections)
        print(f"wrote {args.markdown}")
    finished = _finished_if_interrupted(run)
    if finished is not None:
        print(f"\ninterrupted: the tables and files hold the {finished} finished "
              f"{'contexts' if args.what == 'decode' else 'lengths'}", file=sys.stderr)
        return 130
    return 0


def _finished_if_interrupted(run: dict) -> int | None:
    """How many sizes a run stopped by Ctrl-C finished (its partial results), or None for a whole run."""
    part = run.get(run["what"], {})
    return len(part["rows"]) if part.get("interrupted") else None


def _check_window(what: str, shape: dict) -> str | None:
    """Why --window/--sinks/--recentre cannot run (the op's own message), or None."""
    import torch

    import sata

    if what not in ("decode", "prefill"):
        return "--window, --sinks and --recentre apply to decode and prefill"
    x = torch.zeros(1, 1, 1, shape["d_key"])
    try:  # one token through the op validates the settings
        sata.sata_attention(x, x, x, n_taylor=shape["n_taylor"], window=shape["window"], sinks=shape["sinks"],
                            recentre=shape["recentre"])
    except (ValueError, TypeError) as e:
        return str(e)
    return None


def _window_section(sections: list, res: dict) -> None:
    """With --window/--sinks/--recentre: the window mode beside the plain op (the table above shows it as sata)."""
    from .tables import window_table

    c = res["config"]
    if res["rows"] and (c["window"] or c["sinks"] or c["recentre"] is not None):   # (no rows: Ctrl-C at the first)
        title = (f"Window mode (window={c['window']}, sinks={c['sinks']}, recentre={c['recentre']}; sata above) "
                 "against the plain op on the same inputs")
        sections.append((title, window_table(res), window_table(res, True)))


def _decode_title(res: dict) -> str:
    c = res["config"]
    x = res["crossover_vs_sdpa"]
    cross = f"crossover vs SDPA: {x['context']:,} tokens ({x['status']})" if x["context"] else f"crossover vs SDPA: {x['status']}"
    return (f"Decode: one token, B={c['batch']}, {c['n_heads']} heads of {c['d_key']}, n_taylor={c['n_taylor']}, "
            f"{c['dtype']}; median per step ({'steady state: bursts of ~%g ms of consecutive steps, methods round-robin' % (1e3 * c['burst_time']) if c.get('burst_time') else 'single calls, methods round-robin'}); "
            f"mem = context held + peak allocated in the step; {cross}")


def _prefill_title(res: dict) -> str:
    c = res["config"]
    x = res["crossover_vs_sdpa"]
    cross = f"sata faster than SDPA from ~{x['context']:,} tokens ({x['status']})" if x["context"] else x["status"]
    return (f"Causal prefill: B={c['batch']}, {c['n_heads']} heads of {c['d_key']}, n_taylor={c['n_taylor']}, "
            f"{c['dtype']}; median per call; mem = peak allocated in the call; {cross}")


def _write_markdown(path: str, run: dict, sections: list) -> None:
    from sata._files import make_parent

    mach = run["machine"]
    lines = [
        "# Performance",
        "",
        "<!-- generated by `sata bench --markdown`; regenerate rather than edit -->",
        "sata against conventional attention (SDPA with a preallocated KV cache; SDPA's causal kernel for "
        "prefill) and against the paper's formulation (one pass per Taylor term, `sata.bench.baselines`), "
        "every ratio measured in one run on the same inputs (medians of repeated timings after warm-up). "
        "The targets are those of issue 4; rows measured at reduced sizes say so.",
        "",
        f"Measured {run['date']} with:",
        "",
        "```bash",
        run["command"],
        "```",
        "",
        f"Machine: {mach['cpu']}, {mach['cores']} cores, torch {mach['torch']}, {run['threads_note']}, "
        f"{mach['device']}; sata {mach['sata']} (commit {mach['sata_git_commit'] or 'unknown'}); "
        f"load average at start {', '.join(f'{x:.1f}' for x in mach['load_average'] or [])}.",
        "",
    ]
    if run.get("warning"):
        lines += [f"> Warning: {run['warning']}", ""]
    finished = _finished_if_interrupted(run)
    if finished is not None:
        lines += [f"> Interrupted (Ctrl-C): the tables hold the {finished} sizes finished before it, "
                  "not every size of the command above.", ""]
    for title, _, md in sections:
        lines += [f"**{title}**", "", md, ""]
    if run.get("contaminated_timings"):
        from .tables import CONTAMINATED

        lines += [f"{CONTAMINATED} ({run['contaminated_timings']} timings).", ""]
    with open(make_parent(path), "w") as f:
        f.write("\n".join(lines))
