"""The fused CPU kernels' interface: build, cache and fallback; plans; the thread policy.

The numbers the kernels compute are tested against the oracle with every other path in
test_equivalence.py, test_streaming.py and test_shapes.py; here: what happens around them.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sata
from conftest import assert_rel, needs_kernels, qkv
from sata import _kernels

SRC = Path(__file__).resolve().parents[1] / "src"
E = 4                       # head size of the plan tests
SQ = SK = E ** -0.25        # the input scales sata_attention uses (scale 1/sqrt(E)), so states compare too


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


# decode steps and prefills of every kind through the public op, checked against the oracle; prints
# the warnings about the kernels and their status as JSON
_FALLBACK_RUN = textwrap.dedent("""
    import json, warnings
    import torch, sata
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, 3, 9, 4, generator=g, dtype=torch.float64) for _ in range(3))
        worst = 0.0
        with torch.no_grad():
            for causal in (True, False):
                y = sata.sata_attention(q, k, v, n_taylor=3, is_causal=causal)
                want = sata.naive_sata_attention(q, k, v, n_taylor=3, is_causal=causal)
                worst = max(worst, ((y - want).norm() / want.norm()).item())
            state = None
            for t in range(9):                                   # decode, one token at a time
                y, state = sata.sata_attention(q[..., t:t + 1, :], k[..., t:t + 1, :], v[..., t:t + 1, :],
                                               n_taylor=3, is_causal=True, state=state, return_state=True)
            want = sata.naive_sata_attention(q, k, v, n_taylor=3, is_causal=True)[..., -1:, :]
            worst = max(worst, ((y - want).norm() / want.norm()).item())
    about = [str(w.message) for w in caught if "fused CPU kernels" in str(w.message)]
    print(json.dumps({"warnings": about, "categories": [w.category.__name__ for w in caught],
                      "status": sata._kernels.status(), "worst": worst}))
""")


@pytest.mark.parametrize("broken", ["g++ on PATH exits 1", "CXX=false"])
def test_build_failure_warns_once_and_the_op_still_computes(broken, tmp_path):
    """A compiler that fails: exactly one warning saying so and naming the PyTorch path, and every
    call (prefill both ways, a decode loop) still agrees with the oracle."""
    env = dict(os.environ, PYTHONPATH=str(SRC), SATA_KERNEL_CACHE=str(tmp_path / "cache"))
    env.pop("SATA_DISABLE_KERNELS", None)
    env.pop("CXX", None)
    if broken == "CXX=false":
        env["CXX"] = "false"
    else:
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        _script(bin_dir / "g++", "echo 'g++: simulated failure' >&2; exit 1")
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    proc = subprocess.run([sys.executable, "-c", _FALLBACK_RUN], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(got["warnings"]) == 1, got
    assert got["categories"].count("RuntimeWarning") == 1, got
    assert "PyTorch path" in got["warnings"][0] and "failed" in got["warnings"][0], got
    assert got["status"].startswith("unavailable"), got
    assert got["worst"] < 1e-12, got
    assert not any((tmp_path / "cache").glob("*.so"))      # nothing half-built left behind


def test_disabled_kernels_do_not_warn(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(SRC), SATA_KERNEL_CACHE=str(tmp_path / "cache"), SATA_DISABLE_KERNELS="1")
    proc = subprocess.run([sys.executable, "-c", _FALLBACK_RUN], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["warnings"] == [] and got["status"] == "disabled by SATA_DISABLE_KERNELS" and got["worst"] < 1e-12, got


def test_compiler_call_has_a_timeout(tmp_path):
    hang = _script(tmp_path / "slow-cxx", "sleep 30")
    with pytest.raises(RuntimeError, match="did not finish within 0.5 s"):
        _kernels._compile(str(hang), str(tmp_path / "out.so"), timeout=0.5)


def test_compiler_error_is_reported(tmp_path):
    bad = _script(tmp_path / "bad-cxx", "echo 'bad-cxx: no such flag' >&2; exit 1")
    with pytest.raises(RuntimeError, match="bad-cxx failed: bad-cxx: no such flag"):
        _kernels._compile(str(bad), str(tmp_path / "out.so"))


# the kernels' numbers on each vector width: the oracle tests of the update layouts, decode, window decode and
# window prefill (float32 and float64), run again with the library built for that target
_OTHER_TARGET_TESTS = [
    "tests/test_kernels.py::test_float32_prefill_every_update_layout_matches_the_oracle",
    "tests/test_kernels.py::test_decode_heads_shared_out_match_the_oracle",
    "tests/test_window_kernel.py::test_head_sizes_and_vector_blocks",
    "tests/test_window_kernel.py::test_decode_loop_equals_oracle_and_torch_path_float64",
    "tests/test_window_prefill_kernel.py::test_head_sizes",
    "tests/test_window_prefill_kernel.py::test_prefill_equals_oracle_and_torch_path_float64",
    "tests/test_window_prefill_kernel.py::test_the_band_rolls_across_many_chunks",
]


@needs_kernels
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86 targets")
@pytest.mark.parametrize("arch", ["x86-64-v3", "x86-64"], ids=["avx2", "sse2"])
def test_kernels_built_for_narrower_vectors_match_the_oracle(arch, tmp_path):
    """SATA_KERNEL_ARCH builds for another target than this CPU: 32-byte (AVX2) and 16-byte (SSE2) vectors, where
    4 and 2 lanes of float64 and no paired update test what 64-byte vectors do not."""
    env = {**os.environ, "SATA_KERNEL_ARCH": arch, "SATA_KERNEL_CACHE": str(tmp_path)}
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *_OTHER_TARGET_TESTS],
                         cwd=root, env=env, capture_output=True, text=True, timeout=900)
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-2000:]
    assert out.returncode == 0 and "skipped" not in summary, out.stdout[-4000:] + out.stderr[-2000:]
    assert [p.name for p in tmp_path.glob("kernels-*.so")], "no library was built for the target"


@needs_kernels
def test_cached_library_that_does_not_match_is_rebuilt(tmp_path, monkeypatch):
    """A cached file that reports another ABI number (or does not load at all) is replaced by a fresh build."""
    monkeypatch.setenv("SATA_KERNEL_CACHE", str(tmp_path))
    cxx = os.environ.get("CXX", "g++")
    target = _kernels._library_path(cxx)
    target.write_bytes(b"\x7fELF truncated")
    with pytest.raises(OSError):                                             # _build catches this too
        _kernels._open(str(target))
    src = tmp_path / "old.cpp"
    src.write_text('extern "C" long sata_kernel_abi() { return 1; }\n'
                   'extern "C" long sata_struct_size(long) { return 0; }\n')
    subprocess.run([cxx, "-shared", "-fPIC", str(src), "-o", str(target)], check=True)
    zeros = ", ".join("0" * len(_kernels._STRUCTS))       # one size per argument struct
    with pytest.raises(RuntimeError, match=f"ABI 1 and struct sizes \\[{zeros}\\], this module expects ABI {_kernels._ABI}"):
        _kernels._open(str(target))
    stale = target.read_bytes()
    lib = _kernels._build()
    assert lib.sata_kernel_abi() == _kernels._ABI
    assert sorted(p.name for p in tmp_path.glob("*.so")) == [target.name]  # no temporary file left
    fresh = tmp_path / "fresh" / "copy.so"        # under a new name: this process holds the stale
    fresh.parent.mkdir()                          # library by the target's name
    fresh.write_bytes(target.read_bytes())
    assert fresh.read_bytes() != stale and _kernels._open(str(fresh)).sata_kernel_abi() == _kernels._ABI


@needs_kernels
def test_plan_factories_cache_plans():
    args = (6, 2, 4, 3, 3, torch.float64, 1.0, 0.5, torch.float64, (3, 2, 4, 15), (3, 2, 4, 1, 3))
    assert _kernels.decode_plan(*args) is _kernels.decode_plan(*args)
    assert _kernels.decode_plan(*args) is not _kernels.decode_plan(7, *args[1:])
    pargs = (2, 3, 4, 3, 3, torch.float64, 1.0, 0.5, True, torch.float64)
    assert _kernels.prefill_plan(*pargs) is _kernels.prefill_plan(*pargs)
    assert _kernels.prefill_plan(*pargs) is not _kernels.prefill_plan(*pargs[:8], False, torch.float64)


def _prefill(plan, q, k, v, Hkv, G, keep=None, state_dtype=None):
    """Run a prefill plan on ``[B, H, L, E]`` inputs from an empty state (in ``state_dtype``, default the inputs'):
    ``(y, S [B, Hkv, D, F])``."""
    B, Lq, Ev, D = q.shape[0], q.shape[2], v.shape[-1], plan._shape[4]
    S = torch.zeros(B, Hkv, Ev + 1, D, dtype=state_dtype or q.dtype).mT
    y = torch.empty(B, Hkv * G, Lq, Ev, dtype=q.dtype)
    plan(q, k, v, keep, S, y)
    return y, S


@needs_kernels
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_one_prefill_plan_serves_every_batch_and_length(causal):
    """A plan holds no lengths: the same plan computes calls of several batch sizes and lengths
    (query and key lengths differing when not causal), each equal to the oracle."""
    Hkv, G, Ev, P = 2, 2, 3, 3
    plan = _kernels.prefill_plan(Hkv, G, E, Ev, P, torch.float64, SQ, SK, causal, torch.float64)
    for i, (B, Lq, Lk) in enumerate([(1, 5, 5), (3, 40, 40), (2, 33, 70)]):
        if causal:
            Lk = Lq
        q, k, v = qkv((B,), Hkv * G, Lq, E, Ev, Hkv=Hkv, Lk=Lk, seed=40 + i)
        y, S = _prefill(plan, q, k, v, Hkv, G)
        want = sata.naive_sata_attention(q, k, v, n_taylor=P, is_causal=causal, enable_gqa=True)
        assert_rel(y, want, 1e-12)
        assert_rel(S, sata.accumulate_state(k, v, n_taylor=P).kv, 1e-12)


@needs_kernels
def test_prefill_plan_accepts_the_former_signature():
    """``PrefillPlan(lib, B, Hkv, G, Lq, Lk, d, Ev, basis, ...)``: the lengths given are ignored."""
    Hkv, G, Ev, P = 2, 2, 3, 3
    basis = sata.get_basis(E, P, "cpu", torch.float64)
    old = _kernels.PrefillPlan(_kernels.load(), 9, Hkv, G, 99, 99, E, Ev, basis, torch.float64, SQ, SK, True,
                               state_dtype=torch.float64)
    positional = _kernels.PrefillPlan(_kernels.load(), 9, Hkv, G, 99, 99, E, Ev, basis, torch.float64, SQ, SK,
                                      True, torch.float64)
    new = _kernels.PrefillPlan(_kernels.load(), Hkv, G, E, Ev, basis, torch.float64, SQ, SK, True,
                               state_dtype=torch.float64)
    q, k, v = qkv((2,), Hkv * G, 21, E, Ev, Hkv=Hkv, seed=44)
    ys = [_prefill(plan, q, k, v, Hkv, G)[0] for plan in (old, positional, new)]
    assert torch.equal(ys[0], ys[2]) and torch.equal(ys[1], ys[2])
    assert_rel(ys[2], sata.naive_sata_attention(q, k, v, n_taylor=P, is_causal=True, enable_gqa=True), 1e-12)


@needs_kernels
def test_prefill_plan_refuses_shapes_it_was_not_made_for():
    Hkv, G, Ev, P = 2, 2, 3, 3
    plan = _kernels.prefill_plan(Hkv, G, E, Ev, P, torch.float64, SQ, SK, True, torch.float64)
    q, k, v = qkv((1,), Hkv * G, 8, E, Ev, Hkv=Hkv, seed=45)
    with pytest.raises(ValueError, match=r"shapes q \(1, 4, 8, 4\), k \(1, 2, 8, 4\), v \(1, 2, 8, 4\).*Ev=3"):
        _prefill(plan, q, k, torch.cat([v, v[..., :1]], -1), Hkv, G)
    with pytest.raises(ValueError, match="causal=True"):                     # causal needs Lq == Lk
        _prefill(plan, q[..., :5, :], k, v, Hkv, G)


@pytest.fixture
def all_threads(monkeypatch):
    """Two torch threads, and plans that fan out whatever the work (the policy's other side)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(_kernels, "_WORK_PER_THREAD", {"decode": 1.0, "prefill": 1.0})
    yield
    torch.set_num_threads(threads)


@needs_kernels
@pytest.mark.parametrize("force", [False, True], ids=["policy", "fan-out"])
def test_decode_heads_shared_out_match_the_oracle(force, request):
    """Decode over 13 heads (groups of 8 handed to threads: a partial last group), GQA, masked
    keys, a float64 state: the same numbers on one thread and on several, equal to the oracle."""
    if force:
        request.getfixturevalue("all_threads")
    B, Hkv, G, Ev, P, L = 13, 1, 3, 5, 3, 6
    basis = sata.get_basis(E, P, "cpu", torch.float64)
    D, F = basis.dim, Ev + 1
    plan = _kernels.DecodePlan(_kernels.load(), B * Hkv, G, E, Ev, basis, torch.float64, SQ, SK,
                               state_dtype=torch.float64)
    q, k, v = qkv((B,), Hkv * G, L, E, Ev, Hkv=Hkv, seed=46)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[::3, 2] = True                                                     # some keys ignored
    S = torch.zeros(B * Hkv, F, D, dtype=torch.float64)
    for t in range(L):
        y = torch.empty(B * Hkv, G, Ev, dtype=torch.float64)
        keep = (~mask[:, t]).to(torch.uint8).contiguous()
        plan(q[:, :, t].contiguous(), k[:, :, t].contiguous(), v[:, :, t].contiguous(), keep, S, S, y)
    want = sata.naive_sata_attention(q, k, v, n_taylor=P, is_causal=True, enable_gqa=True, key_padding_mask=mask)
    assert_rel(y.view(B, Hkv * G, Ev), want[:, :, -1], 1e-12)
    assert_rel(S.mT.reshape(B, Hkv, D, F), sata.accumulate_state(k, v, n_taylor=P, key_padding_mask=mask).kv, 1e-12)


@needs_kernels
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_prefill_heads_shared_out_match_the_oracle(causal, all_threads):
    Hkv, G, Ev, P = 3, 2, 3, 3
    plan = _kernels.PrefillPlan(_kernels.load(), Hkv, G, E, Ev, sata.get_basis(E, P, "cpu", torch.float64),
                                torch.float64, SQ, SK, causal, state_dtype=torch.float64)
    q, k, v = qkv((3,), Hkv * G, 45, E, Ev, Hkv=Hkv, seed=47)
    y, S = _prefill(plan, q, k, v, Hkv, G)
    assert_rel(y, sata.naive_sata_attention(q, k, v, n_taylor=P, is_causal=causal, enable_gqa=True), 1e-12)
    assert_rel(S, sata.accumulate_state(k, v, n_taylor=P).kv, 1e-12)


@needs_kernels
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64], ids=["f32-state", "f64-state"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
@pytest.mark.parametrize("d,Ev,P", [(4, 3, 3), (4, 7, 4), (8, 8, 4), (3, 8, 5), (4, 9, 3), (4, 16, 3), (2, 40, 4)],
                         ids=lambda x: str(x))
def test_float32_prefill_every_update_layout_matches_the_oracle(d, Ev, P, causal, state_dtype):
    """float32 state updates take one of three layouts by value width (tokens in pairs with the ones column among
    8 lanes, Ev <= 7; pairs plus a separate row sum for the ones column, Ev = 8; padded rows otherwise), and the
    feature rows end in a partial block (D = 15, 165, 56, 35, 15, 21 with blocks of 8), with the state kept in
    float32 or float64: each equals the float64 oracle, with dropped keys and a partial last chunk."""
    Hkv, G, B, L = 2, 2, 2, 77
    sq = sk = d ** -0.25
    plan = _kernels.prefill_plan(Hkv, G, d, Ev, P, torch.float32, sq, sk, causal, state_dtype)
    q, k, v = qkv((B,), Hkv * G, L, d, Ev, Hkv=Hkv, seed=90 + Ev)
    mask = torch.rand(B, L, generator=torch.Generator().manual_seed(Ev)) < 0.2  # True = dropped key
    mask[:, 0] = False
    keep = (~mask).to(torch.uint8).contiguous()
    y, S = _prefill(plan, q.float(), k.float(), v.float(), Hkv, G, keep=keep, state_dtype=state_dtype)
    want = sata.naive_sata_attention(q, k, v, n_taylor=P, is_causal=causal, enable_gqa=True, key_padding_mask=mask)
    assert_rel(y, want, 2e-5, "output")
    assert_rel(S, sata.accumulate_state(k, v, n_taylor=P, key_padding_mask=mask).kv, 2e-5, "state")
