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

MiB = 2**20
ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, torch, sata
from sata import ops

def status(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))

torch.set_num_threads(2)
fused = ops._kernel_applies
out = {}
for name, c in json.loads(sys.argv[1]).items():
    ops._kernel_applies = fused if c.get("kernels", True) else (lambda *a, **k: False)
    g = torch.Generator().manual_seed(0)
    L, Lk, H, E, Ev = c["L"], c.get("Lk", c["L"]), c["H"], c["E"], c.get("Ev", c["E"])
    q = torch.randn(1, H, L, E, generator=g)
    k, v = torch.randn(1, H, Lk, E, generator=g), torch.randn(1, H, Lk, Ev, generator=g)
    kw = dict(n_taylor=c["P"], is_causal=c["causal"])
    with sata.memory_budget(c.get("budget", "4G")):
        if c.get("grad"):
            for t in (q, k, v):
                t.requires_grad_(True)
        # warm up (kernels, basis, autograd engine) on a few tokens
        w = sata.sata_attention(q[..., :2, :], k[..., :2, :], v[..., :2, :], **kw)
        if c.get("grad"):
            w.sum().backward()
            for t in (q, k, v):
                t.grad = None
        before = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        y = sata.sata_attention(q, k, v, **kw)
        if c.get("grad"):
            y.sum().backward()
        peak = status("VmHWM")
    outputs = y.numel() * 4 * (4 if c.get("grad") else 1)
    out[name] = (peak - before - outputs) / 2**20
    del q, k, v, y
print(json.dumps(out))
"""

CASES = {
    # length growth, fused kernel: 4x the tokens
    "kernel-32K": dict(L=32768, H=4, E=8, P=4, causal=True),
    "kernel-128K": dict(L=131072, H=4, E=8, P=4, causal=True),
    # length growth, PyTorch chunked path (no compiler, or float64 states)
    "torch-8K": dict(L=8192, H=1, E=8, P=4, causal=True, kernels=False),
    "torch-32K": dict(L=32768, H=1, E=8, P=4, causal=True, kernels=False),
    # length growth, forward + backward (checkpointed blocks)
    "grad-1K": dict(L=1024, H=1, E=8, P=4, causal=True, grad=True, budget="8M"),
    "grad-4K": dict(L=4096, H=1, E=8, P=4, causal=True, grad=True, budget="8M"),
    # working sets against small budgets (the state itself fits them)
    "budget-quadratic": dict(L=990, H=16, E=16, P=4, causal=False, budget="8M"),
    "budget-kernel": dict(L=64, H=2, E=32, Ev=1, P=5, causal=True, budget="4M"),
    "budget-chunked-grad": dict(L=64, H=2, E=32, Ev=1, P=5, causal=True, budget="4M", grad=True),
}


@pytest.fixture(scope="module")
def extra_mib():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "MALLOC_MMAP_THRESHOLD_": str(64 * 1024),
           "MALLOC_TRIM_THRESHOLD_": str(64 * 1024)}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(CASES)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("short,long,limit", [("kernel-32K", "kernel-128K", 4), ("torch-8K", "torch-32K", 32),
                                              ("grad-1K", "grad-4K", 8)], ids=["kernel", "torch", "grad"])
def test_prefill_memory_does_not_grow_with_length(extra_mib, short, long, limit):
    """4x the tokens: the extra memory stays put (within 4 MiB) and under a path-specific ceiling
    (kernel: a few chunk buffers; PyTorch: blocks of 16 MiB (sata.ops._BLOCK_BYTES), x2 for
    temporaries; forward + backward: its 8 MiB budget, i.e. blocks of 2 MiB, checkpointed)."""
    a, b = extra_mib[short], extra_mib[long]
    assert b - a < 4 + 0.05 * a, (a, b)
    assert max(a, b) < limit, (a, b)


BUDGET_BUG = "core bug: the working set of this path is not bounded by the memory budget ({})"


@pytest.mark.parametrize("case", [
    pytest.param("budget-quadratic", marks=pytest.mark.xfail(strict=True, reason=BUDGET_BUG.format(
        "ops.parallel's quadratic variant materialises T_P(QK^T) [B, H, Lq, Lk] in one piece"))),
    pytest.param("budget-kernel", marks=pytest.mark.xfail(strict=True, reason=BUDGET_BUG.format(
        "prefill.cpp: per thread D x 16 state copy plus two D x 32 feature chunks"))),
    pytest.param("budget-chunked-grad", marks=pytest.mark.xfail(strict=True, reason=BUDGET_BUG.format(
        "_Run.block is at least one chunk of 64 tokens, whatever its D x 64 features cost"))),
])
def test_call_stays_within_memory_budget(extra_mib, case):
    budget = {"4M": 4, "8M": 8}[CASES[case]["budget"]]
    assert extra_mib[case] <= budget + 4, extra_mib[case]       # 4 MiB of slack for the allocator
