"""The window mode's fused decode step (``_kernels/decode_window.cpp``) against the oracle and the PyTorch path.

Every stream is prefilled by the PyTorch path, then decoded one token at a time through the kernel (each
test counts the kernel's calls, so a silent fallback fails it). Outputs equal ``sata.naive_sata_attention``
(float64 to 1e-10, float32 to 1e-5 against float64) and the state after every step equals the PyTorch
path's: the window and sink buffers, flags and positions bit for bit, the far state to 1e-12 (float64).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import sata
from sata import _kernels
from sata._paths import window_kernel
from sata.ops import force_path
from conftest import assert_rel, needs_kernels, qkv

pytestmark = needs_kernels

B, HKV, G, E, EV, L = 3, 2, 2, 4, 3, 30
PER_HEAD_ALPHA = torch.tensor([0.0, 0.3, 0.6, 1.0], dtype=torch.float64)
PER_HEAD_BETA = torch.tensor([0.5, 1.0, 0.0, 2.0], dtype=torch.float64)

# (settings of the decode steps, prefill length, settings the prefill overrides); a stream whose first call
# re-centres holds a key centre
CONFIGS = [
    pytest.param(dict(window=5, sinks=2), 9, {}, id="w5-s2"),
    pytest.param(dict(window=5, sinks=2, recentre=0.0), 9, {}, id="w5-s2-mean"),
    pytest.param(dict(window=4, sinks=3, recentre=1.0, taylor_mix=0.0), 9, {}, id="w4-s3-mix0"),
    pytest.param(dict(window=3, sinks=4, recentre=0.5), 2, {}, id="sinks-fill-while-decoding"),
    pytest.param(dict(window=0, sinks=2, recentre=0.5), 9, {}, id="w0"),
    pytest.param(dict(window=6, sinks=0, recentre=PER_HEAD_ALPHA, taylor_mix=PER_HEAD_BETA), 9, {}, id="s0-per-head"),
    pytest.param(dict(window=0, sinks=0, recentre=1.0), 9, {}, id="recentre-only"),
    pytest.param(dict(window=1, sinks=1, recentre=0.3, taylor_mix=2.0), 1, {}, id="w1-s1"),
    pytest.param(dict(window=5, sinks=2), 9, dict(recentre=0.5), id="key-centre-no-recentre"),
    pytest.param(dict(window=5, sinks=2, recentre=0.7), 9, dict(recentre=None), id="recentre-no-key-centre"),
]


def count_calls(monkeypatch, plan_class) -> list[int]:
    """``[n]``: how many times the kernel of ``plan_class`` ran from now on."""
    calls = [0]
    run = plan_class.__call__

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return run(self, *args, **kwargs)

    monkeypatch.setattr(plan_class, "__call__", counted)
    return calls


@pytest.fixture
def kernel_calls(monkeypatch):
    """How many times the window decode kernel ran."""
    return count_calls(monkeypatch, _kernels.WindowDecodePlan)


def _inputs(dtype, seed=0, n_taylor=3):
    """GQA inputs with left padding (row 1, into the decode steps) and holes (row 2), NaN behind every mask."""
    q, k, v = qkv((B,), HKV * G, L, E, EV, Hkv=HKV, seed=seed)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[1, :6] = True
    mask[2, [4, 13, 14, 15, 24]] = True
    poison = lambda t: t.masked_fill(mask[:, None, :, None], float("nan")).to(dtype)
    return q.to(dtype), poison(k), poison(v), mask, (q, k, v)


def _step(q, k, v, mask, t, state, kw, **extra):
    return sata.sata_attention(q[..., t:t + 1, :], k[..., t:t + 1, :], v[..., t:t + 1, :],
                               key_padding_mask=mask[:, t:t + 1], state=state, return_state=True, **kw, **extra)


def _assert_same_state(a, b, kv_tol):
    """The kernel's state ``a`` against the PyTorch path's ``b``."""
    assert (a.n_tokens, a.window, a.sinks, a.dtype) == (b.n_tokens, b.window, b.sinks, b.dtype)
    assert_rel(a.kv, b.kv, kv_tol, "far state")
    assert (a.exact is None) == (b.exact is None) and (a.key_centre is None) == (b.key_centre is None)
    for (name, x), (_, y) in zip(a._extras(), b._extras()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True, msg=name)


# outputs of the kernel against the PyTorch path: float64 to 1e-10, float32 to its rounding; half inputs are
# computed in float32 by both, so their outputs differ by at most one rounding to the half type (one unit in
# the last place: 2^-8 of bfloat16's values, 2^-11 of float16's)
PATHS_AGREE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -10}
# and against the oracle in float64: the half inputs' own rounding of the output
HALF_ORACLE = {torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _decode(q, k, v, mask, kw, pre, pre_kw, state_dtype=None, kv_tol=1e-12, check_every=1):
    """Prefill ``pre`` tokens, then decode the rest through the kernel; every ``check_every``-th step also
    through the PyTorch path from the same state, with outputs and states compared."""
    _, st = sata.sata_attention(q[..., :pre, :], k[..., :pre, :], v[..., :pre, :], key_padding_mask=mask[:, :pre],
                                return_state=True, **{**kw, **pre_kw})
    if state_dtype is not None:
        st = st.to(dtype=state_dtype)
    outs = []
    for t in range(pre, L):
        y, new = _step(q, k, v, mask, t, st, kw)
        if (t - pre) % check_every == 0:
            with force_path(kernels=False):
                y_slow, slow = _step(q, k, v, mask, t, st, kw)
            kept = mask[:, None, t:t + 1, None].logical_not()       # outputs of padded queries are not defined
            assert_rel(_kept(y, kept), _kept(y_slow, kept), PATHS_AGREE[q.dtype], f"step {t}")
            _assert_same_state(new, slow, kv_tol)
        outs.append(y)
        st = new
    return torch.cat(outs, dim=-2), st


def _kept(y, kept):
    return torch.where(kept, y, 0.0)


@pytest.mark.parametrize("hybrid,pre,pre_kw", CONFIGS)
def test_decode_loop_equals_oracle_and_torch_path_float64(hybrid, pre, pre_kw, kernel_calls):
    q, k, v, mask, clean = _inputs(torch.float64)
    kw = dict(n_taylor=3, is_causal=True, enable_gqa=True, **hybrid)
    y, st = _decode(q, k, v, mask, kw, pre, pre_kw)
    assert kernel_calls[0] == L - pre
    expected = sata.naive_sata_attention(*clean, key_padding_mask=mask, **kw)[..., pre:, :]
    rows = mask[:, None, pre:, None].logical_not()
    assert_rel(_kept(y, rows), _kept(expected, rows), 1e-10)
    assert st.n_tokens == L and (st.key_centre is not None) == ((pre_kw or hybrid).get("recentre") is not None)
    if st.sinks:  # every row filled its sinks with its first kept positions
        first = [(~mask[b]).nonzero()[:st.sinks, 0].tolist() for b in range(B)]
        assert st.exact.sink_pos.tolist() == first


@pytest.mark.parametrize("hybrid,pre,pre_kw", CONFIGS[1:7])
@pytest.mark.parametrize("state_dtype", [None, torch.float64], ids=["state32", "state64"])
def test_decode_loop_float32(hybrid, pre, pre_kw, state_dtype, kernel_calls):
    q, k, v, mask, clean = _inputs(torch.float32, seed=3)
    kw = dict(n_taylor=3, is_causal=True, enable_gqa=True, **hybrid)
    y, st = _decode(q, k, v, mask, kw, pre, pre_kw, state_dtype, kv_tol=1e-6, check_every=4)
    assert kernel_calls[0] == L - pre and y.dtype == torch.float32 and st.dtype == (state_dtype or torch.float32)
    expected = sata.naive_sata_attention(*(t.to(torch.float32).double() for t in clean), key_padding_mask=mask,
                                         **kw)[..., pre:, :]
    rows = mask[:, None, pre:, None].logical_not()
    assert_rel(_kept(y, rows), _kept(expected, rows), 1e-5)


@pytest.mark.parametrize("hybrid,pre,pre_kw", CONFIGS[1:4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_decode_loop_half_inputs(hybrid, pre, pre_kw, dtype, kernel_calls):
    """Half inputs take the kernel too (computed in float32, the state and window in float32, as every path
    keeps them); until 2026-12-01 they took the PyTorch path, ~6 ms a step for 64 heads of 8."""
    q, k, v, mask, clean = _inputs(dtype, seed=4)
    kw = dict(n_taylor=3, is_causal=True, enable_gqa=True, **hybrid)
    y, st = _decode(q, k, v, mask, kw, pre, pre_kw, kv_tol=1e-6)
    assert kernel_calls[0] == L - pre and y.dtype == dtype and st.dtype == torch.float32
    expected = sata.naive_sata_attention(*(t.to(dtype).double() for t in clean), key_padding_mask=mask,
                                         **kw)[..., pre:, :]
    rows = mask[:, None, pre:, None].logical_not()
    assert_rel(_kept(y, rows), _kept(expected, rows), HALF_ORACLE[dtype])


@pytest.mark.parametrize("n_taylor", [1, 2, 4, 5])
def test_other_term_counts(n_taylor, kernel_calls):
    q, k, v, mask, clean = _inputs(torch.float64, seed=5)
    kw = dict(n_taylor=n_taylor, is_causal=True, enable_gqa=True, window=4, sinks=2,
              recentre=None if n_taylor == 1 else 0.0 if n_taylor == 2 else 0.8)
    y, _ = _decode(q, k, v, mask, kw, 7, {}, check_every=3)
    assert kernel_calls[0] == L - 7
    rows = mask[:, None, 7:, None].logical_not()
    assert_rel(_kept(y, rows), _kept(sata.naive_sata_attention(*clean, key_padding_mask=mask, **kw)[..., 7:, :], rows), 1e-10)


# the kernel's paths by head size: vector blocks of window rows (8 doubles / 16 floats per vector: rows
# packed when shorter, split when longer), a partial last block, the row-by-row fallback (E = 6); the fixed
# sweep (one query head, Ev + 1 in 5, 9, 17) and the row sweep (GQA); values in vectors or one by one
SHAPES = [
    pytest.param(torch.float64, 8, 8, 1, 20, 3, False, id="f64-E8-Ev8-W20"),
    pytest.param(torch.float64, 4, 5, 3, 9, 2, True, id="f64-E4-gqa-padded"),
    pytest.param(torch.float64, 6, 3, 1, 8, 2, False, id="f64-E6-any-size"),
    pytest.param(torch.float32, 8, 8, 1, 35, 4, True, id="f32-E8-Ev8-W35-padded"),
    pytest.param(torch.float32, 16, 16, 2, 17, 1, False, id="f32-E16-Ev16-gqa"),
    pytest.param(torch.float32, 32, 4, 1, 16, 0, False, id="f32-E32-Ev4-S0"),
]


@pytest.mark.parametrize("dtype,E,Ev,g,W,S,padded", SHAPES)
def test_head_sizes_and_vector_blocks(dtype, E, Ev, g, W, S, padded, kernel_calls):
    L_, pre = 44, 24
    q, k, v = qkv((2,), 2 * g, L_, E, Ev, Hkv=2, seed=E + Ev)
    mask = torch.zeros(2, L_, dtype=torch.bool)
    if padded:
        mask[1, :5] = True
        mask[0, [26, 27, 40]] = True                                         # holes while decoding
    kw = dict(n_taylor=3, is_causal=True, enable_gqa=True, window=W, sinks=S, recentre=0.5)
    _, st = sata.sata_attention(*(t[..., :pre, :].to(dtype) for t in (q, k, v)), key_padding_mask=mask[:, :pre],
                                return_state=True, **kw)
    outs = []
    for t in range(pre, L_):
        one = [x[..., t:t + 1, :].to(dtype) for x in (q, k, v)]
        y, new = sata.sata_attention(*one, key_padding_mask=mask[:, t:t + 1], state=st, return_state=True, **kw)
        if t % 4 == 0:
            with force_path(kernels=False):
                _, slow = sata.sata_attention(*one, key_padding_mask=mask[:, t:t + 1], state=st, return_state=True,
                                              **kw)
            _assert_same_state(new, slow, 1e-12 if dtype == torch.float64 else 1e-6)
        outs.append(y)
        st = new
    assert kernel_calls[0] == L_ - pre
    expected = sata.naive_sata_attention(*(t.to(dtype).double() for t in (q, k, v)), key_padding_mask=mask, **kw)
    kept = mask[:, None, pre:, None].logical_not()
    assert_rel(_kept(torch.cat(outs, -2), kept), _kept(expected[..., pre:, :], kept),
               1e-10 if dtype == torch.float64 else 1e-5)


# ---------------------------------------------------------------- states: in place, kept, long, from files
def test_inplace_updates_the_passed_state_and_equals_a_copying_step(kernel_calls):
    q, k, v, mask, _ = _inputs(torch.float64, seed=7)
    kw = dict(n_taylor=3, is_causal=True, enable_gqa=True, window=5, sinks=3, recentre=0.5)
    _, st = sata.sata_attention(q[..., :2, :], k[..., :2, :], v[..., :2, :], key_padding_mask=mask[:, :2],
                                return_state=True, **kw)
    for t in range(2, 20):
        before = st.clone()
        y, copied = _step(q, k, v, mask, t, st, kw)
        _assert_same_state(st, before, 0.0)                          # inplace=False keeps the passed state
        y_in, st_in = _step(q, k, v, mask, t, st, kw, inplace=True)
        torch.testing.assert_close(y_in, y, rtol=0, atol=0, equal_nan=True)
        _assert_same_state(st_in, copied, 0.0)                       # the same arithmetic: bit for bit
        assert st_in.kv.data_ptr() == st.kv.data_ptr()              # the passed state's own buffers, from the first step
        assert all(a.data_ptr() == b.data_ptr() for a, b in zip(st_in.exact.tensors(), st.exact.tensors()))
        st = st_in
    assert kernel_calls[0] == 2 * 18


def test_inplace_writes_into_a_loaded_state(kernel_calls, tmp_path):
    """A state in another layout (loaded from a file: kv not F-major) is computed in a copy and written back."""
    q, k, v, mask, _ = _inputs(torch.float64, seed=9)
    kw = dict(n_taylor=3, is_causal=True, enable_gqa=True, window=5, sinks=3, recentre=0.5)
    _, st = sata.sata_attention(q[..., :8, :], k[..., :8, :], v[..., :8, :], key_padding_mask=mask[:, :8],
                                return_state=True, **kw)
    st.save(tmp_path / "s.sata")
    loaded = sata.SATAState.load(tmp_path / "s.sata")
    assert loaded._fmajor() is None                                  # the case: not the kernel's layout
    y, copied = _step(q, k, v, mask, 8, loaded, kw)
    buffers = (loaded.kv, *loaded.exact.tensors())
    y_in, st_in = _step(q, k, v, mask, 8, loaded, kw, inplace=True)
    torch.testing.assert_close(y_in, y, rtol=0, atol=0, equal_nan=True)
    _assert_same_state(st_in, copied, 0.0)
    assert st_in.kv.data_ptr() == loaded.kv.data_ptr()
    for mine, want in zip(buffers, (copied.kv, *copied.exact.tensors())):
        torch.testing.assert_close(mine, want, rtol=0, atol=0, equal_nan=True)
    assert kernel_calls[0] == 2


def test_a_long_context_is_just_a_count(kernel_calls):
    """At n_tokens ~ 1M the slot index wraps as in the PyTorch path; the numbers do not change."""
    q, k, v, mask, _ = _inputs(torch.float64, seed=8)
    kw = dict(n_taylor=3, is_causal=True, enable_gqa=True, window=5, sinks=2, recentre=0.0)
    _, st = sata.sata_attention(q[..., :12, :], k[..., :12, :], v[..., :12, :], key_padding_mask=mask[:, :12],
                                return_state=True, **kw)
    # the ring keeps position p in slot p % W: move n_tokens by a multiple of W, and the window stays put
    fast = slow = dataclasses.replace(st, n_tokens=st.n_tokens + 5 * 200_001)
    for t in range(12, 24):
        y, fast = _step(q, k, v, mask, t, fast, kw)
        with force_path(kernels=False):
            y_slow, slow = _step(q, k, v, mask, t, slow, kw)
        rows = mask[:, None, t:t + 1, None].logical_not()
        assert_rel(_kept(y, rows), _kept(y_slow, rows), 1e-10)
        _assert_same_state(fast, slow, 1e-12)
    assert fast.n_tokens == 24 + 5 * 200_001 and kernel_calls[0] == 12


def test_a_state_from_a_file_continues_through_the_kernel(tmp_path, kernel_calls):
    q, k, v = qkv((2,), 2, 20, 4, 3, seed=9)
    kw = dict(n_taylor=3, is_causal=True, window=4, sinks=2, recentre=0.5)
    _, st = sata.sata_attention(q[..., :10, :], k[..., :10, :], v[..., :10, :], return_state=True, **kw)
    st.save(tmp_path / "s.pt")
    loaded = sata.SATAState.load(tmp_path / "s.pt")
    assert loaded._fmajor() is None                                  # stored [D, F]: the kernel copies it once
    outs = []
    for t in range(10, 20):
        y, loaded = sata.sata_attention(q[..., t:t + 1, :], k[..., t:t + 1, :], v[..., t:t + 1, :], state=loaded,
                                        return_state=True, inplace=True, **kw)
        outs.append(y)
    assert kernel_calls[0] == 10
    assert_rel(torch.cat(outs, -2), sata.naive_sata_attention(q, k, v, **kw)[..., 10:, :], 1e-10)


# ---------------------------------------------------------------- threads, and calls the kernel leaves alone
@pytest.fixture
def all_threads(monkeypatch):
    """Fan out whatever the work (every plan made inside is new)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(_kernels, "_WORK_PER_THREAD", {"decode": 1.0, "prefill": 1.0})
    _kernels.decode_plan.cache_clear()
    _kernels.prefill_plan.cache_clear()
    window_kernel._PLANS.clear()
    yield
    window_kernel._PLANS.clear()
    torch.set_num_threads(threads)


def test_heads_shared_out_across_threads(all_threads, kernel_calls):
    """13 batch rows x 2 kv heads: groups of 8 heads (a partial last one) handed to 2 threads."""
    q, k, v = qkv((13,), 4, 24, 4, 3, Hkv=2, seed=10)
    mask = torch.zeros(13, 24, dtype=torch.bool)
    mask[::3, 3:6] = True
    kw = dict(n_taylor=3, is_causal=True, enable_gqa=True, window=4, sinks=2, recentre=0.5)
    _, st = sata.sata_attention(q[..., :4, :], k[..., :4, :], v[..., :4, :], key_padding_mask=mask[:, :4],
                                return_state=True, **kw)
    outs = []
    for t in range(4, 24):
        y, st = _step(q, k, v, mask, t, st, kw)
        outs.append(y)
    assert kernel_calls[0] == 20
    rows = mask[:, None, 4:, None].logical_not()
    expected = sata.naive_sata_attention(q, k, v, key_padding_mask=mask, **kw)[..., 4:, :]
    assert_rel(_kept(torch.cat(outs, -2), rows), _kept(expected, rows), 1e-10)


def test_calls_the_kernel_does_not_serve_take_the_torch_path(kernel_calls):
    q, k, v = qkv((1,), 2, 12, 4, 3, seed=11)
    kw = dict(n_taylor=3, window=3, sinks=1, recentre=0.5)
    _, st = sata.sata_attention(q[..., :8, :], k[..., :8, :], v[..., :8, :], is_causal=True, return_state=True, **kw)
    one = lambda t: (q[..., t:t + 1, :], k[..., t:t + 1, :], v[..., t:t + 1, :])
    want = sata.naive_sata_attention(q[..., :9, :], k[..., :9, :], v[..., :9, :], is_causal=True, **kw)[..., 8:, :]
    # non-causal, under autograd: the PyTorch path, same numbers
    assert_rel(sata.sata_attention(*one(8), is_causal=False, state=st, **kw), want, 1e-10)
    qg = one(8)[0].clone().requires_grad_(True)
    y = sata.sata_attention(qg, *one(8)[1:], is_causal=True, state=st, **kw)
    assert_rel(y, want, 1e-10)
    y.sum().backward()
    assert qg.grad is not None and bool(torch.isfinite(qg.grad).all())
    assert kernel_calls[0] == 0
    # a state of another window is refused with the same message as by the PyTorch path
    with pytest.raises(ValueError, match="window=3, sinks=1 but the call asks for window=4"):
        sata.sata_attention(*one(8), is_causal=True, state=st, **{**kw, "window": 4})
    assert kernel_calls[0] == 0
    assert_rel(sata.sata_attention(*one(8), is_causal=True, state=st, **kw), want, 1e-10)
    assert kernel_calls[0] == 1


@pytest.mark.parametrize("copy_with", ["deepcopy", "pickle"])
def test_a_copy_of_a_state_stepped_in_place_has_buffers_of_its_own(copy_with, kernel_calls):
    """The kernel caches the data pointers of a state's window buffers on it: a copy must not take them along
    (its in-place steps wrote into the original's buffers, or into freed memory once the original was gone)."""
    import copy
    import pickle

    q, k, v = qkv((1,), 2, 30, 8, 8, seed=3)
    kw = dict(n_taylor=3, is_causal=True, window=4, sinks=2)
    ref = sata.naive_sata_attention(q, k, v, **kw)
    step = lambda s, t: sata.sata_attention(q[..., t:t + 1, :], k[..., t:t + 1, :], v[..., t:t + 1, :], state=s,
                                            return_state=True, inplace=True, **kw)
    _, st = sata.sata_attention(q[..., :10, :], k[..., :10, :], v[..., :10, :], return_state=True, **kw)
    _, st = step(st, 10)                                             # the pointers are cached from here on
    snap = copy.deepcopy(st) if copy_with == "deepcopy" else pickle.loads(pickle.dumps(st))
    before = [t.clone() for t in st.exact.tensors()]
    outs, s = [], snap
    for t in range(11, 30):
        y, s = step(s, t)
        outs.append(y)
    assert_rel(torch.cat(outs, -2), ref[..., 11:, :], 1e-10)
    for now, then in zip(st.exact.tensors(), before):                # the original, untouched by the copy's steps
        torch.testing.assert_close(now, then, rtol=0, atol=0)
    y, _ = step(st, 11)                                              # and it continues its own stream
    assert_rel(y, ref[..., 11:12, :], 1e-10)
