"""Stream text from a checkpoint written by ``sata train``, reporting time per token and memory.

A SATA model carries one fixed-size state per layer, so time per token and resident memory
stay flat however many tokens are generated; a softmax checkpoint carries a KV cache that grows
with every token. Text goes to stdout (control characters other than newline and tab shown as
``\\xNN``), measurements to stderr: after the text, or as they are taken with ``--quiet`` (which
prints no text). Each step runs on one torch thread by default (``--threads``).
"""

from __future__ import annotations

import argparse
import codecs
import math
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..bench.timing import LATENCY_THREADS, Timing

__all__ = ["GenerationStep", "generate", "printable", "sample_next", "resident_mib"]

# C0 controls but newline and tab, DEL and C1 controls: a terminal would act on them (escape sequences,
# bells, carriage returns over the text) instead of showing them
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7f, 0xa0)) if chr(c) not in "\n\t"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="folder with model.safetensors + config.json (OUT/model or OUT/checkpoint)")
    p.add_argument("--prompt", default="def ", help="text to start from")
    p.add_argument("--tokens", type=int, default=400, help="bytes to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely bytes (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest set with this probability")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    p.add_argument("--report-every", type=int, default=None,
                   help="print time per token and resident memory every N tokens (default: tokens / 10)")
    p.add_argument("--quiet", action="store_true", help="do not print the text, only the measurements (as they are taken)")
    p.add_argument("--threads", type=int, default=LATENCY_THREADS,
                   help="torch threads (a one-token step is too short to share between cores, and a core busy with "
                        "another process would stall every step)")


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample from ``logits [B, V]`` -> ``[B]``; ``temperature=0`` is greedy.

    ``top_k`` keeps the k most likely tokens (0 = all), ``top_p`` the smallest set whose
    probability reaches ``top_p`` (always at least the most likely token).
    """
    problems = _sampling_problems(temperature, top_k, top_p)
    if problems:
        raise ValueError(f"sample_next: {'; '.join(problems)}; got temperature={temperature}, top_k={top_k}, "
                         f"top_p={top_p}")
    if temperature == 0:
        return logits.argmax(-1)
    # float64 so a tiny temperature saturates to greedy instead of overflowing to NaN
    logits = logits.double() / temperature                                       # [B, V]
    logits = logits - logits.amax(-1, keepdim=True)                              # [B, V]
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]                         # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)              # [B, V]
        p = sorted_logits.softmax(-1)                                            # [B, V]
        drop = p.cumsum(-1) - p >= top_p                                         # keep the token that crosses top_p
        drop[..., 0] = False                                                     # and always the most likely one
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)                                                   # [B, V]
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _sampling_problems(temperature: float, top_k: int, top_p: float,
                       names: tuple[str, str, str] = ("temperature", "top_k", "top_p")) -> list[str]:
    """What is wrong with these sampling settings (empty if nothing), in the caller's argument names."""
    problems = []
    if not (0 <= temperature < math.inf):  # (NaN fails this too)
        problems.append(f"{names[0]} must be a finite number >= 0 (0 = greedy)")
    if top_k < 0:
        problems.append(f"{names[1]} must be >= 0 (0 = all)")
    if not 0 < top_p <= 1:  # (NaN fails this too)
        problems.append(f"{names[2]} must be in (0, 1]")
    return problems


@dataclass
class GenerationStep:
    token: int
    seconds: float
    state_bytes: int


@torch.no_grad()
def generate(model, prompt: bytes, n_tokens: int, *, temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0) -> Iterator[GenerationStep]:
    """Yield ``n_tokens`` sampled bytes after ``prompt``, one model call per byte on the carried states."""
    if not prompt:
        raise ValueError("generate: the prompt must hold at least one byte")
    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    tokens = torch.tensor(list(prompt), dtype=torch.long, device=dev)[None]      # [1, L]
    logits, states = model(tokens, return_states=True)                            # [1, L, V]
    last = logits[:, -1]                                                          # [1, V]
    for _ in range(n_tokens):
        t0 = time.perf_counter()
        nxt = sample_next(last.cpu(), temperature=temperature, top_k=top_k, top_p=top_p, generator=g)  # [1]
        logits, states = model(nxt.to(dev)[:, None], states, return_states=True)   # [1, 1, V]
        last = logits[:, -1]
        yield GenerationStep(int(nxt), time.perf_counter() - t0, model.state_nbytes(states))


def printable(text: str) -> str:
    """``text`` with every control character but newline and tab written as ``\\xNN``."""
    return text.translate(_CONTROLS)


def resident_mib() -> float:
    """Resident set size of this process in MiB (Linux /proc; elsewhere the peak from ``resource``)."""
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(args) -> int:
    from ..lm import TransformerLM

    problems = _argument_problems(args)
    if problems:
        print("sata generate: " + "; ".join(problems), file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        model = TransformerLM.from_pretrained(args.checkpoint).eval()
    except (FileNotFoundError, ValueError) as e:
        print(f"sata generate: {e}", file=sys.stderr)
        return 2
    c = model.config
    every = args.report_every or max(1, args.tokens // 10)
    print(f"# {c.mixer}, {c.n_heads} heads of "
          f"{c.resolved_head_dim}, {model.num_parameters():,} parameters; {args.tokens:,} tokens on "
          f"{args.threads} torch thread(s)" + ("" if args.quiet else "; measurements after the text"), file=sys.stderr)
    report = _Report(live=args.quiet)
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    if not args.quiet:
        sys.stdout.write(printable(args.prompt))
    window: list[float] = []
    t_start = time.perf_counter()
    for i, step in enumerate(generate(model, args.prompt.encode(), args.tokens, temperature=args.temperature,
                                      top_k=args.top_k, top_p=args.top_p, seed=args.seed), 1):
        if not args.quiet:
            sys.stdout.write(printable(dec.decode(bytes([step.token]))))
            sys.stdout.flush()
        window.append(step.seconds)
        if i % every == 0 or i == args.tokens:
            report.add(i, Timing.from_samples(window), step.state_bytes)
            window = []
    total = time.perf_counter() - t_start
    if not args.quiet:
        sys.stdout.write(printable(dec.decode(b"", final=True)) + "\n")
        sys.stdout.flush()
    report.finish(f"# {args.tokens:,} tokens in {total:.1f} s: {args.tokens / total:,.0f} tokens/s")
    return 0


def _argument_problems(args) -> list[str]:
    problems = []
    if args.tokens < 1:
        problems.append("--tokens must be >= 1")
    if not args.prompt:
        problems.append("--prompt must hold at least one character")
    problems += _sampling_problems(args.temperature, args.top_k, args.top_p, ("--temperature", "--top-k", "--top-p"))
    if args.report_every is not None and args.report_every < 1:
        problems.append("--report-every must be >= 1")
    if args.threads < 1:
        problems.append("--threads must be >= 1")
    return problems


class _Report:
    """The measurement lines on stderr: as they are taken (``live``), or all once the text is out,
    so that they never land in the middle of a line of text."""

    def __init__(self, live: bool):
        self.live = live
        self.lines: list[str] = []
        self.contaminated = 0
        self._emit(f"# {'tokens':>9} {'ms/token':>9} {'tokens/s':>9} {'state MiB':>10} {'RSS MiB':>8}")

    def add(self, tokens: int, t: Timing, state_bytes: int) -> None:
        ms = 1e3 * t.median
        mark = ""
        if t.contaminated:
            self.contaminated += 1
            mark = "  *"
        self._emit(f"# {tokens:>9,} {ms:>9.3f} {1e3 / ms:>9,.0f} {state_bytes / 2**20:>10.2f} {resident_mib():>8.0f}{mark}")

    def finish(self, last: str) -> None:
        if self.contaminated:
            self._emit("# * contaminated: token times spread (other processes on the machine); not a result")
        self._emit(last)
        if not self.live:
            print("\n".join(self.lines), file=sys.stderr, flush=True)

    def _emit(self, line: str) -> None:
        if self.live:
            print(line, file=sys.stderr, flush=True)
        else:
            self.lines.append(line)
