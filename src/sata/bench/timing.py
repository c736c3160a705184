"""Measuring: repeated timings (median, IQR), peak memory, machine limits, machine description.

What is measured:

- Time: wall clock (``time.perf_counter``) of one call, after warm-up calls, synchronising
  the device around every call on CUDA. Repeated until both a minimum count and a minimum
  total time are reached; we report the median and the inter-quartile range. Functions
  compared with each other are timed round-robin (:func:`time_interleaved`) so that load from
  other processes on a shared machine hits all of them alike.
- Contamination: a measurement that other processes slowed is marked, not reported as a result
  (:attr:`Timing.contaminated`): its repeats spread (``q75 / q25 > 1.5``), or a fixed reference
  workload timed round-robin beside it (:class:`LoadProbe`) ran more than 1.5x slower than on the
  quiet machine (the fastest it ran so far in this process, at the same thread count).
- Threads: one-token decode steps are timed on one thread by default (:data:`LATENCY_THREADS`):
  a step lasts microseconds, too short to share between cores, and with two threads a core taken
  by another process stalls every step.
- Memory: bytes allocated by torch's allocator during one call, at their peak, above what was
  allocated when the call started (:func:`peak_memory`). On CUDA from the caching allocator's
  statistics (``max_memory_allocated``); on CPU from the allocation events of the torch
  profiler (every tensor allocation and free, in order). Tensors held before the call (a KV
  cache, a state) are not included: callers add them explicitly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Callable

import torch

from .._files import write_atomic

__all__ = [
    "LATENCY_THREADS",
    "LoadProbe",
    "Timing",
    "copy_bandwidth",
    "cpu_count",
    "machine_info",
    "matmul_throughput",
    "peak_memory",
    "set_threads",
    "threads_note",
    "time_fn",
    "time_interleaved",
    "torch_threads",
]

SPREAD_LIMIT = 1.5      # q75 / q25 of the repeats above this: other processes slowed some of them
LOAD_LIMIT = 1.5        # the reference workload this much slower than on the quiet machine: the machine was busy
LATENCY_THREADS = 1     # default torch threads of one-token decode loops


@dataclass(frozen=True)
class Timing:
    """Seconds per call over ``n`` timed calls; ``load``: the reference workload's time during the
    measurement over its quiet time (``None``: not probed)."""

    median: float
    q25: float
    q75: float
    n: int
    load: float | None = None

    @property
    def iqr(self) -> float:
        return self.q75 - self.q25

    @property
    def contaminated(self) -> str | None:
        """Why other processes make this measurement untrustworthy as a result, or ``None``."""
        why = []
        if self.q25 > 0 and self.q75 / self.q25 > SPREAD_LIMIT:
            why.append(f"repeats spread x{self.q75 / self.q25:.2f} (q75/q25 > {SPREAD_LIMIT:g})")
        if self.load is not None and self.load > LOAD_LIMIT:
            why.append(f"a reference workload ran x{self.load:.2f} slower than on the quiet machine")
        return "; ".join(why) or None

    def to_dict(self) -> dict:
        return {**asdict(self), "iqr": self.iqr, "contaminated": self.contaminated}

    @classmethod
    def from_samples(cls, samples: list[float]) -> Timing:
        s = sorted(samples)
        if len(s) == 1:
            return cls(s[0], s[0], s[0], 1)
        q = statistics.quantiles(s, n=4, method="inclusive")
        return cls(statistics.median(s), q[0], q[2], len(s))


def cpu_count() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads(n: int | None = None) -> int:
    """Use ``n`` torch threads (default: one per core). Returns the number set."""
    n = cpu_count() if n is None else int(n)
    torch.set_num_threads(n)
    return n


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block with ``n`` torch threads (``None``: leave the setting alone), then restore it."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def threads_note(bulk: int, latency: int, chosen: bool) -> str:
    """The sentence a command prints about its thread counts."""
    if chosen:
        return f"{bulk} torch thread(s) for everything (--threads)"
    return (f"one-token decode steps timed on {latency} thread(s), the rest on {bulk} (one per core); "
            "--threads N uses N for everything")


class LoadProbe:
    """A fixed reference workload timed round-robin beside the functions of a measurement: other
    processes slow it as they slow them, so its time against its quiet time tells whether the
    machine was busy.

    The workload, one elementwise op over 1 MiB, spreads over the torch threads like the code
    measured. Its quiet time is the fastest it ran so far on one thread or on the current number
    (parallel is never slower on free cores; one thread holds up best on a busy machine, where the
    first calibration at several threads may already be stalled).
    """

    def __init__(self, numel: int = 2**18):
        self._x = torch.rand(numel)
        self._y = torch.empty_like(self._x)
        self._fastest: dict[int, float] = {}   # by thread count

    def __call__(self) -> None:
        torch.mul(self._x, 1.0001, out=self._y)

    def _calibrated(self, threads: int) -> float:
        if threads not in self._fastest:   # the fastest of a few short runs: one likely found a core free
            with torch_threads(threads):
                self._fastest[threads] = min(
                    time_fn(self, min_repeat=10, min_time=0.01, burst_time=_PROBE_BURST, probe=False).median
                    for _ in range(5))
        return self._fastest[threads]

    def quiet_seconds(self) -> float:
        return min(self._calibrated(1), self._calibrated(torch.get_num_threads()))

    def load(self, seconds: float) -> float:
        """``seconds`` (the probe's median during a measurement) over the quiet time, which it may lower."""
        n = torch.get_num_threads()
        self._fastest[n] = min(self._calibrated(n), seconds)
        return seconds / min(self.quiet_seconds(), seconds)


@functools.cache
def _probe() -> LoadProbe:
    return LoadProbe()


_PROBE_KEY = "\0probe"
_PROBE_BURST = 0.002    # seconds of back-to-back probe calls per sample, in calibration and in measurements


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    device: torch.device | str | None = None,
    warmup: int = 2,
    min_repeat: int = 5,
    max_repeat: int = 100,
    min_time: float = 0.2,
    max_time: float = 10.0,
    burst_time: float = 0.0,
    probe: bool = True,
) -> dict[str, Timing]:
    """Time several functions round-robin after ``warmup`` calls each (fewer for a function whose
    call takes ``min_time`` or more): each is called once per round until it has at least
    ``min_repeat`` calls and ``min_time`` seconds of them, or ``max_repeat`` calls, or (slow
    functions) at least one call and ``max_time`` seconds.

    ``burst_time > 0``: a sample is the mean of as many consecutive calls as take about that long
    (steady state: what one call costs when the previous one left its data in cache, as in a
    loop); otherwise every sample is one call, right after the other functions ran (cold caches).

    ``probe`` (CPU only): time :class:`LoadProbe`'s workload in the same rounds and set every
    ``Timing.load`` from it.

    Returns ``{name: Timing}`` with seconds per call.
    """
    probe = probe and (device is None or torch.device(device).type == "cpu")
    if probe:
        _probe().quiet_seconds()          # calibrated before, not during, the measurement
        fns = {**fns, _PROBE_KEY: _probe()}
    # the probe runs in bursts as when it was calibrated, whatever the measured functions do
    calls = {name: _warm_up(fn, device, warmup, min_time, _PROBE_BURST if name == _PROBE_KEY else burst_time)
             for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    def done(name: str) -> bool:
        n, total = len(samples[name]), sum(samples[name])
        return n >= max_repeat or (n >= min_repeat and total >= min_time) or (n >= 1 and total >= max_time)

    while not all(done(name) for name in fns):
        for name, fn in fns.items():
            if done(name):
                continue
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - t0) / calls[name])
    timings = {name: Timing.from_samples(s) for name, s in samples.items()}
    if probe:
        load = _probe().load(timings.pop(_PROBE_KEY).median)
        timings = {name: dataclasses.replace(t, load=load) for name, t in timings.items()}
    return timings


def _warm_up(fn: Callable[[], object], device, warmup: int, min_time: float, burst_time: float) -> int:
    """Call ``fn`` ``warmup`` times (at least once; fewer if a call takes ``min_time``); return the
    calls per sample: as many as take ``burst_time`` back to back, or 1."""
    elapsed = float("inf")
    for _ in range(max(warmup, 1)):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        elapsed = min(elapsed, time.perf_counter() - t0)
        if elapsed >= min_time:   # slow enough: caches and allocations are warm
            break
    if burst_time <= 0:
        return 1
    if elapsed < burst_time:      # per call in a loop: a lone call may still be cold
        elapsed = _loop_seconds(fn, device, burst_time / 2)
    return max(1, int(burst_time / max(elapsed, 1e-9)))


def _loop_seconds(fn: Callable[[], object], device, budget: float) -> float:
    """Seconds per call of ``fn`` called back to back for about ``budget`` seconds (at least 3 calls)."""
    n = 0
    _sync(device)
    t0 = time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < budget:
        fn()
        n += 1
    _sync(device)
    return (time.perf_counter() - t0) / n


def time_fn(fn: Callable[[], object], **kwargs) -> Timing:
    """Time one function; keyword arguments as :func:`time_interleaved`."""
    return time_interleaved({"fn": fn}, **kwargs)["fn"]


# ---------------------------------------------------------------------------- memory
def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[int | None, object]:
    """Run ``fn`` once; return ``(peak_bytes, result)``: the peak of bytes allocated by torch during
    the call, above the bytes allocated at its start.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the running sum of the allocation events the
    torch profiler records (``profile_memory=True``; the lines it writes to stderr are dropped).
    ``peak_bytes`` is ``None`` if this torch cannot tell.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base), result
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError:  # pragma: no cover - a torch without these internals
        return None, fn()
    if device.type != "cpu":
        return None, fn()
    with _without_profiler_lines(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    events.sort()
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return int(peak), result


# kineto (the profiler's C++ side) writes lines like "USDT:2026-01-01 10:00:00 123:123 SyncActivityProfilerHandler.cpp:52]
# profiler_start" to file descriptor 2 on every use, whatever its log level
_PROFILER_LINE = re.compile(rb"^[A-Z]+:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ [\w.]+\.cpp:\d+\]")


@contextlib.contextmanager
def _without_profiler_lines():
    """Capture file descriptor 2 during the block, then pass every captured line that is not the
    profiler's on to ``sys.stderr`` (a warning raised by the measured code is delayed, not lost)."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:      # no stderr to capture
        yield
        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = b"".join(line for line in captured.read().splitlines(keepends=True) if not _PROFILER_LINE.match(line))
            if kept:
                sys.stderr.write(kept.decode(errors="replace"))
                sys.stderr.flush()


# ---------------------------------------------------------------------------- machine limits
def copy_bandwidth(nbytes: int = 256 * 2**20, *, device: torch.device | str = "cpu", min_time: float = 0.3) -> dict:
    """Memory bandwidth of ``dst.copy_(src)`` on buffers of ``nbytes`` (larger than the caches).

    Counted as STREAM does for its Copy kernel: bytes read plus bytes written, per second.
    """
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device=device, warmup=2, min_repeat=5, min_time=min_time)
    return {"bytes_per_s": 2 * n * 4 / t.median, "buffer_bytes": n * 4, "time": t.to_dict()}


def matmul_throughput(size: int = 2048, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                      min_time: float = 0.3) -> dict:
    """FLOP/s of a large square ``torch.mm`` (``2 n^3`` FLOPs per call)."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    out = torch.empty(size, size, dtype=dtype, device=device)
    t = time_fn(lambda: torch.mm(a, b, out=out), device=device, warmup=2, min_repeat=3, min_time=min_time)
    return {"flops_per_s": 2 * size**3 / t.median, "size": size, "dtype": str(dtype).replace("torch.", ""),
            "time": t.to_dict()}


# ---------------------------------------------------------------------------- description
def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _mem_total() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    return None


def mem_available() -> int | None:
    """Bytes of RAM available to new allocations (Linux ``MemAvailable``), or ``None``."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    with contextlib.suppress(Exception):
        out = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip()
    return None


def machine_info(device: torch.device | str = "cpu") -> dict:
    """The machine, the software and the settings a measurement ran with."""
    import sata

    device = torch.device(device)
    info = {
        "cpu": _cpu_model(),
        "cores": cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": _mem_total(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "sata": sata.__version__,
        "sata_git_commit": _git_commit(),
        "packages": {p: _version(p) for p in ("numpy", "matplotlib", "tqdm", "transformers", "safetensors")},
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def is_busy(load_average: float, cores: int) -> bool:
    """Whether other processes already keep the cores busy (a load average above half of them)."""
    return load_average > 0.5 * cores


def busy_warning(machine: dict) -> str | None:
    """A warning if other processes already keep the cores busy (timings will be noisy)."""
    load = (machine.get("load_average") or [0])[0]
    if machine["device"] == "cpu" and is_busy(load, machine["cores"]):
        return (f"the machine is busy (load average {load:.1f} on {machine['cores']} cores): timings will be "
                f"noisy and slow; ratios measured in the same run remain comparable"
                + ("; with several torch threads, --threads 1 may be steadier" if machine["torch_threads"] > 1 else ""))
    return None


def command_line(name: str, args, add_arguments) -> str:
    """The ``sata <name> ...`` command being run: as typed when run from the console, else
    rebuilt from the parsed ``args`` (the options that differ from their defaults)."""
    import argparse
    import shlex

    argv = sys.argv
    if len(argv) > 1 and argv[1] == name and os.path.basename(argv[0]) in ("sata", "cli.py", "__main__.py"):
        return "sata " + " ".join(shlex.quote(a) for a in argv[1:])
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    words = ["sata", name]
    for action in parser._actions:
        if action.dest == "help" or not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        if not action.option_strings:                      # positional
            words.append(str(value))
        elif value != action.default:
            flag = action.option_strings[-1]
            if action.const is not None and value == action.const:
                words.append(flag)
            elif isinstance(value, bool):
                words.append(flag)
            else:
                words += [flag, shlex.quote(str(value))]
    return " ".join(words)


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write ``data`` as JSON atomically (:func:`sata._files.write_atomic`)."""
    write_atomic(path, (json.dumps(data, indent=1, default=_json_default) + "\n").encode())


def _json_default(o):
    if isinstance(o, torch.dtype):
        return str(o).replace("torch.", "")
    if isinstance(o, torch.device):
        return str(o)
    if hasattr(o, "to_dict"):
        return o.to_dict()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
