"""The window mode's fused causal prefill (``_kernels/prefill_window.cpp``) against the oracle and the PyTorch path.

A stream is split into calls of several tokens (the first one or more chunks long, later ones shorter and
unaligned, so window, sinks, key centre and far state are carried across calls); every call goes through the
kernel (each test counts the kernel's calls, so a silent fallback fails it) and through the PyTorch path from
the same state. Outputs equal ``sata.naive_sata_attention`` (float64 to 1e-10, float32 to 1e-5 against float64),
and the state after every call equals the PyTorch path's: the window and sink buffers, flags and positions bit
for bit, the far state to 1e-12 (float64).
"""

from __future__ import annotations

import pytest
import torch

import sata
from sata import _kernels
from sata._paths import window_prefill
from sata.ops import force_path
from conftest import assert_rel, needs_kernels, qkv
from test_window_kernel import HALF_ORACLE, PATHS_AGREE, _assert_same_state, count_calls

pytestmark = needs_kernels

B, HKV, G, E, EV, L = 3, 2, 2, 4, 3, 90
SPLITS = (0, 41, 50, 77, 90)   # calls of 41, 9, 27 and 13 tokens: chunk-aligned, shorter than a chunk, unaligned
PER_HEAD_ALPHA = torch.tensor([0.0, 0.3, 0.6, 1.0], dtype=torch.float64)
PER_HEAD_BETA = torch.tensor([0.5, 1.0, 0.0, 2.0], dtype=torch.float64)

CONFIGS = [
    pytest.param(dict(window=5, sinks=2), id="w5-s2"),
    pytest.param(dict(window=5, sinks=2, recentre=0.0), id="w5-s2-mean"),
    pytest.param(dict(window=40, sinks=3, recentre=1.0, taylor_mix=0.0), id="w40-s3-mix0"),
    pytest.param(dict(window=7, sinks=12, recentre=0.5), id="sinks-fill-across-calls"),
    pytest.param(dict(window=0, sinks=2, recentre=0.5), id="w0"),
    pytest.param(dict(window=6, sinks=0, recentre=PER_HEAD_ALPHA, taylor_mix=PER_HEAD_BETA), id="s0-per-head"),
    pytest.param(dict(window=0, sinks=0, recentre=1.0), id="recentre-only"),
    pytest.param(dict(window=100, sinks=1), id="window-longer-than-stream"),
    pytest.param(dict(window=33, sinks=4, recentre=0.3, taylor_mix=2.0), id="w33-s4"),
]


@pytest.fixture
def kernel_calls(monkeypatch):
    """How many times the window prefill kernel ran."""
    return count_calls(monkeypatch, _kernels.WindowPrefillPlan)


def _inputs(dtype, seed=0, Ev=EV):
    """GQA inputs with left padding (row 1, across the first two calls) and holes (row 2), NaN behind every mask."""
    q, k, v = qkv((B,), HKV * G, L, E, Ev, Hkv=HKV, seed=seed)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[1, :45] = True
    mask[2, [4, 13, 14, 15, 24, 60, 61]] = True
    poison = lambda t: t.masked_fill(mask[:, None, :, None], float("nan")).to(dtype)
    return q.to(dtype), poison(k), poison(v), mask, (q, k, v)


def _stream(q, k, v, mask, kw, state_dtype=None, kv_tol=1e-12, tol=1e-10):
    """The stream in the calls of SPLITS through the kernel, each also through the PyTorch path from the same state."""
    outs, st = [], None
    for a, b in zip(SPLITS, SPLITS[1:]):
        args = (q[..., a:b, :], k[..., a:b, :], v[..., a:b, :])
        y, new = sata.sata_attention(*args, key_padding_mask=mask[:, a:b], state=st, return_state=True, **kw)
        with force_path(kernels=False):
            y_slow, slow = sata.sata_attention(*args, key_padding_mask=mask[:, a:b], state=st, return_state=True, **kw)
        kept = mask[:, None, a:b, None].logical_not()       # outputs of padded queries are not defined
        assert_rel(torch.where(kept, y, 0.0), torch.where(kept, y_slow, 0.0), tol, f"call {a}:{b}")
        _assert_same_state(new, slow, kv_tol)
        if st is None and state_dtype is not None:
            new = new.to(dtype=state_dtype)
        outs.append(y)
        st = new
    return torch.cat(outs, dim=-2), st


def _oracle_check(y, clean, mask, kw, tol):
    expected = sata.naive_sata_attention(*clean, key_padding_mask=mask, **kw)
    rows = mask[:, None, :, None].logical_not()
    assert_rel(torch.where(rows, y.double(), 0.0), torch.where(rows, expected, 0.0), tol)


@pytest.mark.parametrize("hybrid", CONFIGS)
def test_prefill_equals_oracle_and_torch_path_float64(hybrid, kernel_calls):
    q, k, v, mask, clean = _inputs(torch.float64)
    kw = dict(n_taylor=3, is_causal=True, enable_gqa=True, **hybrid)
    y, st = _stream(q, k, v, mask, kw)
    assert kernel_calls[0] == len(SPLITS) - 1
    _oracle_check(y, clean, mask, kw, 1e-10)
    assert st.n_tokens == L and (st.key_centre is not None) == (hybrid.get("recentre") is not None)
    if st.sinks:  # every row filled its sinks with its first kept positions, across calls
        first = [(~mask[b]).nonzero()[:st.sinks, 0].tolist() for b in range(B)]
        assert st.exact.sink_pos.tolist() == [f + [-1] * (st.sinks - len(f)) for f in first]


@pytest.mark.parametrize("hybrid", CONFIGS[1:7])
@pytest.mark.parametrize("state_dtype", [None, torch.float64], ids=["state32", "state64"])
def test_prefill_float32(hybrid, state_dtype, kernel_calls):
    q, k, v, mask, clean = _inputs(torch.float32, seed=3)
    kw = dict(n_taylor=3, is_causal=True, enable_gqa=True, **hybrid)
    y, st = _stream(q, k, v, mask, kw, state_dtype, kv_tol=1e-6, tol=1e-5)
    assert kernel_calls[0] == len(SPLITS) - 1 and y.dtype == torch.float32
    assert st.dtype == (state_dtype or torch.float32)
    _oracle_check(y, tuple(t.to(torch.float32).double() for t in clean), mask, kw, 1e-5)


@pytest.mark.parametrize("hybrid", CONFIGS[1:4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_prefill_half_inputs(hybrid, dtype, kernel_calls):
    """Half inputs take the kernel too, computed in float32 as by the PyTorch path (until 2026-12-01 they took
    that path): outputs within one rounding to the half type, float32 states to float32 rounding."""
    q, k, v, mask, clean = _inputs(dtype, seed=5)
    kw = dict(n_taylor=3, is_causal=True, enable_gqa=True, **hybrid)
    y, st = _stream(q, k, v, mask, kw, kv_tol=1e-6, tol=PATHS_AGREE[dtype])
    assert kernel_calls[0] == len(SPLITS) - 1 and y.dtype == dtype and st.dtype == torch.float32
    _oracle_check(y, tuple(t.to(dtype).double() for t in clean), mask, kw, HALF_ORACLE[dtype])


@pytest.mark.parametrize("n_taylor", [1, 2, 4, 5])
def test_other_term_counts(n_taylor, kernel_calls):
    q, k, v, mask, clean = _inputs(torch.float64, seed=5)
    recentre = None if n_taylor == 1 else (0.0 if n_taylor == 2 else 0.5)
    kw = dict(n_taylor=n_taylor, is_causal=True, enable_gqa=True, window=6, sinks=2, recentre=recentre)
    y, _ = _stream(q, k, v, mask, kw)
    assert kernel_calls[0] == len(SPLITS) - 1
    _oracle_check(y, clean, mask, kw, 1e-10)


@pytest.mark.parametrize("E,Ev", [(8, 8), (8, 16), (16, 5), (3, 32)])
def test_head_sizes(E, Ev, kernel_calls):
    q, k, v = qkv((2,), 4, 70, E, Ev, Hkv=4, seed=7)
    kw = dict(n_taylor=3, is_causal=True, window=20, sinks=3, recentre=0.0)
    y, st = sata.sata_attention(q, k, v, return_state=True, **kw)
    assert kernel_calls[0] == 1
    assert_rel(y, sata.naive_sata_attention(q, k, v, **kw), 1e-10)
    with force_path(kernels=False):
        _, slow = sata.sata_attention(q, k, v, return_state=True, **kw)
    _assert_same_state(st, slow, 1e-12)


@pytest.mark.parametrize("window", [5, 45, 100])
def test_the_band_rolls_across_many_chunks(window, kernel_calls):
    """A call of many chunks after one that filled the window: the band slides a chunk at a time and its
    columns move back to the start of its rows every few chunks (prefill_window.cpp: load_band; 18 chunks:
    twice), through holes in the mask, a window shorter and longer than a chunk."""
    q, k, v = qkv((2,), 2, 600, 4, 3, seed=17)
    mask = torch.zeros(2, 600, dtype=torch.bool)
    mask[0, [3, 40, 41, 99, 100, 101, 102, 200, 263, 290, 291, 292, 511, 512, 580]] = True
    mask[1, :50] = True
    kw = dict(n_taylor=3, is_causal=True, window=window, sinks=2, recentre=0.5)
    y1, st = sata.sata_attention(q[..., :37, :], k[..., :37, :], v[..., :37, :], key_padding_mask=mask[:, :37],
                                 return_state=True, **kw)
    y2, _ = sata.sata_attention(q[..., 37:, :], k[..., 37:, :], v[..., 37:, :], key_padding_mask=mask[:, 37:],
                                state=st, return_state=True, **kw)
    assert kernel_calls[0] == 2
    _oracle_check(torch.cat([y1, y2], dim=-2), (q, k, v), mask, kw, 1e-10)


def test_a_prefill_continues_into_decode_steps(kernel_calls):
    """The prefill kernel's state is the decode kernel's input: a stream prefilled, then decoded, equals the oracle."""
    q, k, v = qkv((1,), 4, 80, 8, Hkv=2, seed=9)
    kw = dict(n_taylor=4, is_causal=True, enable_gqa=True, window=16, sinks=4, recentre=0.0)
    y, st = sata.sata_attention(q[..., :70, :], k[..., :70, :], v[..., :70, :], return_state=True, **kw)
    outs = [y]
    for t in range(70, 80):
        y, st = sata.sata_attention(q[..., t:t + 1, :], k[..., t:t + 1, :], v[..., t:t + 1, :], state=st,
                                    return_state=True, **kw)
        outs.append(y)
    assert kernel_calls[0] == 1
    assert_rel(torch.cat(outs, dim=-2), sata.naive_sata_attention(q, k, v, **kw), 1e-10)


def test_the_passed_state_is_not_modified(kernel_calls):
    q, k, v = qkv((1,), 2, 60, 4, seed=11)
    kw = dict(n_taylor=3, is_causal=True, window=8, sinks=2, recentre=0.5)
    _, st = sata.sata_attention(q[..., :30, :], k[..., :30, :], v[..., :30, :], return_state=True, **kw)
    before = st.clone()
    sata.sata_attention(q[..., 30:, :], k[..., 30:, :], v[..., 30:, :], state=st, return_state=True, **kw)
    assert kernel_calls[0] == 2
    _assert_same_state(st, before, 0.0)


def test_heads_shared_out_across_threads(kernel_calls):
    """Long enough to fan out (kernels.h: threads_for): the same numbers as one thread."""
    q, k, v = (t.float() for t in qkv((2,), 8, 8192, 8, seed=13))
    kw = dict(n_taylor=3, is_causal=True, window=32, sinks=4, recentre=0.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = sata.sata_attention(q, k, v, **kw)
        torch.set_num_threads(max(2, threads))
        y2 = sata.sata_attention(q, k, v, **kw)
    finally:
        torch.set_num_threads(threads)
    assert kernel_calls[0] == 2
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)


def test_calls_the_kernel_does_not_serve_take_the_torch_path(kernel_calls):
    q, k, v = qkv((1,), 2, 20, 4, seed=15)
    kw = dict(n_taylor=3, window=4, sinks=1, recentre=0.0)
    sata.sata_attention(q, k, v, is_causal=False, **kw)                              # non-causal
    sata.sata_attention(q.float().requires_grad_(), k.float(), v.float(), is_causal=True, **kw)   # autograd
    with force_path(kernels=False):
        sata.sata_attention(q, k, v, is_causal=True, **kw)
    sata.sata_attention(q, k, v, is_causal=True, **{**kw, "window": window_prefill.MAX_EXACT})   # a window this long
    assert kernel_calls[0] == 0


def test_bad_tensors_are_refused_before_the_kernel_reads_them():
    plan = _kernels.WindowPrefillPlan(_kernels.load(), 1, 1, 4, 4, sata.basis.get_basis(4, 3, "cpu", torch.float64),
                                      torch.float64, 0.7, 0.7, torch.float64, 2, 1, False)
    f = lambda *s: torch.zeros(*s, dtype=torch.float64)
    ok = dict(q=f(1, 1, 5, 4), k_win=f(1, 2, 4), v_win=f(1, 2, 4), k=f(1, 5, 4), v=f(1, 5, 4),
              flag=torch.zeros(1, 7, dtype=torch.uint8), sink_k=f(1, 1, 4), sink_v=f(1, 1, 4),
              sink_pos=torch.full((1, 1), -1), key_centre=None, alpha=f(1), beta=f(1), S=f(1, 5, 15), y=f(1, 1, 5, 4))
    plan(**ok, n_tokens=0)
    with pytest.raises(ValueError, match="window prefill kernel"):
        plan(**{**ok, "k": f(1, 6, 4)}, n_tokens=0)
    with pytest.raises(ValueError, match="window prefill kernel"):
        plan(**{**ok, "S": f(1, 15, 5).mT}, n_tokens=0)
