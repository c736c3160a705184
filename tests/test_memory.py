"""Memory: a prefill's working set does not grow with the length, and a call stays within its budget.

Measured in a child process (``VmHWM`` after resetting it through ``/proc/self/clear_refs``, minus
the resident size before the call and the output's bytes), with glibc's mmap threshold fixed so
that freed blocks go back to the system between measurements. The full acceptance measurement
(262,144 tokens, 64 heads of 8, n_taylor=4) is ``benchmarks/prefill_memory.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sata
from conftest import needs_kernels

MiB = 2**20
ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, torch, sata
from sata.ops import force_path

def status(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

torch.set_num_threads(2)
out = {}
for name, c in json.loads(sys.argv[1]).items():
    with force_path(kernels=c.get("kernels", True)):                        # False: as if no compiler
        g = torch.Generator().manual_seed(0)
        L, Lk, H, E, Ev = c["L"], c.get("Lk", c["L"]), c["H"], c["E"], c.get("Ev", c["E"])
        dt = getattr(torch, c.get("dtype", "float32"))
        q = torch.randn(1, H, L, E, generator=g).to(dt)
        k, v = torch.randn(1, H, Lk, E, generator=g).to(dt), torch.randn(1, H, Lk, Ev, generator=g).to(dt)
        kw = dict(n_taylor=c["P"], is_causal=c["causal"], return_state=c.get("state", False))
        with sata.memory_budget(c.get("budget", "4G")):
            if c.get("grad"):
                for t in (q, k, v):
                    t.requires_grad_(True)
            # warm up (kernels, basis, autograd engine) on a few tokens
            before = status("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            try:
                w = sata.sata_attention(q[..., :2, :], k[..., :2, :], v[..., :2, :], **kw)
            except sata.MemoryBudgetError:  # refused before allocating: record how much that cost
                out[name] = {"refused": (status("VmHWM") - before) / 2**20}
                continue
            w = w[0] if c.get("state") else w
            if c.get("grad"):
                w.sum().backward()
                for t in (q, k, v):
                    t.grad = None
            before = status("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            try:
                y = sata.sata_attention(q, k, v, **kw)
                y = y[0] if c.get("state") else y
                if c.get("grad"):
                    y.sum().backward()
            except sata.MemoryBudgetError:  # refused before allocating: record how much that cost
                out[name] = {"refused": (status("VmHWM") - before) / 2**20}
                continue
            peak = status("VmHWM")
        outputs = y.numel() * y.element_size() * (4 if c.get("grad") else 1)
        out[name] = (peak - before - outputs) / 2**20
        del q, k, v, y
print(json.dumps(out))
"""

CASES = {
    # length growth, fused kernel: 4x the tokens
    "kernel-32K": dict(L=32768, H=4, E=8, P=4, causal=True),
    "kernel-128K": dict(L=131072, H=4, E=8, P=4, causal=True),
    "kernel-bf16-32K": dict(L=32768, H=4, E=8, P=4, causal=True, dtype="bfloat16"),
    "kernel-bf16-128K": dict(L=131072, H=4, E=8, P=4, causal=True, dtype="bfloat16"),
    # length growth, PyTorch chunked path (no compiler, or float64 states)
    "torch-2K": dict(L=2048, H=1, E=8, P=4, causal=True, kernels=False, budget="4M"),
    "torch-8K": dict(L=8192, H=1, E=8, P=4, causal=True, kernels=False, budget="4M"),
    # length growth, forward + backward (checkpointed blocks)
    "grad-512": dict(L=512, H=1, E=8, P=4, causal=True, grad=True, budget="4M"),
    "grad-2K": dict(L=2048, H=1, E=8, P=4, causal=True, grad=True, budget="4M"),
    # working sets against small budgets (the state itself fits them)
    "budget-quadratic": dict(L=700, H=8, E=16, P=4, causal=False, budget="8M"),
    "budget-quadratic-causal": dict(L=700, H=8, E=16, P=4, causal=True, budget="8M"),
    "budget-kernel": dict(L=64, H=2, E=32, Ev=1, P=5, causal=True, budget="4M", state=True),
    "budget-chunked-grad": dict(L=64, H=2, E=32, Ev=1, P=5, causal=True, budget="4M", grad=True, state=True),
}


@pytest.fixture(scope="module")
def extra_mib():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "MALLOC_MMAP_THRESHOLD_": str(64 * 1024),
           "MALLOC_TRIM_THRESHOLD_": str(64 * 1024)}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(CASES)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("short,long,limit", [
    pytest.param("kernel-32K", "kernel-128K", 4, id="kernel"),
    pytest.param("kernel-bf16-32K", "kernel-bf16-128K", 4, id="kernel-bfloat16"),
    pytest.param("torch-2K", "torch-8K", 8, id="torch"),
    pytest.param("grad-512", "grad-2K", 8, id="grad"),
])
def test_prefill_memory_does_not_grow_with_length(extra_mib, short, long, limit):
    """4x the tokens: the extra memory stays put (within 4 MiB) and under a ceiling: a few chunk
    buffers for the kernel; for the PyTorch paths the call's budget (4 MiB, small enough that both
    lengths span several blocks) plus the 4 MiB of allocator slack the budget test allows."""
    a, b = extra_mib[short], extra_mib[long]
    assert b - a < 4 + 0.05 * a, (a, b)
    assert max(a, b) < limit, (a, b)


@pytest.mark.parametrize("case", [
    pytest.param("budget-quadratic"),
    pytest.param("budget-quadratic-causal"),
    pytest.param("budget-kernel"),
    pytest.param("budget-chunked-grad"),
])
def test_call_stays_within_memory_budget(extra_mib, case):
    """Within the budget, or refused (``MemoryBudgetError``) before allocating beyond it."""
    budget = {"4M": 4, "8M": 8}[CASES[case]["budget"]]
    got = extra_mib[case]
    if isinstance(got, dict):                                    # refused: it must have said so up front
        assert case == "budget-chunked-grad", got                # d=32, n_taylor=5, one token per block
        got = got["refused"]
    assert got <= budget + 4, got                                # 4 MiB of slack for the allocator


@needs_kernels
def test_call_shape_caches_are_bounded():
    """A server calling with many shapes: the validated-shape cache and the kernel caches keyed by
    call shape stop growing at their caps instead of growing with every new length."""
    x = torch.randn(1, 1, 4200, 1)
    for n in range(1, 4200):                              # 4199 distinct key lengths, one query each
        sata.sata_attention(x[..., :1, :], x[..., :n, :], x[..., :n, :], n_taylor=2, return_state=True)
    sizes = sata.ops.cache_sizes()
    assert sizes["specs"] <= 4096
    assert sizes["kernel_verdicts"] <= 4096 and sizes["decode_plans"] <= 4096 and sizes["prefill_plans"] <= 64
