"""Optional fused CPU kernels, compiled on first use with the system C++ compiler.

A decode step in plain PyTorch is about twenty small operator calls whose fixed
overheads dominate at batch 1; the fused kernel in ``decode.cpp`` does the whole step in
one pass over the state, ``decode_window.cpp`` the window mode's step (``MATH.md`` section 6:
the far state, the window and the sinks), ``prefill.cpp`` the chunked causal (or
state-then-read) prefill, ``prefill_window.cpp`` the window mode's chunked causal prefill
(shared pieces in ``prefill.h`` and ``window.h``).
They are plain C++ called through ``ctypes`` with one argument struct per kernel
(``kernels.h``), built in a few seconds with ``g++ -O3 -march=native -fopenmp`` against
torch's headers only for ``at::parallel_for``: the kernels share torch's intra-op thread
pool (``torch.set_num_threads``) and fan out only when the work pays for the threads.

When no compiler is available, the build fails, or ``SATA_DISABLE_KERNELS=1`` is set, every
call takes the PyTorch path, which computes the same thing (both are tested against the
oracle); a build failure says so once per process (a ``RuntimeWarning``). The shared library
is cached in ``$SATA_KERNEL_CACHE`` (default ``~/.cache/sata``) under a hash of the sources,
flags, compiler, CPU and torch build, and is checked against this module's ABI number and
struct sizes on load (a disagreeing file is rebuilt). ``$SATA_KERNEL_ARCH`` builds for a ``-march``
target other than this CPU.

Plans bind a configuration's constants once; :func:`decode_plan` and :func:`prefill_plan`
cache them (window decode plans are cached by ``sata._paths.window_kernel``, window prefill plans by
``sata._paths.window_prefill``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from ..basis import get_basis

_SOURCES = [Path(__file__).with_name(name) for name in ("kernels.h", "decode.h", "decode.cpp", "decode_window.cpp", "prefill.h", "prefill.cpp", "window.h", "prefill_window.cpp")]
_ABI = 11  # SATA_KERNEL_ABI in kernels.h
_TORCH = Path(torch.__file__).parent
_FLAGS = ["-O3", "-shared", "-fPIC", "-std=c++17", f"-I{_TORCH / 'include'}",
          f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
# torch's libraries (at::parallel_for and its thread count), already loaded in this process
_LINK = [f"-L{_TORCH / 'lib'}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{_TORCH / 'lib'}"]
_BUILD_TIMEOUT = 300.0  # seconds per compiler call; a build takes 5-20 s on 2 (busy) cores
# Flops (2 F D per key and per query, kernels.h: work) a call needs per thread before it takes
# more than one: about 2.5 ms of one core's work. benchmarks/kernel_threads.py threshold, 2 cores:
# on a quiet machine a second thread pays from a single decode step (~20 us); beside busy processes
# a fan-out cost 10-30 ms per call whatever the work, and two threads broke even only from ~100 ms
# calls. So decode steps up to ~150 sequences of 64 heads and prefill calls up to ~500 tokens stay
# on the calling thread (at most 2x slower on an idle machine, never a time slice per step on a
# busy one) and long calls fan out. Decode streams the state through memory (~13 GFLOP/s per core
# here), prefill computes (~40), hence one figure each.
_WORK_PER_THREAD = {"decode": 3e7, "prefill": 1e8}
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


def _optional() -> list[list[str]]:
    """Flag sets tried in order: the first this compiler accepts is used (without OpenMP the kernels run
    serially). ``$SATA_KERNEL_ARCH`` names a target other than this CPU (``haswell``, ``x86-64-v3``: a
    library for machines of several kinds), and then only builds for it are tried."""
    arch = os.environ.get("SATA_KERNEL_ARCH", "")
    if arch:
        return [[f"-march={arch}", "-fopenmp"], [f"-march={arch}"]]
    return [["-march=native", "-fopenmp"], ["-fopenmp"], []]


def _compile(cxx: str, out: str, timeout: float = _BUILD_TIMEOUT) -> None:
    """Compile the sources into the shared library ``out`` with the first optional flag set ``cxx`` accepts."""
    err = ""
    for extra in _optional():
        cmd = [cxx, *_FLAGS, *extra, *(str(p) for p in _SOURCES if p.suffix == ".cpp"), "-o", out, *_LINK]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{cxx} did not finish within {timeout:g} s") from None
        if proc.returncode == 0:
            return
        err = proc.stderr.strip()[-2000:] or f"exit status {proc.returncode}"
    raise RuntimeError(f"{cxx} failed: {err}")


class _DecodeArgs(ctypes.Structure):
    _fields_ = [("N", ctypes.c_int64), ("G", ctypes.c_int64), ("d", ctypes.c_int64), ("Ev", ctypes.c_int64),
                ("D", ctypes.c_int64), ("P", ctypes.c_int64), ("prefix_len", ctypes.c_void_p),
                ("weight", ctypes.c_void_p), ("sq", ctypes.c_double), ("sk", ctypes.c_double),
                ("work_per_thread", ctypes.c_double)]


class _PrefillArgs(ctypes.Structure):
    _fields_ = [("Hkv", ctypes.c_int64), ("G", ctypes.c_int64), ("d", ctypes.c_int64), ("Ev", ctypes.c_int64),
                ("D", ctypes.c_int64), ("P", ctypes.c_int64), ("prefix_len", ctypes.c_void_p),
                ("weight", ctypes.c_void_p), ("sq", ctypes.c_double), ("sk", ctypes.c_double),
                ("work_per_thread", ctypes.c_double), ("causal", ctypes.c_int64)]


class _View(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("b", ctypes.c_int64), ("h", ctypes.c_int64), ("l", ctypes.c_int64)]


class _PrefillTensors(ctypes.Structure):
    _fields_ = [("B", ctypes.c_int64), ("Lq", ctypes.c_int64), ("Lk", ctypes.c_int64), ("q", _View), ("k", _View),
                ("v", _View), ("y", _View), ("keep", ctypes.c_void_p), ("S", ctypes.c_void_p),
                ("s_b", ctypes.c_int64), ("s_h", ctypes.c_int64), ("s_d", ctypes.c_int64), ("s_f", ctypes.c_int64)]


class _WindowDecodeArgs(ctypes.Structure):
    _fields_ = [("base", _DecodeArgs), ("Hkv", ctypes.c_int64), ("W", ctypes.c_int64), ("S", ctypes.c_int64),
                ("recentre", ctypes.c_int64)]


class _WindowDecodeTensors(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ("q", "k", "v", "keep", "S_in", "S_out", "y", "win_k", "win_v",
                                                     "win_keep", "sink_k", "sink_v", "sink_pos", "key_centre",
                                                     "alpha", "beta")] + [("n_tokens", ctypes.c_int64)] + [
        (name, ctypes.c_void_p) for name in ("win_k_src", "win_v_src", "win_keep_src", "sink_k_src", "sink_v_src",
                                             "sink_pos_src", "q_far", "k_far")]


class _WindowPrefillArgs(ctypes.Structure):
    _fields_ = [("base", _PrefillArgs), ("W", ctypes.c_int64), ("S", ctypes.c_int64), ("recentre", ctypes.c_int64)]


class _WindowPrefillTensors(ctypes.Structure):
    _fields_ = [("B", ctypes.c_int64), ("L", ctypes.c_int64)] + [
        (name, ctypes.c_void_p) for name in ("q", "k_win", "v_win", "k", "v", "flag", "sink_k", "sink_v", "sink_pos",
                                             "key_centre", "alpha", "beta", "S", "y")] + [("n_tokens", ctypes.c_int64)] + [
        ("q_far", ctypes.c_void_p), ("k_far", ctypes.c_void_p)]


# every field of the window decode tensors is 8 bytes (pointers and int64), in order: filled as one int64 array
_WORDS = len(_WindowDecodeTensors._fields_)
assert ctypes.sizeof(_WindowDecodeTensors) == 8 * _WORDS and ctypes.sizeof(ctypes.c_void_p) == 8

# sata_struct_size(0, 1, ...)
_STRUCTS = (_DecodeArgs, _PrefillArgs, _PrefillTensors, _WindowDecodeArgs, _WindowDecodeTensors, _WindowPrefillArgs,
            _WindowPrefillTensors)


def _open(path: str) -> ctypes.CDLL:
    """Load a built library and declare its entry points; ``RuntimeError`` if it is not this module's ABI."""
    lib = ctypes.CDLL(path)
    try:
        abi, size = lib.sata_kernel_abi, lib.sata_struct_size
    except AttributeError:
        raise RuntimeError("the library exports no ABI number") from None
    abi.restype = size.restype = ctypes.c_int64
    size.argtypes = [ctypes.c_int64]
    sizes = [size(i) for i in range(len(_STRUCTS))]
    if abi() != _ABI or sizes != [ctypes.sizeof(s) for s in _STRUCTS]:
        raise RuntimeError(f"the library has ABI {abi()} and struct sizes {sizes}, this module expects ABI {_ABI} "
                           f"and {[ctypes.sizeof(s) for s in _STRUCTS]}")
    ptr = ctypes.c_void_p
    for name in ("sata_decode_f32", "sata_decode_f32s64", "sata_decode_f64"):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = [ptr] * 8, ctypes.c_int
    for name in ("sata_prefill_f32", "sata_prefill_f32s64", "sata_prefill_f64", "sata_decode_window_f32",
                 "sata_decode_window_f32s64", "sata_decode_window_f64", "sata_prefill_window_f32",
                 "sata_prefill_window_f32s64", "sata_prefill_window_f64"):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = [ptr, ptr], ctypes.c_int
    return lib


def _library_path(cxx: str) -> Path:
    """Where the library built by ``cxx`` for these sources, flags, CPU and torch is cached."""
    key = hashlib.sha256(b"\0".join([*(p.read_bytes() for p in _SOURCES), repr((_FLAGS, _LINK, _optional())).encode(),
                                     cxx.encode(), _cpu_id().encode(), platform.machine().encode(),
                                     torch.__version__.encode()])).hexdigest()[:16]
    cache = Path(os.environ.get("SATA_KERNEL_CACHE") or Path.home() / ".cache" / "sata")
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        cache = Path(tempfile.gettempdir()) / "sata-kernels"
        cache.mkdir(parents=True, exist_ok=True)
    return cache / f"kernels-{key}.so"


def _build() -> ctypes.CDLL:
    """The library from the cache, or built into it (and rebuilt when the cached file does not load or match)."""
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx}) on PATH")
    target = _library_path(cxx)
    if target.exists():
        try:
            return _open(str(target))
        except (OSError, RuntimeError):
            pass  # truncated, foreign or stale: rebuild below
    # build beside the target, load it under its own name (a stale library loaded above keeps the
    # target's name in this process) and only then rename: no process ever loads a partial file
    fd, tmp = tempfile.mkstemp(prefix=".kernels-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        _compile(cxx, tmp)
        lib = _open(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled library, or ``None`` (PyTorch path) if it is disabled or cannot be built.

    A failure to build or load warns once per process and is not retried."""
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
                warnings.warn(
                    f"sata: the fused CPU kernels are unavailable ({e}); calls without autograd take the PyTorch "
                    "path instead (same results, slower decoding and prefill). Set SATA_DISABLE_KERNELS=1 to "
                    "choose that path without this warning.", RuntimeWarning, stacklevel=2)
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


def _failed(kind: str) -> MemoryError:
    return MemoryError(f"the fused {kind} kernel could not allocate its workspace; free memory, or set "
                       "SATA_DISABLE_KERNELS=1 to use the PyTorch path")


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
        self._args = _DecodeArgs(N, G, d, Ev, basis.dim, basis.n_taylor, self._prefix_len.data_ptr(),
                                 self._weight.data_ptr(), sq, sk, _WORK_PER_THREAD["decode"])
        self._args_ptr = ctypes.addressof(self._args)
        self.state_shape = state_shape   # (*batch, Hkv, F, D): the kernel's state layout
        self.out_shape = out_shape       # (*batch, Hq, 1, Ev)
        self.out_like_query = d == Ev    # then the output has the query's shape

    def __call__(self, q, k, v, keep, S_in, S_out, y) -> None:
        if self._fn(self._args_ptr, q.data_ptr(), k.data_ptr(), v.data_ptr(), None if keep is None else keep.data_ptr(),
                    S_in.data_ptr(), S_out.data_ptr(), y.data_ptr()):
            raise _failed("decode")


IN_PLACE = (0,) * 6  # no source buffers: the window decode step updates the state's own


class WindowDecodePlan:
    """The fused window-mode decode step (``MATH.md`` section 6) for one configuration, its constants bound once.

    Call with contiguous CPU tensors, ``T`` the plan's compute dtype, ``TS`` its state dtype: q ``[N, G, d]``,
    k ``[N, d]``, v ``[N, Ev]`` in T (``N`` = batch x kv heads); keep ``[B]`` uint8 or ``None``; S_in / S_out
    ``[N, F, D]`` in TS (may be one tensor: in place); y ``[N, G, Ev]`` in T; ``exact``, the data pointers of the
    state's window and sink buffers (:meth:`sata.state.ExactKeys.tensors` order, contiguous, batch x kv heads
    flattened, TS; updated in place); key_centre ``[N, d]`` in TS or ``None``; alpha and beta ``[Hkv G]`` in T
    (alpha read only by a re-centring plan); n_tokens, the positions before the step; source, the data pointers of
    the state's six buffers before the step (``exact`` order) when ``exact`` holds new (uninitialised) buffers,
    which the kernel fills from them (all 0: in place); far, the data pointers of the far part's own queries
    ``[N, G, d]`` and of its version of the key the step absorbs ``[N, d]``, both T (``(0, 0)``: q and that key).
    """

    def __init__(self, lib, N: int, G: int, d: int, Ev: int, basis, dtype: torch.dtype, sq: float, sk: float,
                 state_dtype: torch.dtype, Hkv: int, window: int, sinks: int, recentre: bool):
        self._prefix_len, self._weight = _hierarchy(basis, dtype)
        self._fn = _entry(lib, "decode_window", dtype, state_dtype)
        base = _DecodeArgs(N, G, d, Ev, basis.dim, basis.n_taylor, self._prefix_len.data_ptr(), self._weight.data_ptr(),
                           sq, sk, _WORK_PER_THREAD["decode"])
        self._args = _WindowDecodeArgs(base, Hkv, window, sinks, int(recentre))
        self._args_ptr = ctypes.addressof(self._args)
        self._local = threading.local()  # one tensors struct per calling thread: the kernel reads it unlocked

    def __call__(self, q, k, v, keep, S_in, S_out, y, exact: tuple, key_centre, alpha, beta, n_tokens: int,
                 source: tuple = IN_PLACE, far: tuple = (0, 0)) -> None:
        words = getattr(self._local, "words", None)
        if words is None:  # the struct, and its 8-byte fields as one int64 array (one assignment fills it)
            self._local.tensors = _WindowDecodeTensors()
            words = self._local.words = (ctypes.c_int64 * _WORDS).from_buffer(self._local.tensors)
            self._local.address = ctypes.addressof(self._local.tensors)
        words[:] = (q.data_ptr(), k.data_ptr(), v.data_ptr(), 0 if keep is None else keep.data_ptr(), S_in.data_ptr(),
                    S_out.data_ptr(), y.data_ptr(), *exact, 0 if key_centre is None else key_centre.data_ptr(),
                    alpha.data_ptr(), beta.data_ptr(), n_tokens, *source, *far)
        if self._fn(self._args_ptr, self._local.address):
            raise _failed("window decode")


class WindowPrefillPlan:
    """The fused window-mode causal prefill (``MATH.md`` section 6) for one configuration, its constants bound once.

    Call with contiguous CPU tensors, ``T`` the plan's compute dtype, ``TS`` its state dtype, ``N = B Hkv``:
    q ``[N, G, L, d]``; the state's window, oldest first, k_win ``[N, W, d]``, v_win ``[N, W, Ev]``; the call's
    k ``[N, L, d]``, v ``[N, L, Ev]``, all T; flag ``[B, W + L]`` uint8 (1 = a kept key that is not a sink, window
    then call); sink_k ``[N, S, d]``, sink_v ``[N, S, Ev]`` in T (the sinks after the call), sink_pos ``[B, S]``
    int64; key_centre ``[N, d]`` T or ``None``; alpha, beta ``[Hkv G]`` T; S ``[N, F, D]`` TS, updated in place;
    y ``[N, G, L, Ev]`` T; n_tokens, the positions before the call; q_far ``[N, G, L, d]``, k_far ``[N, L, d]`` T or
    ``None``: the far part's own queries and keys (a converted hybrid's maps; only for a stream's first call).
    """

    def __init__(self, lib, Hkv: int, G: int, d: int, Ev: int, basis, dtype: torch.dtype, sq: float, sk: float,
                 state_dtype: torch.dtype, window: int, sinks: int, recentre: bool):
        self._prefix_len, self._weight = _hierarchy(basis, dtype)
        self._fn = _entry(lib, "prefill_window", dtype, state_dtype)
        base = _PrefillArgs(Hkv, G, d, Ev, basis.dim, basis.n_taylor, self._prefix_len.data_ptr(),
                            self._weight.data_ptr(), sq, sk, _WORK_PER_THREAD["prefill"], 1)
        self._args = _WindowPrefillArgs(base, window, sinks, int(recentre))
        self._args_ptr = ctypes.addressof(self._args)
        self._shape = (Hkv, G, d, Ev, basis.dim, window, sinks, dtype, state_dtype)

    def __call__(self, q, k_win, v_win, k, v, flag, sink_k, sink_v, sink_pos, key_centre, alpha, beta, S, y,
                 n_tokens: int, q_far=None, k_far=None) -> None:
        Hkv, G, d, Ev, D, W, Sn, dt, sdt = self._shape
        B, L = flag.shape[0], q.shape[-2]
        N = B * Hkv
        # the kernel reads raw memory: anything that disagrees with the plan would read out of bounds
        want = [(q, (N, G, L, d), dt), (k_win, (N, W, d), dt), (v_win, (N, W, Ev), dt), (k, (N, L, d), dt),
                (v, (N, L, Ev), dt), (flag, (B, W + L), torch.uint8), (sink_k, (N, Sn, d), dt),
                (sink_v, (N, Sn, Ev), dt), (sink_pos, (B, Sn), torch.int64), (key_centre, (N, d), dt),
                (alpha, (Hkv * G,), dt), (beta, (Hkv * G,), dt), (S, (N, Ev + 1, D), sdt), (y, (N, G, L, Ev), dt),
                (q_far, (N, G, L, d), dt), (k_far, (N, L, d), dt)]
        for t, shape, dtype in want:
            if t is not None and (tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous()):
                raise ValueError(f"window prefill kernel: a {tuple(t.shape)} {t.dtype} tensor where the plan needs a "
                                 f"contiguous {shape} {dtype} one")
        ptr = lambda t: None if t is None else t.data_ptr()
        t = _WindowPrefillTensors(B, L, *(ptr(x) for x in (q, k_win, v_win, k, v, flag, sink_k, sink_v, sink_pos,
                                                            key_centre, alpha, beta, S, y)), n_tokens,
                                    ptr(q_far), ptr(k_far))
        if self._fn(self._args_ptr, ctypes.addressof(t)):
            raise _failed("window prefill")


def _view(t: torch.Tensor) -> _View:
    return _View(t.data_ptr(), *t.stride()[:3])


class PrefillPlan:
    """The fused chunked prefill (causal) or state-build-then-read (non-causal) for one configuration.

    ``PrefillPlan(lib, Hkv, G, d, Ev, basis, dtype, sq, sk, causal, state_dtype=None)``: no
    lengths, so one plan serves every batch size and length. The former form
    ``PrefillPlan(lib, B, Hkv, G, Lq, Lk, d, Ev, basis, dtype, sq, sk, causal, state_dtype=None)``
    is still accepted (its ``B``, ``Lq``, ``Lk`` are ignored) until every caller uses
    :func:`prefill_plan`.

    Call with CPU tensors in the plan's dtype, each ``[B, H, L, X]`` with a contiguous last dimension
    (any other strides): q ``[B, Hkv*G, Lq, d]``, k ``[B, Hkv, Lk, d]``, v ``[B, Hkv, Lk, Ev]``,
    y ``[B, Hkv*G, Lq, Ev]``; keep ``[B, Lk]`` uint8 contiguous or ``None``; S ``[B, Hkv, D, F]``
    (any strides; updated in place). Causal plans need ``Lq == Lk``.
    """

    def __init__(self, lib, *args, state_dtype: torch.dtype | None = None):
        if len(args) == 13:  # the former form with a positional state_dtype
            *args, state_dtype = args
        if len(args) == 12:  # the former form: (B, Hkv, G, Lq, Lk, d, Ev, basis, dtype, sq, sk, causal)
            args = (*args[1:3], *args[5:])
        Hkv, G, d, Ev, basis, dtype, sq, sk, causal = args
        self._prefix_len, self._weight = _hierarchy(basis, dtype)
        self._fn = _entry(lib, "prefill", dtype, state_dtype or dtype)
        self._args = _PrefillArgs(Hkv, G, d, Ev, basis.dim, basis.n_taylor, self._prefix_len.data_ptr(),
                                  self._weight.data_ptr(), sq, sk, _WORK_PER_THREAD["prefill"], int(causal))
        self._args_ptr = ctypes.addressof(self._args)
        self._shape = (Hkv, G, d, Ev, basis.dim, bool(causal))

    def __call__(self, q, k, v, keep, S, y) -> None:
        B, Lq, Lk = q.shape[0], q.shape[2], k.shape[2]
        Hkv, G, d, Ev, D, causal = self._shape
        # the kernel reads raw memory: shapes that disagree with the plan would read out of bounds
        if (q.shape, k.shape, v.shape, y.shape, S.shape) != ((B, Hkv * G, Lq, d), (B, Hkv, Lk, d), (B, Hkv, Lk, Ev),
                                                            (B, Hkv * G, Lq, Ev), (B, Hkv, D, Ev + 1)) or (
                causal and Lq != Lk) or (keep is not None and keep.shape != (B, Lk)):
            raise ValueError(f"prefill kernel: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                             f"y {tuple(y.shape)}, S {tuple(S.shape)} do not fit the plan (Hkv={Hkv}, G={G}, "
                             f"d={d}, Ev={Ev}, D={D}, causal={causal})")
        t = _PrefillTensors(B, Lq, Lk, _view(q), _view(k), _view(v), _view(y), None if keep is None else keep.data_ptr(),
                            S.data_ptr(), *S.stride())
        if self._fn(self._args_ptr, ctypes.addressof(t)):
            raise _failed("prefill")


def _require() -> ctypes.CDLL:
    lib = load()
    if lib is None:
        raise RuntimeError(f"the fused CPU kernels are not in use ({_status}); check sata._kernels.load() first")
    return lib


@functools.lru_cache(maxsize=256)
def decode_plan(N: int, G: int, d: int, Ev: int, n_taylor: int, dtype: torch.dtype, sq: float, sk: float,
                state_dtype: torch.dtype, state_shape: tuple, out_shape: tuple) -> DecodePlan:
    """The cached :class:`DecodePlan` for ``N`` (batch x kv) heads of ``G`` query heads each, head sizes
    ``d`` / ``Ev``, ``n_taylor`` terms, compute / state dtypes and input scales ``sq``, ``sk``."""
    return DecodePlan(_require(), N, G, d, Ev, get_basis(d, n_taylor, "cpu", dtype), dtype, sq, sk,
                      state_dtype=state_dtype, state_shape=state_shape, out_shape=out_shape)


@functools.lru_cache(maxsize=256)
def prefill_plan(Hkv: int, G: int, d: int, Ev: int, n_taylor: int, dtype: torch.dtype, sq: float, sk: float,
                 causal: bool, state_dtype: torch.dtype) -> PrefillPlan:
    """The cached :class:`PrefillPlan` for ``Hkv`` kv heads of ``G`` query heads each (any batch and length)."""
    return PrefillPlan(_require(), Hkv, G, d, Ev, get_basis(d, n_taylor, "cpu", dtype), dtype, sq, sk, causal,
                       state_dtype=state_dtype)
