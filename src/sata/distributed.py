"""Exact context parallelism: one sequence split across the ranks of a ``torch.distributed`` group.

The state of a sequence is the sum of the states of its segments (``MATH.md`` section 4),
so a sequence split into contiguous segments, one per rank in rank order, is attended
exactly by exchanging states, never the segments' keys or values:

    S_r      = phi(K_r)^T [V_r, 1]                  each rank, its own segment (local)
    P_r      = S_in + sum_{r' < r} S_r'              exclusive prefix: one all-gather of states
    Y_r      = causal attention of segment r over P_r and its own keys   (local)

The window mode (``window``, ``sinks``, ``recentre``; ``MATH.md`` section 6) is exchanged the same
way: a segment's state then also holds its last ``window`` keys and values and its first ``sinks``
kept keys (:class:`sata.state.ExactKeys`, constant size), and ``P_r`` is the merge ``S_in + S_0 +
... + S_{r-1}`` of window states (``SATAState.__add__``), which moves the keys an earlier segment
can no longer reach into the Taylor part and keeps the first ``sinks`` kept keys of the stream, so
a window that spans several short segments and sinks that live on rank 0 are both exact. The key
centre of a re-centred stream (the mean of the whole sequence's kept keys after its sinks, as one call would choose)
comes from one more all-gather of per-rank key sums.

Communication per call, per rank (:func:`state_exchange_bytes`), plus a few integers for validation;
none of it depends on the sequence length:

- plain: sends one state ``[..., Hkv, D, Ev + 1]`` and receives ``world_size - 1`` of them (an
  all-gather); the backward pass all-gathers gradients of twice that size.
- window mode: sends one state plus its exact keys, ``B Hkv (D (Ev + 1) + (window + sinks)(E + Ev))``
  floats and ``B (window + sinks)`` int64 slot flags and sink positions, and receives ``world_size - 1``
  of them; with ``recentre`` and no ``state``, also ``B (Hkv E + 1)`` float64 key sums. The backward
  pass all-reduces the gradients of all ``world_size`` states' floats (an all-reduce: every backend of
  torch >= 2.5 has it, gloo's reduce-scatter came later).

Works with any backend that implements ``all_gather`` and ``all_reduce`` (gloo on CPU, nccl on GPU).
Launch with ``torchrun --nproc-per-node N script.py`` (see ``examples/context_parallel.py``).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from ._checks import check_inputs
from ._paths.centre import fixed
from .hybrid import Hybrid, check_hybrid
from .ops import _DEFAULT_MIX, accumulate_state, sata_attention
from .state import ExactKeys, SATAState

__all__ = ["context_parallel_attention", "exclusive_prefix_states", "state_exchange_bytes"]

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1}
_FN = "context_parallel_attention"


def context_parallel_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, n_taylor: int = 3, is_causal: bool = True,
    scale: float | None = None, enable_gqa: bool = False, key_padding_mask: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None, state: SATAState | None = None, return_state: bool = False,
    window: int = 0, sinks: int = 0, taylor_mix: float | torch.Tensor = _DEFAULT_MIX, recentre: float | torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, SATAState]:
    r""":func:`sata.sata_attention` over a sequence whose segments live on different ranks.

    Rank ``r`` of ``group`` holds the ``r``-th contiguous segment of one sequence (segments
    may have different lengths, including 0). Every rank of the group must call this
    function with the same settings, and, under autograd, every rank must run the backward
    pass (it contains a collective).

    .. math::
        Y_r = \mathrm{SATA}(Q_r, K_r, V_r;\ S_{in} + S_0 + \dots + S_{r-1})

    Causal: query ``i`` of rank ``r`` attends to the keys of ``state``, of all earlier ranks,
    and of its own segment up to ``i``. Non-causal: every query attends to all keys of every
    rank (and of ``state``). Equal to one process running the whole sequence, up to rounding.

    The window mode (``window``, ``sinks`` or ``recentre``, causal only) attends exactly to the
    ``window`` most recent positions, which may lie on earlier ranks, and the first ``sinks`` kept
    keys of the whole sequence; a re-centred stream without ``state`` centres its keys by the mean of
    the whole sequence's kept keys after the first ``sinks``, as one call on the whole sequence does.

    Communication: one all-gather of one state per rank, ``[..., Hkv, D, Ev + 1]`` floats with
    ``D = C(E + P - 1, P - 1)``, and in the window mode its window and sink keys and values
    (see :func:`state_exchange_bytes`), independent of the sequence length.

    Args:
        query (torch.Tensor): ``[..., Hq, L_r, E]``, this rank's segment.
        key (torch.Tensor): ``[..., Hkv, L_r, E]``.
        value (torch.Tensor): ``[..., Hkv, L_r, Ev]``.
        n_taylor, scale, enable_gqa: as in :func:`sata.sata_attention`. Default ``n_taylor=3``.
        is_causal (bool): causal over the whole sequence. Default: ``True``.
        key_padding_mask (torch.Tensor, optional): ``[..., L_r]`` bool, ``True`` = ignore that key.
        group (ProcessGroup, optional): the ranks sharing the sequence, in sequence order.
            Default: the default group.
        state (SATAState, optional): state of the tokens before the whole sequence, the same on
            every rank (checked: passed on every rank or on none, with the same count, window, sinks and key
            centre; its numbers are not compared). Its gradient on each rank is that rank's share (sum over ranks, as for
            replicated parameters).
        return_state (bool): also return the state after the whole sequence (the same on every
            rank). Default: ``False``.
        window, sinks, taylor_mix, recentre: the window mode of :func:`sata.sata_attention`, the same
            on every rank; needs ``is_causal=True``. A tensor ``taylor_mix`` or ``recentre`` gets its
            gradient share on each rank, like ``state``. Defaults: ``0, 0, 1.0, None`` (the plain op).

    Returns:
        ``[..., Hq, L_r, Ev]`` in the input dtype, or ``(output, state)`` with ``return_state=True``.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
        ValueError: the ranks disagree on shapes, dtype or settings, ``is_causal``, the window settings and
            the passed state included (raised on every rank); the window mode with ``is_causal=False``.
    """
    common = dict(n_taylor=n_taylor, scale=scale, enable_gqa=enable_gqa)
    _check_initialised()
    if window or sinks or recentre is not None or (state is not None and state.exact is not None):
        return _window_mode(query, key, value, is_causal, key_padding_mask, state, return_state, group,
                            dict(window=window, sinks=sinks, taylor_mix=taylor_mix, recentre=recentre), **common)
    local = _local_state(query, key, value, is_causal, key_padding_mask, state, group, taylor_mix, **common)
    # q, k, v ride along so that every rank joins the backward collective, even with an empty segment
    prefix, total = exclusive_prefix_states(local, group=group, _anchors=(query, key, value),
                                            _codes=_call_codes(is_causal, state))
    if state is not None:
        prefix, total = state + prefix, state + total
    if is_causal:
        out = sata_attention(query, key, value, is_causal=True, key_padding_mask=key_padding_mask, state=prefix,
                             **common)
    else:  # every key of the sequence is in ``total``: read it with no further keys
        out = sata_attention(query, key[..., :0, :], value[..., :0, :], is_causal=False, state=total, **common)
    if out.numel() == 0 and not out.requires_grad and total.kv.requires_grad:
        # an empty segment's output must still reach the collective in backward, or the other ranks wait forever
        out = out + total.kv.sum().to(out.dtype) * 0
    return (out, total) if return_state else out


def _check_initialised() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{_FN}: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group(...) first (torchrun sets the environment)"
        )


def _check_segment(query, key, is_causal) -> None:
    """``is_causal`` is a bool, and a causal segment has as many queries as keys."""
    if not isinstance(is_causal, bool):
        raise TypeError(f"{_FN}: is_causal must be a bool, got {is_causal!r}")
    if is_causal and query.shape[-2] != key.shape[-2]:
        raise ValueError(f"{_FN}: is_causal=True needs as many queries as keys in each segment, "
                         f"got {query.shape[-2]} and {key.shape[-2]}")


def _local_state(query, key, value, is_causal: bool, key_padding_mask, state, group, taylor_mix, *, n_taylor,
                 scale, enable_gqa) -> SATAState:
    """This rank's segment state, after validating its arguments; a rank that fails alone makes every
    rank raise (through :func:`_check_agreement`) instead of leaving the others waiting."""
    try:
        _check_segment(query, key, is_causal)
        sata_attention(query[..., :0, :], key[..., :0, :], value[..., :0, :], n_taylor=n_taylor, scale=scale,
                       enable_gqa=enable_gqa, taylor_mix=taylor_mix)           # checks the query side; no work
        local = accumulate_state(key, value, n_taylor=n_taylor, scale=scale, key_padding_mask=key_padding_mask)
        if state is not None:
            state.check_compatible(local, what="context_parallel_attention: state", ours="in the state",
                                   theirs="in this call")
    except (ValueError, TypeError):
        _check_agreement(None, group, dist.get_world_size(group))
        raise
    return local


# ---------------------------------------------------------------------------- the window mode
def _window_mode(query, key, value, is_causal: bool, key_padding_mask, state: SATAState | None, return_state: bool,
                 group, hybrid_args: dict, *, n_taylor, scale, enable_gqa):
    """The window mode: the ranks' segment states (each from an empty start, centred by the stream's key
    centre) all-gathered with their exact keys, merged in rank order into each rank's incoming state."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    common = dict(n_taylor=n_taylor, scale=scale, enable_gqa=enable_gqa)
    try:
        spec, hybrid = _check_window_call(query, key, value, is_causal, key_padding_mask, state, hybrid_args, common)
        # what every rank must agree on, described by an empty state of this rank's configuration (over the memory
        # budget on this rank alone: the others must still hear of it, or they wait in the exchange)
        shape = SATAState.zeros(spec.batch_shape, spec.n_kv_heads, spec.d_key, spec.d_value, spec.n_taylor, spec.scale,
                                dtype=spec.state_dtype, device=spec.device, window=hybrid.window, sinks=hybrid.sinks)
    except (ValueError, TypeError):  # (MemoryBudgetError is a ValueError)
        _check_agreement(None, group, world)
        raise
    lengths = _check_agreement(replace(shape, n_tokens=spec.len_k), group, world,
                               _call_codes(is_causal, state) + _mode_codes(hybrid, spec.n_q_heads))
    if state is not None:  # one call continuing ``state`` keeps its centre
        centre = state.key_centre
    elif hybrid.recentre is not None:
        centre = _stream_key_centre(key, key_padding_mask, hybrid.sinks, spec.state_dtype, group, world)
    else:
        centre = None
    if centre is not None:  # every rank's local state on this one centre (a rank does not re-estimate it alone)
        centre = fixed(centre)
    start = replace(shape, key_centre=centre)                # an empty stream with the whole sequence's centre
    local = sata_attention(query[..., :0, :], key, value, is_causal=False, key_padding_mask=key_padding_mask,
                           state=start, return_state=True, **common, **hybrid_args)[1]
    anchors = (query, key, value, *(t for t in (hybrid.taylor_mix, hybrid.recentre) if isinstance(t, torch.Tensor)))
    if state is not None:
        anchors += tuple(t for _, t in (("kv", state.kv), *state._extras()) if t.is_floating_point())
    states, gathered = _all_gather_states(local, lengths, group, world, anchors)
    incoming = state if state is not None else start
    prefix = incoming
    for r in range(world if return_state else rank):     # left fold: the merge keeps the stream's order
        incoming = incoming + states[r]
        if r + 1 == rank:
            prefix = incoming
    out = sata_attention(query, key, value, is_causal=True, key_padding_mask=key_padding_mask, state=prefix, **common,
                         **hybrid_args)
    if gathered.requires_grad:  # rank 0 reads no gathered state: tie it in so that its backward joins the collective
        out = _Join.apply(out, gathered)
    return (out, incoming) if return_state else out


def _check_window_call(query, key, value, is_causal, key_padding_mask, state, hybrid_args: dict, common: dict):
    """Validate this rank's arguments for the window mode: ``(Spec, Hybrid)`` or a ``ValueError`` / ``TypeError``."""
    _check_segment(query, key, is_causal)
    if not is_causal:
        raise ValueError(
            f"{_FN}: window, sinks and recentre need is_causal=True (a non-causal query would also need the "
            "window keys and the Taylor state of the later ranks); use is_causal=True or the plain op"
        )
    spec = check_inputs(_FN, query, key, value, is_causal=True, key_padding_mask=key_padding_mask, state=state, **common)
    hybrid = check_hybrid(_FN, **hybrid_args, n_taylor=spec.n_taylor, n_q_heads=spec.n_q_heads, device=spec.device)
    if state is not None:
        state.check_compatible({"window": hybrid.window, "sinks": hybrid.sinks}, what=f"{_FN}: state",
                               ours="in the state", theirs="in this call")
    return spec, hybrid


_CALL = ("is_causal", "state", "state n_tokens", "state window", "state sinks", "state key centre")


def _call_codes(is_causal: bool, state: SATAState | None) -> list[int]:
    """``is_causal`` and what describes the passed ``state`` (there or not, its count, window, sinks and key centre),
    for :func:`_check_agreement`: every rank must pass the same (a state restored on one rank only, or from another
    point of the stream, gave the other ranks wrong outputs without an error). Read back by :func:`_fields`."""
    if state is None:
        return [int(is_causal), 0, 0, 0, 0, 0]
    return [int(is_causal), 1, state.n_tokens, state.window, state.sinks, int(state.key_centre is not None)]


def _mode_codes(hybrid: Hybrid, n_q_heads: int) -> list[int]:
    """``taylor_mix`` and ``recentre`` per query head as float64 bits, for :func:`_check_agreement`:
    ``[Hq, *mix bits, has recentre, *recentre bits]`` (read back by :func:`_fields`)."""
    def bits(x) -> list[int]:
        t = x.detach() if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float64)
        return t.to("cpu", torch.float64).expand(n_q_heads).contiguous().view(torch.int64).tolist()

    codes = [n_q_heads, *bits(hybrid.taylor_mix), int(hybrid.recentre is not None)]
    return codes + (bits(hybrid.recentre) if hybrid.recentre is not None else [])


def _fields(settings: list[int]) -> dict[str, object]:
    """A row of :func:`_check_agreement` (after ``n_tokens, failed``) by name, floats decoded, for its message."""
    floats = lambda xs: torch.tensor(xs, dtype=torch.int64).view(torch.float64).tolist()
    names = ("dtype", "n_taylor", "d_key", "d_value", "kv heads", "state size", "window", "sinks")
    out = dict(zip(names, settings))
    out["dtype"] = {code: str(dt) for dt, code in _DTYPE_CODES.items()}.get(settings[0], settings[0])
    nb = settings[8]
    out["batch shape"] = tuple(settings[9 : 9 + nb])
    out["scale"] = floats(settings[9 + nb : 10 + nb])[0]
    mode = [c for c in settings[10 + nb :] if c != -1]        # -1: padding (never a finite float's bits)
    if mode:  # _call_codes
        out.update(zip(_CALL, mode[: len(_CALL)]))
        out["is_causal"], out["state"] = bool(out["is_causal"]), bool(out["state"])
        mode = mode[len(_CALL):]
    if mode:  # _mode_codes: [Hq, *taylor_mix bits, has recentre, *recentre bits]
        n = mode[0]
        out["taylor_mix"] = floats(mode[1 : n + 1])
        out["recentre"] = floats(mode[n + 2 :]) if mode[n + 1] else None
    return out


def _stream_key_centre(key, key_padding_mask, sinks: int, dtype, group, world: int) -> torch.Tensor:
    """The key centre one call on the whole sequence would choose, ``[..., Hkv, E]``: the mean of the kept keys of
    every rank after the sequence's first ``sinks`` kept ones (``sata._paths.centre.centre_of``), from one
    all-gather of per-rank sums, counts and the running sums of each rank's first ``sinks`` kept keys (summed in
    ``dtype`` as the op sums them, exchanged in float64; no gradient, as in the op)."""
    kept = torch.ones(key.shape[:-3] + key.shape[-2:-1], dtype=torch.bool, device=key.device) \
        if key_padding_mask is None else ~key_padding_mask                         # [..., L]
    k = key.detach().to(dtype)                                                 # [..., Hkv, L, E]
    sums = torch.where(kept[..., None, :, None], k, 0.0).sum(-2).double()     # [..., Hkv, E]
    counts = kept.sum(-1)                                                      # [...]
    # this rank's first `sinks` kept keys into slots 0 .. sinks - 1 (every other key into a slot dropped after),
    # then their running sums: firsts[j] = the sum of the first j, j = 0 .. sinks (a sink's key, wherever it sits)
    rank_of = kept.cumsum(-1)                                                  # [..., L]
    slot = torch.where(kept & (rank_of <= sinks), rank_of - 1, sinks)         # [..., L]
    index = slot[..., None, :, None].expand(k.shape)                           # [..., Hkv, L, E]
    first = k.new_zeros(*k.shape[:-2], sinks + 1, k.shape[-1]).scatter_add_(-2, index, k)[..., :sinks, :]
    firsts = torch.cat([torch.zeros_like(sums)[..., None, :], first.double().cumsum(-2)], -2)   # [..., Hkv, S + 1, E]
    firsts = firsts.movedim(-2, 0)                                             # [S + 1, ..., Hkv, E]
    mine = torch.cat([sums.flatten(), counts.flatten().double(), firsts.flatten()])
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    n_s, n_c = sums.numel(), counts.numel()
    total, before = torch.zeros_like(sums), torch.zeros_like(counts)
    for part in parts:  # in rank order: the sinks are the first kept keys of the earlier ranks, then of this one
        r_sums, r_counts = part[:n_s].view(sums.shape), part[n_s:n_s + n_c].view(counts.shape).long()
        r_firsts = part[n_s + n_c:].view(firsts.shape)
        taken = (sinks - before).clamp(0, sinks).clamp_max(r_counts)           # [...]: this rank's keys that are sinks
        sink_sum = r_firsts.gather(0, taken[None, ..., None, None].expand(1, *sums.shape))[0]
        total = total + r_sums - sink_sum
        before = before + r_counts
    far = (before - sinks).clamp_min(1)
    return (total / far[..., None, None].double()).to(dtype)


def _all_gather_states(local: SATAState, lengths: list[int], group, world: int, anchors):
    """Every rank's window-mode segment state, differentiable: ``(states, gathered floats [W, N])``."""
    floats = [("kv", local.kv), *((n, t) for n, t in local._extras() if n in _EXACT_FLOATS)]
    flat = torch.cat([t.reshape(-1) for _, t in floats])                       # [N] in the state dtype
    gathered = _AllGatherStates.apply(flat, group, world, *anchors)            # [W, N]
    index = None
    if local.exact is not None:  # slot flags and sink positions: no gradient
        mine = torch.cat([local.exact.win_keep.long().reshape(-1), local.exact.sink_pos.reshape(-1)])
        index = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(index, mine, group=group)
    states = []
    for r in range(world):
        parts = dict(zip([n for n, _ in floats], gathered[r].split([t.numel() for _, t in floats])))
        parts = {n: parts[n].view(t.shape) for n, t in floats}
        exact = None
        if index is not None:
            keep, pos = index[r].split([local.exact.win_keep.numel(), local.exact.sink_pos.numel()])
            exact = ExactKeys(parts["win_k"], parts["win_v"], keep.view(local.exact.win_keep.shape).bool(),
                              parts["sink_k"], parts["sink_v"], pos.view(local.exact.sink_pos.shape))
        states.append(replace(local, kv=parts["kv"], exact=exact, n_tokens=lengths[r]))
    return states, gathered


_EXACT_FLOATS = ("win_k", "win_v", "sink_k", "sink_v")


class _AllGatherStates(torch.autograd.Function):
    """``x_r -> stack(x_0, ..., x_{W-1})`` across ranks; backward sums every rank's gradient of ``x_r`` (an all-reduce)."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, group, world: int, *anchors: torch.Tensor) -> torch.Tensor:
        # ``anchors`` are unused: they make the output require grad whenever the caller's inputs do
        ctx.n_anchors, ctx.group, ctx.rank = len(anchors), group, dist.get_rank(group)
        parts = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(parts, flat.contiguous(), group=group)
        return torch.stack(parts)                                               # [W, N]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)                # [W, N], all-reduced in place
        dist.all_reduce(grad, group=ctx.group)
        return (grad[ctx.rank], None, None) + (None,) * ctx.n_anchors


class _Join(torch.autograd.Function):
    """``out`` unchanged, with ``anchor`` as an input that receives a zero gradient: the backward pass of every
    rank then reaches ``anchor``'s collective, whether or not its output read ``anchor``."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        ctx.anchor_shape, ctx.anchor_dtype = anchor.shape, anchor.dtype
        return out.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, grad.new_zeros(ctx.anchor_shape, dtype=ctx.anchor_dtype)


# ---------------------------------------------------------------------------- the exchange
def exclusive_prefix_states(
    local: SATAState, *, group: dist.ProcessGroup | None = None, _anchors: tuple[torch.Tensor, ...] = (),
    _codes: list[int] = (),
) -> tuple[SATAState, SATAState]:
    r"""Exclusive prefix and total of the ranks' states: ``(sum_{r' < r} S_r', sum_r' S_r')``.

    One all-gather of one state per rank (and of a few integers that validate the ranks
    agree). Differentiable: the backward pass sends each rank the gradients of all later
    ranks' prefixes and of every rank's total, through one all-gather of ``2 x`` a state.

    Args:
        local (SATAState): this rank's segment state, ``kv [..., Hkv, D, Ev + 1]``.
        group (ProcessGroup, optional): default: the default group.

    Returns:
        ``(prefix, total)``: states with ``n_tokens`` of the earlier ranks and of all ranks.
    """
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    lengths = _check_agreement(local, group, world, list(_codes))
    kv = _PrefixSum.apply(local.kv.mT.contiguous(), group, world, rank, *_anchors).mT   # [2, ..., Hkv, D, F] F-major storage
    prefix = SATAState(kv=kv[0], n_taylor=local.n_taylor, d_key=local.d_key, d_value=local.d_value,
                       scale=local.scale, n_tokens=sum(lengths[:rank]))
    total = SATAState(kv=kv[1], n_taylor=local.n_taylor, d_key=local.d_key, d_value=local.d_value,
                      scale=local.scale, n_tokens=sum(lengths))
    return prefix, total


def state_exchange_bytes(batch: int, n_kv_heads: int, d_key: int, d_value: int, n_taylor: int, world_size: int,
                         dtype: torch.dtype = torch.float32, *, window: int = 0, sinks: int = 0,
                         recentre: bool = False) -> dict[str, int]:
    """Bytes one rank sends and receives per forward call, and puts into the backward collective.

    ``state = batch * n_kv_heads * D * (d_value + 1)`` floats; in the window mode (``window`` or
    ``sinks`` > 0) plus ``batch * n_kv_heads * (window + sinks) * (d_key + d_value)`` floats of exact keys
    and values and ``batch * (window + sinks)`` int64 slot flags and sink positions. An all-gather sends
    it once and receives it from the ``world_size - 1`` other ranks. ``recentre=True`` (a re-centred
    stream started without ``state``) adds ``batch * (n_kv_heads * d_key * (sinks + 2) + 1)`` float64 key sums,
    counts and running sums of each rank's first ``sinks`` kept keys (the key centre leaves the sinks out).
    ``backward``: the plain mode all-gathers ``2 x`` the state; the window mode (or ``recentre``)
    all-reduces the floats of all ``world_size`` states. Independent of the sequence length.
    """
    from .basis import state_size

    itemsize = torch.empty((), dtype=dtype).element_size()
    floats = batch * n_kv_heads * (state_size(d_key, d_value, n_taylor) + (window + sinks) * (d_key + d_value))
    state = floats * itemsize + batch * (window + sinks) * 8
    sent = state + (batch * (n_kv_heads * d_key * (sinks + 2) + 1) * 8 if recentre else 0)
    backward = world_size * floats * itemsize if window or sinks or recentre else 2 * state
    return {"state": state, "sent": sent, "received": sent * (world_size - 1), "backward": backward}


def _check_agreement(local: SATAState | None, group, world: int, mode: list[int] = ()) -> list[int]:
    """All-gather ``[n_tokens, failed, settings..., mode...]``; raise the same ``ValueError`` on every rank if they differ.

    ``local=None``: this rank's arguments were invalid; it joins the exchange so the others raise too.
    ``mode``: the window mode's per-head settings (:func:`_mode_codes`), empty for the plain op.
    """
    if local is None:
        mine = [0, 1]
    else:
        scale_bits = int(torch.tensor([local.scale], dtype=torch.float64).view(torch.int64))
        mine = [local.n_tokens, 0, _DTYPE_CODES[local.dtype], local.n_taylor, local.d_key, local.d_value,
                local.n_heads, local.kv.numel(), local.window, local.sinks, len(local.batch_shape), *local.batch_shape,
                scale_bits, *mode]
    device = torch.device("cpu")
    if dist.get_backend(group) == "nccl":  # nccl moves CUDA tensors only
        device = local.device if local is not None and local.device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    widths = [torch.empty(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(widths, torch.tensor([len(mine)], dtype=torch.int64, device=device), group=group)
    n = max(int(w) for w in widths)
    padded = torch.full((n,), -1, dtype=torch.int64)
    padded[: len(mine)] = torch.tensor(mine, dtype=torch.int64)
    rows = [torch.empty(n, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(rows, padded.to(device), group=group)
    rows = [r.cpu() for r in rows]
    failed = [i for i, r in enumerate(rows) if int(r[1])]
    if failed:
        if local is None:
            return []                       # the caller raises its own error
        raise ValueError(
            f"context_parallel_attention: rank(s) {failed} of the group got invalid arguments (see the error "
            "raised there); every rank stops"
        )
    settings = [r[2:].tolist() for r in rows]
    if any(s != settings[0] for s in settings):
        fields = [_fields(s) for s in settings]
        names = list(dict.fromkeys(name for f in fields for name in f))
        differ = [name for name in names if any(f.get(name) != fields[0].get(name) for f in fields)]
        detail = "; ".join(f"{name}: " + ", ".join(f"rank {i} {f.get(name, '-')}" for i, f in enumerate(fields))
                           for name in differ)
        raise ValueError(
            f"{_FN}: the ranks disagree on the shape or settings of their segments ({detail}); every rank must pass "
            "the same batch, heads, head sizes, dtype, n_taylor, scale, is_causal, window, sinks, taylor_mix and "
            "recentre, and the same state (or none)"
        )
    return [int(r[0]) for r in rows]


class _PrefixSum(torch.autograd.Function):
    """``kv_r -> stack(sum_{r'<r} kv_r', sum_r' kv_r')`` across ranks, with the matching backward."""

    @staticmethod
    def forward(ctx, kv: torch.Tensor, group, world: int, rank: int, *anchors: torch.Tensor) -> torch.Tensor:
        # ``anchors`` are unused: they make the output require grad whenever the caller's inputs do
        ctx.n_anchors = len(anchors)
        ctx.group, ctx.world, ctx.rank = group, world, rank
        parts = [torch.empty_like(kv) for _ in range(world)]
        dist.all_gather(parts, kv, group=group)
        stacked = torch.stack(parts)                                            # [W, ..., F, D]
        prefix = stacked[:rank].sum(0) if rank else torch.zeros_like(kv)        # [..., F, D]
        return torch.stack([prefix, stacked.sum(0)])                           # [2, ..., F, D]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # d loss / d kv_r = sum over later ranks of their prefix gradients + sum over all ranks of total gradients
        grad = grad.contiguous()                                                # [2, ..., F, D]
        parts = [torch.empty_like(grad) for _ in range(ctx.world)]
        dist.all_gather(parts, grad, group=ctx.group)
        stacked = torch.stack(parts)                                            # [W, 2, ..., F, D]
        g = stacked[:, 1].sum(0)
        if ctx.rank + 1 < ctx.world:
            g = g + stacked[ctx.rank + 1 :, 0].sum(0)
        return (g, None, None, None) + (None,) * ctx.n_anchors
