"""Context parallelism over 2 gloo processes on CPU equals one process (forward and gradients).

One spawn runs every case (starting processes dominates the time); each rank saves its
outputs and gradients, and the test compares them with a single-process run in float64.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sata
from sata.distributed import context_parallel_attention, state_exchange_bytes

WORLD = 2


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
    extra: dict = field(default_factory=dict, compare=False)


CASES = [
    Case("causal-gqa-padding", lengths=(45, 70)),
    Case("causal-gqa-padding-state-return", lengths=(33, 40), with_state=True, return_state=True, n_taylor=4),
    Case("causal-empty-rank0", lengths=(0, 50), return_state=True),
    Case("causal-mha-2batchdims", lengths=(20, 7), n_q_heads=2, n_kv_heads=2, batch_shape=(2, 1), padding=False),
    Case("noncausal-gqa-padding", lengths=(30, 41), causal=False, with_state=True, return_state=True),
]


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
        state = sata.accumulate_state(k0, v0, n_taylor=case.n_taylor)
    ws = torch.randn(state.kv.shape if state is not None else (1,), generator=g, dtype=torch.float64)
    return q, k, v, mask, w, state, ws


def _loss_terms(case, y, w, total, ws, include_state: bool):
    loss = (y * w).sum()
    if case.return_state and include_state:
        ws_full = ws if ws.shape == total.kv.shape else torch.ones_like(total.kv)
        loss = loss + (total.kv * ws_full).sum()
    return loss


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for case in CASES:
            q, k, v, mask, w, state, ws = _inputs(case)
            a = sum(case.lengths[:rank])
            b = a + case.lengths[rank]
            ql, kl, vl = (t[..., a:b, :].clone().requires_grad_() for t in (q, k, v))
            st = None
            if state is not None:
                st = state.detach()
                st = sata.SATAState(kv=st.kv.clone().requires_grad_(), n_taylor=st.n_taylor, d_key=st.d_key,
                                    d_value=st.d_value, scale=st.scale, n_tokens=st.n_tokens)
            res = context_parallel_attention(
                ql, kl, vl, n_taylor=case.n_taylor, is_causal=case.causal, enable_gqa=case.n_q_heads != case.n_kv_heads,
                key_padding_mask=None if mask is None else mask[..., a:b], state=st, return_state=case.return_state,
            )
            y, total = res if case.return_state else (res, None)
            # the state's loss term counted once, on rank 0; every rank still runs backward
            _loss_terms(case, y, w[..., a:b, :], total, ws, include_state=rank == 0).backward()
            torch.save({
                "y": y.detach(), **{n: torch.zeros_like(t) if t.grad is None else t.grad  # None for an empty segment
                                   for n, t in (("dq", ql), ("dk", kl), ("dv", vl))},
                "dstate": None if st is None else st.kv.grad,
                "total": None if total is None else total.kv.detach(),
                "n_tokens": None if total is None else total.n_tokens,
            }, os.path.join(out_dir, f"{case.name}-{rank}.pt"))
        # ranks that disagree on the configuration: every rank raises the same clear error, none hangs
        x = torch.randn(1, 2, 5, 3 + rank)
        try:
            context_parallel_attention(x, x, x)
            message = None
        except ValueError as e:
            message = str(e)
        torch.save({"message": message}, os.path.join(out_dir, f"mismatch-{rank}.pt"))
        # invalid arguments on one rank only (causal with Lq != Lk): it raises its error, the others follow
        x = torch.randn(1, 2, 6, 4)
        try:
            context_parallel_attention(x if rank == 0 else x[..., :5, :], x, x)
            message = None
        except ValueError as e:
            message = str(e)
        torch.save({"message": message}, os.path.join(out_dir, f"invalid-{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(WORLD, str(out / "rendezvous"), str(out)), nprocs=WORLD, join=True)
    results = {c.name: [torch.load(out / f"{c.name}-{r}.pt") for r in range(WORLD)] for c in CASES}
    results["mismatch"] = [torch.load(out / f"mismatch-{r}.pt") for r in range(WORLD)]
    results["invalid"] = [torch.load(out / f"invalid-{r}.pt") for r in range(WORLD)]
    return results


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    err = (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1e-300)
    assert err <= 1e-10, f"{what}: relative error {err:.3g} > 1e-10"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_two_gloo_ranks_equal_one_process(case, distributed_results):
    parts = distributed_results[case.name]
    q, k, v, mask, w, state, ws = _inputs(case)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    st = None
    if state is not None:
        st = sata.SATAState(kv=state.kv.detach().clone().requires_grad_(), n_taylor=state.n_taylor,
                            d_key=state.d_key, d_value=state.d_value, scale=state.scale, n_tokens=state.n_tokens)
    gqa = case.n_q_heads != case.n_kv_heads
    res = sata.sata_attention(q, k, v, n_taylor=case.n_taylor, is_causal=case.causal, enable_gqa=gqa,
                              key_padding_mask=mask, state=st, return_state=case.return_state)
    y, total = res if case.return_state else (res, None)
    _loss_terms(case, y, w, total, ws, include_state=True).backward()

    # the oracle, too, where it applies (no state)
    if state is None:
        ref = sata.naive_sata_attention(q.detach(), k.detach(), v.detach(), n_taylor=case.n_taylor,
                                        is_causal=case.causal, enable_gqa=gqa, key_padding_mask=mask)
        _close(y.detach(), ref, "single process vs oracle")

    _close(torch.cat([p["y"] for p in parts], dim=-2), y.detach(), "output")
    for name, full in (("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        _close(torch.cat([p[name] for p in parts], dim=-2), full, name)
    if st is not None:  # each rank holds its share of the replicated state's gradient
        _close(sum(p["dstate"] for p in parts), st.kv.grad, "dstate")
    if case.return_state:
        for p in parts:
            _close(p["total"], total.kv.detach(), "returned state")
            assert p["n_tokens"] == total.n_tokens


def test_ranks_that_disagree_all_raise(distributed_results):
    messages = [p["message"] for p in distributed_results["mismatch"]]
    assert all(m is not None and "ranks disagree" in m for m in messages), messages
    assert messages[0] == messages[1]


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
