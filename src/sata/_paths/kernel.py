"""Glue to the fused CPU kernels of :mod:`sata._kernels` (``MATH.md`` section 3).

- :func:`usable`: whether the kernels can serve a call shape (device, dtypes, workspace, compiler).
- :func:`decode`: the ``decode_kernel`` path, one token for every sequence and head: the rank-1
  update ``S += phi(k) [v, 1]^T`` and the read-out ``phi(q)^T S`` in one pass over the state.
- :func:`prefill`: the ``prefill_kernel`` path: chunked causal prefill, or, non-causal, the state
  built over all keys and then read by all queries.
- :func:`causal_block`: one block of the chunked path without autograd.

The kernels read raw memory through ``ctypes``: inputs in the compute dtype with a contiguous last
dimension are used in place, others are converted in bounded segments. Plans (a kernel's constant
arguments, bound once) are cached per call shape here, never on the shape itself.
"""

from __future__ import annotations

import functools

import torch

from .. import _kernels
from .._checks import Spec
from ..basis import get_basis
from ..features import _split_scale
from .tuning import Tuning

# call shapes whose kernel verdicts and decode plans are kept (a server may see many)
_CACHE_SIZE = 4096
_USABLE: dict[Spec, bool] = {}
_DECODE_PLANS: dict[Spec, _kernels.DecodePlan] = {}


def _remember(cache: dict, spec: Spec, value):
    if len(cache) >= _CACHE_SIZE:  # start over rather than grow with every shape ever seen
        cache.clear()
    cache[spec] = value
    return value


def cache_sizes() -> dict[str, int]:
    return {"kernel_verdicts": len(_USABLE), "decode_plans": len(_DECODE_PLANS),
            "prefill_plans": _prefill_plan.cache_info().currsize}


@functools.cache
def available() -> bool:
    """The kernels are compiled and loaded: one fact per process, asked only when a call could use them."""
    return _kernels.load() is not None


def usable(spec: Spec) -> bool:
    """The kernels can serve calls of this shape: CPU, float32/float64 compute, a workspace within a
    quarter of the budget, and a compiler (cached per shape)."""
    ok = _USABLE.get(spec)
    if ok is None:
        ok = _remember(_USABLE, spec, spec.device.type == "cpu"
                       and _kernels.supports(spec.compute_dtype, spec.state_dtype)
                       and _workspace(spec) <= spec.budget // 4 and available())
    return ok


def _workspace(spec: Spec) -> int:
    """Bytes the kernels allocate besides inputs, outputs and the state (all threads)."""
    D, F, c, s = spec.feature_dim, spec.d_value + 1, spec.compute_dtype.itemsize, spec.state_dtype.itemsize
    threads = torch.get_num_threads()
    Fp = -(-F // 16) * 16
    prefill = D * Fp * (s + (c if s != c else 0)) + (1 + spec.group) * D * 32 * c   # state copy, features of a chunk
    decode = -(-spec.batch * spec.n_kv_heads // threads) * (1 + spec.group) * (D + 16) * c
    return threads * max(prefill, decode)


# ---------------------------------------------------------------------------- decode
def _decode_plan(spec: Spec) -> _kernels.DecodePlan:
    basis = get_basis(spec.d_key, spec.n_taylor, spec.device, spec.compute_dtype)
    return _remember(_DECODE_PLANS, spec, _kernels.DecodePlan(
        _kernels.load(), spec.batch * spec.n_kv_heads, spec.group, spec.d_key, spec.d_value, basis,
        spec.compute_dtype, *_split_scale(spec.scale), state_dtype=spec.state_dtype,
        state_shape=(*spec.batch_shape, spec.n_kv_heads, spec.d_value + 1, spec.feature_dim),
        out_shape=(*spec.batch_shape, spec.n_q_heads, 1, spec.d_value),
    ))


def decode(query, key, value, spec: Spec, mask, state, need_state: bool, inplace: bool, tuning: Tuning):
    """One token for every sequence and head: ``[..., Hq, 1, E] -> [..., Hq, 1, Ev]``.

    Contiguous inputs in the compute dtype are used as they are, and a D-contiguous state (every
    state this library makes) without a copy; ``inplace`` writes the new state over it. Returns the
    output and the new state as the D-contiguous ``[..., Hkv, F, D]`` tensor. This is the per-token
    path of a decode loop: every line here is paid once per token.
    """
    plan = _DECODE_PLANS.get(spec) or _decode_plan(spec)
    cd = spec.compute_dtype
    query, key, value = step_inputs(query, key, value, cd)
    keep = None
    if mask is not None:  # [B, 1] -> one flag per (batch, kv head)
        keep = (~mask).to(torch.uint8).reshape(spec.batch, 1).expand(spec.batch, spec.n_kv_heads).contiguous()
    if state is None:  # a fresh state is private: update it in place
        S_in, inplace = torch.zeros(plan.state_shape, dtype=spec.state_dtype), True   # [..., Hkv, F, D]
    else:
        S_in = state._fmajor()
        if S_in is None:  # a state in another layout (e.g. loaded from a file): a private copy
            S_in, inplace = state.kv.mT.contiguous(), True
    S_out = S_in if inplace else torch.empty_like(S_in)                       # [..., Hkv, F, D]
    # the output: like the query when it has the query's shape (the cheapest allocation)
    y = torch.empty_like(query) if plan.out_like_query else torch.empty(plan.out_shape, dtype=cd)
    plan(query, key, value, keep, S_in, S_out, y)
    if spec.dtype is not cd:
        y = y.to(spec.dtype)
    return y, S_out


def step_inputs(query, key, value, cd: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decode step's inputs as the kernels read them: contiguous, in the compute dtype (half inputs are
    converted, as every path computes in float32 for them); already so: the same tensors, no copy."""
    # (three plain tests: a generator here cost ~0.4 us a decode step)
    if query.dtype is not cd or not query.is_contiguous():
        query = query.to(cd).contiguous()
    if key.dtype is not cd or not key.is_contiguous():
        key = key.to(cd).contiguous()
    if value.dtype is not cd or not value.is_contiguous():
        value = value.to(cd).contiguous()
    return query, key, value


# ---------------------------------------------------------------------------- prefill
@functools.lru_cache(maxsize=64)
def _prefill_plan(B: int, Hkv: int, G: int, Lq: int, Lk: int, d: int, Ev: int, n_taylor: int, scale: float,
                  dtype: torch.dtype, state_dtype: torch.dtype, causal: bool) -> _kernels.PrefillPlan:
    """The one place a prefill plan is made (cached per shape and lengths)."""
    basis = get_basis(d, n_taylor, torch.device("cpu"), dtype)
    return _kernels.PrefillPlan(_kernels.load(), B, Hkv, G, Lq, Lk, d, Ev, basis, dtype, *_split_scale(scale), causal,
                                state_dtype=state_dtype)


def _plan(spec: Spec, Lq: int, Lk: int, causal: bool) -> _kernels.PrefillPlan:
    """The prefill plan of this call shape for ``Lq`` queries and ``Lk`` keys."""
    return _prefill_plan(spec.batch, spec.n_kv_heads, spec.group, Lq, Lk, spec.d_key, spec.d_value, spec.n_taylor,
                         spec.scale, spec.compute_dtype, spec.state_dtype, causal)


def prefill(query, key, value, spec: Spec, mask, state, need_state: bool, inplace: bool, tuning: Tuning):
    """Causal chunked prefill, or non-causal state build then read: ``[..., Hq, Lq, E] -> [..., Hq, Lq, Ev]``.

    Inputs in the compute dtype are read in place through their strides (a ``[B, L, H, E]``
    tensor transposed to ``[B, H, L, E]`` is not copied) and the output is written in place.
    Other inputs go through in segments of tokens, converted one segment at a time, so the extra
    memory stays bounded however long the sequence. Returns the output and the new state as the
    D-contiguous ``[..., Hkv, F, D]`` tensor.
    """
    B, Hkv, Hq, Lq, Ev, cd = spec.batch, spec.n_kv_heads, spec.n_q_heads, spec.len_q, spec.d_value, spec.compute_dtype
    F, D = Ev + 1, spec.feature_dim
    q4, k4, v4 = (_as_4d(t, B) for t in (query, key, value))                  # [B, H, L, X]
    keep = None if mask is None else (~mask).to(torch.uint8).reshape(B, spec.len_k).contiguous()   # [B, Lk]
    kvT = torch.empty((B, Hkv, F, D), dtype=spec.state_dtype)                 # [B, Hkv, F, D]
    if state is None:
        kvT.zero_()
    else:
        kvT.copy_(state.kv.reshape(B, Hkv, D, F).mT)
    y = torch.empty((B, Hq, Lq, Ev), dtype=spec.dtype)                        # [B, Hq, Lq, Ev]
    if spec.dtype == cd and all(t.stride(-1) == 1 for t in (q4, k4, v4)):
        _plan(spec, Lq, spec.len_k, spec.is_causal)(q4, k4, v4, keep, kvT.mT, y)   # updates kvT in place
    else:
        _prefill_segments(spec, q4, k4, v4, keep, kvT, y, tuning.segment_bytes)
    return y.view(*spec.batch_shape, Hq, Lq, Ev), kvT.view(*spec.batch_shape, Hkv, F, D)


def _prefill_segments(spec: Spec, q4, k4, v4, keep, kvT, y, nbytes: int) -> None:
    """:func:`prefill` on inputs the kernel cannot read in place, converted span by span
    (:func:`_segments`); updates ``kvT`` and writes ``y`` in place."""
    B, Hq, Ev, cd = spec.batch, spec.n_q_heads, spec.d_value, spec.compute_dtype
    size = lambda r: 0 if r is None else r.stop - r.start
    # converted inline, a span's inputs are freed as its call returns, before the next span's are made
    conv = lambda t, r: (t.new_empty((B, t.shape[1], 0, t.shape[-1]), dtype=cd) if r is None
                         else t[:, :, r].to(cd).contiguous())
    for qs, ks in _segments(spec, nbytes):
        y_seg = torch.empty((B, Hq, size(qs), Ev), dtype=cd)                  # [B, Hq, T, Ev]
        _plan(spec, size(qs), size(ks), spec.is_causal)(
            conv(q4, qs), conv(k4, ks), conv(v4, ks), None if keep is None or ks is None else keep[:, ks].contiguous(),
            kvT.mT, y_seg,
        )
        if qs is not None:
            y[:, :, qs] = y_seg


def _segments(spec: Spec, nbytes: int) -> list[tuple[slice | None, slice | None]]:
    """The ``(queries, keys)`` token spans of successive kernel calls (``None``: none), each converting
    at most about ``nbytes`` of inputs.

    Causal: spans of queries, keys and values together, carrying the state exactly like one call.
    Non-causal: every key span (no queries), then every query span (no keys).
    """
    heads, width = spec.n_q_heads + spec.n_kv_heads, spec.d_key + spec.d_value
    per_token = spec.batch * heads * width * spec.compute_dtype.itemsize
    seg = max(32, nbytes // max(per_token, 1) // 32 * 32)
    spans = lambda n: [slice(a, min(a + seg, n)) for a in range(0, n, seg)]
    if spec.is_causal:
        return [(r, r) for r in spans(spec.len_q)]
    return [(None, r) for r in spans(spec.len_k)] + [(r, None) for r in spans(spec.len_q)]


def _as_4d(t: torch.Tensor, B: int) -> torch.Tensor:
    """``[..., H, L, X] -> [B, H, L, X]``, a view whenever the batch dimensions allow it."""
    if t.dim() == 4:
        return t
    try:
        return t.view(B, *t.shape[-3:])
    except RuntimeError:
        return t.reshape(B, *t.shape[-3:])


# ---------------------------------------------------------------------------- chunked, no autograd
def causal_block(q, k, v, mask, S, *, run):
    """:func:`sata._paths.chunked.causal_block` through the fused kernel (no autograd): same arguments
    and results; ``S`` is not modified (it may be a saved block start)."""
    B, Hkv, g, T, E = q.shape
    cd = run.cd
    q4 = q.flatten(1, 2)                                                        # [B, Hkv g, T, E]
    q4, k, v = (t if t.dtype == cd and t.stride(-1) == 1 else t.to(cd).contiguous() for t in (q4, k, v))
    keep = None if mask is None else (~mask).to(torch.uint8).contiguous()      # [B, T]
    S_new = S.clone()                                                           # [B, Hkv, F, D]
    y = torch.empty(B, Hkv * g, T, run.spec.d_value, dtype=cd)                  # [B, Hkv g, T, Ev]
    _plan(run.spec, T, T, True)(q4, k, v, keep, S_new.mT, y)
    return y.view(B, Hkv, g, T, run.spec.d_value).to(run.spec.dtype), S_new
