"""Optional fused CPU kernels, compiled on first use with the system C++ compiler.

A decode step in plain PyTorch is about twenty small operator calls whose fixed
overheads dominate at batch 1; the fused kernel in ``decode.cpp`` does the whole step in
one pass over the state. It has no dependency on torch headers, builds in about a second
with ``g++ -O3 -march=native -fopenmp`` and is called through ``ctypes``. When no compiler
is available, the build fails, or ``SATA_DISABLE_KERNELS=1`` is set, every call takes the
PyTorch path, which computes the same thing (both are tested against the oracle).
The shared library is cached in ``$SATA_KERNEL_CACHE`` (default ``~/.cache/sata``).
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

_SOURCES = [Path(__file__).with_name(name) for name in ("decode.cpp", "prefill.cpp")]
_FLAGS = ["-O3", "-shared", "-fPIC", "-std=c++17"]
# tried in order: the first set this compiler accepts is used
_OPTIONAL = [["-march=native", "-fopenmp"], ["-fopenmp"], []]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_status = "not built yet"
_tables: dict = {}


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("model name", "flags"))), "")
    except OSError:
        return platform.processor()


def _build() -> ctypes.CDLL:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx}) on PATH")
    key = hashlib.sha256(b"\0".join([*(p.read_bytes() for p in _SOURCES), repr((_FLAGS, _OPTIONAL)).encode(),
                                     cxx.encode(), _cpu_id().encode(), platform.machine().encode()])).hexdigest()[:16]
    cache = Path(os.environ.get("SATA_KERNEL_CACHE") or Path.home() / ".cache" / "sata")
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        cache = Path(tempfile.gettempdir()) / "sata-kernels"
        cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"kernels-{key}.so"
    if not target.exists():
        # build beside the target and rename: concurrent processes never load a partial file
        fd, tmp = tempfile.mkstemp(prefix=".kernels-", suffix=".so", dir=cache)
        os.close(fd)
        try:
            for extra in _OPTIONAL:
                proc = subprocess.run([cxx, *_FLAGS, *extra, *map(str, _SOURCES), "-o", tmp], capture_output=True, text=True)
                if proc.returncode == 0:
                    break
            else:
                raise RuntimeError(f"{cxx} failed: {proc.stderr.strip()[-2000:]}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    i64, ptr, f64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
    for name in ("sata_decode_f32", "sata_decode_f32s64", "sata_decode_f64"):
        fn = getattr(lib, name)
        fn.argtypes = [i64] * 6 + [ptr] * 9 + [f64, f64, ctypes.c_int]
        fn.restype = None
    for name in ("sata_prefill_f32", "sata_prefill_f32s64", "sata_prefill_f64"):
        fn = getattr(lib, name)
        fn.argtypes = ([i64] * 9 + [ptr] + [i64] * 3 + [ptr] + [i64] * 3 + [ptr] + [i64] * 3 + [ptr, ptr]
                       + [i64] * 4 + [ptr] + [i64] * 3 + [ptr, ptr, f64, f64, ctypes.c_int, ctypes.c_int])
        fn.restype = None
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled library, or ``None`` (PyTorch path) if it is disabled or cannot be built."""
    global _lib, _status
    if _lib is not None:
        return _lib
    if os.environ.get("SATA_DISABLE_KERNELS", "") not in ("", "0"):
        _status = "disabled by SATA_DISABLE_KERNELS"
        return None
    if _status != "not built yet":
        return None
    with _lock:
        if _lib is None and _status == "not built yet":
            try:
                _lib = _build()
                _status = "ok"
            except Exception as e:  # any failure means: use the PyTorch path
                _status = f"unavailable: {e}"
    return _lib


def status() -> str:
    """``'ok'``, ``'not built yet'``, or why the kernels are not in use."""
    return _status


def _entry(lib, kind: str, dtype: torch.dtype, state_dtype: torch.dtype):
    """The compiled function for (compute dtype, state dtype)."""
    suffix = {(torch.float32, torch.float32): "f32", (torch.float32, torch.float64): "f32s64",
              (torch.float64, torch.float64): "f64"}[(dtype, state_dtype)]
    return getattr(lib, f"sata_{kind}_{suffix}")


def supports(dtype: torch.dtype, state_dtype: torch.dtype) -> bool:
    """Whether the kernels handle inputs computed in ``dtype`` with a state in ``state_dtype``."""
    return (dtype, state_dtype) in ((torch.float32, torch.float32), (torch.float32, torch.float64),
                                    (torch.float64, torch.float64))


def _hierarchy(basis, dtype: torch.dtype):
    """``prefix_len [(P-2) d]`` and ``weight [D-1-d]`` as contiguous CPU tensors (cached)."""
    key = (basis.d, basis.n_taylor, dtype)
    if key not in _tables:
        d = basis.d
        lens = [math.comb(j + p - 1, p - 1) for p in range(2, basis.n_taylor) for j in range(d)]
        # a vector of zero padding: the decode kernel reads whole vectors past the last segment
        weight = torch.cat([basis.weight.cpu().to(dtype), torch.zeros(16, dtype=dtype)])
        _tables[key] = (torch.tensor(lens, dtype=torch.long), weight)
    return _tables[key]


class DecodePlan:
    """The fused decode step for one configuration, with its constant arguments bound once.

    Call with tensors on the CPU, contiguous, in the plan's dtype: q ``[N, G, d]``, k ``[N, d]``,
    v ``[N, Ev]`` (any shapes with that memory layout), keep ``[N]`` uint8 or ``None``,
    S_in / S_out ``[N, F, D]`` (may be the same tensor: in-place), y ``[N, G, Ev]``.
    """

    def __init__(self, lib, N: int, G: int, d: int, Ev: int, basis, dtype: torch.dtype, sq: float, sk: float,
                 state_dtype: torch.dtype | None = None, state_shape: tuple = (), out_shape: tuple = ()):
        self._prefix_len, self._weight = _hierarchy(basis, dtype)
        self._fn = _entry(lib, "decode", dtype, state_dtype or dtype)
        self._head = (N, G, d, Ev, basis.dim, basis.n_taylor)
        self._tail = (self._prefix_len.data_ptr(), self._weight.data_ptr(), sq, sk)
        self.state_shape = state_shape   # (*batch, Hkv, F, D): the kernel's state layout
        self.out_shape = out_shape       # (*batch, Hq, 1, Ev)

    def __call__(self, q, k, v, keep, S_in, S_out, y) -> None:
        self._fn(*self._head, q.data_ptr(), k.data_ptr(), v.data_ptr(), None if keep is None else keep.data_ptr(),
                 S_in.data_ptr(), S_out.data_ptr(), y.data_ptr(), *self._tail, torch.get_num_threads())


class PrefillPlan:
    """The fused chunked prefill (causal) or state-build-then-read (non-causal) for one configuration.

    Call with CPU tensors in the plan's dtype, each ``[B, H, L, X]`` with a contiguous last dimension
    (any other strides): q ``[B, Hkv*G, Lq, d]``, k ``[B, Hkv, Lk, d]``, v ``[B, Hkv, Lk, Ev]``,
    y ``[B, Hkv*G, Lq, Ev]``; keep ``[B, Lk]`` uint8 contiguous or ``None``; S ``[B, Hkv, D, F]``
    (any strides; updated in place).
    """

    def __init__(self, lib, B: int, Hkv: int, G: int, Lq: int, Lk: int, d: int, Ev: int, basis,
                 dtype: torch.dtype, sq: float, sk: float, causal: bool, state_dtype: torch.dtype | None = None):
        self._prefix_len, self._weight = _hierarchy(basis, dtype)
        self._fn = _entry(lib, "prefill", dtype, state_dtype or dtype)
        self._head = (B, Hkv, G, Lq, Lk, d, Ev, basis.dim, basis.n_taylor)
        self._tail = (self._prefix_len.data_ptr(), self._weight.data_ptr(), sq, sk, int(causal))

    def __call__(self, q, k, v, keep, S, y) -> None:
        args = []
        for t in (q, k, v):
            args += [t.data_ptr(), *t.stride()[:3]]
        self._fn(*self._head, *args, None if keep is None else keep.data_ptr(), S.data_ptr(), *S.stride(),
                 y.data_ptr(), *y.stride()[:3], *self._tail, torch.get_num_threads())
