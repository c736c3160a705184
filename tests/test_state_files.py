"""Durable states: save/load round trips across processes, bad files, and crashes during a save."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
import torch

import sata
from sata import StateFileError

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _segment(seed: int, length: int, dtype: torch.dtype, heads=(4, 2), E=4, Ev=3):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads[0], length, E, generator=g).to(dtype)
    k = torch.randn(2, heads[1], length, E, generator=g).to(dtype)
    v = torch.randn(2, heads[1], length, Ev, generator=g).to(dtype)
    return q, k, v


def _small_state(n_taylor=3, E=3, Ev=2, heads=2, length=10, dtype=torch.float32) -> sata.SATAState:
    g = torch.Generator().manual_seed(1)
    k = torch.randn(1, heads, length, E, generator=g, dtype=dtype)
    v = torch.randn(1, heads, length, Ev, generator=g, dtype=dtype)
    return sata.accumulate_state(k, v, n_taylor=n_taylor)


# ---------------------------------------------------------------- round trips

# continue a saved stream in a fresh process: prefill of 70 tokens, then 3 decode steps
_CONTINUE = """
import sys, torch, sata
sys.path.insert(0, sys.argv[3])
from test_state_files import _segment
dtype = getattr(torch, sys.argv[2])
st = sata.SATAState.load(sys.argv[1], expected={"n_taylor": 4, "d_key": 4, "d_value": 3, "n_heads": 2, "batch_shape": [2]})
outs = []
y, st = sata.sata_attention(*_segment(2, 70, dtype), n_taylor=4, is_causal=True, enable_gqa=True, state=st, return_state=True)
outs.append(y)
for i in range(3):
    y, st = sata.sata_attention(*_segment(3 + i, 1, dtype), n_taylor=4, is_causal=True, enable_gqa=True, state=st, return_state=True)
    outs.append(y)
torch.save({"outs": outs, "kv": st.kv.contiguous(), "n_tokens": st.n_tokens}, sys.argv[1] + ".out")
"""


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_other_process_continues_bit_identically(tmp_path, dtype):
    path = tmp_path / "stream.sata"
    _, st = sata.sata_attention(*_segment(1, 100, dtype), n_taylor=4, is_causal=True, enable_gqa=True, return_state=True)
    st.save(path)
    outs = []
    y, here = sata.sata_attention(*_segment(2, 70, dtype), n_taylor=4, is_causal=True, enable_gqa=True, state=st, return_state=True)
    outs.append(y)
    for i in range(3):
        y, here = sata.sata_attention(*_segment(3 + i, 1, dtype), n_taylor=4, is_causal=True, enable_gqa=True,
                                      state=here, return_state=True)
        outs.append(y)

    _run_python(_CONTINUE, str(path), str(dtype).removeprefix("torch."), str(Path(__file__).parent))
    there = torch.load(str(path) + ".out")
    assert there["n_tokens"] == here.n_tokens == 100 + 70 + 3
    assert torch.equal(there["kv"], here.kv), "state differs after continuing in another process"
    for a, b in zip(there["outs"], outs):
        assert torch.equal(a, b), "outputs differ after continuing in another process"


def test_load_restores_every_field_bit_for_bit(tmp_path):
    st = _small_state(dtype=torch.float64)
    st.save(tmp_path / "s.sata")
    back = sata.SATAState.load(tmp_path / "s.sata", expected=st)
    assert torch.equal(back.kv, st.kv) and back.kv.dtype == torch.float64
    assert (back.n_tokens, back.scale, back.config) == (st.n_tokens, st.scale, st.config)


def test_save_replaces_an_older_file(tmp_path):
    path = tmp_path / "s.sata"
    _small_state(length=3).save(path)
    st = _small_state(length=9)
    st.save(path)
    assert sata.SATAState.load(path).n_tokens == 9
    assert [p.name for p in tmp_path.iterdir()] == ["s.sata"], "temporary files left behind"


# ---------------------------------------------------------------- bad files


@pytest.fixture
def saved(tmp_path) -> tuple[Path, sata.SATAState, bytes]:
    st = _small_state()
    path = tmp_path / "s.sata"
    st.save(path)
    return path, st, path.read_bytes()


@pytest.mark.parametrize("keep", [0, 1, 100, 0.5, -100, -1], ids=lambda k: f"keep-{k}")
def test_truncated_file_raises(saved, keep):
    path, st, data = saved
    n = int(len(data) * keep) if isinstance(keep, float) else (keep if keep >= 0 else len(data) + keep)
    path.write_bytes(data[:n])
    with pytest.raises(StateFileError, match=r"truncated or corrupt|not a SATA state"):
        sata.SATAState.load(path)


def test_corrupted_tensor_bytes_raise(saved):
    path, st, data = saved
    raw = st.kv.detach().contiguous().numpy().tobytes()
    at = data.find(raw)
    assert at > 0, "tensor bytes not found in the file"
    for offset in (0, len(raw) // 2, len(raw) - 1):
        for bit in (0, 7):
            bad = bytearray(data)
            bad[at + offset] ^= 1 << bit
            path.write_bytes(bad)
            with pytest.raises(StateFileError, match="corrupt"):
                sata.SATAState.load(path)


def test_any_single_bit_flip_raises_or_loads_the_same_kv(saved):
    """Every one-bit corruption of the file either raises StateFileError or leaves kv intact."""
    path, st, data = saved
    rng = random.Random(0)
    for i in rng.sample(range(len(data)), 300):
        bad = bytearray(data)
        bad[i] ^= 1 << rng.randrange(8)
        path.write_bytes(bad)
        try:
            back = sata.SATAState.load(path)
        except StateFileError:
            continue
        assert torch.equal(back.kv, st.kv), f"flip at byte {i} loaded a different kv"


def test_bit_flips_in_the_stored_config_are_detected(saved):
    path, st, data = saved
    with zipfile.ZipFile(path) as z:  # torch.save writes a zip; the config lives in the pickle member
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    changed = []
    for i in range(start, start + info.compress_size):
        for bit in (0, 6):
            bad = bytearray(data)
            bad[i] ^= 1 << bit
            path.write_bytes(bad)
            try:
                back = sata.SATAState.load(path)
            except StateFileError:
                continue
            if not (torch.equal(back.kv, st.kv) and back.n_tokens == st.n_tokens and back.scale == st.scale
                    and back.config == st.config):
                changed.append((i, bit, back.n_tokens, back.scale))
    assert not changed, f"{len(changed)} single-bit flips load a different state without error, e.g. {changed[:3]}"


def test_file_from_another_configuration_raises(saved):
    path, st, _ = saved
    other = _small_state(n_taylor=4)
    with pytest.raises(StateFileError, match=r"another configuration \(n_taylor=3 in the file, 4 expected"):
        sata.SATAState.load(path, expected=other)
    with pytest.raises(StateFileError, match=r"d_value=2 in the file, 5 expected"):
        sata.SATAState.load(path, expected={**st.config, "d_value": 5})
    with pytest.raises(StateFileError, match=r"batch_shape"):
        sata.SATAState.load(path, expected={**st.config, "batch_shape": [2]})


@pytest.mark.parametrize("content", ["empty", "text", "tensor", "dict", "other-format", "directory", "missing"])
def test_non_state_files_raise(tmp_path, content):
    path = tmp_path / "x.sata"
    if content == "empty":
        path.write_bytes(b"")
    elif content == "text":
        path.write_text("hello, not a state\n")
    elif content == "tensor":
        torch.save(torch.zeros(3), path)
    elif content == "dict":
        torch.save({"kv": torch.zeros(1, 1, 4, 3)}, path)
    elif content == "other-format":
        torch.save({"format": "sata.SATAState", "version": 99, "kv": torch.zeros(1)}, path)
    elif content == "directory":
        path.mkdir()
    with pytest.raises(StateFileError) as info:
        sata.SATAState.load(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------- crashes during a save

# saves a ~16 MiB state in a loop; every version i holds kv == i and n_tokens == i
_SAVER = """
import sys, torch, sata
path = sys.argv[1]
kv = torch.zeros(1, 64, 165, 400)
i = 0
while True:
    i += 1
    kv.fill_(float(i))
    sata.SATAState(kv=kv, n_taylor=4, d_key=8, d_value=399, scale=0.25, n_tokens=i).save(path)
    print(i, flush=True)
"""


def test_kill_during_save_keeps_the_previous_file_loadable(tmp_path):
    path = tmp_path / "big.sata"
    rng = random.Random(0)
    env = {**os.environ, "PYTHONPATH": SRC}
    last = 0
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(path)], env=env, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()           # one complete save: from now on a valid file exists
            assert first.strip(), "saver produced nothing"
            time.sleep(rng.uniform(0.0, 0.6))         # land somewhere inside a later save
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        st = sata.SATAState.load(path, expected={"n_taylor": 4, "d_key": 8, "d_value": 399, "n_heads": 64})
        assert st.n_tokens >= 1
        assert torch.equal(st.kv, torch.full_like(st.kv, float(st.n_tokens))), "loaded a mixture of two saves"
        last = st.n_tokens
    assert last >= 1
    # a killed save leaves its temporary file behind (harmless: never loaded, hidden name)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "big.sata"]
    assert all(n.startswith(".big.sata.") and n.endswith(".tmp") for n in leftovers), leftovers
