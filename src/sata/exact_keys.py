"""The keys a window-mode state attends exactly (``MATH.md`` section 6): a ring of the last positions and the sinks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ExactKeys"]


@dataclass(frozen=True, eq=False)
class ExactKeys:
    """The keys a window-mode state attends exactly: the last ``W`` positions and the first ``S`` kept keys.

    Stored in the state's dtype (float32 or float64), whatever the input dtype, so that a stream continues
    bit for bit however it is split into calls.

    Attributes:
        win_k (torch.Tensor): ``[..., Hkv, W, E]`` keys of the last ``W`` positions, position ``p`` in slot
            ``p % W`` (a ring: one token writes one slot).
        win_v (torch.Tensor): ``[..., Hkv, W, Ev]`` their values.
        win_keep (torch.Tensor): ``[..., W]`` bool, the slot holds a kept key that is not a sink.
        sink_k (torch.Tensor): ``[..., Hkv, S, E]`` the first ``S`` kept keys of the stream.
        sink_v (torch.Tensor): ``[..., Hkv, S, Ev]`` their values.
        sink_pos (torch.Tensor): ``[..., S]`` int64 stream position of each sink, -1 while not filled.
    """

    win_k: torch.Tensor
    win_v: torch.Tensor
    win_keep: torch.Tensor
    sink_k: torch.Tensor
    sink_v: torch.Tensor
    sink_pos: torch.Tensor

    def __getstate__(self) -> dict:
        # a copy (copy.deepcopy, pickle, torch.save) has buffers of its own: the decode kernel's cached data
        # pointers (sata._paths.window_kernel._ready) name this object's, so they stay behind
        return {k: v for k, v in self.__dict__.items() if k != "_kernel_pointers"}

    @classmethod
    def empty(cls, heads_shape, window: int, sinks: int, d_key: int, d_value: int, dtype, device) -> ExactKeys:
        """No tokens yet. ``heads_shape`` is ``(*batch, Hkv)``."""
        *batch, _ = heads_shape
        z = lambda *tail: torch.zeros((*heads_shape, *tail), dtype=dtype, device=device)
        return cls(z(window, d_key), z(window, d_value), torch.zeros((*batch, window), dtype=torch.bool, device=device),
                   z(sinks, d_key), z(sinks, d_value), torch.full((*batch, sinks), -1, dtype=torch.long, device=device))

    def named(self):
        return [(name, getattr(self, name)) for name in ("win_k", "win_v", "win_keep", "sink_k", "sink_v", "sink_pos")]

    def tensors(self):
        return [t for _, t in self.named()]

    def map(self, fn) -> ExactKeys:
        return ExactKeys(*(fn(t) for t in self.tensors()))

    def check(self, heads_shape, window: int, sinks: int, d_key: int, d_value: int) -> None:
        """Raise ``ValueError`` unless every buffer has the shape and dtype the state's configuration gives."""
        batch = tuple(heads_shape[:-1])
        want = {"win_k": (*heads_shape, window, d_key), "win_v": (*heads_shape, window, d_value), "win_keep": (*batch, window),
                "sink_k": (*heads_shape, sinks, d_key), "sink_v": (*heads_shape, sinks, d_value), "sink_pos": (*batch, sinks)}
        for name, t in self.named():
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != want[name]:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"SATAState.exact.{name} must have shape {want[name]} for this configuration, got {got}")
        if self.win_keep.dtype != torch.bool or self.sink_pos.dtype != torch.long:
            raise TypeError("SATAState.exact: win_keep must be bool and sink_pos int64")

