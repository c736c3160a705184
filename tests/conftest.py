"""Shared helpers of the core suite: seeded inputs, the internal path hook, relative errors.

Also the hypothesis profiles of the fuzz suite (tests/test_fuzz.py):

- ``ci`` (default): derandomized (the same cases every run), no example database, bounded so
  the fuzz suite takes well under a minute on 2 busy cores.
- ``long``: random cases, ~30 minutes on 2 cores: ``python -m pytest tests/test_fuzz.py
  --hypothesis-profile=long --hypothesis-show-statistics``.

``--hypothesis-profile=NAME`` or the ``SATA_HYPOTHESIS_PROFILE`` environment variable selects one;
``SATA_FUZZ_EXAMPLES`` sets the long profile's examples per test (default 9000; the cheap
invalid-input test runs 5x as many).
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import sata
from sata import _kernels, ops
from sata._checks import _SPEC_CACHE, check_inputs

KERNELS = _kernels.load() is not None
needs_kernels = pytest.mark.skipif(not KERNELS, reason=f"fused CPU kernels unavailable: {_kernels.status()}")

# every way of computing the op: internal paths forced through sata.ops._attention, plus "auto"
# (the public dispatch). The kernels are forward-only (no autograd) and run on the CPU; without
# autograd "chunked" runs its blocks through the prefill kernel when it can, so "chunked_torch"
# and "auto_torch" are the same with the kernels unavailable (no compiler, or CUDA).
CAUSAL_MODES = ["recurrent", "chunked", "chunked_torch", "quadratic", "prefill_kernel", "auto", "auto_torch"]
NONCAUSAL_MODES = ["parallel", "quadratic", "prefill_kernel", "auto", "auto_torch"]
TORCH_CAUSAL_MODES = ["recurrent", "chunked", "quadratic", "auto"]      # with autograd
TORCH_NONCAUSAL_MODES = ["parallel", "quadratic", "auto"]


def mode_params(modes):
    """``pytest.param`` per mode, skipping the kernel modes when no compiler is available."""
    return [pytest.param(m, id=m, marks=needs_kernels if "kernel" in m else ()) for m in modes]


def rand(*shape, dtype=torch.float64, seed=0, scale=1.0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


def qkv(B, H, L, E, Ev=None, *, Hkv=None, Lk=None, dtype=torch.float64, seed=0, scale=1.0):
    """``q [*B, H, L, E]``, ``k [*B, Hkv, Lk, E]``, ``v [*B, Hkv, Lk, Ev]``; ``B`` a tuple of batch dims."""
    Ev, Hkv, Lk = Ev or E, Hkv or H, L if Lk is None else Lk
    return (rand(*B, H, L, E, dtype=dtype, seed=seed, scale=scale),
            rand(*B, Hkv, Lk, E, dtype=dtype, seed=seed + 1, scale=scale),
            rand(*B, Hkv, Lk, Ev, dtype=dtype, seed=seed + 2))


@contextlib.contextmanager
def kernels_unavailable():
    """As if no compiler were available: every call takes a PyTorch path.

    Validated call shapes (``Spec``) cache whether the kernels apply, so the cache is emptied on
    the way in and out: no verdict crosses the boundary."""
    load = _kernels.load
    _SPEC_CACHE.clear()
    _kernels.load = lambda: None
    try:
        yield
    finally:
        _kernels.load = load
        _SPEC_CACHE.clear()


def attend(mode, q, k, v, *, chunk_size=None, block_size=None, **kw):
    """``sata.sata_attention`` through one path: ``mode`` in the lists above."""
    if mode.endswith("_torch"):
        with kernels_unavailable():
            return attend(mode.removesuffix("_torch"), q, k, v, chunk_size=chunk_size, block_size=block_size, **kw)
    if mode == "auto":
        assert chunk_size is None and block_size is None
        return sata.sata_attention(q, k, v, **kw)
    kw = {"n_taylor": 3, "is_causal": False, "scale": None, "enable_gqa": False, "key_padding_mask": None,
          "state": None, "return_state": False, **kw}
    spec = check_inputs("sata_attention", q, k, v, n_taylor=kw["n_taylor"], is_causal=kw["is_causal"],
                        scale=kw["scale"], enable_gqa=kw["enable_gqa"], key_padding_mask=kw["key_padding_mask"],
                        state=kw["state"])
    return ops._attention(q, k, v, spec, kw["is_causal"], kw["key_padding_mask"], kw["state"], kw["return_state"],
                          mode=mode, chunk_size=chunk_size, block_size=block_size)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |a - e| / max |e|`` in float64 (the scale-free error the tolerances refer to)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    a, e = actual.detach().double(), expected.detach().double()
    if e.numel() == 0:
        return 0.0
    return float((a - e).abs().max() / e.abs().max().clamp_min(1e-300))


def assert_rel(actual, expected, tol, what=""):
    err = rel_err(actual, expected)
    assert err <= tol, f"{what} relative error {err:.3e} > {tol:.1e}"


def streamed_oracle(q, k, v, prefix_k, prefix_v, *, is_causal, **kw):
    """The oracle for a call that starts from the state of ``prefix_k/v``: causal = the last
    ``Lq`` rows of one causal call over the concatenation (with dummy queries for the prefix);
    non-causal = every query over prefix and passed keys."""
    K = torch.cat([prefix_k, k], dim=-2)
    V = torch.cat([prefix_v, v], dim=-2)
    if is_causal:
        # dummy prefix queries: their rows are dropped, so any values do
        Q = torch.cat([q.new_zeros(*q.shape[:-2], prefix_k.shape[-2], q.shape[-1]), q], dim=-2)
        return sata.naive_sata_attention(Q, K, V, is_causal=True, **kw)[..., prefix_k.shape[-2]:, :]
    return sata.naive_sata_attention(q, K, V, is_causal=False, **kw)


@pytest.fixture
def tiny_blocks(monkeypatch):
    """Force the PyTorch paths to process one chunk per block (many blocks, checkpointed under autograd)."""
    monkeypatch.setattr(ops, "_BLOCK_BYTES", 1)
    yield


# ---------------------------------------------------------------- hypothesis profiles (fuzz suite)
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=True)
settings.register_profile("ci", max_examples=300, derandomize=True, database=None, **_COMMON)
settings.register_profile("long", max_examples=int(os.environ.get("SATA_FUZZ_EXAMPLES", 9000)), **_COMMON)
if settings.get_current_profile_name() == "default":  # not chosen with --hypothesis-profile already
    settings.load_profile(os.environ.get("SATA_HYPOTHESIS_PROFILE", "ci"))
