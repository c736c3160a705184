"""The backward pass of the block-wise paths: recompute each block instead of storing its features.

The forward pass runs every block without a graph and keeps only the state at the start of
each block (``MATH.md`` section 3: the state is all a block needs of the past), so activation
memory does not grow with ``D`` per token. When those states would not fit the memory budget,
only every ``stride``-th is kept and the ones in between are recomputed from the keys. The
backward pass walks the blocks in reverse, re-runs each under autograd and carries the state
gradient. The path supplies its block functions (:class:`BlockSteps`); nothing here knows their
math.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from ..budget import MemoryBudgetError, format_bytes


class BlockSteps(NamedTuple):
    """A block-wise path's pieces, on ``q [B, Hkv, g, T, E]``, ``k [B, Hkv, T, E]``, ``v [B, Hkv, T, Ev]``,
    ``mask [B, T]`` and states ``S^T [B, Hkv, F, D]``.

    Attributes:
        forward: ``(q, k, v, mask, S, run, saved, save_every) -> (y, S_end)``, all blocks without
            a graph, appending the start state of every ``save_every``-th block to ``saved``.
        block: ``(q, k, v, mask, S, *, run) -> (y, S_next)``, one block, differentiable.
        absorb: ``(k, v, mask, S, *, run) -> (_, S_next)``, one block's keys only.
    """

    forward: Callable
    block: Callable
    absorb: Callable


class BlockRecompute(torch.autograd.Function):
    """``steps`` over a sequence in blocks of ``run.block`` tokens, recomputed block by block in backward."""

    @staticmethod
    def forward(ctx, q, k, v, S, mask, run, steps: BlockSteps):
        L = q.shape[-2]
        stride = _save_stride(-(-L // run.block), S.numel() * S.element_size(), L, run.spec.budget)
        starts: list = []
        with torch.no_grad():
            out, S_end = steps.forward(q, k, v, mask, S, run, starts, stride)
        ctx.save_for_backward(q, k, v, *starts)
        ctx.mask, ctx.run, ctx.steps, ctx.stride = mask, run, steps, stride
        return out, S_end

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_S_end):
        q, k, v, *saved = ctx.saved_tensors
        mask, run, steps, stride = ctx.mask, ctx.run, ctx.steps, ctx.stride
        need = ctx.needs_input_grad[:4]
        grads = [torch.zeros_like(t) if n else None for t, n in zip((q, k, v), need)]   # dq, dk, dv
        d_S = d_S_end
        L = q.shape[-2]
        n_blocks = max(1, -(-L // run.block))
        span = lambda i: slice(i * run.block, min((i + 1) * run.block, L))
        for seg in reversed(range(len(saved))):
            # the states at the start of this segment's blocks: saved, or recomputed from the keys
            starts = [saved[seg]]
            with torch.no_grad():
                for i in range(seg * stride + 1, min((seg + 1) * stride, n_blocks)):
                    t = span(i - 1)
                    starts.append(steps.absorb(k[:, :, t], v[:, :, t], None if mask is None else mask[:, t],
                                               starts[-1], run=run)[1])
            for j in reversed(range(len(starts))):
                t = span(seg * stride + j)
                *block_grads, d_S = _block_grads(steps.block, run, q, k, v, mask, t, starts[j], d_out, d_S, need)
                for dst, g, dim in zip(grads, block_grads, (3, 2, 2)):   # the token dim of q, k, v
                    if dst is not None and g is not None:
                        dst.narrow(dim, t.start, t.stop - t.start).copy_(g)
                starts[j] = None  # free as we go
        return *grads, (d_S if need[3] else None), None, None, None


def _block_grads(block, run, q, k, v, mask, t: slice, S, d_out, d_S, need) -> list:
    """``[dq, dk, dv, dS]`` of the block of tokens ``t`` started from state ``S``, given the gradients
    of its output and of its end state (``None`` for inputs not needed; ``dS`` always a tensor)."""
    with torch.enable_grad():
        leaves = [
            q[:, :, :, t].detach().requires_grad_(need[0]),
            k[:, :, t].detach().requires_grad_(need[1]),
            v[:, :, t].detach().requires_grad_(need[2]),
            S.detach().requires_grad_(True),                 # the gradient flows on to earlier blocks
        ]
        y, S_next = block(*leaves[:3], None if mask is None else mask[:, t], leaves[3], run=run)
        wrt = [x for x in leaves if x.requires_grad]
        got = iter(torch.autograd.grad([y, S_next], wrt, [d_out[:, :, :, t], d_S], allow_unused=True))
    grads = [next(got) if x.requires_grad else None for x in leaves]
    if grads[3] is None:
        grads[3] = torch.zeros_like(S)
    return grads


def _save_stride(n_blocks: int, state_bytes: int, L: int, budget: int) -> int:
    """Keep every block's start state, or, when they would not fit a quarter of the budget, every
    ``stride``-th (about ``sqrt(n)`` kept, the rest recomputed); refuse when even that is too much."""
    n_blocks = max(1, n_blocks)
    if n_blocks * state_bytes <= budget // 4:
        return 1
    stride = math.isqrt(n_blocks - 1) + 1
    held = (-(-n_blocks // stride) + stride) * state_bytes
    if held > budget // 2:
        raise MemoryBudgetError(
            f"sata_attention: the backward pass of {L} tokens in {n_blocks} blocks needs at least "
            f"{format_bytes(held)} of saved states ({format_bytes(state_bytes)} each), more than half the memory "
            f"budget of {format_bytes(budget)}. Use fewer Taylor terms or smaller heads, or raise "
            "the budget with sata.set_memory_budget(...) or SATA_MEMORY_BUDGET."
        )
    return stride
