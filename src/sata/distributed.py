"""Exact context parallelism: one sequence split across the ranks of a ``torch.distributed`` group.

The state of a sequence is the sum of the states of its segments (``MATH.md`` section 4),
so a sequence split into contiguous segments, one per rank in rank order, is attended
exactly by exchanging states, never keys or values:

    S_r      = phi(K_r)^T [V_r, 1]                  each rank, its own segment (local)
    P_r      = S_in + sum_{r' < r} S_r'              exclusive prefix: one all-gather of states
    Y_r      = causal attention of segment r over P_r and its own keys   (local)

Communication per call, per rank: it sends one state ``[..., Hkv, D, Ev + 1]`` and receives
``world_size - 1`` of them (an all-gather), plus a few integers for validation; the backward
pass does the same with gradients of twice that size. None of it depends on the sequence
length. Works with any backend that implements ``all_gather`` (gloo on CPU, nccl on GPU).

Launch with ``torchrun --nproc-per-node N script.py`` (see ``examples/context_parallel.py``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .ops import accumulate_state, sata_attention
from .state import SATAState

__all__ = ["context_parallel_attention", "exclusive_prefix_states", "state_exchange_bytes"]

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1}


def context_parallel_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, n_taylor: int = 3, is_causal: bool = True,
    scale: float | None = None, enable_gqa: bool = False, key_padding_mask: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None, state: SATAState | None = None, return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, SATAState]:
    r""":func:`sata.sata_attention` over a sequence whose segments live on different ranks.

    Rank ``r`` of ``group`` holds the ``r``-th contiguous segment of one sequence (segments
    may have different lengths, including 0). Every rank of the group must call this
    function with the same settings, and, under autograd, every rank must run the backward
    pass (it contains a collective).

    .. math::
        Y_r = \mathrm{SATA}(Q_r, K_r, V_r;\ S_{in} + \textstyle\sum_{r'<r} \phi(K_{r'})^T [V_{r'}, 1])

    Causal: query ``i`` of rank ``r`` attends to the keys of ``state``, of all earlier ranks,
    and of its own segment up to ``i``. Non-causal: every query attends to all keys of every
    rank (and of ``state``). Equal to one process running the whole sequence, up to rounding.

    Communication: one all-gather of one state per rank, ``[..., Hkv, D, Ev + 1]`` floats with
    ``D = C(E + P - 1, P - 1)`` (see :func:`state_exchange_bytes`), independent of the
    sequence length; the backward pass all-gathers ``2 x`` that.

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
            every rank. Its gradient on each rank is that rank's share (sum over ranks, as for
            replicated parameters).
        return_state (bool): also return the state after the whole sequence (the same on every
            rank). Default: ``False``.

    Returns:
        ``[..., Hq, L_r, Ev]`` in the input dtype, or ``(output, state)`` with ``return_state=True``.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialised.
        ValueError: the ranks disagree on shapes, dtype or settings (raised on every rank).
    """
    common = dict(n_taylor=n_taylor, scale=scale, enable_gqa=enable_gqa)
    local = _local_state(query, key, value, is_causal, key_padding_mask, state, group, **common)
    # q, k, v ride along so that every rank joins the backward collective, even with an empty segment
    prefix, total = exclusive_prefix_states(local, group=group, _anchors=(query, key, value))
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


def _local_state(query, key, value, is_causal: bool, key_padding_mask, state, group, *, n_taylor, scale,
                 enable_gqa) -> SATAState:
    """This rank's segment state, after validating its arguments; a rank that fails alone makes every
    rank raise (through :func:`_check_agreement`) instead of leaving the others waiting."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "context_parallel_attention: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group(...) first (torchrun sets the environment)"
        )
    if not isinstance(is_causal, bool):
        raise TypeError(f"context_parallel_attention: is_causal must be a bool, got {is_causal!r}")
    try:
        if is_causal and query.shape[-2] != key.shape[-2]:
            raise ValueError(
                f"context_parallel_attention: is_causal=True needs as many queries as keys in each segment, "
                f"got {query.shape[-2]} and {key.shape[-2]}"
            )
        sata_attention(query[..., :0, :], key[..., :0, :], value[..., :0, :], n_taylor=n_taylor, scale=scale,
                       enable_gqa=enable_gqa)                                  # checks the query side; no work
        local = accumulate_state(key, value, n_taylor=n_taylor, scale=scale, key_padding_mask=key_padding_mask)
        if state is not None:
            state.check_compatible(local, what="context_parallel_attention: state")
    except (ValueError, TypeError):
        _check_agreement(None, group, dist.get_world_size(group))
        raise
    return local


def exclusive_prefix_states(
    local: SATAState, *, group: dist.ProcessGroup | None = None, _anchors: tuple[torch.Tensor, ...] = ()
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
    lengths = _check_agreement(local, group, world)
    kv = _PrefixSum.apply(local.kv.mT.contiguous(), group, world, rank, *_anchors).mT   # [2, ..., Hkv, D, F] F-major storage
    prefix = SATAState(kv=kv[0], n_taylor=local.n_taylor, d_key=local.d_key, d_value=local.d_value,
                       scale=local.scale, n_tokens=sum(lengths[:rank]))
    total = SATAState(kv=kv[1], n_taylor=local.n_taylor, d_key=local.d_key, d_value=local.d_value,
                      scale=local.scale, n_tokens=sum(lengths))
    return prefix, total


def state_exchange_bytes(batch: int, n_kv_heads: int, d_key: int, d_value: int, n_taylor: int, world_size: int,
                         dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """Bytes one rank sends and receives per forward call (the backward pass moves twice that).

    ``state = batch * n_kv_heads * D * (d_value + 1)`` floats; an all-gather sends it once and
    receives it from the ``world_size - 1`` other ranks. Independent of the sequence length.
    """
    from .basis import state_size

    state = batch * n_kv_heads * state_size(d_key, d_value, n_taylor) * torch.empty((), dtype=dtype).element_size()
    return {"state": state, "sent": state, "received": state * (world_size - 1)}


def _check_agreement(local: SATAState | None, group, world: int) -> list[int]:
    """All-gather ``[n_tokens, failed, settings...]``; raise the same ``ValueError`` on every rank if they differ.

    ``local=None``: this rank's arguments were invalid; it joins the exchange so the others raise too.
    """
    if local is None:
        mine = [0, 1]
    else:
        scale_bits = int(torch.tensor([local.scale], dtype=torch.float64).view(torch.int64))
        mine = [local.n_tokens, 0, _DTYPE_CODES[local.dtype], local.n_taylor, local.d_key, local.d_value,
                local.n_heads, local.kv.numel(), *local.batch_shape, scale_bits]
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
        names = "dtype, n_taylor, d_key, d_value, kv heads, state size, batch shape, scale bits"
        detail = "; ".join(f"rank {i}: {s}" for i, s in enumerate(settings))
        raise ValueError(
            "context_parallel_attention: the ranks disagree on the shape or settings of their segments "
            f"({names}): {detail}; every rank must pass the same batch, heads, head sizes, dtype, n_taylor and scale"
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
