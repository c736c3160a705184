"""Decode benchmark: time and memory per generated token as the context grows.

For every context length, in one run on the same tokens: ``sata`` (one decode step of
:func:`sata.sata_attention` with the context's state), conventional attention (SDPA over a
preallocated KV cache, :class:`~sata.bench.baselines.KVCacheAttention`) and the paper's
formulation (:class:`~sata.bench.baselines.PaperTaylorAttention`), timed round-robin; with
``paper_code``, also the paper's own code (:class:`~sata.bench.baselines.PaperCode`) from the same state.

Contexts are built by streaming prefill: tokens are generated chunk by chunk and absorbed
into the ``sata`` state (:func:`sata.accumulate_state`) and the paper's state, and written
into the KV cache as long as it fits in ``max_bytes``; a baseline that cannot hold a context
is skipped there, never materialised. With ``stream_limit = T``, only the first ``T`` tokens
are streamed and longer contexts repeat that segment (``n = r T``): their states are ``r``
times the segment's state, exactly, since states of disjoint segments add, and the KV cache
holds the same ``r`` copies. Time and memory per decode step do not depend on token values,
so this keeps long contexts affordable in quick runs; ``streamed_tokens`` records it.

The window mode (``window``, ``sinks``, ``recentre``; ``MATH.md`` section 6): ``sata`` is then
the window mode, and ``plain`` the plain op on the same tokens, so one run times the window
mode against SDPA and against the plain op. (A repeated segment's window state is scaled like
a plain one: its values are then not those of the longer stream, its cost is.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

import sata

from .baselines import KVCacheAttention, PaperCode, PaperTaylorAttention
from .compare import agreement, crossover
from .timing import peak_memory, time_interleaved, torch_threads

__all__ = ["DecodeConfig", "WindowSettings", "run_decode", "sata_step"]

METHODS = ("sata", "sdpa", "paper")
WINDOW_METHODS = ("sata", "plain", "sdpa", "paper")   # the window mode: sata = window mode, plain = the plain op


@dataclass
class WindowSettings:
    """The window mode of ``sata`` in a decode or prefill sweep (``0, 0, None``: the plain op); on, the
    default methods gain ``plain`` (the plain op on the same inputs)."""

    window: int = 0
    sinks: int = 0
    recentre: float | None = None

    def __post_init__(self):
        if self.hybrid and self.methods == METHODS:
            self.methods = WINDOW_METHODS

    @property
    def hybrid(self) -> dict:
        """The window-mode arguments of ``sata_attention`` (empty: the plain op)."""
        if not self.window and not self.sinks and self.recentre is None:
            return {}
        return {"window": self.window, "sinks": self.sinks, "recentre": self.recentre}


@dataclass
class DecodeConfig(WindowSettings):
    """One decode sweep: shapes, contexts and measurement settings."""

    batch: int = 1
    n_heads: int = 64
    d_key: int = 8
    d_value: int | None = None            # default: d_key
    n_taylor: int = 4
    contexts: tuple[int, ...] = (1024, 4096, 16384, 65536)
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    stream_limit: int | None = None       # tokens streamed; longer contexts repeat them
    max_bytes: int = 4 * 2**30            # a baseline's context (KV cache, state) may hold at most this
    methods: tuple[str, ...] = METHODS
    measure_memory: bool = True
    sata_inplace: bool = True              # decode as a serving loop does: the state updated in place
    min_time: float = 0.2
    min_repeat: int = 5
    # steady state: a sample is ~2 ms of consecutive steps (one layer's loop); 0 = single cold calls
    burst_time: float = 0.002
    threads: int | None = None            # torch threads of the timed steps (None: as the caller set them)
    seed: int = 0
    label: str = field(default="")
    paper_code: str | None = None         # the paper's sata_attention.py: also time its own decode step

    def __post_init__(self):
        super().__post_init__()
        if self.paper_code is not None and "paper_code" not in self.methods:
            self.methods = (*self.methods, "paper_code")

    @property
    def dv(self) -> int:
        return self.d_key if self.d_value is None else self.d_value


def _absorb(k, v, state: sata.SATAState | None, n_taylor: int, **hybrid) -> sata.SATAState:
    """``state`` after keys and values (no outputs); with ``hybrid``, a window-mode state whose first
    call fixes the key centre, as a re-centred stream's does."""
    if not hybrid:
        return sata.accumulate_state(k, v, n_taylor=n_taylor, state=state)
    # sata_attention with no queries: accumulate_state takes no recentre (the stream's centre)
    return sata.sata_attention(k[..., :0, :], k, v, n_taylor=n_taylor, state=state, return_state=True, **hybrid)[1]


def sata_step(state: sata.SATAState, query, key, value, n_taylor: int, inplace: bool = True, **hybrid):
    """A decode step to time: ``sata_attention`` on one token with the context's state.

    ``inplace=True`` (a serving loop) updates a private copy of the state in place, so timed calls
    leave ``state`` as it was (the copy drifts by one token per call, which changes no cost);
    ``inplace=False`` returns a new state per call, leaving the old one valid. ``hybrid``: the
    window mode's ``window``, ``sinks``, ``recentre`` (the state's own window and sinks).
    """
    st = state.clone() if inplace else state
    return lambda: sata.sata_attention(query, key, value, n_taylor=n_taylor, is_causal=True, state=st,
                                       return_state=True, inplace=inplace, **hybrid)


def _chunk_tokens(cfg: DecodeConfig) -> int:
    """Tokens per streamed chunk: inputs of ~16 MiB at most."""
    per_token = cfg.batch * cfg.n_heads * (cfg.d_key + cfg.dv) * 4
    return max(64, min(65536, (16 * 2**20) // max(per_token, 1)))


def _plan(cfg: DecodeConfig) -> tuple[list[int], int]:
    """Contexts to measure (rounded to multiples of the streamed segment beyond it) and the segment length."""
    contexts = sorted({int(n) for n in cfg.contexts if n >= 1})
    if not contexts:
        raise ValueError("contexts must hold at least one positive length")
    seg = contexts[-1] if cfg.stream_limit is None else min(cfg.stream_limit, contexts[-1])
    planned = sorted({n if n <= seg else max(seg, round(n / seg) * seg) for n in contexts})
    return planned, seg


class _Streams:
    """The growing context: sata state, paper state and KV cache fed from one token stream."""

    def __init__(self, cfg: DecodeConfig, capacity: int):
        self.cfg = cfg
        self.gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        self.pos = 0
        self.state: sata.SATAState | None = None
        self.plain_state: sata.SATAState | None = None      # the plain op's, beside a window-mode ``state``
        # the paper's own code decodes from this formulation's state: streamed for either
        paper = "paper" in cfg.methods or "paper_code" in cfg.methods
        self.paper = PaperTaylorAttention(cfg.d_key, cfg.n_taylor, device=cfg.device) if paper else None
        self.paper_code = None if cfg.paper_code is None else PaperCode(cfg.paper_code, cfg.d_key, cfg.dv, cfg.n_taylor,
                                                                        cfg.device, cfg.dtype)
        self.paper_state = None
        self.cache = None
        if "sdpa" in cfg.methods and capacity > 0:
            self.cache = KVCacheAttention(cfg.batch, cfg.n_heads, cfg.d_key, cfg.dv, capacity,
                                          dtype=cfg.dtype, device=cfg.device)

    def _tokens(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cfg
        k = torch.randn(c.batch, c.n_heads, n, c.d_key, generator=self.gen).to(c.device, c.dtype)   # [B, H, n, E]
        v = torch.randn(c.batch, c.n_heads, n, c.dv, generator=self.gen).to(c.device, c.dtype)      # [B, H, n, Ev]
        return k, v

    def stream_to(self, n: int, progress=None) -> None:
        """Absorb tokens until ``n`` have been streamed."""
        chunk = _chunk_tokens(self.cfg)
        while self.pos < n:
            t = min(chunk, n - self.pos)
            k, v = self._tokens(t)
            with torch.no_grad():
                if "sata" in self.cfg.methods:
                    self.state = _absorb(k, v, self.state, self.cfg.n_taylor, **self.cfg.hybrid)
                if "plain" in self.cfg.methods:
                    self.plain_state = _absorb(k, v, self.plain_state, self.cfg.n_taylor)
                if self.paper is not None:
                    self.paper_state = self.paper.absorb(k, v, self.paper_state)
            if self.cache is not None and self.cache.length + t <= self.cache.capacity - 1:
                self.cache.extend(k, v)
            self.pos += t
            if progress is not None:
                progress.update(t)

    def states(self) -> dict[str, sata.SATAState | None]:
        """The sata states so far by method: ``sata`` (the window mode's, if on) and ``plain``."""
        return {"sata": self.state, "plain": self.plain_state}

    def fill_cache_periodic(self, n: int, seg: int) -> None:
        """Extend the KV cache to ``n`` positions by repeating its first ``seg`` ones."""
        cache = self.cache
        if cache is None or n > cache.capacity - 1:
            return
        while cache.length < n:
            t = min(seg, n - cache.length)
            cache.k[:, :, cache.length:cache.length + t].copy_(cache.k[:, :, :t])
            cache.v[:, :, cache.length:cache.length + t].copy_(cache.v[:, :, :t])
            cache.length += t


def _scaled_state(state: sata.SATAState, r: int, n: int) -> sata.SATAState:
    """The state of ``r`` repetitions of a segment: ``r`` times its state."""
    return dataclasses.replace(state, kv=state.kv * r, n_tokens=n)


def run_decode(cfg: DecodeConfig, progress: bool = True, partial: bool = False) -> dict:
    """Measure one decode step at every context of ``cfg``. Returns a JSON-ready dict; with ``partial``, Ctrl-C
    returns the contexts measured so far (``interrupted`` set) instead of raising ``KeyboardInterrupt``."""
    from tqdm.auto import tqdm

    contexts, seg = _plan(cfg)
    itemsize = torch.empty((), dtype=cfg.dtype).element_size()
    kv_per_token = cfg.batch * cfg.n_heads * (cfg.d_key + cfg.dv) * itemsize
    fit = cfg.max_bytes // kv_per_token - 1            # longest context the cache may hold (+1 decode slot)
    capacity = min(fit, contexts[-1]) + 1 if fit >= 1 else 0
    streams = _Streams(cfg, capacity)
    if streams.paper is not None:
        paper_state_bytes = cfg.batch * cfg.n_heads * streams.paper.state_numel(cfg.dv) * itemsize
        if paper_state_bytes > cfg.max_bytes // 4:
            streams.paper = None

    g = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
    shape = (cfg.batch, cfg.n_heads, 1)
    q1 = torch.randn(*shape, cfg.d_key, generator=g).to(cfg.device, cfg.dtype)   # [B, H, 1, E]
    k1 = torch.randn(*shape, cfg.d_key, generator=g).to(cfg.device, cfg.dtype)   # [B, H, 1, E]
    v1 = torch.randn(*shape, cfg.dv, generator=g).to(cfg.device, cfg.dtype)      # [B, H, 1, Ev]

    rows = []
    desc = cfg.label or f"decode B={cfg.batch} H={cfg.n_heads} d={cfg.d_key} P={cfg.n_taylor}"
    bar = tqdm(total=min(seg, contexts[-1]), desc=f"{desc}: streaming", unit="tok", unit_scale=True,
               disable=not progress, leave=False)
    seg_states = seg_paper = None
    interrupted = False
    for n in tqdm(contexts, desc=desc, unit="ctx", disable=not progress, leave=False):
        try:
            if n <= seg:
                streams.stream_to(n, bar)
                states, paper_state = streams.states(), streams.paper_state
                if n == seg:
                    seg_states, seg_paper = states, paper_state
            else:
                if seg_states is None:
                    streams.stream_to(seg, bar)
                    seg_states, seg_paper = streams.states(), streams.paper_state
                r = n // seg
                states = {m: None if st is None else _scaled_state(st, r, n) for m, st in seg_states.items()}
                paper_state = None if seg_paper is None else [(a * r, b * r) for a, b in seg_paper]
                streams.fill_cache_periodic(n, seg)
            rows.append(_measure(cfg, n, min(n, seg), streams, states, paper_state, q1, k1, v1))
        except KeyboardInterrupt:   # Ctrl-C: the contexts measured so far are still reported
            if not partial:
                raise
            interrupted = True
            break
    bar.close()

    ns = [r["context"] for r in rows]
    med = lambda m: [r[m]["time"]["median"] if "time" in r.get(m, {}) else None for r in rows]
    return {
        "config": _config_dict(cfg),
        "rows": rows,
        "interrupted": interrupted,
        "crossover_vs_sdpa": crossover(ns, med("sata"), med("sdpa")),
    }


def _config_dict(cfg: DecodeConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["dtype"] = str(cfg.dtype).replace("torch.", "")
    d["d_value"] = cfg.dv
    d["contexts"] = list(cfg.contexts)
    d["methods"] = list(cfg.methods)
    return d


def _measure(cfg, n, streamed, streams: _Streams, states: dict, paper_state, q1, k1, v1) -> dict:
    row: dict = {"context": n, "streamed_tokens": streamed}
    fns, held = {}, {}
    for name in ("sata", "plain"):
        if name not in cfg.methods:
            continue
        if states[name] is None:
            row[name] = {"skipped": "no state"}
        else:
            hybrid = cfg.hybrid if name == "sata" else {}
            fns[name] = sata_step(states[name], q1, k1, v1, cfg.n_taylor, cfg.sata_inplace, **hybrid)
            held[name] = states[name].nbytes
    if "sdpa" in cfg.methods:
        cache = streams.cache
        if cache is None or cache.length < n or n + 1 > cache.capacity:
            need = KVCacheAttention.nbytes_for(cfg.batch, cfg.n_heads, cfg.d_key, cfg.dv, n + 1, cfg.dtype)
            row["sdpa"] = {"skipped": f"KV cache of {n + 1} tokens needs {need / 2**30:.2f} GiB, "
                                      f"over the memory limit of {cfg.max_bytes / 2**30:.2f} GiB"}
        else:
            def sdpa_step(cache=cache, n=n):
                cache.length = n          # every timed step decodes token n+1 of the same context
                return cache.step(q1, k1, v1)
            fns["sdpa"] = sdpa_step
            held["sdpa"] = cache.context_nbytes(n + 1)
    # the paper's state, held alike by its formulation and its own code
    paper_bytes = None if paper_state is None else sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in paper_state)
    if "paper" in cfg.methods:
        if paper_state is None or streams.paper is None:
            row["paper"] = {"skipped": "the paper's state does not fit in the memory limit"}
        else:
            fns["paper"] = lambda: streams.paper.step(q1, k1, v1, paper_state)
            held["paper"] = paper_bytes
    if "paper_code" in cfg.methods:
        if paper_state is None or streams.paper_code is None:
            row["paper_code"] = {"skipped": "the paper's state does not fit in the memory limit"}
        else:
            streams.paper_code.load_state(paper_state)   # its steps then drift by a token each (the cost does not)
            fns["paper_code"] = lambda: streams.paper_code.step(q1, k1, v1)
            held["paper_code"] = paper_bytes

    with torch.no_grad(), torch_threads(cfg.threads):
        outs, peaks = {}, {}
        for name, fn in fns.items():          # the first call, profiled for memory, also warms up
            peaks[name], out = peak_memory(fn, cfg.device) if cfg.measure_memory else (None, fn())
            outs[name] = out[0] if isinstance(out, tuple) else out
        timings = time_interleaved(fns, device=cfg.device, warmup=1, min_time=cfg.min_time,
                                   min_repeat=cfg.min_repeat, burst_time=cfg.burst_time)
    if "sdpa" in fns:  # the timed steps appended a token: the context is n tokens again for the next stream
        streams.cache.length = n
    for name in fns:
        entry = {"time": timings[name].to_dict(), "held_bytes": int(held[name])}
        if cfg.measure_memory:
            entry["transient_peak_bytes"] = peaks[name]
            entry["peak_bytes"] = None if peaks[name] is None else int(held[name] + peaks[name])
        row[name] = entry
    compare(row, outs)
    return row


def compare(row: dict, outs: dict) -> None:
    """``sata``'s agreement with every other method's output, and its time over theirs (``sata_over_<m>``)."""
    for name in ("sdpa", "paper", "paper_code", "plain"):
        if "sata" in outs and name in outs:
            row["sata"][f"vs_{name}"] = agreement(outs["sata"], outs[name])
        if "time" in row.get("sata", {}) and "time" in row.get(name, {}):
            row[f"sata_over_{name}"] = row["sata"]["time"]["median"] / row[name]["time"]["median"]
