"""Fuzzing: random shapes, dtypes, masks, splits and states against the O(n^2) oracle.

Every valid configuration must agree with ``sata.naive_sata_attention`` evaluated in float64
on the same inputs, streamed in any split, with finite outputs; every invalid one must raise
``ValueError``/``TypeError`` naming the argument. Profiles (``tests/conftest.py``): ``ci``
(default, derandomized, ~1 minute) and ``long`` (``--hypothesis-profile=long``, ~30 minutes).

Tolerances follow a forward error bound. A row's output is ``sum_j w_j v_j / z`` with
``w_j = T_P(s_j)`` and ``z = sum_j w_j``; computing the weights through features sums terms
bounded by ``A = sum_j T_P(|scale| |q| . |k_j|)``, so rounding errors are ``O(eps A / z)``
relative to ``max |v|``. Rows with ``A / z`` beyond ``1 / sqrt(eps)`` (an even ``n_taylor``
whose normaliser nearly cancels) are only required to be finite, and in float16/bfloat16 not
even that: their exact value can exceed the dtype's range (as the oracle's does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st

import sata

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# unit roundoff of the arithmetic (float32 for half inputs) and of the returned dtype
COMPUTE_EPS = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-24, torch.bfloat16: 2.0**-24}
OUTPUT_EPS = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# headroom of the bound for the lengths and feature sizes drawn here
SLACK = 512


@dataclass(frozen=True)
class Config:
    batch_shape: tuple[int, ...]
    n_kv_heads: int
    group: int
    gqa: bool
    d_key: int
    d_value: int
    n_taylor: int
    scale: float | None
    dtype: torch.dtype
    magnitude: float
    mask_p: float | None
    layout: str          # memory layout of q, k, v (same values): the fused kernels read strides
    seed: int

    @property
    def n_q_heads(self) -> int:
        return self.n_kv_heads * self.group


@st.composite
def configs(draw, dtypes=DTYPES) -> Config:
    group = draw(st.integers(1, 3))
    return Config(
        batch_shape=tuple(draw(st.lists(st.sampled_from([1, 1, 2, 3, 0]), max_size=2))),
        n_kv_heads=draw(st.integers(1, 3)),
        group=group,
        gqa=group > 1 or draw(st.booleans()),
        d_key=draw(st.integers(1, 6)),
        d_value=draw(st.integers(1, 5)),
        n_taylor=draw(st.integers(1, 5)),
        # default, the edges, and any scale of a sensible size (either sign: a negative one flips scores)
        scale=draw(st.one_of(st.none(), st.sampled_from([0.0, 1e-4, 1.0, -1.0]), st.floats(1e-3, 1.5),
                             st.floats(-1.5, -1e-3))),
        dtype=draw(st.sampled_from(dtypes)),
        magnitude=draw(st.sampled_from([1.0, 1.0, 0.0, 1e-3, 3.0])),
        mask_p=draw(st.sampled_from([None, None, 0.2, 0.7, 1.0])),
        layout=draw(st.sampled_from(["contiguous", "contiguous", "BLHE", "strided", "expanded"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _tensors(cfg: Config, len_q: int, len_k: int):
    """q, k, v in ``cfg.dtype`` and a key padding mask, from ``cfg.seed``."""
    g = torch.Generator().manual_seed(cfg.seed)
    B, E, Ev = cfg.batch_shape, cfg.d_key, cfg.d_value
    q = torch.randn(*B, cfg.n_q_heads, len_q, E, generator=g, dtype=torch.float64) * cfg.magnitude
    k = torch.randn(*B, cfg.n_kv_heads, len_k, E, generator=g, dtype=torch.float64) * cfg.magnitude
    v = torch.randn(*B, cfg.n_kv_heads, len_k, Ev, generator=g, dtype=torch.float64)
    mask = None if cfg.mask_p is None else torch.rand(*B, len_k, generator=g) < cfg.mask_p
    return *(_layout(t.to(cfg.dtype), cfg.layout) for t in (q, k, v)), mask


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` (or, for ``expanded``, its first batch entry repeated) in another memory layout."""
    if layout == "BLHE":      # [..., L, H, E] memory seen as [..., H, L, E], as from a projection
        return x.transpose(-3, -2).contiguous().transpose(-3, -2)
    if layout == "strided":   # every other element of a wider tensor: last-dim stride 2
        wide = torch.full((*x.shape[:-1], 2 * x.shape[-1]), 7.0, dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    if layout == "expanded" and x.dim() > 3 and x.shape[0] > 1:   # stride 0 along the batch
        return x[:1].expand_as(x)
    return x


def _scale(cfg: Config) -> float:
    return cfg.d_key**-0.5 if cfg.scale is None else cfg.scale


def _oracle_and_bound(cfg: Config, q, k, v, mask, is_causal: bool):
    """Oracle output in float64 and the per-row error bound ``[..., Hq, Lq, 1]`` (inf: ill-conditioned row)."""
    q64, k64, v64 = (t.double() for t in (q, k, v))
    gqa = dict(enable_gqa=cfg.gqa)
    ref = sata.naive_sata_attention(q64, k64, v64, n_taylor=cfg.n_taylor, is_causal=is_causal, scale=cfg.scale,
                                    key_padding_mask=mask, **gqa)
    kk, vv = k64.repeat_interleave(cfg.group, -3), v64.repeat_interleave(cfg.group, -3)
    sc = _scale(cfg)
    w = sata.taylor_exp(sc * q64 @ kk.mT, cfg.n_taylor)                          # [..., Hq, Lq, Lk]
    A = sata.taylor_exp(abs(sc) * q64.abs() @ kk.abs().mT, cfg.n_taylor)         # [..., Hq, Lq, Lk]
    keep = torch.ones_like(w, dtype=torch.bool)
    if is_causal:
        keep &= torch.ones(w.shape[-2:], dtype=torch.bool).tril()
    if mask is not None:
        keep &= ~mask[..., None, None, :]
    z = (w * keep).sum(-1, keepdim=True)
    A = (A * keep).sum(-1, keepdim=True)
    vmax = vv.abs().amax(dim=(-2, -1), keepdim=True) if vv.shape[-2] else torch.zeros_like(z)
    eps = COMPUTE_EPS[cfg.dtype]
    cond = A / z.clamp_min(1e-300)
    bound = SLACK * eps * cond * (vmax + ref.abs().amax(-1, keepdim=True)) + 2 * OUTPUT_EPS[cfg.dtype] * ref.abs().amax(-1, keepdim=True)
    ill = (z <= 0) | (cond > eps**-0.5)
    exact_zero = keep.sum(-1, keepdim=True) == 0                                # no keys at all: output must be 0
    return ref, torch.where(ill & ~exact_zero, torch.inf, bound), exact_zero


def _check_rows(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, exact_zero: torch.Tensor, what: str):
    assert out.dtype == ref.dtype or out.shape == ref.shape
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != oracle {tuple(ref.shape)}"
    # finite inputs give finite outputs, except where the exact value itself overflows the output
    # dtype: an even n_taylor lets the normaliser nearly cancel, so float16 can overflow (as the oracle)
    representable = ref.abs().amax(-1, keepdim=True) <= torch.finfo(out.dtype).max / 2
    if out.dtype in (torch.float16, torch.bfloat16):
        representable &= torch.isfinite(bound)
    finite = torch.isfinite(out).all(-1, keepdim=True)
    assert (finite | ~representable).all(), f"{what}: non-finite output from finite inputs"
    err = (out.double() - ref).abs().amax(-1, keepdim=True)
    bad = err > bound
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} rows beyond the error bound; worst error {err[bad].max().item():.3g} "
        f"with bound {bound[bad].min().item():.3g}"
    )
    assert (out[exact_zero.expand_as(out)] == 0).all(), f"{what}: a query without keys must output 0"


def _check_state(cfg: Config, state: sata.SATAState, k, v, mask, what: str):
    """``state.kv`` against ``phi(K)^T [V, 1]`` in float64, within ``eps |phi(K)|^T |[V, 1]|``."""
    k64, v64 = k.double(), v.double()
    # keys carry sqrt(|scale|); the sign of a negative scale rides on the query side
    phi = sata.taylor_features(k64, cfg.n_taylor, scale=abs(_scale(cfg)))          # [..., Hkv, L, D]
    vt = torch.cat([v64, torch.ones_like(v64[..., :1])], -1)                       # [..., Hkv, L, F]
    if mask is not None:
        vt = vt.masked_fill(mask[..., None, :, None], 0.0)
    exact = phi.mT @ vt
    bound = SLACK * COMPUTE_EPS[cfg.dtype] * (phi.abs().mT @ vt.abs()) + 1e-300
    assert torch.isfinite(state.kv).all(), f"{what}: non-finite state"
    err = (state.kv.double() - exact).abs()
    assert (err <= bound).all(), f"{what}: state error {(err / bound).max().item():.3g} x the bound"


# ---------------------------------------------------------------- causal streams


@st.composite
def splits(draw, length: int) -> list[int]:
    """Sorted cut points in ``[0, length]``: segments of any size, 0 and 1 included."""
    cuts = draw(st.lists(st.integers(0, length), max_size=4))
    return sorted(cuts)


@given(cfg=configs(), data=st.data())
def test_causal_stream_matches_oracle(cfg: Config, data):
    """Causal prefill in arbitrary pieces (first piece optionally absorbed without outputs) equals the oracle."""
    L = data.draw(st.integers(0, 96), label="length")
    cuts = data.draw(splits(L), label="cuts")
    absorb_first = data.draw(st.booleans(), label="absorb first piece with accumulate_state")
    grad = data.draw(st.booleans(), label="requires_grad (autograd path)")
    inplace = not grad and data.draw(st.booleans(), label="inplace")
    q, k, v, mask = _tensors(cfg, L, L)
    ref, bound, zero = _oracle_and_bound(cfg, q, k, v, mask, is_causal=True)
    if grad:
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    opts = dict(n_taylor=cfg.n_taylor, scale=cfg.scale)
    bounds = [0, *cuts, L]
    state, outs, start = None, [], 0
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        m = None if mask is None else mask[..., a:b]
        if i == 0 and absorb_first:
            state = sata.accumulate_state(k[..., a:b, :], v[..., a:b, :], key_padding_mask=m, **opts)
            start = b
            continue
        out, state = sata.sata_attention(
            q[..., a:b, :], k[..., a:b, :], v[..., a:b, :], is_causal=True, enable_gqa=cfg.gqa, key_padding_mask=m,
            state=state, return_state=True, inplace=inplace and state is not None, **opts,
        )
        outs.append(out)
    assert state is not None and state.n_tokens == L
    out = torch.cat(outs, dim=-2) if outs else ref[..., :0, :].to(cfg.dtype)
    assert out.dtype == cfg.dtype
    s = slice(start, L)
    _check_rows(out.detach(), ref[..., s, :], bound[..., s, :], zero[..., s, :], f"causal stream {bounds}")
    _check_state(cfg, state.detach(), k.detach(), v.detach(), mask, "final state")


# ---------------------------------------------------------------- non-causal with a state


@given(cfg=configs(), data=st.data())
def test_noncausal_over_state_matches_oracle(cfg: Config, data):
    """Keys absorbed into a state in pieces, then non-causal queries over state + remaining keys."""
    Lq = data.draw(st.integers(0, 40), label="queries")
    Lk = data.draw(st.integers(0, 80), label="keys")
    cuts = data.draw(splits(Lk), label="cuts")
    grad = data.draw(st.booleans(), label="requires_grad")
    q, k, v, mask = _tensors(cfg, Lq, Lk)
    ref, bound, zero = _oracle_and_bound(cfg, q, k, v, mask, is_causal=False)
    if grad:
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    opts = dict(n_taylor=cfg.n_taylor, scale=cfg.scale)
    bounds = [0, *cuts, Lk]
    state = None
    for a, b in zip(bounds[:-2], bounds[1:-1]):
        state = sata.accumulate_state(k[..., a:b, :], v[..., a:b, :], state=state,
                                      key_padding_mask=None if mask is None else mask[..., a:b], **opts)
    a = bounds[-2]
    out, state = sata.sata_attention(q, k[..., a:, :], v[..., a:, :], enable_gqa=cfg.gqa, state=state,
                                     key_padding_mask=None if mask is None else mask[..., a:], return_state=True, **opts)
    assert out.dtype == cfg.dtype and state.n_tokens == Lk
    _check_rows(out.detach(), ref, bound, zero, f"non-causal over a state {bounds}")
    _check_state(cfg, state.detach(), k.detach(), v.detach(), mask, "state")


# ---------------------------------------------------------------- gradients


@given(cfg=configs(dtypes=[torch.float64]), data=st.data())
def test_gradients_match_oracle(cfg: Config, data):
    """d/d(q, k, v) of a random linear functional of the output equals the oracle's (float64)."""
    causal = data.draw(st.booleans(), label="causal")
    Lq = data.draw(st.integers(0, 40), label="queries")
    Lk = Lq if causal else data.draw(st.integers(0, 40), label="keys")
    q, k, v, mask = _tensors(cfg, Lq, Lk)
    ref, bound, zero = _oracle_and_bound(cfg, q, k, v, mask, is_causal=causal)
    assume(bool(torch.isfinite(bound).all()))     # gradients of an ill-conditioned row are ill-conditioned too
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(cfg.seed + 1), dtype=torch.float64)
    grads = []
    for fn in (sata.sata_attention, sata.naive_sata_attention):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*x, n_taylor=cfg.n_taylor, scale=cfg.scale, is_causal=causal, enable_gqa=cfg.gqa, key_padding_mask=mask)
        if not out.requires_grad:                 # empty inputs: nothing to differentiate
            assert out.numel() == 0 or Lk == 0
            return
        grads.append(torch.autograd.grad((out * w).sum(), x, allow_unused=True))
    cond = float((bound / (SLACK * COMPUTE_EPS[cfg.dtype])).max()) if bound.numel() else 1.0
    # one scale for all three: a gradient that is exactly 0 in the oracle (a lone key) is ~eps elsewhere
    scale = max((b.abs().max().item() for b in grads[1] if b is not None and b.numel()), default=0.0)
    for name, a, b in zip("qkv", *grads):
        if a is None or b is None:
            assert a is None or not a.any(), f"d{name}: nonzero where the oracle has none"
            continue
        assert torch.isfinite(a).all(), f"d{name}: non-finite gradient"
        err = (a - b).abs().max().item() if a.numel() else 0.0
        note(f"d{name}: err {err:.3g} scale {scale:.3g} cond {cond:.3g}")
        assert err <= 1e-9 * max(cond, 1.0) * max(scale, 1e-30), f"d{name}: error {err:.3g} vs {scale:.3g}"


# ---------------------------------------------------------------- invalid input

MUTATIONS = [
    "query-2d", "int-key", "dtype-mix", "heads-mismatch", "gqa-not-multiple", "head-size", "value-length",
    "causal-lengths", "n_taylor-0", "n_taylor-float", "n_taylor-bool", "scale-nan", "scale-inf", "scale-str",
    "mask-dtype", "mask-shape", "state-config", "state-type", "state-float32-for-float64", "is_causal-int",
    "batch-mismatch",
]


@settings(max_examples=5 * settings.default.max_examples)   # cheap: no oracle
@given(cfg=configs(dtypes=[torch.float64, torch.float32]), mutation=st.sampled_from(MUTATIONS),
       length=st.integers(1, 20))
def test_invalid_input_raises_clear_error(cfg: Config, mutation: str, length: int):
    q, k, v, mask = _tensors(cfg, length, length)
    kw = dict(n_taylor=cfg.n_taylor, is_causal=False, scale=cfg.scale, enable_gqa=cfg.gqa, key_padding_mask=mask)
    match = {
        "query-2d": "query", "int-key": "key", "dtype-mix": "dtype", "heads-mismatch": "heads",
        "gqa-not-multiple": "heads", "head-size": "head size", "value-length": "length", "causal-lengths": "is_causal",
        "n_taylor-0": "n_taylor", "n_taylor-float": "n_taylor", "n_taylor-bool": "n_taylor", "scale-nan": "scale",
        "scale-inf": "scale", "scale-str": "scale", "mask-dtype": "key_padding_mask", "mask-shape": "key_padding_mask",
        "state-config": "state", "state-type": "state", "state-float32-for-float64": "state", "is_causal-int": "is_causal",
        "batch-mismatch": "batch",
    }[mutation]
    if mutation == "query-2d":
        q = q.reshape(-1, q.shape[-1])
    elif mutation == "int-key":
        k = k.to(torch.int64)
    elif mutation == "dtype-mix":
        v = v.to(torch.float16)
    elif mutation == "heads-mismatch":
        k, v = torch.cat([k, k], -3), torch.cat([v, v], -3)
        kw["enable_gqa"] = False
        assume(q.shape[-3] != k.shape[-3])
    elif mutation == "gqa-not-multiple":
        k, v = torch.cat([k, k, k[..., :1, :, :]], -3), torch.cat([v, v, v[..., :1, :, :]], -3)
        assume(q.shape[-3] % k.shape[-3] != 0)
        kw["enable_gqa"] = True
    elif mutation == "head-size":
        k = torch.cat([k, k], -1)
    elif mutation == "value-length":
        v = torch.cat([v, v], -2)
    elif mutation == "causal-lengths":
        k, v = torch.cat([k, k], -2), torch.cat([v, v], -2)
        kw.update(is_causal=True, key_padding_mask=None)
    elif mutation == "n_taylor-0":
        kw["n_taylor"] = 0
    elif mutation == "n_taylor-float":
        kw["n_taylor"] = 3.0
    elif mutation == "n_taylor-bool":
        kw["n_taylor"] = True
    elif mutation == "scale-nan":
        kw["scale"] = math.nan
    elif mutation == "scale-inf":
        kw["scale"] = -math.inf
    elif mutation == "scale-str":
        kw["scale"] = "0.5"
    elif mutation == "mask-dtype":
        kw["key_padding_mask"] = torch.zeros(*cfg.batch_shape, length, dtype=torch.float32)
    elif mutation == "mask-shape":
        kw["key_padding_mask"] = torch.zeros(*cfg.batch_shape, length + 1, dtype=torch.bool)
    elif mutation == "state-config":
        kw["state"] = sata.SATAState.zeros(cfg.batch_shape, cfg.n_kv_heads, cfg.d_key, cfg.d_value, cfg.n_taylor + 1)
    elif mutation == "state-type":
        kw["state"] = torch.zeros(3)
    elif mutation == "state-float32-for-float64":
        assume(cfg.dtype == torch.float64)
        kw["state"] = sata.SATAState.zeros(cfg.batch_shape, cfg.n_kv_heads, cfg.d_key, cfg.d_value, cfg.n_taylor,
                                           cfg.scale, dtype=torch.float32)
    elif mutation == "is_causal-int":
        kw["is_causal"] = 1
    elif mutation == "batch-mismatch":
        q = torch.cat([q[None], q[None]])
        k, v = k[None], v[None]
        kw["key_padding_mask"] = None
    with pytest.raises((ValueError, TypeError), match=match):
        sata.sata_attention(q, k, v, **kw)
