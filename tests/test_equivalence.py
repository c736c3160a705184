"""Every path computes the oracle: forward in every dtype, chunking and blocking, and backward.

Paths (``sata.ops.PATHS``, pinned with ``sata.ops.force_path``): ``recurrent``, ``chunked`` (causal),
``parallel`` (non-causal), ``quadratic`` (scores; both), the fused CPU kernels ``prefill_kernel`` and
``decode_kernel`` (forward only), and ``auto`` (the public dispatch), all against
``sata.naive_sata_attention``.

Tolerances, as ``max |y - y_oracle| / max |y_oracle|``:
- float64: 1e-10 (issue 2), float32: 1e-4 (issue 2);
- float16 / bfloat16 inputs: the op computes in float32 and rounds its output to the input dtype,
  so against the float64 oracle on the *same rounded inputs* the error is the final rounding
  (at most the unit roundoff u of the output dtype times |y_i| <= max |y|: u = 2^-11 for float16,
  2^-8 for bfloat16) plus the float32 computation (< 1e-4 above). Tolerance: u + 1e-4, i.e.
  5.9e-4 (float16) and 4.0e-3 (bfloat16); measured worst cases 3.8e-4 and 3.1e-3.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sata
from conftest import (CAUSAL_MODES, KERNELS, NONCAUSAL_MODES, TORCH_CAUSAL_MODES, TORCH_NONCAUSAL_MODES, assert_rel,
                      attend, mode_params, needs_kernels, qkv, rand, streamed_oracle)

TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2**-11 + 1e-4, torch.bfloat16: 2**-8 + 1e-4}
DTYPES = [pytest.param(dt, id=str(dt).removeprefix("torch.")) for dt in TOL]
CAUSAL = [pytest.param(True, id="causal"), pytest.param(False, id="noncausal")]


def _modes(causal):
    return CAUSAL_MODES if causal else NONCAUSAL_MODES


def _oracle(q, k, v, **kw):
    """The oracle in float64 on the given (possibly rounded) inputs."""
    return sata.naive_sata_attention(q.double(), k.double(), v.double(), **kw)


# ------------------------------------------------------------------ forward, every dtype and path
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", mode_params(CAUSAL_MODES))
@pytest.mark.parametrize("P", [1, 2, 3, 4, 5], ids=lambda P: f"P={P}")
def test_causal_matches_oracle(mode, dtype, P):
    L = 20 if mode == "recurrent" else 70        # token by token in Python: keep it short
    q, k, v = qkv((2,), 3, L, 8, 5, dtype=dtype, seed=P)
    y = attend(mode, q, k, v, n_taylor=P, is_causal=True)
    assert y.dtype == dtype and y.shape == (2, 3, L, 5)
    assert_rel(y, _oracle(q, k, v, n_taylor=P, is_causal=True), TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", mode_params(NONCAUSAL_MODES))
@pytest.mark.parametrize("return_state", [False, True], ids=["out", "out+state"])
@pytest.mark.parametrize("P", [1, 3, 4], ids=lambda P: f"P={P}")
def test_noncausal_matches_oracle(mode, dtype, return_state, P):
    # Lq != Lk; "auto" takes the quadratic path without a state, the parallel one with
    q, k, v = qkv((2,), 3, 37, 6, 4, Lk=53, dtype=dtype, seed=P)
    res = attend(mode, q, k, v, n_taylor=P, return_state=return_state)
    y = res[0] if return_state else res
    assert y.dtype == dtype and y.shape == (2, 3, 37, 4)
    assert_rel(y, _oracle(q, k, v, n_taylor=P), TOL[dtype])
    if return_state:
        want = sata.accumulate_state(k.double(), v.double(), n_taylor=P).kv
        assert_rel(res[1].kv, want, 1e-12 if dtype == torch.float64 else 1e-5, "state")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", CAUSAL)
@needs_kernels
def test_decode_kernel_matches_oracle(causal, dtype):
    """One token per call (the fused decode step), after a prefix held in a state."""
    q, k, v = qkv((2,), 4, 1, 8, 6, Hkv=2, dtype=dtype, seed=3)
    pk, pv = rand(2, 2, 9, 8, dtype=dtype, seed=7), rand(2, 2, 9, 6, dtype=dtype, seed=8)
    state = sata.accumulate_state(pk, pv, n_taylor=4)
    y, st = attend("decode_kernel", q, k, v, n_taylor=4, is_causal=causal, enable_gqa=True, state=state, return_state=True)
    want = streamed_oracle(q.double(), k.double(), v.double(), pk.double(), pv.double(), is_causal=causal,
                           n_taylor=4, enable_gqa=True)
    assert y.dtype == dtype
    assert_rel(y, want, TOL[dtype])
    full = sata.accumulate_state(torch.cat([pk, k], -2).double(), torch.cat([pv, v], -2).double(), n_taylor=4)
    assert_rel(st.kv, full.kv, 1e-12 if dtype == torch.float64 else 1e-5, "state")
    assert st.n_tokens == 10


# ------------------------------------------------------------------ chunks and blocks
@pytest.mark.parametrize("L,chunk", [(24, 4), (24, 5), (23, 8), (7, 64), (64, 64), (65, 64), (130, 16)],
                         ids=str)
@pytest.mark.parametrize("blocks", [False, True], ids=["one-block", "tiny-blocks"])
def test_chunked_any_chunk_size(L, chunk, blocks):
    q, k, v = qkv((), 2, L, 4, 3, seed=L)
    st0_k, st0_v = rand(2, 5, 4, seed=1), rand(2, 5, 3, seed=2)
    state = sata.accumulate_state(st0_k, st0_v, n_taylor=3)
    y, st = attend("chunked", q, k, v, n_taylor=3, is_causal=True, state=state, return_state=True, chunk_size=chunk,
                   block_bytes=1 if blocks else None)                                 # 1: one chunk per block
    assert_rel(y, streamed_oracle(q, k, v, st0_k, st0_v, is_causal=True, n_taylor=3), 1e-10)
    want = sata.accumulate_state(torch.cat([st0_k, k], -2), torch.cat([st0_v, v], -2), n_taylor=3)
    assert_rel(st.kv, want.kv, 1e-12, "state")


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("how", ["patch", "budget"])
def test_small_blocks_forward(causal, how):
    """Blocks forced small through force_path's block budget or by lowering the memory budget."""
    q, k, v = qkv((2,), 2, 150, 4, 4, seed=5)
    mode = "chunked" if causal else "parallel"
    want = sata.naive_sata_attention(q, k, v, n_taylor=4, is_causal=causal)
    if how == "patch":
        y, st = attend(mode, q, k, v, n_taylor=4, is_causal=causal, return_state=True, chunk_size=8, block_bytes=1)
    else:
        with sata.memory_budget("64K"):
            y, st = attend(mode, q, k, v, n_taylor=4, is_causal=causal, return_state=True, chunk_size=8)
    assert_rel(y, want, 1e-10)
    assert_rel(st.kv, sata.accumulate_state(k, v, n_taylor=4).kv, 1e-12)


@settings(max_examples=30, deadline=None)
@given(lead=st.lists(st.integers(1, 2), max_size=2), hkv=st.integers(1, 2), group=st.integers(1, 3),
       L=st.integers(1, 40), Lk=st.integers(0, 40), E=st.integers(1, 5), Ev=st.integers(1, 5), P=st.integers(1, 5),
       causal=st.booleans(), chunk=st.integers(1, 12), block=st.one_of(st.none(), st.integers(1, 3)),
       scale=st.one_of(st.none(), st.floats(-1.0, 1.0)), masked=st.booleans(), seed=st.integers(0, 2**16),
       prefix=st.integers(0, 6), data=st.data())
def test_random_shapes_every_path(lead, hkv, group, L, Lk, E, Ev, P, causal, chunk, block, scale, masked, seed, prefix,
                                  data):
    Lk = L if causal else Lk
    q, k, v = qkv(tuple(lead), hkv * group, L, E, Ev, Hkv=hkv, Lk=Lk, seed=seed)
    pk, pv = rand(*lead, hkv, prefix, E, seed=seed + 5), rand(*lead, hkv, prefix, Ev, seed=seed + 6)
    mask = (torch.rand(*lead, Lk, generator=torch.Generator().manual_seed(seed)) < 0.3) if masked else None
    kw = dict(n_taylor=P, scale=scale, enable_gqa=group > 1)
    state = sata.accumulate_state(pk, pv, n_taylor=P, scale=scale) if prefix else None
    full_mask = None if mask is None else torch.cat([torch.zeros(*lead, prefix, dtype=torch.bool), mask], -1)
    want = streamed_oracle(q, k, v, pk, pv, is_causal=causal, key_padding_mask=full_mask, **kw)
    modes = [m for m in _modes(causal) if "kernel" not in m or KERNELS]
    mode = data.draw(st.sampled_from(modes))
    sizes = dict(chunk_size=chunk, block_size=block and block * chunk) if mode.startswith("chunked") else {}
    y, st_ = attend(mode, q, k, v, is_causal=causal, state=state, key_padding_mask=mask, return_state=True, **sizes, **kw)
    assert_rel(y, want, 1e-10, mode)
    K, V = torch.cat([pk, k], -2), torch.cat([pv, v], -2)
    assert_rel(st_.kv, sata.accumulate_state(K, V, n_taylor=P, scale=scale, key_padding_mask=full_mask).kv, 1e-12)


# ------------------------------------------------------------------ backward against the oracle
def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


def _grads(fn, inputs, cot):
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, cot)


GRAD_PATHS = [pytest.param(m, c, id=f"{m}-{'causal' if c else 'noncausal'}")
              for c, ms in ((True, TORCH_CAUSAL_MODES), (False, TORCH_NONCAUSAL_MODES)) for m in ms]


@pytest.mark.parametrize("blocks", [False, True], ids=["one-block", "tiny-blocks"])
@pytest.mark.parametrize("mode,causal", GRAD_PATHS)
@pytest.mark.parametrize("with_state", [False, True], ids=["no-state", "state"])
def test_gradients_match_oracle(mode, causal, with_state, blocks):
    """Gradients of q, k, v and of the keys/values that built the input state (through the state)."""
    q, k, v = qkv((2,), 4, 21, 4, 3, Hkv=2, seed=11)
    pk, pv = rand(2, 2, 6, 4, seed=12), rand(2, 2, 6, 3, seed=13)
    cot = rand(2, 4, 21, 3, seed=14)
    kw = dict(n_taylor=4, is_causal=causal, enable_gqa=True)
    chunk = 5 if mode == "chunked" else None

    def fast(q, k, v, pk, pv):
        state = sata.accumulate_state(pk, pv, n_taylor=4) if with_state else None
        return attend(mode, q, k, v, state=state, chunk_size=chunk, block_bytes=1 if blocks else None, **kw)

    def slow(q, k, v, pk, pv):
        if not with_state:
            return sata.naive_sata_attention(q, k, v, **kw)
        kw2 = {**kw}
        kw2.pop("is_causal")
        return streamed_oracle(q, k, v, pk, pv, is_causal=causal, **kw2)

    inputs = (q, k, v, pk, pv)
    y, g = _grads(fast, _leaves(*inputs), cot) if with_state else _grads(lambda *a: fast(*a, None, None), _leaves(q, k, v), cot)
    y0, g0 = _grads(slow, _leaves(*inputs), cot) if with_state else _grads(lambda *a: slow(*a, None, None), _leaves(q, k, v), cot)
    assert_rel(y, y0, 1e-10)
    for name, a, b in zip("q k v prefix_k prefix_v".split(), g, g0):
        assert_rel(a, b, 1e-9, f"grad {name}")


@pytest.mark.parametrize("mode,causal", [("recurrent", True), ("chunked", True), ("parallel", False)], ids=str)
def test_state_gradient_matches_hand_built_reference(mode, causal):
    """d loss / d state.kv against y = norm(phi(Q) S + mask(T_P(s QK^T)) [V, 1]) built by hand from taylor_features."""
    P, E, Ev, L = 3, 3, 2, 9
    q, k, v = qkv((), 2, L, E, Ev, seed=21)
    S0 = sata.accumulate_state(rand(2, 4, E, seed=22), rand(2, 4, Ev, seed=23), n_taylor=P).kv.detach()
    cot = rand(2, L, Ev, seed=24)

    S = S0.clone().requires_grad_(True)
    state = sata.SATAState(kv=S, n_taylor=P, d_key=E, d_value=Ev, scale=E**-0.5, n_tokens=4)
    y = attend(mode, q, k, v, n_taylor=P, is_causal=causal, state=state, chunk_size=4 if mode == "chunked" else None)
    (g,) = torch.autograd.grad(y, S, cot)

    S_ref = S0.clone().requires_grad_(True)
    phq = sata.taylor_features(q, P)                                           # [2, L, D]
    A = sata.taylor_exp(E**-0.5 * q @ k.mT, P)                                 # [2, L, L]
    if causal:
        A = A.tril()
    vt = torch.cat([v, torch.ones(2, L, 1, dtype=v.dtype)], -1)                # [2, L, Ev + 1]
    U = phq @ S_ref + A @ vt
    y_ref = U[..., :Ev] / U[..., Ev:]
    (g_ref,) = torch.autograd.grad(y_ref, S_ref, cot)
    assert_rel(y, y_ref, 1e-10)
    assert_rel(g, g_ref, 1e-10, "grad state")
    assert g.abs().max() > 0


GRADCHECK_PATHS = [("recurrent", True), ("chunked", True), ("quadratic", True), ("parallel", False),
                   ("quadratic", False)]


@pytest.mark.parametrize("mode,causal", GRADCHECK_PATHS, ids=str)
@pytest.mark.parametrize("P", [2, 3], ids=lambda P: f"P={P}")
def test_gradcheck(mode, causal, P):
    E, Ev, L = 2, 2, 5
    q, k, v = qkv((1,), 2, L, E, Ev, Hkv=1, seed=31, scale=0.7)
    S = sata.accumulate_state(rand(1, 1, 3, E, seed=32), rand(1, 1, 3, Ev, seed=33), n_taylor=P).kv.detach()
    path = mode

    def f(q, k, v, S):
        state = sata.SATAState(kv=S, n_taylor=P, d_key=E, d_value=Ev, scale=E**-0.5, n_tokens=3)
        out = attend(path, q, k, v, n_taylor=P, is_causal=causal, enable_gqa=True, state=state,
                     return_state=True, chunk_size=2 if path == "chunked" else None, block_bytes=1)   # several blocks
        return out[0], out[1].kv

    assert torch.autograd.gradcheck(f, _leaves(q, k, v, S), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)
    # no state in, none out (the quadratic path returns no state of its own)
    g = lambda q, k, v: attend(path, q, k, v, n_taylor=P, is_causal=causal, enable_gqa=True,
                               chunk_size=2 if path == "chunked" else None, block_bytes=1)
    assert torch.autograd.gradcheck(g, _leaves(q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("mode,causal", GRAD_PATHS)
def test_masked_gradients_match_oracle(mode, causal):
    """Padded keys get zero gradient and the rest match the oracle, over several blocks."""
    q, k, v = qkv((2,), 2, 19, 3, 2, seed=51)
    mask = torch.rand(2, 19, generator=torch.Generator().manual_seed(52)) < 0.3
    cot = rand(2, 2, 19, 2, seed=53)
    kw = dict(n_taylor=3, is_causal=causal, key_padding_mask=mask)
    chunk = 4 if mode == "chunked" else None
    y, g = _grads(lambda *a: attend(mode, *a, chunk_size=chunk, block_bytes=1, **kw), _leaves(q, k, v), cot)
    y0, g0 = _grads(lambda *a: sata.naive_sata_attention(*a, **kw), _leaves(q, k, v), cot)
    assert_rel(y, y0, 1e-10)
    for name, a, b in zip("qkv", g, g0):
        assert_rel(a, b, 1e-9, f"grad {name}")
    pad = mask[:, None, :]                                                     # [2, 1, 19]
    assert (g[1] * pad[..., None]).abs().max() == 0 and (g[2] * pad[..., None]).abs().max() == 0


@pytest.mark.parametrize("causal", CAUSAL)
def test_public_dispatch_keeps_the_graph(causal):
    """With inputs that require grad the public op must not take a forward-only kernel."""
    q, k, v = _leaves(*qkv((), 2, 40, 4, seed=41))
    y = sata.sata_attention(q, k, v, n_taylor=3, is_causal=causal)
    assert y.requires_grad
    y.sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))
    q1, k1, v1 = _leaves(*qkv((), 2, 1, 4, seed=42))   # a decode step too
    y1 = sata.sata_attention(q1, k1, v1, n_taylor=3, is_causal=causal)
    assert y1.requires_grad
