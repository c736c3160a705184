"""Shared helpers of the core suite: seeded inputs, every path through sata.ops.force_path, relative errors.

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

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import sata
from sata import _kernels
from sata.ops import force_path

KERNELS = _kernels.load() is not None
needs_kernels = pytest.mark.skipif(not KERNELS, reason=f"fused CPU kernels unavailable: {_kernels.status()}")

# every way of computing the op: the paths of sata.ops.PATHS forced with sata.ops.force_path, plus
# "auto" (the public dispatch). A "_torch" suffix turns the kernels off, as if no compiler were
# available. The kernels are forward-only (no autograd) and run on the CPU; without autograd
# "chunked" runs its blocks through the prefill kernel when it can, so "chunked_torch" and
# "auto_torch" are the same with the kernels unavailable (no compiler, or CUDA).
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


def attend(mode, q, k, v, *, chunk_size=None, block_size=None, block_bytes=None, segment_bytes=None, **kw):
    """``sata.sata_attention`` through one path: ``mode`` in the lists above; sizes as in ``force_path``."""
    path = mode.removesuffix("_torch")
    with force_path(None if path == "auto" else path, kernels=not mode.endswith("_torch"), chunk_size=chunk_size,
                    block_size=block_size, block_bytes=block_bytes, segment_bytes=segment_bytes):
        return sata.sata_attention(q, k, v, **kw)


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


# ---------------------------------------------------------------- hypothesis profiles (fuzz suite)
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=True)
settings.register_profile("ci", max_examples=300, derandomize=True, database=None, **_COMMON)
settings.register_profile("long", max_examples=int(os.environ.get("SATA_FUZZ_EXAMPLES", 9000)), **_COMMON)
if settings.get_current_profile_name() == "default":  # not chosen with --hypothesis-profile already
    settings.load_profile(os.environ.get("SATA_HYPOTHESIS_PROFILE", "ci"))
