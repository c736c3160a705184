"""Context parallelism over 2 and 3 gloo processes on CPU equals one process (forward and gradients).

One spawn per world size runs every case (starting processes dominates the time); each rank saves
its outputs and gradients, and the test compares them with a single-process run in float64: the
plain op, and the window mode (window, sinks, taylor_mix, recentre) with windows that span several
short segments and sinks that live on rank 0.
"""

from __future__ import annotations

import datetime
import math
import os
from dataclasses import dataclass, field, replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sata
from sata.distributed import context_parallel_attention, state_exchange_bytes

WORLDS = (2, 3)


@dataclass(frozen=True)
class Case:
    name: str
    lengths: tuple[int, ...]           # segment length per rank
    causal: bool = True
    n_q_heads: int = 4
    n_kv_heads: int = 2                # GQA when different from n_q_heads
    padding: bool = True
    with_state: bool = False           # a state of earlier tokens, replicated on every rank
    return_state: bool = False
    batch_shape: tuple[int, ...] = (2,)
    d_key: int = 4
    d_value: int = 3
    n_taylor: int = 3
    seed: int = 0
    # the window mode: window, sinks, and taylor_mix / recentre as a float or a list (one per query head,
    # a tensor that requires grad); a window-mode state (with_state) comes from a call with these settings
    hybrid: dict = field(default_factory=dict, compare=False)
    count_bytes: bool = False          # record the collectives' payloads (vs state_exchange_bytes)

    @property
    def world(self) -> int:
        return len(self.lengths)


CASES = [
    Case("causal-gqa-padding", lengths=(45, 70)),
    Case("causal-gqa-padding-state-return", lengths=(33, 40), with_state=True, return_state=True, n_taylor=4),
    Case("causal-empty-rank0", lengths=(0, 50), return_state=True),
    Case("causal-mha-2batchdims", lengths=(20, 7), n_q_heads=2, n_kv_heads=2, batch_shape=(2, 1), padding=False),
    Case("noncausal-gqa-padding", lengths=(30, 41), causal=False, with_state=True, return_state=True),
    # the window mode
    Case("window-gqa-padding-return", lengths=(20, 25), return_state=True, count_bytes=True,
         hybrid=dict(window=6, sinks=3, recentre=0.5, taylor_mix=0.7)),
    Case("window-spans-both-ranks", lengths=(3, 4), return_state=True, hybrid=dict(window=9, sinks=2, recentre=0.0)),
    Case("window-3ranks-per-head", lengths=(5, 3, 30), return_state=True, count_bytes=True,
         hybrid=dict(window=10, sinks=2, taylor_mix=[0.5, 1.0, 1.5, 2.0], recentre=[0.0, 0.3, 0.6, 1.0])),
    Case("window-3ranks-sinks-on-rank0", lengths=(12, 4, 20), padding=False, n_q_heads=2, n_kv_heads=2,
         batch_shape=(2, 1), hybrid=dict(window=3, sinks=4, recentre=1.0, taylor_mix=2.0)),
    Case("window-3ranks-empty-rank0", lengths=(0, 7, 16), return_state=True, n_taylor=4,
         hybrid=dict(window=5, sinks=2, recentre=0.3)),
    Case("window-3ranks-state", lengths=(6, 0, 11), with_state=True, return_state=True,
         hybrid=dict(window=4, sinks=2, recentre=0.5)),
    Case("recentre-only-3ranks", lengths=(9, 2, 13), return_state=True, count_bytes=True,
         hybrid=dict(recentre=[0.2, 0.9, 0.0, 0.5])),
    Case("window-no-recentre-3ranks-state", lengths=(4, 9, 2), with_state=True, return_state=True, n_taylor=5,
         hybrid=dict(window=7, sinks=1)),
]


def _hybrid(case: Case) -> dict:
    """The window-mode arguments: per-head lists become leaf tensors that require grad (fresh every call)."""
    as_arg = lambda x: torch.tensor(x, dtype=torch.float64, requires_grad=True) if isinstance(x, list) else x
    return {name: as_arg(x) for name, x in case.hybrid.items()}


def _inputs(case: Case):
    """The whole sequence (every rank builds the same one), float64, and the loss weights."""
    g = torch.Generator().manual_seed(case.seed)
    L, B = sum(case.lengths), case.batch_shape
    q = torch.randn(*B, case.n_q_heads, L, case.d_key, generator=g, dtype=torch.float64)
    k = torch.randn(*B, case.n_kv_heads, L, case.d_key, generator=g, dtype=torch.float64)
    v = torch.randn(*B, case.n_kv_heads, L, case.d_value, generator=g, dtype=torch.float64)
    mask = torch.rand(*B, L, generator=g) < 0.25 if case.padding else None
    w = torch.randn(*B, case.n_q_heads, L, case.d_value, generator=g, dtype=torch.float64)
    state = None
    if case.with_state:
        k0 = torch.randn(*B, case.n_kv_heads, 9, case.d_key, generator=g, dtype=torch.float64)
        v0 = torch.randn(*B, case.n_kv_heads, 9, case.d_value, generator=g, dtype=torch.float64)
        if case.hybrid:  # a window-mode stream of 9 earlier tokens (its key centre is theirs)
            q0 = torch.randn(*B, case.n_q_heads, 9, case.d_key, generator=g, dtype=torch.float64)
            hybrid = {n: x.detach() if isinstance(x, torch.Tensor) else x for n, x in _hybrid(case).items()}
            state = sata.sata_attention(q0, k0, v0, n_taylor=case.n_taylor, is_causal=True, return_state=True,
                                        enable_gqa=case.n_q_heads != case.n_kv_heads, **hybrid)[1]
        else:
            state = sata.accumulate_state(k0, v0, n_taylor=case.n_taylor)
    return q, k, v, mask, w, state


def _state_floats(state: sata.SATAState) -> list[torch.Tensor]:
    """The differentiable tensors of a state: ``kv`` and the window and sink keys and values."""
    return [state.kv] + ([] if state.exact is None else
                         [state.exact.win_k, state.exact.win_v, state.exact.sink_k, state.exact.sink_v])


def _leaf_state(state: sata.SATAState | None) -> sata.SATAState | None:
    """A copy of ``state`` whose floating tensors are leaves that require grad."""
    if state is None:
        return None
    leaf = lambda t: t.detach().clone().requires_grad_(t.is_floating_point())
    exact = None if state.exact is None else state.exact.map(leaf)
    return replace(state.detach(), kv=leaf(state.kv), exact=exact)


def _loss_terms(case, y, w, total, include_state: bool):
    loss = (y * w).sum()
    if case.return_state and include_state:
        for i, t in enumerate(_state_floats(total)):
            weight = torch.randn(t.shape, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64)
            loss = loss + (t * weight).sum()
    return loss


def _grads(named: dict) -> dict:
    """``{name: grad}`` of leaf tensors (zeros where autograd left None: an empty segment, say)."""
    return {n: torch.zeros_like(t) if t.grad is None else t.grad for n, t in named.items()}


class _Recorder:
    """Bytes each collective of ``torch.distributed`` sends from this rank, while installed."""

    def __init__(self):
        self.calls: list[tuple[str, int]] = []
        self.saved = {}

    def __enter__(self):
        for name in ("all_gather", "all_reduce"):
            original = self.saved[name] = getattr(dist, name)

            def wrapped(*args, _name=name, _original=original, **kwargs):
                sent = args[1] if _name == "all_gather" else args[0]
                self.calls.append((_name, sent.numel() * sent.element_size()))
                return _original(*args, **kwargs)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def _within(budget: str, fn):
    with sata.memory_budget(budget):
        return fn()


def _catch(fn) -> str | None:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    # a collective some rank never joins fails in a minute instead of gloo's default half hour
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for case in (c for c in CASES if c.world == world):
            q, k, v, mask, w, state, = _inputs(case)
            a = sum(case.lengths[:rank])
            b = a + case.lengths[rank]
            ql, kl, vl = (t[..., a:b, :].clone().requires_grad_() for t in (q, k, v))
            st, hybrid = _leaf_state(state), _hybrid(case)
            with _Recorder() as rec:
                res = context_parallel_attention(
                    ql, kl, vl, n_taylor=case.n_taylor, is_causal=case.causal,
                    enable_gqa=case.n_q_heads != case.n_kv_heads, key_padding_mask=None if mask is None else mask[..., a:b],
                    state=st, return_state=case.return_state, **hybrid,
                )
                y, total = res if case.return_state else (res, None)
                # the state's loss term counted once, on rank 0; every rank still runs backward
                _loss_terms(case, y, w[..., a:b, :], total, include_state=rank == 0).backward()
            leaves = {"dq": ql, "dk": kl, "dv": vl, **{f"d{n}": t for n, t in hybrid.items() if isinstance(t, torch.Tensor)}}
            torch.save({
                "y": y.detach(), **_grads(leaves),
                "dstate": None if st is None else list(_grads(dict(enumerate(_state_floats(st)))).values()),
                "total": None if total is None else total.detach(),
                "collectives": rec.calls,
            }, os.path.join(out_dir, f"{case.name}-{rank}.pt"))
        if world == 2:
            _bad_calls(rank, out_dir)
            with torch.no_grad():  # serving: float32, no autograd (the fused kernels may run), a one-token rank
                q, k, v = _float32_stream()
                a, b = (0, 12) if rank == 0 else (12, 13)
                y = context_parallel_attention(q[..., a:b, :], k[..., a:b, :], v[..., a:b, :], **FLOAT32_KW)
            torch.save({"y": y}, os.path.join(out_dir, f"float32-nograd-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _bad_calls(rank: int, out_dir: str) -> None:
    """Ranks that disagree, or one rank with invalid arguments: every rank raises a clear error, none hangs."""
    x = torch.randn(1, 2, 5, 3 + rank)
    y = torch.randn(1, 2, 6, 4)
    g = torch.Generator().manual_seed(5)  # the same states on every rank
    k0, v0 = torch.randn(1, 2, 5, 4, generator=g), torch.randn(1, 2, 5, 4, generator=g)
    start, later = sata.accumulate_state(k0[..., :3, :], v0[..., :3, :]), sata.accumulate_state(k0, v0)
    wstart = sata.accumulate_state(k0, v0, window=2)
    calls = {
        "mismatch": lambda: context_parallel_attention(x, x, x),
        # invalid arguments on one rank only (causal with Lq != Lk): it raises its error, the others follow
        "invalid": lambda: context_parallel_attention(y if rank == 0 else y[..., :5, :], y, y),
        "mismatch-window": lambda: context_parallel_attention(y, y, y, window=4 + 2 * rank, sinks=1),
        "mismatch-mode": lambda: context_parallel_attention(y, y, y, recentre=None if rank == 0 else 0.5),
        "mismatch-mix": lambda: context_parallel_attention(y, y, y, window=3, taylor_mix=0.5 + 0.5 * rank),
        "invalid-window": lambda: context_parallel_attention(y, y, y, window=2 if rank == 0 else -1),
        "noncausal-window": lambda: context_parallel_attention(y, y, y, is_causal=False, window=2),
        "mismatch-causal": lambda: context_parallel_attention(y, y, y, is_causal=rank == 0),
        # a state restored on one rank only, or from another point of the stream: plain and window mode
        "state-one-rank": lambda: context_parallel_attention(y, y, y, state=start if rank == 0 else None),
        "state-other-count": lambda: context_parallel_attention(y, y, y, state=start if rank == 0 else later),
        "window-state-one-rank": lambda: context_parallel_attention(y, y, y, window=2, state=wstart if rank else None),
        # one rank's window over the memory budget: it must still join the exchange, or the others wait in it
        "window-over-budget-one-rank": lambda: _within("16M", lambda: context_parallel_attention(
            y, y, y, window=2 if rank == 0 else 10**6)),
    }
    for name, call in calls.items():
        torch.save({"message": _catch(call)}, os.path.join(out_dir, f"{name}-{rank}.pt"))


FLOAT32_KW = dict(n_taylor=3, enable_gqa=True, window=5, sinks=2, recentre=0.5, taylor_mix=0.8)


def _float32_stream():
    g = torch.Generator().manual_seed(3)
    return (torch.randn(2, 4, 13, 8, generator=g), torch.randn(2, 2, 13, 8, generator=g),
            torch.randn(2, 2, 13, 8, generator=g))


WORLD2_RUNS = ["float32-nograd", "mismatch", "invalid", "mismatch-window", "mismatch-mode", "mismatch-mix", "invalid-window",
             "noncausal-window", "mismatch-causal", "state-one-rank", "state-other-count", "window-state-one-rank",
             "window-over-budget-one-rank"]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = {}
    for world in WORLDS:
        out = tmp_path_factory.mktemp(f"cp{world}")
        mp.spawn(_worker, args=(world, str(out / "rendezvous"), str(out)), nprocs=world, join=True)
        names = [c.name for c in CASES if c.world == world] + (WORLD2_RUNS if world == 2 else [])
        results.update({name: [torch.load(out / f"{name}-{r}.pt", weights_only=False) for r in range(world)]  # our files
                        for name in names})
    return results


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    err = (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1e-300)
    assert err <= 1e-10, f"{what}: relative error {err:.3g} > 1e-10"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_gloo_ranks_equal_one_process(case, distributed_results):
    parts = distributed_results[case.name]
    q, k, v, mask, w, state = _inputs(case)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    st, hybrid = _leaf_state(state), _hybrid(case)
    gqa = case.n_q_heads != case.n_kv_heads
    res = sata.sata_attention(q, k, v, n_taylor=case.n_taylor, is_causal=case.causal, enable_gqa=gqa,
                              key_padding_mask=mask, state=st, return_state=case.return_state, **hybrid)
    y, total = res if case.return_state else (res, None)
    _loss_terms(case, y, w, total, include_state=True).backward()

    # the oracle, too, where it applies (no state; rows of padded queries are not defined in the window mode)
    if state is None:
        ref = sata.naive_sata_attention(q.detach(), k.detach(), v.detach(), n_taylor=case.n_taylor,
                                        is_causal=case.causal, enable_gqa=gqa, key_padding_mask=mask,
                                        **{n: x.detach() if isinstance(x, torch.Tensor) else x for n, x in hybrid.items()})
        rows = 1.0 if mask is None or not case.hybrid else ~mask[..., None, :, None]
        _close(y.detach() * rows, ref * rows, "single process vs oracle")

    _close(torch.cat([p["y"] for p in parts], dim=-2), y.detach(), "output")
    for name, full in (("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        _close(torch.cat([p[name] for p in parts], dim=-2), full, name)
    for name, x in hybrid.items():  # replicated per-head parameters: each rank holds its share of the gradient
        if isinstance(x, torch.Tensor):
            _close(sum(p[f"d{name}"] for p in parts), x.grad, f"d{name}")
    if st is not None:  # each rank holds its share of the replicated state's gradient
        for i, t in enumerate(_state_floats(st)):
            _close(sum(p["dstate"][i] for p in parts), t.grad, f"dstate[{i}]")
    if case.return_state:
        for p in parts:
            got = p["total"]
            for a, b in zip(_state_floats(got), _state_floats(total)):
                _close(a, b.detach(), "returned state")
            assert got.n_tokens == total.n_tokens and (got.window, got.sinks) == (total.window, total.sinks)
            if total.exact is not None:  # slot flags and sink positions are the same integers
                assert torch.equal(got.exact.win_keep, total.exact.win_keep)
                assert torch.equal(got.exact.sink_pos, total.exact.sink_pos)
            assert (got.key_centre is None) == (total.key_centre is None)
            if total.key_centre is not None:
                _close(got.key_centre, total.key_centre, "key centre")


@pytest.mark.parametrize("case", [c for c in CASES if c.count_bytes], ids=lambda c: c.name)
def test_window_exchange_volume_is_what_state_exchange_bytes_says(case, distributed_results):
    vol = state_exchange_bytes(math.prod(case.batch_shape), case.n_kv_heads, case.d_key, case.d_value,
                               case.n_taylor, case.world, torch.float64, window=case.hybrid.get("window", 0),
                               sinks=case.hybrid.get("sinks", 0), recentre="recentre" in case.hybrid)
    for rank, p in enumerate(distributed_results[case.name]):
        gathers = [n for op, n in p["collectives"] if op == "all_gather"]
        reduces = [n for op, n in p["collectives"] if op == "all_reduce"]
        # the first two all-gathers are the agreement check (a few integers)
        assert sum(gathers[2:]) == vol["sent"], (rank, gathers)
        assert reduces == [vol["backward"]], (rank, reduces)


def test_ranks_that_disagree_all_raise(distributed_results):
    messages = [p["message"] for p in distributed_results["mismatch"]]
    assert all(m is not None and "ranks disagree" in m for m in messages), messages
    assert messages[0] == messages[1]


def test_a_rank_over_the_memory_budget_stops_every_rank(distributed_results):
    rank0, rank1 = (p["message"] for p in distributed_results["window-over-budget-one-rank"])
    assert rank1 is not None and "memory budget" in rank1
    assert rank0 is not None and "rank(s) [1]" in rank0


def test_invalid_arguments_on_one_rank_stop_every_rank(distributed_results):
    rank0, rank1 = (p["message"] for p in distributed_results["invalid"])
    assert rank1 is not None and "as many queries as keys" in rank1
    assert rank0 is not None and "rank(s) [1]" in rank0


def test_exchange_volume_is_one_state_per_rank():
    vol = state_exchange_bytes(batch=1, n_kv_heads=4, d_key=8, d_value=8, n_taylor=4, world_size=8)
    assert vol["state"] == 4 * 165 * 9 * 4
    assert vol["sent"] == vol["state"] and vol["received"] == 7 * vol["state"]


def test_needs_initialised_process_group():
    x = torch.randn(1, 2, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        context_parallel_attention(x, x, x)


SETTINGS_BAD = [
    pytest.param("mismatch-window", ["window: rank 0 4, rank 1 6"], id="window"),
    pytest.param("mismatch-mode", ["taylor_mix: rank 0 -, rank 1 [1.0, 1.0]", "recentre: rank 0 -, rank 1 [0.5, 0.5]"],
                 id="plain-vs-recentre"),
    pytest.param("mismatch-mix", ["taylor_mix: rank 0 [0.5, 0.5], rank 1 [1.0, 1.0]"], id="taylor_mix"),
    pytest.param("mismatch-causal", ["is_causal: rank 0 True, rank 1 False"], id="is_causal"),
    pytest.param("state-one-rank", ["state: rank 0 True, rank 1 False"], id="state-on-one-rank"),
    pytest.param("state-other-count", ["state n_tokens: rank 0 3, rank 1 5"], id="state-other-count"),
    pytest.param("window-state-one-rank", ["state: rank 0 False, rank 1 True"], id="window-state-on-one-rank"),
]


@pytest.mark.parametrize("name,details", SETTINGS_BAD)
def test_ranks_that_disagree_on_a_setting_or_the_state_all_raise(name, details, distributed_results):
    messages = [p["message"] for p in distributed_results[name]]
    assert messages[0] is not None and messages[0] == messages[1], messages
    assert "the ranks disagree" in messages[0]
    for detail in details:
        assert detail in messages[0], messages[0]


def test_float32_without_autograd(distributed_results):
    q, k, v = _float32_stream()
    y = torch.cat([p["y"] for p in distributed_results["float32-nograd"]], dim=-2)
    assert y.dtype == torch.float32
    expected = sata.naive_sata_attention(q.double(), k.double(), v.double(), is_causal=True, **FLOAT32_KW)
    err = ((y.double() - expected).abs().max() / expected.abs().max()).item()
    assert err < 1e-5, err


def test_invalid_window_on_one_rank_stops_every_rank(distributed_results):
    rank0, rank1 = (p["message"] for p in distributed_results["invalid-window"])
    assert rank1 is not None and "window must be a non-negative int" in rank1
    assert rank0 is not None and "rank(s) [1]" in rank0


def test_noncausal_window_mode_is_refused_on_every_rank(distributed_results):
    for p in distributed_results["noncausal-window"]:
        assert p["message"] is not None and "need is_causal=True" in p["message"]


def test_window_exchange_volume_formula():
    # 2 x 3 kv heads, E = 4, Ev = 3, P = 3: D = 15; window 6 + 2 sinks
    vol = state_exchange_bytes(2, 3, 4, 3, 3, world_size=3, dtype=torch.float64, window=6, sinks=2, recentre=True)
    floats = 2 * 3 * (15 * 4 + 8 * 7)
    assert vol["state"] == floats * 8 + 2 * 8 * 8
    # key sums, counts, and the running sums of each rank's first 2 kept keys (0, 1, 2 of them): the centre's
    assert vol["sent"] == vol["state"] + 2 * (3 * 4 * (1 + 3) + 1) * 8 and vol["received"] == 2 * vol["sent"]
    assert vol["backward"] == 3 * floats * 8
