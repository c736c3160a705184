"""Symmetry-aware Taylor attention: the functional op, a drop-in beside SDPA.

The paths compute the same thing (``MATH.md`` section 3) and are chosen per call:

- ``decode_kernel``  one new token (CPU, no autograd): fused C++ step, one pass over the state.
- ``prefill_kernel`` longer inputs (CPU, no autograd): fused C++ chunked prefill, or for
  non-causal input, state build then read.
- ``quadratic``      ``T_P`` on the score matrix, when the sequence is short next to the feature
  size ``D`` and no state is returned (it would cost more to build one).
- ``chunked``        causal, PyTorch (autograd, CUDA): per chunk, the polynomial of the scores
  inside the chunk plus ``phi(Q_t) S_{t-1}`` for everything before it.
- ``parallel``       non-causal, PyTorch: ``S = S_in + phi(K)^T [V, 1]``, then ``phi(Q) S``.
- ``recurrent``      causal single tokens, PyTorch: ``S += phi(k) [v, 1]^T``, ``u = phi(q)^T S``.

Long inputs are processed in blocks whose working set is bounded; under autograd each block
is recomputed in the backward pass instead of storing its features, so memory does not grow
with ``D`` per token.
"""

from __future__ import annotations

import functools
import math

import torch
from torch.utils.checkpoint import checkpoint

from . import _kernels
from ._checks import Spec, check_inputs
from .basis import TaylorBasis, get_basis
from .budget import MemoryBudgetError, check_budget, format_bytes, get_memory_budget
from .features import _phi, _phi_t, taylor_exp
from .hybrid import Hybrid, check_hybrid
from .state import ExactKeys, SATAState
from ._paths.window import window_attention
from ._paths.window_kernel import decode_step as window_decode_step

__all__ = ["accumulate_state", "sata_attention"]

# causal calls with at most this many tokens run token by token (decode)
_RECURRENT_MAX_LEN = 1
# bytes of features and scores one block may hold (at most a quarter of the budget)
_BLOCK_BYTES = 64 * 2**20
# bytes of converted inputs one fused-kernel call may hold (non-float32 inputs)
_SEGMENT_BYTES = 4 * 2**20
# the default weight of the Taylor part: its identity tells a decode loop that nothing needs checking
_DEFAULT_MIX = 1.0


def sata_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    n_taylor: int = 3,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    state: SATAState | None = None,
    return_state: bool = False,
    inplace: bool = False,
    window: int = 0,
    sinks: int = 0,
    taylor_mix: float | torch.Tensor = _DEFAULT_MIX,
    recentre: float | torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, SATAState]:
    r"""Attention with ``exp`` replaced by its Taylor series truncated to ``n_taylor`` terms.

    .. math::
        y_i = \frac{\sum_j T_P(s_{ij})\, v_j}{\sum_j T_P(s_{ij})},\qquad
        T_P(s) = \sum_{p<P} \frac{s^p}{p!},\qquad s_{ij} = \mathrm{scale}\; q_i \cdot k_j

    computed at constant cost per token through the packed symmetric features ``phi``
    with ``<phi(q), phi(k)> = T_P(scale q.k)``. Same layout as
    :func:`torch.nn.functional.scaled_dot_product_attention`.

    Args:
        query (torch.Tensor): ``[..., Hq, Lq, E]``.
        key (torch.Tensor): ``[..., Hkv, Lk, E]``.
        value (torch.Tensor): ``[..., Hkv, Lk, Ev]``.
        n_taylor (int): number of Taylor terms ``P`` (degrees ``0..P-1``). Default: ``3``,
            the most terms every head size up to 64 affords; odd ``P`` keeps every weight
            ``T_P(s) > 0``. Features per head: ``D = C(E + P - 1, P - 1)``.
        is_causal (bool): query ``i`` attends to the keys in ``state`` and to the passed keys at
            positions ``<= i``; requires ``Lq == Lk``. Default: ``False`` (every query attends to
            the state and to all passed keys).
        scale (float, optional): score scale. Default: ``1 / sqrt(E)``.
        enable_gqa (bool): grouped-query attention, ``Hq`` a multiple of ``Hkv``; query head ``h``
            uses key/value head ``h // (Hq // Hkv)``, one state per key/value head. Default: ``False``.
        key_padding_mask (torch.Tensor, optional): ``[..., Lk]`` bool, ``True`` = ignore that key
            (``nn.MultiheadAttention``'s convention). A masked key changes neither output nor state.
        state (SATAState, optional): keys seen before this call. Never modified.
        return_state (bool): also return the state after this call. Default: ``False``.
        inplace (bool): write the new state into ``state.kv`` instead of a new tensor, for serving
            loops that drop the old state anyway (no allocation per token; about a third less memory
            traffic). The returned state shares that tensor. Not allowed when ``state.kv`` requires
            grad. Default: ``False`` (the passed-in state stays valid). In the window mode it applies to decode
            steps through the fused kernel (the window and sink buffers too) and is ignored elsewhere.
        window (int): each query also attends *exactly* (softmax weights ``exp``) to the ``window``
            most recent positions, itself included (non-causal: ``|i - j| < window``); the Taylor state
            holds only the keys further back. ``window >= L`` is exact softmax attention. Default: ``0``.
        sinks (int): and exactly to the first ``sinks`` kept keys of the stream (across calls; padded
            keys do not count, so each row of a left-padded batch gets its own first keys). Default: ``0``.
        taylor_mix (float | torch.Tensor): ``beta >= 0``, scalar or per query head ``[Hq]``, the weight of
            the Taylor part beside the exact keys in the shared normaliser; differentiable. ``0`` is a
            sliding window with sinks. Default: ``1.0`` (no effect without a window or sinks).
        recentre (float | torch.Tensor, optional): ``alpha``, scalar or ``[Hq]``: expand the series of
            query ``i`` around ``c_i = mu_i - alpha sd_i``, the mean and standard deviation of its scores
            over the keys in the Taylor part, read from the same state (the mean needs ``n_taylor >= 2``,
            the deviation ``n_taylor >= 3``); differentiable. Default: ``None``, the series around 0.

            With any of these (``MATH.md`` section 6), for query ``i`` with exact keys ``E_i`` and
            Taylor keys ``F_i``, ``m_i = max(max_{E_i} s_ij, c_i)``:
            ``y_i = (sum_{E_i} e^{s_ij - m_i} v_j + beta e^{c_i - m_i} sum_{F_i} T_P(s_ij - c_i) v_j) / (same with 1)``.
            The state then also keeps the window's and the sinks' keys and values
            (``SATAState.exact``, in the state's dtype): memory per head
            ``D (Ev + 1) + (window + sinks)(E + Ev)`` floats, still constant per token.

    Returns:
        ``[..., Hq, Lq, Ev]`` in the input dtype, or ``(output, state)`` with ``return_state=True``.
        States accumulate in float32 (float64 for float64 inputs, or when ``state`` is float64).

    Notes:
        A query whose normaliser ``sum_j T_P(s_ij)`` is not positive (no keys, or, for even
        ``P`` only, strongly negative scores) gets a zero output, never Inf or NaN.
        NaN/Inf in unmasked inputs propagate to the outputs and states that depend on them,
        as in SDPA (to later tokens too: they enter the state); masked keys are ignored.

    Examples::
        >>> q, k, v = (torch.randn(2, 8, 1024, 16) for _ in range(3))
        >>> y, st = sata.sata_attention(q, k, v, n_taylor=3, is_causal=True, return_state=True)
        >>> q1, k1, v1 = (torch.randn(2, 8, 1, 16) for _ in range(3))       # one more token
        >>> y1, st = sata.sata_attention(q1, k1, v1, n_taylor=3, is_causal=True, state=st, return_state=True)
    """
    if torch.compiler.is_compiling():  # opaque to torch.compile: run eagerly behind a graph break
        return _eager_attention(query, key, value, n_taylor=n_taylor, is_causal=is_causal, scale=scale,
                                enable_gqa=enable_gqa, key_padding_mask=key_padding_mask, state=state,
                                return_state=return_state, inplace=inplace, window=window, sinks=sinks,
                                taylor_mix=taylor_mix, recentre=recentre)
    spec = check_inputs(
        "sata_attention", query, key, value, n_taylor=n_taylor, is_causal=is_causal, scale=scale,
        enable_gqa=enable_gqa, key_padding_mask=key_padding_mask, state=state,
    )
    if window or sinks or recentre is not None or taylor_mix is not _DEFAULT_MIX or (
        state is not None and state.exact is not None
    ):
        hybrid = check_hybrid("sata_attention", window=window, sinks=sinks, taylor_mix=taylor_mix, recentre=recentre,
                              n_taylor=spec.n_taylor, n_q_heads=spec.n_q_heads, device=spec.device)
        if not hybrid.plain or (state is not None and state.exact is not None):
            return _window_call(query, key, value, spec, hybrid, is_causal, key_padding_mask, state, return_state,
                                inplace)
    if inplace:
        if state is None or not return_state:
            raise ValueError("sata_attention: inplace=True updates a state: pass state=... and return_state=True")
        if _needs_grad(query, key, value, state):
            raise ValueError(
                "sata_attention: inplace=True cannot be used under autograd (inputs or state.kv require grad): "
                "the state would lose its history; use inplace=False, or torch.no_grad() for serving"
            )
    return _attention(query, key, value, spec, is_causal, key_padding_mask, state, return_state, inplace=inplace)


@torch.compiler.disable
def _eager_attention(*args, **kwargs):
    return sata_attention(*args, **kwargs)


@torch.compiler.disable
def accumulate_state(
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    n_taylor: int = 3,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    state: SATAState | None = None,
    window: int = 0,
    sinks: int = 0,
) -> SATAState:
    r"""Absorb keys and values into a state without reading it: ``S + phi(K)^T [V, 1]``.

    The state of a segment, for building a context without computing outputs, or for
    combining segments processed elsewhere (states of disjoint segments add).

    Args:
        key (torch.Tensor): ``[..., Hkv, Lk, E]``.
        value (torch.Tensor): ``[..., Hkv, Lk, Ev]``.
        n_taylor, scale, key_padding_mask, window, sinks: as in :func:`sata_attention`.
        state (SATAState, optional): state to continue; never modified.

    Returns:
        :class:`SATAState` with ``kv [..., Hkv, D, Ev + 1]``; gradients flow to key, value and state.
    """
    query = key[..., :0, :]
    spec = check_inputs(
        "accumulate_state", query, key, value, n_taylor=n_taylor, is_causal=False, scale=scale,
        enable_gqa=False, key_padding_mask=key_padding_mask, state=state,
    )
    if window or sinks or (state is not None and state.exact is not None):
        hybrid = check_hybrid("accumulate_state", window=window, sinks=sinks, taylor_mix=1.0, recentre=None,
                              n_taylor=spec.n_taylor, n_q_heads=spec.n_q_heads, device=spec.device)
        return _window_call(query, key, value, spec, hybrid, False, key_padding_mask, state, True)[1]
    _, new_state = _attention(query, key, value, spec, False, key_padding_mask, state, True)
    return new_state


def _window_call(query, key, value, spec: Spec, hybrid: Hybrid, is_causal: bool, key_padding_mask, state, return_state,
                 inplace: bool = False):
    """The window mode (``MATH.md`` section 6): a decode step through the fused kernel where it applies, else
    reshape, run :func:`window_attention`, wrap the new state."""
    fast = window_decode_step(query, key, value, spec, hybrid, is_causal, key_padding_mask, state, return_state, inplace)
    if fast is not None:
        return fast
    fn = "accumulate_state" if spec.len_q == 0 and not is_causal else "sata_attention"
    if state is not None and (state.window, state.sinks) != (hybrid.window, hybrid.sinks):
        raise ValueError(
            f"{fn}: state has window={state.window}, sinks={state.sinks} but the call asks for window={hybrid.window}, "
            f"sinks={hybrid.sinks}; continue a stream with the window and sinks it was started with"
        )
    if not is_causal and spec.len_q not in (0, spec.len_k):
        raise ValueError(
            f"{fn}: non-causal calls with window, sinks or recentre need Lq == Lk (query i sits at key i's position), "
            f"got Lq={spec.len_q}, Lk={spec.len_k}; absorb earlier keys into a state with sata.accumulate_state"
        )
    B, Hkv, g, D, F = spec.batch, spec.n_kv_heads, spec.group, spec.feature_dim, spec.d_value + 1
    itemsize = torch.empty((), dtype=spec.state_dtype).element_size()
    # the window and sink buffers, and the extended stream of one call (window + call keys and values)
    exact_bytes = B * Hkv * (2 * hybrid.window + hybrid.sinks + spec.len_k) * (spec.d_key + F) * itemsize
    check_budget(
        exact_bytes + B * Hkv * D * F * itemsize,
        f"{fn}: window={hybrid.window}, sinks={hybrid.sinks} with {spec.len_k} keys, {B} x {Hkv} heads of "
        f"d_key={spec.d_key}, d_value={spec.d_value} ({format_bytes(exact_bytes)} of exact keys and values)",
        "Use a smaller window, fewer sinks, or split the call into shorter segments.",
    )
    q = query.reshape(B, Hkv, g, spec.len_q, spec.d_key)                      # [B, Hkv, g, Lq, E]
    k = key.reshape(B, Hkv, spec.len_k, spec.d_key)                           # [B, Hkv, Lk, E]
    v = value.reshape(B, Hkv, spec.len_k, spec.d_value)                       # [B, Hkv, Lk, Ev]
    mask = None if key_padding_mask is None else key_padding_mask.reshape(B, spec.len_k)
    if state is None:
        exact = ExactKeys.empty((B, Hkv), hybrid.window, hybrid.sinks, spec.d_key, spec.d_value, spec.state_dtype, spec.device)
        far, n0 = None, 0
    else:
        flat = lambda t: t.reshape(B, *t.shape[len(spec.batch_shape):])
        exact = ExactKeys.empty((B, Hkv), 0, 0, spec.d_key, spec.d_value, spec.state_dtype, spec.device) \
            if state.exact is None else state.exact.map(flat)
        far, n0 = flat(state.kv).mT.to(spec.state_dtype), state.n_tokens          # [B, Hkv, F, D]
    if state is not None:
        centre = None if state.key_centre is None else flat(state.key_centre)
    elif hybrid.recentre is not None:  # a new re-centred stream: centre its keys once, on this call's mean key
        kept = torch.ones(B, 1, spec.len_k, 1, dtype=torch.bool, device=k.device) if mask is None else (~mask)[:, None, :, None]
        total = torch.where(kept, k.detach().to(spec.state_dtype), 0.0).sum(-2)       # [B, Hkv, E]
        centre = total / kept.sum(-2).clamp_min(1)
    else:
        centre = None
    y, far, exact = window_attention(q, k, v, mask, far, exact, n0, spec, hybrid, is_causal, centre)
    out = y.reshape(*spec.batch_shape, spec.n_q_heads, spec.len_q, spec.d_value)
    if not return_state:
        return out
    if far is None:
        far = torch.zeros(B, Hkv, F, D, dtype=spec.state_dtype, device=spec.device)
    unflat = lambda t: t.reshape(*spec.batch_shape, *t.shape[1:])
    has_exact = hybrid.window > 0 or hybrid.sinks > 0
    new_state = SATAState._unchecked(
        unflat(far).mT, spec.n_taylor, spec.d_key, spec.d_value, spec.scale, n0 + spec.len_k,
        window=hybrid.window, sinks=hybrid.sinks, exact=exact.map(unflat) if has_exact else None,
        key_centre=None if centre is None else unflat(centre),
    )
    return out, new_state


def _attention(query, key, value, spec: Spec, is_causal: bool, key_padding_mask, state, return_state, mode=None,
               chunk_size=None, block_size=None, inplace=False):
    """Reshape to ``[B, Hkv, (g,) L, E]``, dispatch to a path, reshape back.

    Tests force a path with ``mode`` (``'decode_kernel'``, ``'prefill_kernel'``, ``'recurrent'``,
    ``'chunked'``, ``'parallel'``) and small ``chunk_size`` / ``block_size`` (tokens).
    """
    if mode is None:
        fused = _kernel_applies(spec, query, key, value, state)
        if fused and spec.len_q == 1 and spec.len_k == 1:  # the decode loop: keep this branch lean
            out, kvT = _decode_kernel(query, key, value, spec, key_padding_mask, state, inplace)
            if not return_state:
                return out
            return out, SATAState._unchecked(None, spec.n_taylor, spec.d_key, spec.d_value, spec.scale,
                                             (0 if state is None else state.n_tokens) + 1, kvT=kvT)
        elif not return_state and spec.len_q > 1 and _quadratic_cheaper(spec, is_causal):
            mode = "quadratic"
        elif fused:
            mode = "prefill_kernel"
        elif is_causal:
            mode = "recurrent" if spec.len_q <= _RECURRENT_MAX_LEN else "chunked"
        else:
            mode = "parallel"
    S_in = None if state is None else state.kv
    B, Hkv, g, D, F = spec.batch, spec.n_kv_heads, spec.group, spec.feature_dim, spec.d_value + 1
    basis = get_basis(spec.d_key, spec.n_taylor, spec.device, spec.compute_dtype)
    if mode == "decode_kernel":
        out, kvT = _decode_kernel(query, key, value, spec, key_padding_mask, state, inplace)
        S_new = kvT.mT
        if inplace and state is not None and kvT.data_ptr() == state.kv.mT.data_ptr():
            S_new = S_in
    elif mode == "prefill_kernel":
        out, S_new = _prefill_kernel(query, key, value, spec, basis, key_padding_mask, S_in, is_causal)
    else:
        if (mode == "parallel" and is_causal) or (mode in ("chunked", "recurrent") and not is_causal):
            raise ValueError(f"mode={mode!r} does not compute {'causal' if is_causal else 'non-causal'} attention")
        q = query.reshape(B, Hkv, g, spec.len_q, spec.d_key)                  # [B, Hkv, g, Lq, E]
        k = key.reshape(B, Hkv, spec.len_k, spec.d_key)                       # [B, Hkv, Lk, E]
        v = value.reshape(B, Hkv, spec.len_k, spec.d_value)                   # [B, Hkv, Lk, Ev]
        mask = None if key_padding_mask is None else key_padding_mask.reshape(B, spec.len_k)   # [B, Lk]
        # internally F-major: S^T [B, Hkv, F, D], the layout the kernel and the state use
        S = None if S_in is None else S_in.transpose(-1, -2).reshape(B, Hkv, F, D)   # [B, Hkv, F, D]
        run = _Run(spec, basis, chunk_size or _default_chunk(spec), block_size)
        if mode == "quadratic":
            y, S_new = run.quadratic(q, k, v, mask, S, return_state, is_causal)
            if return_state:  # the scores give no state: absorb the keys separately
                _, S_new = run.parallel(q[:, :, :, :0], k, v, mask, S, True)
        else:
            y, S_new = getattr(run, mode)(q, k, v, mask, S, need_state=return_state)
        out = y.reshape(*spec.batch_shape, spec.n_q_heads, spec.len_q, spec.d_value)
        if out.numel() == 0 and not out.requires_grad and _needs_grad(query, key, value, state):
            # an empty output still belongs to the graph, so that backward() through it works
            out = out + 0 * (query.sum() + key.sum() + value.sum()).to(out.dtype)
        if S_new is not None:
            S_new = S_new.reshape(*spec.batch_shape, Hkv, F, D).transpose(-1, -2)
    if not return_state:
        return out
    if inplace and S_new is not S_in:
        with torch.no_grad():
            S_in.copy_(S_new)
        S_new = S_in
    if S_new is None:
        S_new = torch.zeros(*spec.batch_shape, Hkv, F, D, dtype=spec.state_dtype, device=spec.device).transpose(-1, -2)
    new_state = SATAState._unchecked(
        S_new, spec.n_taylor, spec.d_key, spec.d_value, spec.scale, (0 if state is None else state.n_tokens) + spec.len_k
    )
    return out, new_state


def _kernel_applies(spec: Spec, query, key, value, state) -> bool:
    """The fused CPU kernels serve calls without autograd."""
    return _kernel_ok(spec) and not _needs_grad(query, key, value, state)


def _kernel_ok(spec: Spec) -> bool:
    """Device, dtypes, workspace and compiler allow the fused kernels (cached per call shape)."""
    ok = spec.plans.get("kernel_ok")
    if ok is None:
        ok = spec.plans["kernel_ok"] = (
            spec.device.type == "cpu"
            and _kernels.supports(spec.compute_dtype, spec.state_dtype)
            and _kernel_workspace(spec) <= get_memory_budget() // 4
            and _kernels.load() is not None
        )
    return ok


def _kernel_workspace(spec: Spec) -> int:
    """Bytes the fused kernels allocate besides inputs, outputs and the state (all threads)."""
    D, F, c, s = spec.feature_dim, spec.d_value + 1, _ITEMSIZE[spec.compute_dtype], _ITEMSIZE[spec.state_dtype]
    Fp = -(-F // 16) * 16
    prefill = D * Fp * (s + (c if s != c else 0)) + (1 + spec.group) * D * 32 * c   # state copy, features of a chunk
    decode = -(-spec.batch * spec.n_kv_heads // torch.get_num_threads()) * (1 + spec.group) * (D + 16) * c
    return torch.get_num_threads() * max(prefill, decode)




def _decode_kernel(query, key, value, spec: Spec, key_padding_mask, state, inplace: bool = False):
    """One token for every sequence and head through the fused kernel: ``[..., Hq, 1, E] -> [..., Hq, 1, Ev]``.

    The kernel reads raw memory, so contiguous inputs in the compute dtype are used as they are and
    the state is used without a copy when it is D-contiguous (as every state this library makes).
    Returns the output and the new state as the D-contiguous ``[..., Hkv, F, D]`` tensor. This is the
    per-token path of a decode loop: every line here is paid once per token.
    """
    plan = spec.plans.get("decode")
    if plan is None:
        basis = get_basis(spec.d_key, spec.n_taylor, spec.device, spec.compute_dtype)
        plan = spec.plans["decode"] = _kernels.DecodePlan(
            _kernels.load(), spec.batch * spec.n_kv_heads, spec.group, spec.d_key, spec.d_value, basis,
            spec.compute_dtype, *_split_scale(spec.scale), state_dtype=spec.state_dtype,
            state_shape=(*spec.batch_shape, spec.n_kv_heads, spec.d_value + 1, spec.feature_dim),
            out_shape=(*spec.batch_shape, spec.n_q_heads, 1, spec.d_value),
        )
    cd = spec.compute_dtype
    if query.dtype is not cd or not query.is_contiguous():
        query = query.to(cd).contiguous()
    if key.dtype is not cd or not key.is_contiguous():
        key = key.to(cd).contiguous()
    if value.dtype is not cd or not value.is_contiguous():
        value = value.to(cd).contiguous()
    keep = None
    if key_padding_mask is not None:  # [B, 1] -> one flag per (batch, kv head)
        keep = (~key_padding_mask).to(torch.uint8).reshape(spec.batch, 1).expand(spec.batch, spec.n_kv_heads).contiguous()
    copy_back = False
    if state is None:
        S_in = torch.zeros(plan.state_shape, dtype=spec.state_dtype)          # [..., Hkv, F, D]
    else:
        S_in = state._fmajor()
        if S_in is None:  # a state in another layout (e.g. loaded from a file)
            S_in, copy_back, inplace = state.kv.mT.contiguous(), inplace, False
    S_out = S_in if inplace else torch.empty_like(S_in)                       # [..., Hkv, F, D]
    # the output: like the query when it has the query's shape (the cheapest allocation)
    y = torch.empty_like(query) if plan.out_like_query else torch.empty(plan.out_shape, dtype=cd)
    plan(query, key, value, keep, S_in, S_out, y)
    if spec.dtype is not cd:
        y = y.to(spec.dtype)
    if copy_back:
        state.kv.copy_(S_out.mT)
        return y, state.kv.mT  # the passed state's own storage, in its own layout
    return y, S_out


def _prefill_kernel(query, key, value, spec: Spec, basis: TaylorBasis, key_padding_mask, S, is_causal: bool):
    """Causal chunked prefill, or non-causal state build then read, through the fused kernel.

    Inputs in the compute dtype are read in place through their strides (a ``[B, L, H, E]``
    tensor transposed to ``[B, H, L, E]`` is not copied) and the output is written in place.
    Other dtypes go through in segments of tokens, converted one segment at a time, so the
    extra memory stays bounded however long the sequence.
    """
    B, Hkv, G, F, D, cd = spec.batch, spec.n_kv_heads, spec.group, spec.d_value + 1, spec.feature_dim, spec.compute_dtype
    Lq, Lk, E, Ev = spec.len_q, spec.len_k, spec.d_key, spec.d_value
    q4, k4, v4 = (_as_4d(t, B) for t in (query, key, value))                  # [B, H, L, X]
    keep = None if key_padding_mask is None else (~key_padding_mask).to(torch.uint8).reshape(B, Lk).contiguous()
    kvT = torch.empty((B, Hkv, F, D), dtype=spec.state_dtype)                 # [B, Hkv, F, D]
    if S is None:
        kvT.zero_()
    else:
        kvT.copy_(S.reshape(B, Hkv, D, F).mT)
    y = torch.empty((B, spec.n_q_heads, Lq, Ev), dtype=spec.dtype)           # [B, Hq, Lq, Ev]

    def run(q, k, v, keep, y, causal):
        _kernels.PrefillPlan(_kernels.load(), B, Hkv, G, q.shape[-2], k.shape[-2], E, Ev, basis, cd,
                             *_split_scale(spec.scale), causal, state_dtype=spec.state_dtype)(q, k, v, keep, kvT.mT, y)

    if spec.dtype == cd and all(t.stride(-1) == 1 for t in (q4, k4, v4)):
        run(q4, k4, v4, keep, y, is_causal)                                  # updates kvT in place
    else:
        conv = lambda t: t.to(cd).contiguous()
        per_token = B * (spec.n_q_heads * (E + Ev) + Hkv * (E + Ev)) * _ITEMSIZE[cd]
        seg = max(32, _SEGMENT_BYTES // max(per_token, 1) // 32 * 32)
        if is_causal:  # segments carry the state, exactly like one call
            for a in range(0, Lq, seg):
                b = min(a + seg, Lq)
                y_seg = torch.empty((B, spec.n_q_heads, b - a, Ev), dtype=cd)
                run(conv(q4[:, :, a:b]), conv(k4[:, :, a:b]), conv(v4[:, :, a:b]),
                    None if keep is None else keep[:, a:b].contiguous(), y_seg, True)
                y[:, :, a:b] = y_seg
        else:  # absorb every key segment, then read every query segment
            no_q, no_y = q4.new_empty((B, spec.n_q_heads, 0, E), dtype=cd), y.new_empty((B, spec.n_q_heads, 0, Ev), dtype=cd)
            for a in range(0, Lk, seg):
                b = min(a + seg, Lk)
                run(no_q, conv(k4[:, :, a:b]), conv(v4[:, :, a:b]),
                    None if keep is None else keep[:, a:b].contiguous(), no_y, False)
            no_k, no_v = k4.new_empty((B, Hkv, 0, E), dtype=cd), v4.new_empty((B, Hkv, 0, Ev), dtype=cd)
            for a in range(0, Lq, seg):
                b = min(a + seg, Lq)
                y_seg = torch.empty((B, spec.n_q_heads, b - a, Ev), dtype=cd)
                run(conv(q4[:, :, a:b]), no_k, no_v, None, y_seg, False)
                y[:, :, a:b] = y_seg
    y = y.view(*spec.batch_shape, spec.n_q_heads, Lq, Ev)
    return y, kvT.view(*spec.batch_shape, Hkv, F, D).mT


def _as_4d(t: torch.Tensor, B: int) -> torch.Tensor:
    """``[..., H, L, X] -> [B, H, L, X]``, a view whenever the batch dimensions allow it."""
    if t.dim() == 4:
        return t
    try:
        return t.view(B, *t.shape[-3:])
    except RuntimeError:
        return t.reshape(B, *t.shape[-3:])


def _quadratic_cheaper(spec: Spec, causal: bool) -> bool:
    """Scores cost ``Lq Lk (E + F + P)`` (half for causal); features ``(Lq + Lk) D F``."""
    F = spec.d_value + 1
    pairs = spec.len_q * spec.len_k / (2 if causal else 1)
    return pairs * (spec.d_key + F + spec.n_taylor) <= (spec.len_q + spec.len_k) * spec.feature_dim * F


def _split_scale(scale: float) -> tuple[float, float]:
    """``(sq, sk)`` with ``sq * sk = scale``; the sign of a negative scale rides on the query side."""
    root = math.sqrt(abs(scale))
    return math.copysign(root, scale), root


def _default_chunk(spec: Spec) -> int:
    # intra-chunk work grows with c, per-chunk state reads shrink with it; 64 balances them
    # for small heads on CPU (see benchmarks)
    return 64


def _normalize(U: torch.Tensor, d_value: int, dtype: torch.dtype) -> torch.Tensor:
    """``[..., Ev + 1] -> [..., Ev]``: numerator / normaliser; 0 where the normaliser is not positive."""
    num, z = U[..., :d_value], U[..., d_value:]
    dead = z <= 0  # False for NaN: a NaN normaliser propagates, as in SDPA
    # the inner where keeps the unused branch finite so its gradient is 0, not NaN
    return torch.where(dead, 0.0, num / torch.where(dead, torch.ones_like(z), z)).to(dtype)


def _needs_grad(*tensors) -> bool:
    """Autograd is on and a tensor (or a SATAState's tensor) requires grad."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if isinstance(t, SATAState):
            t = t.__dict__.get("_kvT", None) if "kv" not in t.__dict__ else t.kv   # no view made for this
        if t is not None and t.requires_grad:
            return True
    return False


_ITEMSIZE = {torch.float32: 4, torch.float64: 8}


class _Run:
    """One call's constants; ``recurrent``, ``chunked`` and ``parallel`` are the three paths.

    States travel F-major, ``S^T [B, Hkv, F, D]`` (``F = Ev + 1``), accumulated in the state dtype;
    features, scores and products are computed in the compute dtype.
    """

    def __init__(self, spec: Spec, basis: TaylorBasis, chunk: int, block: int | None = None):
        self.spec = spec
        self.basis = basis
        self.cd = spec.compute_dtype
        self.sd = spec.state_dtype
        self.sq, self.sk = _split_scale(spec.scale)
        D, F, E, g = spec.feature_dim, spec.d_value + 1, spec.d_key, spec.group
        self.budget = budget = min(_BLOCK_BYTES, get_memory_budget() // 4)
        # a chunk's features (x3 under autograd) must fit the block budget: large D, shorter chunks
        feature_bytes = 3 * D * (1 + g) * _ITEMSIZE[self.cd] * spec.batch * spec.n_kv_heads
        self.chunk = c = max(1, min(chunk, budget // max(feature_bytes, 1)))
        # bytes per token of a causal block, all heads (x3: temporaries under autograd)
        per_token = 3 * (D * (1 + g) + g * c + D * F / c + (1 + g) * (E + F)) * _ITEMSIZE[self.cd] * spec.batch * spec.n_kv_heads
        self.block = block or max(c, int(budget // max(per_token, 1)) // c * c)
        # the fused CPU kernel computes blocks without autograd when the state is in the compute dtype
        self.fused = _kernel_ok(spec)

    # ------------------------------------------------------------ shared pieces
    def _keys_values(self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
        """Scaled keys and ``[v, 1]`` rows in compute dtype; masked positions zeroed in both."""
        ks = k.to(self.cd) * self.sk                                            # [B, Hkv, L, E]
        vt = torch.cat([v.to(self.cd), v.new_ones(v.shape[:-1] + (1,), dtype=self.cd)], dim=-1)  # [B, Hkv, L, F]
        if mask is not None:
            keep = ~mask[:, None, :, None]                                       # [B, 1, L, 1]
            ks = torch.where(keep, ks, 0.0)
            vt = torch.where(keep, vt, 0.0)
        return ks, vt

    def _grow(self, S: torch.Tensor | None, inc: torch.Tensor) -> torch.Tensor:
        """``S + inc`` accumulated in the state dtype."""
        inc = inc.to(self.sd)
        return inc if S is None else S + inc

    def _read(self, phi: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
        """``phi @ S``: ``[..., T, D] x S^T [..., F, D] -> [..., T, F]``."""
        return phi @ S.to(self.cd).transpose(-1, -2)

    def _blocks(self, fn, length: int, slices, need_grad: bool, carry):
        """Apply ``fn(*slices(a, b), carry) -> (out, carry)`` over blocks of tokens.

        Under autograd each block is checkpointed: its features are recomputed in the
        backward pass instead of kept, so memory does not grow with the length.
        """
        outs = []
        for start in range(0, length, self.block):
            args = slices(start, min(start + self.block, length))
            out, carry = checkpoint(fn, *args, carry, use_reentrant=False) if need_grad else fn(*args, carry)
            outs.append(out)
        return outs, carry

    # ------------------------------------------------------------ decode
    def recurrent(self, q, k, v, mask, S, need_state):
        """Token by token: ``S += [v_t, 1] phi(k_t)^T``, then ``u_t = phi(q_t) S``."""
        B, Hkv, g, L, E = q.shape
        phiq = _phi(q.to(self.cd) * self.sq, self.basis)                       # [B, Hkv, g, L, D]
        ks, vt = self._keys_values(k, v, mask)                                  # [B, Hkv, L, E], [B, Hkv, L, F]
        phik = _phi(ks, self.basis)                                             # [B, Hkv, L, D]
        outs = []
        for t in range(L):
            S = self._grow(S, vt[:, :, t, :, None] * phik[:, :, t, None, :])    # [B, Hkv, F, D]
            outs.append(self._read(phiq[:, :, :, t], S))                       # [B, Hkv, g, F]
        U = torch.stack(outs, dim=-2) if outs else phiq.new_zeros(B, Hkv, g, 0, vt.shape[-1])
        return _normalize(U, self.spec.d_value, self.spec.dtype), S              # [B, Hkv, g, L, Ev]

    # ------------------------------------------------------------ causal prefill / training
    def chunked(self, q, k, v, mask, S, need_state):
        """Causal, in chunks of ``c``: intra-chunk ``T_P(QK^T)`` plus inter-chunk ``phi(Q_t) S_{t-1}``."""
        B, Hkv, g, L, E = q.shape
        if S is None:
            S = q.new_zeros(B, Hkv, self.spec.d_value + 1, self.spec.feature_dim, dtype=self.sd)
        if _needs_grad(q, k, v, S):
            return _CausalChunked.apply(q, k, v, S, mask, self)
        return _causal_forward(q, k, v, mask, S, self, saved=None)

    # ------------------------------------------------------------ non-causal
    def parallel(self, q, k, v, mask, S, need_state):
        """Non-causal through the features: ``S += phi(K)^T [V, 1]`` over all keys, then ``phi(Q) S``."""
        spec = self.spec
        B, Hkv, g, Lq, E = q.shape
        need_grad = _needs_grad(q, k, v, S)
        slices = lambda a, b: (k[:, :, a:b], v[:, :, a:b], None if mask is None else mask[:, a:b])
        _, S = self._blocks(functools.partial(_key_block, run=self), k.shape[-2], slices, need_grad, S)
        if S is None:  # no keys at all: every normaliser is 0
            return q.new_zeros(B, Hkv, g, Lq, spec.d_value), None
        outs, _ = self._blocks(functools.partial(_query_block, run=self), Lq, lambda a, b: (q[:, :, :, a:b],), need_grad, S)
        return torch.cat(outs, dim=-2) if outs else q.new_empty(B, Hkv, g, 0, spec.d_value), S

    def quadratic(self, q, k, v, mask, S, need_state, causal: bool):
        """``T_P`` on the score matrix, query block by query block: cheaper than features when the
        sequence is short next to ``D``. Returns no new state (``S`` is passed through)."""
        spec = self.spec
        B, Hkv, g, Lq, E = q.shape
        Lk = k.shape[-2]
        ks, vt = self._keys_values(k, v, mask)                                  # [B, Hkv, Lk, E], [B, Hkv, Lk, F]
        # query rows per block so that one block's scores fit the block budget
        rows = max(1, self.budget // max(3 * _ITEMSIZE[self.cd] * B * Hkv * g * max(Lk, 1), 1))
        fn = functools.partial(_quadratic_block, ks=ks, vt=vt, run=self, causal=causal, offset=Lk - Lq)
        outs = []
        for a in range(0, Lq, rows):
            b = min(a + rows, Lq)
            args = (q[:, :, :, a:b], S, a)
            outs.append(checkpoint(fn, *args, use_reentrant=False) if _needs_grad(q, k, v, S) else fn(*args))
        return torch.cat(outs, dim=-2) if outs else q.new_empty(B, Hkv, g, 0, spec.d_value), S


def _quadratic_block(q, S, start: int, *, ks, vt, run: _Run, causal: bool, offset: int):
    """Queries ``start ..`` of a block against all keys: ``rownorm(T_P(Q K^T) masked) [V, 1]`` (+ ``phi(Q) S``)."""
    qs = q.to(run.cd) * run.sq                                                  # [B, Hkv, g, T, E]
    A = taylor_exp(qs @ ks[:, :, None].mT, run.spec.n_taylor)                  # [B, Hkv, g, T, Lk]
    if causal:  # query i (absolute offset + start + i) sees keys j <= it
        T, Lk = A.shape[-2:]
        i = torch.arange(start + offset, start + offset + T, device=A.device)[:, None]
        A = A.masked_fill(torch.arange(Lk, device=A.device)[None, :] > i, 0.0)
    U = A @ vt[:, :, None]                                                      # [B, Hkv, g, T, F]
    if S is not None:
        U = U + run._read(_phi(qs, run.basis), S[:, :, None])
    return _normalize(U, run.spec.d_value, run.spec.dtype)


def _causal_forward(q, k, v, mask, S, run: _Run, saved: list | None, save_every: int = 1):
    """All blocks of a causal sequence, without autograd; ``saved`` collects the start state of
    every ``save_every``-th block."""
    B, Hkv, g, L, E = q.shape
    out = q.new_empty(B, Hkv, g, L, run.spec.d_value)                         # [B, Hkv, g, L, Ev]
    block_fn = _kernel_causal_block if run.fused else _causal_block
    for i, a in enumerate(range(0, L, run.block)):
        b = min(a + run.block, L)
        if saved is not None and i % save_every == 0:
            saved.append(S)
        out[:, :, :, a:b], S = block_fn(
            q[:, :, :, a:b], k[:, :, a:b], v[:, :, a:b], None if mask is None else mask[:, a:b], S, run=run
        )
    return out, S


def _kernel_causal_block(q, k, v, mask, S, *, run: _Run):
    """:func:`_causal_block` through the fused CPU kernel (no autograd): same arguments and results."""
    B, Hkv, g, T, E = q.shape
    cd = run.cd
    q4 = q.flatten(1, 2)                                                        # [B, Hkv g, T, E]
    q4, k, v = (t if t.dtype == cd and t.stride(-1) == 1 else t.to(cd).contiguous() for t in (q4, k, v))
    keep = None if mask is None else (~mask).to(torch.uint8).contiguous()      # [B, T]
    S_new = S.clone()                                                           # [B, Hkv, F, D] (S may be saved)
    y = torch.empty(B, Hkv * g, T, run.spec.d_value, dtype=cd)                  # [B, Hkv g, T, Ev]
    _kernels.PrefillPlan(_kernels.load(), B, Hkv, g, T, T, E, run.spec.d_value, run.basis, cd, run.sq, run.sk,
                         True, state_dtype=run.sd)(q4, k, v, keep, S_new.mT, y)
    return y.view(B, Hkv, g, T, run.spec.d_value).to(run.spec.dtype), S_new


class _CausalChunked(torch.autograd.Function):
    """Causal chunked attention whose backward recomputes each block instead of storing its features.

    Saved for backward: the inputs and the state at the start of every block (one state per
    ``run.block`` tokens), so activation memory does not grow with ``D`` per token. When those
    states would not fit the memory budget, only every ``stride``-th is kept and the states in
    between are recomputed from the keys in the backward pass. The backward pass walks the
    blocks in reverse, re-runs each under autograd and carries the state gradient.
    """

    @staticmethod
    def forward(ctx, q, k, v, S, mask, run: _Run):
        L = q.shape[-2]
        n_blocks = max(1, -(-L // run.block))
        state_bytes = S.numel() * S.element_size()
        stride = 1
        if n_blocks * state_bytes > get_memory_budget() // 4:  # keep ~sqrt(n) states, recompute the rest
            stride = math.isqrt(n_blocks - 1) + 1
            held = (-(-n_blocks // stride) + stride) * state_bytes
            if held > get_memory_budget() // 2:
                raise MemoryBudgetError(
                    f"sata_attention: the backward pass of {L} tokens in {n_blocks} blocks needs at least "
                    f"{format_bytes(held)} of saved states ({format_bytes(state_bytes)} each), more than half the memory "
                    f"budget of {format_bytes(get_memory_budget())}. Use fewer Taylor terms or smaller heads, or raise "
                    "the budget with sata.set_memory_budget(...) or SATA_MEMORY_BUDGET."
                )
        starts: list = []
        with torch.no_grad():
            out, S_end = _causal_forward(q, k, v, mask, S, run, saved=starts, save_every=stride)
        ctx.save_for_backward(q, k, v, *starts)
        ctx.mask, ctx.run, ctx.stride = mask, run, stride
        return out, S_end

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_S_end):
        q, k, v, *saved = ctx.saved_tensors
        mask, run, stride = ctx.mask, ctx.run, ctx.stride
        need = ctx.needs_input_grad[:4]
        dq = torch.zeros_like(q) if need[0] else None
        dk = torch.zeros_like(k) if need[1] else None
        dv = torch.zeros_like(v) if need[2] else None
        d_S = d_S_end
        L = q.shape[-2]
        n_blocks = max(1, -(-L // run.block))
        span = lambda i: (i * run.block, min((i + 1) * run.block, L))
        for seg in reversed(range(len(saved))):
            # the states at the start of this segment's blocks: saved, or recomputed from the keys
            starts = [saved[seg]]
            with torch.no_grad():
                for i in range(seg * stride + 1, min((seg + 1) * stride, n_blocks)):
                    a, b = span(i - 1)
                    starts.append(_key_block(k[:, :, a:b], v[:, :, a:b], None if mask is None else mask[:, a:b],
                                             starts[-1], run=run)[1])
            for j in reversed(range(len(starts))):
                a, b = span(seg * stride + j)
                with torch.enable_grad():
                    leaves = [
                        q[:, :, :, a:b].detach().requires_grad_(need[0]),
                        k[:, :, a:b].detach().requires_grad_(need[1]),
                        v[:, :, a:b].detach().requires_grad_(need[2]),
                        starts[j].detach().requires_grad_(True),
                    ]
                    y, S_next = _causal_block(*leaves[:3], None if mask is None else mask[:, a:b], leaves[3], run=run)
                    wrt = [t for t in leaves if t.requires_grad]
                    grads = torch.autograd.grad([y, S_next], wrt, [d_out[:, :, :, a:b], d_S], allow_unused=True)
                grads = dict(zip([id(t) for t in wrt], grads))
                for dst, leaf, sl in ((dq, leaves[0], (slice(None),) * 3 + (slice(a, b),)),
                                      (dk, leaves[1], (slice(None),) * 2 + (slice(a, b),)),
                                      (dv, leaves[2], (slice(None),) * 2 + (slice(a, b),))):
                    if dst is not None and grads.get(id(leaf)) is not None:
                        dst[sl] = grads[id(leaf)]
                d_S = grads[id(leaves[3])]
                if d_S is None:
                    d_S = torch.zeros_like(starts[j])
                starts[j] = None  # free as we go
        return dq, dk, dv, (d_S if need[3] else None), None, None


def _key_block(k, v, mask, S, *, run: _Run):
    """Add one block of keys to the state: ``S^T + [V, 1]^T phi(K)``."""
    ks, vt = run._keys_values(k, v, mask)                                      # [B, Hkv, T, E], [B, Hkv, T, F]
    return None, run._grow(S, vt.transpose(-1, -2) @ _phi(ks, run.basis))      # [B, Hkv, F, D]


def _query_block(q, S, *, run: _Run):
    """Read one block of queries out of the state: ``phi(Q) S``."""
    U = run._read(_phi(q.to(run.cd) * run.sq, run.basis), S[:, :, None])      # [B, Hkv, g, T, F]
    return _normalize(U, run.spec.d_value, run.spec.dtype), S


def _causal_block(q, k, v, mask, S, *, run: _Run):
    """One block of ``n`` chunks of ``c`` tokens, causal, starting from state ``S^T [B, Hkv, F, D]``."""
    B, Hkv, g, T, E = q.shape
    c = min(run.chunk, T)
    n = -(-T // c)
    pad = n * c - T
    qs = q.to(run.cd) * run.sq                                                  # [B, Hkv, g, T, E]
    ks, vt = run._keys_values(k, v, mask)                                       # [B, Hkv, T, E], [B, Hkv, T, F]
    if pad:  # zero rows: a padded key adds nothing, a padded query is dropped below
        qs = torch.nn.functional.pad(qs, (0, 0, 0, pad))
        ks = torch.nn.functional.pad(ks, (0, 0, 0, pad))
        vt = torch.nn.functional.pad(vt, (0, 0, 0, pad))
    F = vt.shape[-1]
    qc = qs.view(B, Hkv, g, n, c, E)                                            # [B, Hkv, g, n, c, E]
    kc = ks.view(B, Hkv, n, c, E)                                               # [B, Hkv, n, c, E]
    vc = vt.view(B, Hkv, n, c, F)                                               # [B, Hkv, n, c, F]

    # inter-chunk: features chunk by chunk, feature-major, and the state before each chunk
    phik = _phi_t(kc.mT.contiguous(), run.basis)                                # [B, Hkv, n, D, c]
    dS = vc.mT @ phik.mT                                                        # [B, Hkv, n, F, D]
    S_c = S.to(run.cd)[:, :, None]                                              # [B, Hkv, 1, F, D]
    before = torch.cat([S_c, dS[:, :, :-1]], dim=2).cumsum(dim=2)              # [B, Hkv, n, F, D] exclusive
    phiq = _phi_t(qc.mT.contiguous(), run.basis)                                # [B, Hkv, g, n, D, c]
    U = phiq.mT @ before[:, :, None].mT                                         # [B, Hkv, g, n, c, F]

    # intra-chunk: the polynomial of the scores, causally masked
    A = taylor_exp(qc @ kc[:, :, None].mT, run.spec.n_taylor)                  # [B, Hkv, g, n, c, c]
    A = A.tril_() if not A.requires_grad else A.tril()
    U = U + A @ vc[:, :, None]                                                  # [B, Hkv, g, n, c, F]

    y = _normalize(U.view(B, Hkv, g, n * c, F)[:, :, :, :T], run.spec.d_value, run.spec.dtype)  # [B, Hkv, g, T, Ev]
    # the new state sums in the state dtype: earlier state + this block's chunks
    return y, run._grow(S, dS.sum(dim=2))                                      # [B, Hkv, F, D]


@functools.lru_cache(maxsize=32)
def _tril(c: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.ones(c, c, device=device, dtype=dtype).tril()
