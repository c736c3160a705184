"""Durable file writes: atomic replacement, the permissions of an ordinary file, no stale temporaries.

Every file sata writes for later reading (states, model weights, JSON results) goes through
:func:`write_atomic`: the bytes go to ``.<name>.<pid>.<random>.tmp`` beside the target, are
fsynced, and the temporary is renamed over the target, so a reader sees the old file or the new
one, never a torn one. A writer killed before the rename leaves its temporary behind; the next
write to the same target removes every temporary whose writer is no longer running.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

__all__ = ["make_parent", "unwritable", "write_atomic"]


def write_atomic(path: str | os.PathLike, data: bytes | bytearray | memoryview) -> None:
    """Replace ``path`` by ``data`` atomically (temporary file, fsync, rename, fsync of the folder).

    The file is created with mode ``0o666`` less the umask (``0644`` usually), like ``open(path, "w")``,
    not ``0600`` as a ``tempfile.mkstemp`` temporary would leave it. Creates missing parent folders.
    """
    path = make_parent(path)
    _remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):   # the rename itself durable (not possible on every platform)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def unwritable(option: str, path: str | os.PathLike) -> str | None:
    """Why the command-line output file ``path`` given to ``option`` (e.g. ``--json``) cannot be written, or None:
    checked before the work whose results it holds, so a typo does not cost a long run. Missing folders on the
    way are allowed: the writer makes them (``write_atomic`` does; other writers call ``make_parent``)."""
    path = os.fspath(path)
    if path.endswith(("/", os.sep)) or os.path.isdir(path) or not _can_create_in(os.path.dirname(os.path.abspath(path))):
        return (f"{option} {path}: not a file that can be written here (a directory, a read-only folder, or a file "
                "where a folder should be); give a file path in a writable folder")
    return None


def make_parent(path: str | os.PathLike) -> Path:
    """``path`` as a Path, its folder made if missing (what :func:`unwritable` allowed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _can_create_in(folder: str) -> bool:
    """A file can be created in ``folder``, or in its nearest existing ancestor (missing folders are made when the
    file is written); tried, as permissions alone say yes to root, and to /proc."""
    import tempfile

    while not os.path.isdir(folder):
        if os.path.exists(folder) or os.path.dirname(folder) == folder:
            return False  # a file where a folder should be
        folder = os.path.dirname(folder)
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".sata-write-check-")
    except OSError:
        return False
    os.close(fd)
    os.remove(probe)
    return True


def _remove_stale_temporaries(path: Path) -> None:
    """Delete ``.<name>.*.tmp`` beside ``path`` left by writers that are gone (killed mid-write).

    A temporary whose name carries the id of a running process (another writer, right now) is kept;
    one without a process id (written by sata 0.1) is stale.
    """
    prefix = f".{path.name}."
    for tmp in path.parent.glob(f"{_glob_escape(prefix)}*.tmp"):
        middle = tmp.name[len(prefix):-len(".tmp")]
        pid = middle.split(".", 1)[0]
        if pid.isdigit() and "." in middle and _running(int(pid)):
            continue
        with contextlib.suppress(OSError):
            tmp.unlink()


def _running(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":   # Windows: os.kill(pid, 0) would send CTRL_C_EVENT
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):   # another user's process, or no way to tell: keep its file
        return True
    return True


def _glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)
