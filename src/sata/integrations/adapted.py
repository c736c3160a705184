r"""The converted hybrid (issue 17): the window mode with learned query/key maps on its Taylor part.

A converted layer attends exactly (softmax) to the ``window`` most recent keys and the first ``sinks``
keys with its original queries and keys, and to every older key through the Taylor series of
per-head *adapted* queries and keys ``q' = A_h^T q``, ``k' = B_g^T k`` (``[E, E]`` maps after the
rotary embedding), re-centred per query and weighted by a per-head ``beta``, under one normaliser
(``MATH.md`` section 6 with two score sets: ``s`` for the exact part, ``s'`` for the far part):

.. math::
    y_i = \frac{\sum_{E_i} e^{s_{ij} - m_i} v_j + \beta e^{c_i - m_i} \sum_{F_i} T_P(s'_{ij} - c_i) v_j}
               {\text{the same with } 1 \text{ for } v_j},\qquad c_i = \mu'_i - \alpha\,\sigma'_i

(``mu', sigma'``: mean and deviation of ``s'_ij`` over ``F_i``). With identity maps this is exactly
:func:`sata.sata_attention` in the window mode; one pair ``(q, k)`` cannot express it otherwise, so
this module carries its own two forms: the quadratic one (training, prefill; blocks of queries,
checkpointed under autograd) and a constant-memory decode step (:class:`AdaptedState`: the far
Taylor state in float64, the window's and the sinks' keys and values).

Config (saved with the model): ``sata_qk_adapter=True``, ``sata_window``, ``sata_sinks``,
``sata_layer_recentre`` and ``sata_layer_taylor_mix`` (``[n_layers][Hq]``: alpha and beta per layer and
head); the maps live in ``sata_adapters.safetensors`` beside the weights and are attached on first use.
"""

from __future__ import annotations

import functools
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

import sata
from sata._checks import check_inputs, compute_dtype_for
from sata._paths import window_kernel, window_prefill
from sata._paths.window import window_attention
from sata.exact_keys import ExactKeys
from sata.hybrid import Hybrid, centre, centre_coefficients, check_hybrid, combine, exact_part

__all__ = ["ADAPTER_FILE", "AdaptedState", "QKAdapter", "adapted_attention", "adapter_for", "adapter_state_dict",
           "attach_adapters", "decode_step", "kernel_decode_step", "prefill", "quadratic_attention", "start_state",
           "to_adapted_state"]

ADAPTER_FILE = "sata_adapters.safetensors"
_BLOCK = 256  # queries per block of the quadratic form
# the length from which adapted_attention takes the chunked form through PyTorch (under autograd, or where the
# fused kernel does not serve the call): with SmolLM2's heads (9 of 64 on 3 kv heads, n_taylor 3, window 64,
# 4 sinks; one layer, one thread) the quadratic form takes 0.17 / 0.51 / 2.35 s at 1K / 2K / 4K tokens without
# autograd against PyTorch's chunked 0.51 / 0.77 / 1.73 s (the kernel's: 0.11 / 0.16 / 0.42 s), and 1.6-1.9 /
# 6.9 s against 3.8 / 6.6 s forward and backward at 2K / 4K (PyTorch builds 2,145 features per query and key)
CHUNKED_FROM = 4096


class QKAdapter(torch.nn.Module):
    """One layer's learned pieces: query/key maps ``[Hq, E, E]`` / ``[Hkv, E, E]``, alpha ``[Hq]``, beta ``[Hq]``.

    ``beta = exp(log_beta)`` keeps the mix positive. Default: identity maps, ``alpha = 0`` (centre at the
    mean), ``beta = 1``.
    """

    def __init__(self, n_q_heads: int, n_kv_heads: int, head_dim: int, alpha: float = 0.0, beta: float = 1.0):
        super().__init__()
        eye = torch.eye(head_dim)
        self.q_map = torch.nn.Parameter(eye.repeat(n_q_heads, 1, 1))               # [Hq, E, E]
        self.k_map = torch.nn.Parameter(eye.repeat(n_kv_heads, 1, 1))              # [Hkv, E, E]
        self.alpha = torch.nn.Parameter(torch.full((n_q_heads,), float(alpha)))    # [Hq]
        self.log_beta = torch.nn.Parameter(torch.full((n_q_heads,), math.log(beta)))

    @property
    def beta(self) -> torch.Tensor:
        return self.log_beta.exp()

    def map_q(self, q: torch.Tensor) -> torch.Tensor:
        """``[B, Hq, L, E] -> [B, Hq, L, E]``: ``q'_h = A_h^T q_h``."""
        return q @ self.q_map.to(q.dtype)                    # [B, Hq, L, E] @ [Hq, E, E] (not einsum: ~10 us less a call)

    def map_k(self, k: torch.Tensor) -> torch.Tensor:
        """``[B, Hkv, L, E] -> [B, Hkv, L, E]``."""
        return k @ self.k_map.to(k.dtype)

    def _decode_hybrid(self, *, window: int, sinks: int, n_taylor: int, device: torch.device) -> Hybrid:
        """The window-mode settings of a decode step without autograd (beta and alpha of this adapter), validated
        once and kept until alpha or beta change in place (their version counters): a decode loop skips the
        checks and the exp of ``log_beta`` per token and layer."""
        key = (window, sinks, n_taylor, device, self.alpha._version, self.log_beta._version, self.alpha.data_ptr(),
               self.log_beta.data_ptr())
        cached = self.__dict__.get("_decode_settings")
        if cached is not None and cached[0] == key:
            return cached[1]
        hybrid = check_hybrid("adapted decode", window=window, sinks=sinks, taylor_mix=self.beta.detach(),
                              recentre=self.alpha.detach(), n_taylor=n_taylor, n_q_heads=self.alpha.shape[0],
                              device=device)
        self.__dict__["_decode_settings"] = (key, hybrid)
        return hybrid


# --------------------------------------------------------------------------- the quadratic form
def adapted_attention(q, k, v, qa, ka, *, n_taylor: int, scale: float, window: int, sinks: int,
                      alpha: torch.Tensor, beta: torch.Tensor, q_offset: int = 0) -> torch.Tensor:
    """The converted hybrid, causal: ``[B, Hq, Lq, Ev]``.

    Args:
        q, qa: original and adapted queries ``[B, Hq, Lq, E]`` at positions ``q_offset .. q_offset + Lq - 1``.
        k, ka: original and adapted keys ``[B, Hkv, Lk, E]`` at positions ``0 .. Lk - 1`` (``Hq`` a multiple).
        v: values ``[B, Hkv, Lk, Ev]``.
        alpha, beta: ``[Hq]`` (beta >= 0); window, sinks: as in :func:`sata.sata_attention`.

    A whole sequence (``q_offset = 0``, as many queries as keys: training, evaluation, a prefill) takes the window
    mode's chunked form (linear in the length: the far part with ``qa``, ``ka`` read from a running state, the
    exact part over a band) through the fused prefill kernel where it serves the call (CPU, no autograd), else,
    from :data:`CHUNKED_FROM` tokens on, through PyTorch; anything else takes the quadratic form
    (:func:`quadratic_attention`, the oracle the chunked form is tested against).
    """
    if q_offset == 0 and q.shape[2] == k.shape[2]:
        y = _chunked(q, k, v, qa, ka, n_taylor=n_taylor, scale=scale, window=window, sinks=sinks, alpha=alpha,
                     beta=beta, only_kernel=q.shape[2] < CHUNKED_FROM)
        if y is not None:
            return y
    return quadratic_attention(q, k, v, qa, ka, n_taylor=n_taylor, scale=scale, window=window, sinks=sinks,
                               alpha=alpha, beta=beta, q_offset=q_offset)


def _chunked(q, k, v, qa, ka, *, n_taylor: int, scale: float, window: int, sinks: int, alpha, beta,
             return_far: bool = False, kernels: bool = True, only_kernel: bool = False):
    """:func:`adapted_attention` of a whole sequence through :func:`sata._paths.window.window_attention` with the
    far part's own queries and keys (``far_qk``): the fused prefill kernel without autograd on the CPU (``kernels``),
    else the PyTorch path (``only_kernel``: None instead). With ``return_far`` also the far state after the
    sequence, F-major ``[B, Hkv, Ev + 1, D]``, and its window and sinks (:class:`sata.state.ExactKeys`)."""
    B, Hq, L, E = q.shape
    Hkv, Ev = k.shape[1], v.shape[-1]
    g = Hq // Hkv
    spec = check_inputs("adapted_attention", q, k, v, n_taylor=n_taylor, is_causal=True, scale=scale,
                        enable_gqa=Hq != Hkv, key_padding_mask=None)
    hybrid = check_hybrid("adapted_attention", window=window, sinks=sinks, taylor_mix=beta, recentre=alpha,
                          n_taylor=spec.n_taylor, n_q_heads=Hq, device=q.device)
    exact = ExactKeys.empty((B, Hkv), window, sinks, E, Ev, spec.state_dtype, q.device)
    q5, qa5 = q.reshape(B, Hkv, g, L, E), qa.reshape(B, Hkv, g, L, E)
    if only_kernel and not (kernels and window_prefill.serves(spec, hybrid, q5, k, v, None, exact, None, qa5, ka)):
        return None
    y, far, new_exact = window_attention(q5, k, v, None, None, exact, 0, spec, hybrid, True, kernels=kernels,
                                         far_qk=(qa5, ka))                     # [B, Hkv, g, L, Ev]
    return (y.reshape(B, Hq, L, Ev), far, new_exact) if return_far else y.reshape(B, Hq, L, Ev)


def quadratic_attention(q, k, v, qa, ka, *, n_taylor: int, scale: float, window: int, sinks: int,
                        alpha: torch.Tensor, beta: torch.Tensor, q_offset: int = 0) -> torch.Tensor:
    """:func:`adapted_attention` quadratic in the keys (every score of the causal matrix), block by block of
    queries, checkpointed under autograd: ``[B, Hq, Lq, Ev]``."""
    B, Hq, Lq, E = q.shape
    g = Hq // k.shape[1]
    k, ka, v = (x.repeat_interleave(g, dim=1) for x in (k, ka, v))             # [B, Hq, Lk, .]
    alpha, beta = alpha.to(q.dtype)[:, None], beta.to(q.dtype)[:, None]          # [Hq, 1]
    outs = []
    for a in range(0, Lq, _BLOCK):
        b = min(a + _BLOCK, Lq)
        n_keys = q_offset + b                                                   # causal: later keys unseen
        args = (q[:, :, a:b], qa[:, :, a:b], k[:, :, :n_keys], ka[:, :, :n_keys], v[:, :, :n_keys], alpha, beta)
        run = functools.partial(_block, n_taylor=n_taylor, scale=scale, window=window, sinks=sinks,
                                first=q_offset + a)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in args)
        outs.append(checkpoint(run, *args, use_reentrant=False) if grad else run(*args))
    return torch.cat(outs, dim=2)


def _block(q, qa, k, ka, v, alpha, beta, *, n_taylor, scale, window, sinks, first):
    T, Lk = q.shape[2], k.shape[2]
    i = torch.arange(first, first + T, device=q.device)[:, None]
    j = torch.arange(Lk, device=q.device)[None, :]
    seen = j <= i
    exact = seen & ((i - j < window) | (j < sinks))                              # [T, Lk]
    far = (seen & ~exact).to(q.dtype)
    sa = scale * (qa @ ka.mT)                                                   # [B, Hq, T, Lk] far scores
    moments = torch.stack([far.sum(-1).expand(sa.shape[:-1]), (sa * far).sum(-1), (sa * sa * far).sum(-1) / 2], -1)
    c = centre(moments, alpha)                                                  # [B, Hq, T]
    U = (sata.taylor_exp(sa - c[..., None], n_taylor) * far) @ torch.cat([v, torch.ones_like(v[..., :1])], -1)
    # the exact part reads only the columns that can hold an exact key: the sinks before the block's band, then
    # the band (from the first query's window on)
    lo = max(first - window + 1, 0)
    cols = torch.cat([torch.arange(min(sinks, lo), device=q.device), torch.arange(lo, Lk, device=q.device)])
    s = scale * (q @ k[:, :, cols].mT)                                          # [B, Hq, T, K]
    m, num, den = exact_part(s, exact[:, cols], v[:, :, cols])
    return combine(m, num, den, U, c, moments[..., 0] > 0, beta, v.shape[-1], q.dtype)   # [B, Hq, T, Ev]


# --------------------------------------------------------------------------- constant-memory decoding
@dataclass
class AdaptedState:
    """One layer's decoding state: far Taylor state ``[B, Hkv, D, Ev + 1]`` (float64, the adapted keys), the
    window's keys/values ``[B, Hkv, <= window, E]`` (oldest first, sinks excluded) and the sinks' ``[B, Hkv, <= sinks, E]``.

    Its size stops growing after ``window + sinks`` tokens.
    """

    far: torch.Tensor
    win_k: torch.Tensor
    win_v: torch.Tensor
    sink_k: torch.Tensor
    sink_v: torch.Tensor
    n_tokens: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.far, self.win_k, self.win_v, self.sink_k, self.sink_v))

    def _map(self, fn) -> AdaptedState:
        return AdaptedState(*(fn(t) for t in (self.far, self.win_k, self.win_v, self.sink_k, self.sink_v)), self.n_tokens)


def start_state(k, v, ka, *, n_taylor: int, scale: float, window: int, sinks: int, far=None) -> AdaptedState:
    """The state after keys ``[B, Hkv, L, E]`` at positions ``0 .. L - 1`` (a prefill); ``far``: its far state,
    F-major ``[B, Hkv, Ev + 1, D]``, when the caller has it already (:func:`prefill`), else built here."""
    L = k.shape[2]
    first_win = max(sinks, L - window)                                          # keys older are far (or sinks)
    if far is None:
        far = _features(ka[:, :, sinks:first_win], n_taylor, scale).mT @ _ones_col(v[:, :, sinks:first_win]).double()
    else:
        far = _far64(far)
    return AdaptedState(far, k[:, :, first_win:], v[:, :, first_win:], k[:, :, :sinks], v[:, :, :sinks], L)


def prefill(q, k, v, qa, ka, *, n_taylor: int, scale: float, window: int, sinks: int, alpha: torch.Tensor,
            beta: torch.Tensor, kernel_state: bool = False) -> tuple[torch.Tensor, AdaptedState | sata.SATAState]:
    """A cache's first call, keys at positions ``0 .. L - 1``: the output ``[B, Hq, L, Ev]`` (the chunked form,
    whatever the length) and the decoding state after it, whose far state that form has built anyway: an
    :class:`AdaptedState`, or with ``kernel_state`` the :class:`sata.SATAState` (far state, window ring and sinks)
    that :func:`kernel_decode_step` continues through the fused decode kernel."""
    kw = dict(n_taylor=n_taylor, scale=scale, window=window, sinks=sinks)
    y, far, exact = _chunked(q, k, v, qa, ka, alpha=alpha, beta=beta, return_far=True, **kw)
    if kernel_state:
        L, E = k.shape[2:]
        return y, sata.SATAState._unchecked(None, n_taylor, E, v.shape[-1], scale, L, kvT=far, window=window,
                                            sinks=sinks, exact=exact)
    return y, start_state(k, v, ka, far=far, **kw)


def kernel_decode_step(state: sata.SATAState, q, k, v, adapter: QKAdapter, *, n_taylor: int, scale: float, window: int,
                       sinks: int) -> tuple[torch.Tensor, sata.SATAState] | None:
    """:func:`decode_step` from a :func:`prefill` ``kernel_state`` through the fused window decode kernel, which
    updates ``state`` in place: the output ``[B, Hq, 1, Ev]`` and the state, or None where the kernel does not
    serve the call (autograd, another device or dtype): continue with :func:`to_adapted_state`."""
    Hq, Hkv = q.shape[1], k.shape[1]
    # the far part's version of the key this step absorbs: the one leaving the window's ring (read before the
    # kernel writes the new key into its slot), or without a window the new key
    leaving = state.exact.win_k[:, :, state.n_tokens % window] if window else k[:, :, 0]     # [B, Hkv, E]
    ka = adapter.map_k(leaving[:, :, None].to(k.dtype))[:, :, 0]                              # [B, Hkv, E]
    spec = check_inputs("adapted decode", q, k, v, n_taylor=n_taylor, is_causal=True, scale=scale,
                        enable_gqa=Hq != Hkv, key_padding_mask=None, state=state)
    if torch.is_grad_enabled():  # the kernel serves no autograd: the settings as the PyTorch path takes them
        hybrid = check_hybrid("adapted decode", window=window, sinks=sinks, taylor_mix=adapter.beta,
                              recentre=adapter.alpha, n_taylor=spec.n_taylor, n_q_heads=Hq, device=q.device)
    else:
        hybrid = adapter._decode_hybrid(window=window, sinks=sinks, n_taylor=spec.n_taylor, device=q.device)
    return window_kernel.decode_step(q, k, v, spec, hybrid, True, None, state, True, True,
                                     far_qk=(adapter.map_q(q), ka))


def to_adapted_state(state: sata.SATAState) -> AdaptedState:
    """The :class:`AdaptedState` of a :func:`prefill` ``kernel_state`` (for :func:`decode_step`): the far state in
    float64, the window's keys oldest first without the sinks, the sinks filled so far."""
    n, W, S = state.n_tokens, state.window, state.sinks
    ex = state.exact
    ring = lambda t: t.roll(-(n % W), dims=2) if n >= W else t[:, :, :n]      # oldest first
    first = max(S - max(n - W, 0), 0) if W else 0                               # window positions that are sinks
    win_k, win_v = (ring(t)[:, :, first:] for t in (ex.win_k, ex.win_v)) if W else (ex.win_k, ex.win_v)
    n_sinks = min(n, S)
    return AdaptedState(_far64(state._fmajor()), win_k, win_v, ex.sink_k[:, :, :n_sinks], ex.sink_v[:, :, :n_sinks], n)


def decode_step(state: AdaptedState, q, k, v, adapter: QKAdapter, *, n_taylor: int, scale: float, window: int,
                sinks: int, inplace: bool = False) -> tuple[torch.Tensor, AdaptedState]:
    """One token: ``q [B, Hq, 1, E]``, ``k, v [B, Hkv, 1, E]`` -> output ``[B, Hq, 1, Ev]`` and the new state.

    ``inplace``: the key leaving the window is added into ``state.far`` itself (a cache that owns its state: no
    copy of the ``[B, Hkv, D, Ev + 1]`` float64 tensor per token), else into a new tensor (``state`` unchanged)."""
    if state.n_tokens < sinks:
        state = AdaptedState(state.far, state.win_k, state.win_v, torch.cat([state.sink_k, k], 2),
                             torch.cat([state.sink_v, v], 2), state.n_tokens + 1)
    else:
        win_k, win_v, far = torch.cat([state.win_k, k], 2), torch.cat([state.win_v, v], 2), state.far
        if win_k.shape[2] > window:                                             # the oldest leaves the window
            phi = _features(adapter.map_k(win_k[:, :, :1]), n_taylor, scale)     # [B, Hkv, 1, D]
            vt = _ones_col(win_v[:, :, :1]).double()                            # [B, Hkv, 1, Ev + 1]
            if inplace and far.is_contiguous():
                far.view(-1, *far.shape[-2:]).baddbmm_(phi.reshape(-1, phi.shape[-1], 1), vt.reshape(-1, 1, vt.shape[-1]))
            else:
                far = far + phi.mT @ vt
            win_k, win_v = win_k[:, :, 1:], win_v[:, :, 1:]
        state = AdaptedState(far, win_k, win_v, state.sink_k, state.sink_v, state.n_tokens + 1)
    B, Hq, _, E = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    # exact part: sinks and window, original queries and keys, in the compute dtype (a ring from the fused
    # kernel's state is in float32 beside half inputs, as every path computes them)
    cd = compute_dtype_for(torch.promote_types(q.dtype, state.win_k.dtype))
    ek = torch.cat([state.sink_k, state.win_k], 2).to(cd)                       # [B, Hkv, K, E]
    ev = torch.cat([state.sink_v, state.win_v], 2).to(cd)                       # [B, Hkv, K, Ev]
    s = scale * (q.view(B, Hkv, g, E).to(cd) @ ek.mT)                           # [B, Hkv, g, K]
    m, num, den = exact_part(s, torch.ones_like(s, dtype=torch.bool), ev)       # [B, Hkv, g], [.., Ev]
    # far part: per-degree read-outs of the state with the adapted query, weighted by a_m(c)
    qa = adapter.map_q(q).view(B, Hkv, g, E)
    basis = sata.get_basis(E, n_taylor)
    r = _features(qa, n_taylor, scale).double()                                 # [B, Hkv, g, D]
    blocks = [r[..., basis.degree_slice(p)] @ state.far[:, :, basis.degree_slice(p)]
              for p in range(n_taylor)]                                         # P x [B, Hkv, g, Ev + 1]
    moments = torch.stack([blocks[p][..., -1] for p in range(3)], -1)            # [B, Hkv, g, 3]: N, sum s, sum s^2/2
    alpha = adapter.alpha.double().view(Hkv, g)
    c = centre(moments, alpha)                                                  # [B, Hkv, g]
    a = centre_coefficients(c, n_taylor)                                        # [B, Hkv, g, P]
    U = sum(a[..., p, None] * blocks[p] for p in range(n_taylor))               # [B, Hkv, g, Ev + 1]
    beta = adapter.beta.double().view(Hkv, g)
    y = combine(m.double(), num.double(), den.double(), U, c, moments[..., 0] > 0, beta, v.shape[-1], q.dtype)
    return y.view(B, Hq, 1, -1), state


def _far64(far: torch.Tensor) -> torch.Tensor:
    """A far state from the window mode's paths, F-major ``[B, Hkv, Ev + 1, D]``, as :class:`AdaptedState` holds it:
    ``[B, Hkv, D, Ev + 1]`` in float64, contiguous (decode_step adds into it in place)."""
    return far.mT.to(torch.float64, memory_format=torch.contiguous_format)


def _features(x, n_taylor: int, scale: float) -> torch.Tensor:
    """``phi`` of ``[..., L, E]`` with the whole scale on this side's square root, in float64: ``[..., L, D]``."""
    return sata.taylor_features(x.double(), n_taylor, scale)


def _ones_col(v):
    return torch.cat([v, torch.ones_like(v[..., :1])], -1)                      # [..., Ev + 1]


# --------------------------------------------------------------------------- home in a model and its checkpoint
def _layers(model):
    return getattr(model, "model", model).layers


def attach_adapters(model, directory: str | Path | None = None) -> list[QKAdapter]:
    """Give every attention module of ``model`` its :class:`QKAdapter` (``self_attn.sata_adapter``).

    Maps come from ``directory/sata_adapters.safetensors`` when given, else identity; alpha and beta from
    ``config.sata_layer_recentre`` / ``sata_layer_taylor_mix`` when set (else 0 and 1).
    """
    tensors = _read(str(Path(directory) / ADAPTER_FILE)) if directory is not None else {}
    return [_attach(layer.self_attn, tensors) for layer in _layers(model)]


def _attach(module, tensors: dict[str, torch.Tensor]) -> QKAdapter:
    """``module.sata_adapter`` for layer ``module.layer_idx``: maps from ``tensors`` (identity if absent), alpha and
    beta from ``tensors`` when they hold them (weights saved with the adapters attached), else from the config
    (0 and 1 if absent)."""
    cfg, i = module.config, module.layer_idx
    Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    ad = QKAdapter(Hq, Hkv, getattr(cfg, "head_dim", None) or cfg.hidden_size // Hq)
    alphas, betas = getattr(cfg, "sata_layer_recentre", None), getattr(cfg, "sata_layer_taylor_mix", None)
    with torch.no_grad():
        if tensors:
            ad.q_map.copy_(tensors[f"{i}.q_map"])
            ad.k_map.copy_(tensors[f"{i}.k_map"])
        if f"{i}.alpha" in tensors:
            ad.alpha.copy_(tensors[f"{i}.alpha"])
        elif alphas is not None:
            ad.alpha.copy_(torch.tensor(alphas[i]))
        if f"{i}.log_beta" in tensors:
            ad.log_beta.copy_(tensors[f"{i}.log_beta"])
        elif betas is not None:
            ad.log_beta.copy_(torch.tensor(betas[i]).log())
    module.sata_adapter = ad.to(module.q_proj.weight.device)
    return module.sata_adapter


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The maps of every layer, for ``sata_adapters.safetensors``; also writes alpha/beta into the config."""
    ads = [layer.self_attn.sata_adapter for layer in _layers(model)]
    model.config.sata_qk_adapter = True
    model.config.sata_layer_recentre = [a.alpha.detach().tolist() for a in ads]
    model.config.sata_layer_taylor_mix = [a.beta.detach().tolist() for a in ads]
    return {f"{i}.{n}": getattr(a, n).detach().contiguous() for i, a in enumerate(ads) for n in ("q_map", "k_map")}


def _read(path: str) -> dict[str, torch.Tensor]:
    """The maps in the adapter file at ``path`` (``{i}.q_map``, ``{i}.k_map``), read once per version of the file."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"config.sata_qk_adapter is set but {path} does not exist: the converted model's query/key maps are "
            "saved there by `sata convert`; copy it beside the weights or call "
            "sata.integrations.adapted.attach_adapters(model, directory)"
        )
    return _read_file(*_version(path))


def _version(path: str) -> tuple[str, int, int]:
    """``(real path, mtime, size)``: what the read caches below are keyed by, so a file rewritten in this process
    (a new conversion, a new save) is read again."""
    st = os.stat(path)
    return os.path.realpath(path), st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=4)
def _read_file(path: str, mtime_ns: int, size: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


# an adapter's tensors as ``save_pretrained`` writes them once the adapters are attached (submodules of the layers)
_IN_WEIGHTS = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.sata_adapter\.(q_map|k_map|alpha|log_beta)$")


def _checkpoint_adapters(name_or_path: str) -> dict[str, torch.Tensor]:
    """The adapter tensors of the checkpoint a config was loaded from (a folder or a model id in the local hub
    cache): the ``...sata_adapter.*`` tensors of its ``model.safetensors`` (a converted model saved again with
    ``save_pretrained`` after a forward pass, when its adapters were submodules: newer than any adapter file
    beside it), else ``sata_adapters.safetensors`` as ``sata convert`` writes it; as ``{i}.q_map``, ``{i}.k_map``
    (and ``{i}.alpha``, ``{i}.log_beta``)."""
    from transformers.utils import cached_file

    def find(name: str) -> str | None:
        try:
            return cached_file(name_or_path, name, _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False, local_files_only=True)
        except (OSError, ValueError):
            return None

    # adapters inside the weights come from a later save of the whole model than any adapter file beside them
    weights = find("model.safetensors")
    if weights is not None:
        found = _adapters_in_weights(*_version(weights))
        if found:
            return found
    path = find(ADAPTER_FILE)
    return _read(path if path is not None else str(Path(name_or_path) / ADAPTER_FILE))   # (explains a missing one)


@functools.lru_cache(maxsize=4)
def _adapters_in_weights(path: str, mtime_ns: int, size: int) -> dict[str, torch.Tensor]:
    """The adapter tensors among a weights file's (only those read), keyed ``{i}.q_map`` etc."""
    from safetensors import safe_open

    found = {}
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            m = _IN_WEIGHTS.search(key)
            if m:
                found[f"{m.group(1)}.{m.group(2)}"] = f.get_tensor(key)
    return found


def adapter_for(module) -> QKAdapter:
    """The module's adapter, attached on first use from the checkpoint directory the config was loaded from."""
    ad = getattr(module, "sata_adapter", None)
    if ad is not None:
        return ad
    return _attach(module, _checkpoint_adapters(getattr(module.config, "_name_or_path", "") or "."))
