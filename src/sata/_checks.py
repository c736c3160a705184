"""Input validation shared by the op, the oracle and the layers: one clear error per mistake."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .basis import check_n_taylor, feature_dim
from .budget import check_budget, format_bytes, get_memory_budget
from .state import SATAState

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True, eq=False)
class Spec:
    """Shapes and settings of one call, after validation.

    Compared and hashed by identity: :func:`check_inputs` returns one object per distinct call
    shape, so a ``Spec`` keys the per-shape caches of the paths (kernel plans, kernel verdicts).
    """

    batch_shape: torch.Size
    n_q_heads: int
    n_kv_heads: int
    len_q: int
    len_k: int
    d_key: int
    d_value: int
    n_taylor: int
    scale: float
    is_causal: bool
    dtype: torch.dtype          # input and output dtype
    compute_dtype: torch.dtype  # features, scores, products: float32 or float64
    state_dtype: torch.dtype    # accumulation of the state
    device: torch.device
    budget: int         # the memory budget the call was validated against
    batch: int          # prod(batch_shape)
    group: int          # query heads per key/value head
    feature_dim: int    # D


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """States and products accumulate in float32 for half/bfloat16/float32, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_SPEC_CACHE: dict = {}


def check_inputs(
    fn: str, query: object, key: object, value: object, *, n_taylor: object, is_causal: object, scale: object,
    enable_gqa: object, key_padding_mask: object, state: object = None,
) -> Spec:
    """Validate the arguments of ``fn``; return the call's :class:`Spec` or raise with the fix.

    Everything validated is a function of the shapes, dtypes, devices, settings, the state's
    configuration and the budget, so a repeated call (a decode loop) reuses the earlier verdict.
    """
    try:
        mask = key_padding_mask
        # the tensor a state holds, without making a view (kv, or the F-major tensor kv is a view of: either
        # layout fixes the other, the state's configuration being part of the key too)
        st = None if state is None else state._stored()  # type: ignore[attr-defined]
        # a non-tensor never passed the full check, so no key of one is cached: no type() needed
        cache_key = (
            fn, query.shape, key.shape, value.shape,  # type: ignore[attr-defined]
            query.dtype, key.dtype, value.dtype, query.device, key.device, value.device,  # type: ignore[attr-defined]
            type(n_taylor), n_taylor, type(is_causal), is_causal, type(scale), scale, type(enable_gqa), enable_gqa,
            None if mask is None else (type(mask), mask.shape, mask.dtype, mask.device),  # type: ignore[attr-defined]
            None if st is None else (type(state), st.shape, st.dtype, st.device, state.n_taylor,  # type: ignore
                                     state.d_key, state.d_value, state.scale),  # type: ignore[attr-defined]
            get_memory_budget(),
        )
        spec = _SPEC_CACHE.get(cache_key)
    except (AttributeError, TypeError):  # not tensors, or unhashable settings: the full check explains
        cache_key, spec = None, None
    if spec is None:
        spec = _validate(fn, query, key, value, n_taylor, is_causal, scale, enable_gqa, key_padding_mask, state)
        if cache_key is not None and len(_SPEC_CACHE) < 4096:
            _SPEC_CACHE[cache_key] = spec
    return spec


def _validate(fn, query, key, value, n_taylor, is_causal, scale, enable_gqa, key_padding_mask, state) -> Spec:
    """The full check behind :func:`check_inputs`, in the order a reader fixes mistakes."""
    _check_tensors(fn, query, key, value)
    Hq, Hk, Lq, Lk, E, Ev = _check_heads(fn, query, key, value, enable_gqa, is_causal)
    n_taylor = check_n_taylor(n_taylor, f"{fn}: n_taylor")
    scale = _check_scale(fn, scale, E)
    B = query.shape[:-3]
    if key_padding_mask is not None:
        _check_mask(fn, key_padding_mask, (*B, Lk), key.device)
    compute_dtype = compute_dtype_for(query.dtype)
    state_dtype = compute_dtype
    if state is not None:
        expected = dict(n_taylor=n_taylor, d_key=E, d_value=Ev, scale=scale, n_heads=Hk, batch_shape=list(B))
        state_dtype = _check_state(fn, state, expected, query.device, compute_dtype)
    spec = Spec(
        batch_shape=B, n_q_heads=Hq, n_kv_heads=Hk, len_q=Lq, len_k=Lk, d_key=E, d_value=Ev, n_taylor=n_taylor,
        scale=scale, is_causal=is_causal, dtype=query.dtype, compute_dtype=compute_dtype, state_dtype=state_dtype,
        device=query.device, budget=get_memory_budget(), batch=math.prod(B), group=Hq // Hk,
        feature_dim=feature_dim(E, n_taylor),
    )
    _check_budget(fn, spec)
    return spec


def _check_tensors(fn: str, query: object, key: object, value: object) -> None:
    """Tensors of one floating dtype, on one device, with equal batch dimensions."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            raise TypeError(
                f"{fn}: {name} has dtype {t.dtype}; use a floating dtype (float16, bfloat16, float32, float64), "
                f"e.g. {name}.float()"
            )
        if t.dim() < 3:
            raise ValueError(
                f"{fn}: {name} must be [..., heads, length, features] (at least 3 dims), got shape {tuple(t.shape)}; "
                f"add a heads dimension with {name}.unsqueeze(-3)"
            )
    assert isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor) and isinstance(value, torch.Tensor)
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(
            f"{fn}: query, key and value must share one dtype, got {query.dtype}, {key.dtype}, {value.dtype}; "
            "cast them to one dtype"
        )
    if not (query.device == key.device == value.device):
        raise ValueError(
            f"{fn}: query, key and value must be on one device, got {query.device}, {key.device}, {value.device}"
        )
    if not (query.dim() == key.dim() == value.dim()):
        raise ValueError(
            f"{fn}: query, key and value must have the same number of dims, got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if not (query.shape[:-3] == key.shape[:-3] == value.shape[:-3]):
        raise ValueError(
            f"{fn}: batch dimensions differ: query {tuple(query.shape[:-3])}, key {tuple(key.shape[:-3])}, "
            f"value {tuple(value.shape[:-3])}; inputs are [..., heads, length, features] with equal leading dims"
        )


def _check_heads(fn: str, query, key, value, enable_gqa: object, is_causal: object) -> tuple[int, ...]:
    """Heads, lengths and head sizes that fit together; returns ``(Hq, Hkv, Lq, Lk, E, Ev)``."""
    Hq, Lq, E = query.shape[-3:]
    Hk, Lk, Ek = key.shape[-3:]
    Hv, Lv, Ev = value.shape[-3:]
    if Ek != E:
        raise ValueError(f"{fn}: query and key must have the same head size, got {E} and {Ek} (last dim)")
    if E < 1 or Ev < 1:
        raise ValueError(f"{fn}: head sizes must be at least 1, got d_key={E}, d_value={Ev}")
    if Hk != Hv:
        raise ValueError(f"{fn}: key and value must have the same number of heads, got {Hk} and {Hv} (dim -3)")
    if Lk != Lv:
        raise ValueError(f"{fn}: key and value must have the same length, got {Lk} and {Lv} (dim -2)")
    if Hk < 1:
        raise ValueError(f"{fn}: key has zero heads")
    if not isinstance(enable_gqa, bool):
        raise TypeError(f"{fn}: enable_gqa must be a bool, got {enable_gqa!r}")
    if enable_gqa:
        if Hq % Hk:
            raise ValueError(
                f"{fn}: with enable_gqa=True the query heads ({Hq}) must be a multiple of the key/value heads ({Hk})"
            )
    elif Hq != Hk:
        raise ValueError(
            f"{fn}: query has {Hq} heads but key/value have {Hk}; pass enable_gqa=True for grouped-query attention"
        )
    if not isinstance(is_causal, bool):
        raise TypeError(f"{fn}: is_causal must be a bool, got {is_causal!r}")
    if is_causal and Lq != Lk:
        raise ValueError(
            f"{fn}: is_causal=True needs as many queries as keys (query i attends to keys <= i), got Lq={Lq}, Lk={Lk}; "
            "for a few new queries over earlier keys, put the earlier keys in a state and pass only the new tokens"
        )
    return Hq, Hk, Lq, Lk, E, Ev


def _check_scale(fn: str, scale: object, d_key: int) -> float:
    """The score scale as a finite float; ``None`` means ``1 / sqrt(E)``."""
    if scale is None:
        return d_key**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{fn}: scale must be a float or None (default 1/sqrt(E)), got {scale!r}")
    if not math.isfinite(scale):
        raise ValueError(f"{fn}: scale must be finite, got {scale}")
    return float(scale)


def _check_mask(fn: str, mask: object, shape: tuple[int, ...], device: torch.device) -> None:
    """A bool ``key_padding_mask`` of ``shape`` ``(*batch, Lk)`` on the keys' device."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(
            f"{fn}: key_padding_mask must be a bool tensor [..., Lk] (True = ignore that key), got "
            f"{type(mask).__name__ if not isinstance(mask, torch.Tensor) else mask.dtype}"
        )
    if mask.shape != shape:
        raise ValueError(f"{fn}: key_padding_mask must have shape (*batch, Lk) = {shape}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{fn}: key_padding_mask is on {mask.device}, key on {device}")


def _check_state(fn: str, state: object, expected: dict, device: torch.device, compute_dtype: torch.dtype):
    """A :class:`SATAState` of the call's configuration (``expected``, as :attr:`SATAState.config`)
    on its device; returns the dtype the state accumulates in."""
    if not isinstance(state, SATAState):
        raise TypeError(f"{fn}: state must be a sata.SATAState or None, got {type(state).__name__}")
    diffs = state._config_diffs(expected)
    if diffs:
        raise ValueError(
            f"{fn}: state comes from another configuration: "
            f"{', '.join(f'{k}={ours!r} (call: {call!r})' for k, ours, call in diffs)}; continue a stream with the "
            "same n_taylor, scale, head sizes, heads and batch it was started with"
        )
    if state.device != device:
        raise ValueError(f"{fn}: state is on {state.device} but inputs are on {device}; move it with state.to(device)")
    if state.dtype == torch.float32 and compute_dtype == torch.float64:
        raise TypeError(
            f"{fn}: a float32 state cannot continue with float64 inputs without losing precision; "
            "use state.to(dtype=torch.float64)"
        )
    return state.dtype


def _check_budget(fn: str, spec: Spec) -> None:
    """The state and the smallest working set (one query and one key row of features) fit the budget."""
    D, Hk, Ev = spec.feature_dim, spec.n_kv_heads, spec.d_value
    itemsize = spec.state_dtype.itemsize
    state_bytes = spec.batch * Hk * D * (Ev + 1) * itemsize
    work_bytes = spec.batch * (spec.n_q_heads + Hk) * D * itemsize
    check_budget(
        state_bytes + work_bytes,
        f"{fn}: n_taylor={spec.n_taylor} with d_key={spec.d_key} gives D={D:,} features per head; a state of "
        f"{spec.batch} x {Hk} heads x {D:,} x {Ev + 1} ({format_bytes(state_bytes)}) plus features",
        "Use fewer Taylor terms or smaller heads (cost grows like d^(n_taylor-1)).",
    )


def refuse_inplace(state, return_state: bool) -> None:
    """Why ``inplace=True`` cannot be honoured: no state to update, or autograd."""
    if state is None or not return_state:
        raise ValueError("sata_attention: inplace=True updates a state: pass state=... and return_state=True")
    raise ValueError(
        "sata_attention: inplace=True cannot be used under autograd (inputs, the state, or taylor_mix / recentre "
        "tensors require grad): "
        "the state would lose its history; use inplace=False, or torch.no_grad() for serving"
    )
