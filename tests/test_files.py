"""Durable writes (sata._files.write_atomic): what a killed writer leaves is removed by the next
write, a running writer's temporary is not, and files get an ordinary file's permissions."""

import os
import subprocess
import sys

import pytest
import torch

import sata
from sata._files import write_atomic


@pytest.fixture
def dead_pid() -> int:
    """The id of a process that has exited (what a writer killed mid-save leaves in its file names)."""
    out = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(out.stdout)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_write_replaces_and_removes_only_temporaries_of_gone_writers(tmp_path, dead_pid):
    target = tmp_path / "results.json"
    target.write_bytes(b"old")
    killed = tmp_path / f".results.json.{dead_pid}.0123abcd.tmp"     # a writer killed before its rename
    legacy = tmp_path / ".results.json.k2j4_x9q.tmp"                 # sata 0.1's mkstemp names (no pid)
    running = tmp_path / f".results.json.{os.getppid()}.89abcdef.tmp"   # a writer still at work
    other = tmp_path / f".other.json.{dead_pid}.0123abcd.tmp"         # another target's: not ours to judge
    for f in (killed, legacy, running, other):
        f.write_bytes(b"partial")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert not killed.exists() and not legacy.exists()
    assert running.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, running.name, other.name])


def test_written_files_get_an_ordinary_files_mode(tmp_path):
    write_atomic(tmp_path / "sub" / "a.bin", b"x")                   # missing parents are created
    assert (tmp_path / "sub" / "a.bin").stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")

    class Unwritable:           # not bytes-like: the write fails after the temporary was created
        pass

    with pytest.raises(TypeError):
        write_atomic(target, Unwritable())
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_state_save_cleans_up_after_a_killed_save(tmp_path, dead_pid):
    state = sata.accumulate_state(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), n_taylor=3)
    path = tmp_path / "stream.sata"
    killed = tmp_path / f".stream.sata.{dead_pid}.0123abcd.tmp"
    killed.write_bytes(b"torn")
    state.save(path)
    assert not killed.exists()
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert torch.equal(sata.SATAState.load(path).kv, state.kv)
