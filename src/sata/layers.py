"""Attention layers with an explicit state: SATA (constant-size state) and softmax (KV cache).

Both layers share one constructor and one call::

    y, state = layer(x, state=None, key_padding_mask=None)       # x [B, L, d_model]

so a model switches attention with one config field. The state is a value passed in and
returned, never stored on the module:

- :class:`SATAAttention` returns a :class:`sata.SATAState` whose size does not depend on the
  number of tokens seen: ``[B, Hkv, D, head_dim + 1]`` floats, ``D = C(head_dim + P - 1, P - 1)``.
- :class:`SoftmaxAttention` returns a :class:`KVCache` holding every key and value seen:
  ``2 x [B, Hkv, n_tokens, head_dim]``.

Both know how many tokens they have seen (``state.n_tokens``), which is where rotary
embeddings of the next call start: positions are absolute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .basis import check_n_taylor
from .hybrid import check_hybrid, check_learned, softplus_inverse
from .ops import sata_attention
from .state import SATAState

__all__ = ["KVCache", "RotaryEmbedding", "SATAAttention", "ShortConv", "SoftmaxAttention", "ATTENTION_CLASSES"]


# ---------------------------------------------------------------------------- rotary embeddings
class RotaryEmbedding(nn.Module):
    r"""Rotary position embedding (rotate-half convention) at absolute positions.

    Rotates feature pairs ``(x_i, x_{i + E/2})`` of the token at position ``t`` by the angle
    ``t * base^(-2i/E)``, so that ``<R_t q, R_u k>`` depends on ``t - u`` only.

    Args:
        head_dim (int): ``E``, even.
        base (float): frequency base. Default: ``10000``.
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}; use rope=False or an even head_dim")
        self.head_dim = head_dim
        self.base = float(base)
        # a plain attribute, not a buffer: model.to(bfloat16) must not round the frequencies
        self._inv_freq = self.base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # [E/2]

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """``x [..., L, E]`` at positions ``offset .. offset + L - 1`` -> rotated ``[..., L, E]``."""
        L = x.shape[-2]
        # angles in float64: positions reach 1e5 and more while streaming
        pos = torch.arange(offset, offset + L, device=x.device, dtype=torch.float64)      # [L]
        ang = pos[:, None] * self._inv_freq.to(x.device)[None, :]                           # [L, E/2]
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)                            # [L, E/2]
        x1, x2 = x[..., : self.head_dim // 2], x[..., self.head_dim // 2 :]                  # [..., L, E/2]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)                # [..., L, E]


# ---------------------------------------------------------------------------- short convolution
class ShortConv(nn.Module):
    r"""Causal depthwise convolution over the last ``kernel_size`` tokens, with an explicit state.

    .. math:: y_t = \sum_{j<K} w_{c,j}\, x_{t-K+1+j}

    The local token mixing that linear-attention models (H3, Based, Mamba, fla's layers) put before
    their feature maps: it gives every position exact access to its neighbours, which a
    constant-size attention state approximates poorly. Its state is the last ``K - 1`` inputs, so
    the cost per token stays constant. Initialised as the identity (``w_{c,K-1} = 1``).

    Args:
        channels (int): ``C``.
        kernel_size (int): ``K >= 2``. Default: ``4``.

    Shapes:
        ``x [B, L, C]``, state ``[B, K - 1, C]`` (``None`` = zeros: the start of a sequence).
    """

    def __init__(self, channels: int, kernel_size: int = 4, device=None, dtype=None):
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size < 2:
            raise ValueError(f"ShortConv: kernel_size must be an int >= 2, got {kernel_size!r}")
        self.kernel_size = kernel_size
        weight = torch.zeros(channels, 1, kernel_size, device=device, dtype=dtype)
        weight[:, 0, -1] = 1.0
        self.weight = nn.Parameter(weight)                                                   # [C, 1, K]

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, L, C]`` after ``state [B, K-1, C]`` -> ``(y [B, L, C], state after x [B, K-1, C])``."""
        B, L, C = x.shape
        if state is None:
            state = x.new_zeros(B, self.kernel_size - 1, C)
        elif state.shape != (B, self.kernel_size - 1, C):
            raise ValueError(f"ShortConv: state must be [batch, kernel_size - 1, channels] = "
                             f"{(B, self.kernel_size - 1, C)}, got {tuple(state.shape)}")
        xx = torch.cat([state.to(x.dtype), x], dim=1)                                        # [B, K-1+L, C]
        if L == 1:  # decoding: a weighted sum; conv1d's setup costs ~100x more for one token
            y = torch.einsum("bkc,ck->bc", xx, self.weight[:, 0])[:, None]                    # [B, 1, C]
            return y, xx[:, 1:]                                                              # [B, 1, C], [B, K-1, C]
        y = F.conv1d(xx.transpose(1, 2), self.weight, groups=C)                              # [B, C, L]
        return y.transpose(1, 2), xx[:, L:]                                                  # [B, L, C], [B, K-1, C]


# ---------------------------------------------------------------------------- KV cache
@dataclass(frozen=True, eq=False)
class KVCache:
    r"""Keys and values one softmax attention layer has seen: its state, growing with the tokens.

    Storage is preallocated and grows by doubling (like a Python list): appending ``L`` tokens
    costs ``O(L)`` amortised, and the buffers hold between ``n_tokens`` and ``2 n_tokens``
    positions. Preallocate with ``KVCache.empty(..., capacity=N)`` to avoid regrowth.

    A cache behaves as a value, like :class:`sata.SATAState`: :meth:`append` returns a new cache
    and the old one still describes its own tokens. New tokens are written in place only into
    buffer space no other cache uses; appending to an older cache copies. Under autograd
    appends always copy (no in-place writes into tensors of a graph).

    Attributes:
        key_buffer (torch.Tensor): ``[B, Hkv, capacity, E]``; positions ``< n_tokens`` are valid.
        value_buffer (torch.Tensor): ``[B, Hkv, capacity, Ev]``.
        pad_buffer (torch.Tensor): ``[B, capacity]`` bool, ``True`` = a padded key to ignore.
        n_tokens (int): positions seen so far (padded positions included).
        start (int): absolute position of buffer slot 0: a sliding-window layer drops keys older
            than its window (:meth:`keep_last`), so the cache holds positions ``start .. n_tokens - 1``.
    """

    key_buffer: torch.Tensor
    value_buffer: torch.Tensor
    pad_buffer: torch.Tensor
    n_tokens: int = 0
    start: int = 0
    # how far the shared buffers are filled, by any cache that shares them
    _tip: list = field(default_factory=lambda: [0], repr=False)
    # whether any position held was padded: without padding the layer takes SDPA's unmasked kernels
    has_padding: bool = False

    @classmethod
    def empty(cls, batch: int, n_heads: int, d_key: int, d_value: int | None = None, *, capacity: int = 0,
              dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> KVCache:
        """A cache with no tokens and room for ``capacity`` positions."""
        d_value = d_key if d_value is None else d_value
        return cls(
            key_buffer=torch.empty(batch, n_heads, capacity, d_key, dtype=dtype, device=device),
            value_buffer=torch.empty(batch, n_heads, capacity, d_value, dtype=dtype, device=device),
            pad_buffer=torch.zeros(batch, capacity, dtype=torch.bool, device=device),
        )

    @property
    def n_stored(self) -> int:
        """Positions held: ``n_tokens - start``."""
        return self.n_tokens - self.start

    @property
    def keys(self) -> torch.Tensor:
        """``[B, Hkv, n_stored, E]``."""
        return self.key_buffer[:, :, : self.n_stored]

    @property
    def values(self) -> torch.Tensor:
        """``[B, Hkv, n_stored, Ev]``."""
        return self.value_buffer[:, :, : self.n_stored]

    @property
    def padding(self) -> torch.Tensor:
        """``[B, n_stored]`` bool, ``True`` = ignore."""
        return self.pad_buffer[:, : self.n_stored]

    def keep_last(self, n: int) -> KVCache:
        """A compact copy holding only the last ``n`` positions (``start`` moves forward)."""
        if self.n_stored <= n:
            return self
        return KVCache(self.keys[:, :, -n:].clone(), self.values[:, :, -n:].clone(), self.padding[:, -n:].clone(),
                       self.n_tokens, self.n_tokens - n, [n], self.has_padding)

    @property
    def capacity(self) -> int:
        return self.key_buffer.shape[-2]

    @property
    def n_heads(self) -> int:
        return self.key_buffer.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes allocated by the buffers (up to twice those of the tokens seen)."""
        return sum(t.numel() * t.element_size() for t in (self.key_buffer, self.value_buffer, self.pad_buffer))

    def append(self, key: torch.Tensor, value: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> KVCache:
        """A cache with ``key [B, Hkv, L, E]``, ``value [B, Hkv, L, Ev]`` added after this one's tokens."""
        B, H, L, _ = key.shape
        if key.shape[:2] != self.key_buffer.shape[:2] or key.shape[-1] != self.key_buffer.shape[-1] \
                or value.shape[-1] != self.value_buffer.shape[-1]:
            raise ValueError(
                f"KVCache.append: keys {tuple(key.shape)} / values {tuple(value.shape)} do not match the cache "
                f"(batch, heads, head sizes) = {tuple(self.key_buffer.shape[:2])}, {self.key_buffer.shape[-1]}, "
                f"{self.value_buffer.shape[-1]}"
            )
        pad = torch.zeros(B, L, dtype=torch.bool, device=key.device) if key_padding_mask is None else key_padding_mask
        padded = self.has_padding or (key_padding_mask is not None and bool(key_padding_mask.any()))
        n, new_n = self.n_stored, self.n_stored + L          # buffer slots
        key, value = key.to(self.key_buffer.dtype), value.to(self.value_buffer.dtype)
        if torch.is_grad_enabled() and (key.requires_grad or value.requires_grad or self.key_buffer.requires_grad):
            # autograd: no in-place writes, the cache is exactly the concatenation
            return KVCache(torch.cat([self.keys, key], 2), torch.cat([self.values, value], 2),
                           torch.cat([self.padding, pad], 1), self.n_tokens + L, self.start, [new_n], padded)
        if self._tip[0] == n and new_n <= self.capacity:
            kb, vb, pb, tip = self.key_buffer, self.value_buffer, self.pad_buffer, self._tip
        else:  # grow (doubling) or fork from an older cache
            cap = max(2 * new_n, 16)
            kb = self.key_buffer.new_empty(B, H, cap, self.key_buffer.shape[-1])
            vb = self.value_buffer.new_empty(B, H, cap, self.value_buffer.shape[-1])
            pb = self.pad_buffer.new_zeros(B, cap)
            kb[:, :, :n], vb[:, :, :n], pb[:, :n] = self.keys, self.values, self.padding
            tip = [n]
        kb[:, :, n:new_n], vb[:, :, n:new_n], pb[:, n:new_n] = key, value, pad
        tip[0] = new_n
        return KVCache(kb, vb, pb, self.n_tokens + L, self.start, tip, padded)

    def __repr__(self) -> str:
        return (f"KVCache(batch={self.key_buffer.shape[0]}, n_heads={self.n_heads}, d_key={self.key_buffer.shape[-1]}, "
                f"n_tokens={self.n_tokens}, capacity={self.capacity}, dtype={self.key_buffer.dtype})")


# ---------------------------------------------------------------------------- layers
class _Attention(nn.Module):
    """Projections, head split and rotary embeddings shared by both layers."""

    state_type: type = object

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, n_kv_heads: int | None = None, *,
                 causal: bool = True, rope: bool = True, rope_base: float = 10000.0, scale: float | None = None,
                 bias: bool = False, device=None, dtype=None):
        super().__init__()
        for name, value in (("d_model", d_model), ("n_heads", n_heads)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be a positive int, got {value!r}")
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"{type(self).__name__}: d_model={d_model} is not divisible by n_heads={n_heads}; "
                                 "pass head_dim explicitly")
            head_dim = d_model // n_heads
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if not isinstance(n_kv_heads, int) or n_kv_heads < 1 or n_heads % n_kv_heads:
            raise ValueError(f"{type(self).__name__}: n_kv_heads={n_kv_heads!r} must divide n_heads={n_heads} "
                             "(grouped-query attention)")
        self.d_model, self.n_heads, self.head_dim, self.n_kv_heads = d_model, n_heads, head_dim, n_kv_heads
        self.causal = bool(causal)
        self.scale = head_dim**-0.5 if scale is None else float(scale)
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, **kw)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, **kw)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, **kw)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, **kw)
        self.rotary = RotaryEmbedding(head_dim, rope_base) if rope else None

    def _qkv(self, x: torch.Tensor, offset: int):
        """``x [B, L, d_model]`` -> ``q [B, H, L, E]``, ``k, v [B, Hkv, L, E]`` (rotary at ``offset``)."""
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)        # [B, H, L, E]
        k = self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)     # [B, Hkv, L, E]
        v = self.v_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)     # [B, Hkv, L, E]
        if self.rotary is not None:
            q, k = self.rotary(q, offset), self.rotary(k, offset)
        return q, k, v

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        """``[B, H, L, E]`` -> ``[B, L, d_model]``."""
        B, H, L, E = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(B, L, H * E))

    def _check(self, x, state, key_padding_mask) -> None:
        name = type(self).__name__
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"{name}: x must be [batch, length, d_model={self.d_model}], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if state is not None and not isinstance(state, self.state_type):
            raise TypeError(f"{name}: state must be a {self.state_type.__name__} or None, got {type(state).__name__}; "
                            "states of one attention type cannot continue in the other")
        if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool or key_padding_mask.shape != x.shape[:2]):
            raise ValueError(f"{name}: key_padding_mask must be bool [batch, length] = {tuple(x.shape[:2])} "
                             f"(True = ignore), got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, head_dim={self.head_dim}, n_kv_heads={self.n_kv_heads}, "
                f"causal={self.causal}, rope={self.rotary is not None}")


class SATAAttention(_Attention):
    r"""Multi-head attention with symmetry-aware Taylor attention: constant cost per token.

    .. math::
        y_i = W_o \,\mathrm{concat}_h \frac{\sum_{j \le i} T_P(s_{ij}) v_j}{\sum_{j \le i} T_P(s_{ij})},
        \qquad s_{ij} = \mathrm{scale}\; \mathrm{RoPE}_i(q_i) \cdot \mathrm{RoPE}_j(k_j)

    Args:
        d_model (int): model width.
        n_heads (int): query heads ``H``.
        head_dim (int, optional): ``E``. Default: ``d_model // n_heads``.
        n_kv_heads (int, optional): key/value heads ``Hkv`` (grouped-query attention, divides ``H``).
            Default: ``n_heads``.
        n_taylor (int): Taylor terms ``P``. Default: ``3``. Each key/value head keeps a state of
            ``D (E + 1)`` floats, ``D = C(E + P - 1, P - 1)``.
        causal (bool): token ``i`` attends to tokens ``<= i`` (and the state). Default: ``True``.
        rope (bool): rotary position embeddings at absolute positions ``state.n_tokens + t``.
            Default: ``True``.
        rope_base (float): Default: ``10000``.
        scale (float, optional): score scale. Default: ``1 / sqrt(E)``.
        bias (bool): biases in the projections. Default: ``False``.
        learn_scale (bool): a learned per-head gain on the queries, ``exp(log_gain)``, starting at 1.
            Default: ``False``.
        window (int): the window mode (``MATH.md`` section 6): each token also attends *exactly*
            (``exp``) to the ``window`` most recent positions, itself included; the Taylor state holds
            only older keys. Default: ``0``.
        sinks (int): and exactly to the first ``sinks`` kept tokens of the stream. Default: ``0``.
        taylor_mix (float): ``beta >= 0``, the weight of the Taylor part beside the exact keys in the
            shared normaliser (``0``: a sliding window with sinks). Default: ``1.0``.
        recentre (float, optional): ``alpha``: the series of query ``i`` is expanded around
            ``c_i = mean_i - alpha sd_i`` of its scores over the Taylor keys (needs ``n_taylor >= 2``,
            ``>= 3`` for ``alpha != 0``). Default: ``None``, the series around 0.
        learn_mix (bool): learn ``beta`` per query head, ``beta_h = softplus(mix_param_h)`` (so ``beta >= 0``),
            starting at ``taylor_mix`` (which must then be ``> 0``; needs a window or sinks, without them
            ``beta`` cancels in the normaliser). Default: ``False``. Training from scratch, start it small: a
            byte LM with window 64 (docs/RECALL.md) ended 6.8% worse in bits/byte with ``beta`` started at 1.0
            than at 0.01, and the learned ``beta`` stayed near its start in both.
        learn_recentre (bool): learn ``alpha`` per query head (``recentre_param``, unconstrained), starting
            at ``recentre`` (which must then be given; needs ``n_taylor >= 3``). Default: ``False``.

    With a window or sinks, for query ``i`` with exact keys ``E_i`` and Taylor keys ``F_i``,
    ``m_i = max(max_{E_i} s_ij, c_i)``:
    ``y_i = (sum_{E_i} e^{s_ij - m_i} v_j + beta e^{c_i - m_i} sum_{F_i} T_P(s_ij - c_i) v_j) / (same with 1)``.

    Shapes:
        ``x [B, L, d_model]`` -> ``y [B, L, d_model]``; state ``kv [B, Hkv, D, E + 1]``, plus with a
        window or sinks their keys and values ``[B, Hkv, window + sinks, E]`` (:class:`sata.SATAState` ``.exact``).
    """

    state_type = SATAState

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, n_kv_heads: int | None = None, *,
                 n_taylor: int = 3, causal: bool = True, rope: bool = True, rope_base: float = 10000.0,
                 scale: float | None = None, bias: bool = False, learn_scale: bool = False, window: int = 0,
                 sinks: int = 0, taylor_mix: float = 1.0, recentre: float | None = None, learn_mix: bool = False,
                 learn_recentre: bool = False, device=None, dtype=None):
        super().__init__(d_model, n_heads, head_dim, n_kv_heads, causal=causal, rope=rope, rope_base=rope_base,
                         scale=scale, bias=bias, device=device, dtype=dtype)
        self.n_taylor = check_n_taylor(n_taylor, "SATAAttention: n_taylor")
        # a learned per-head gain on the queries, exp(log_gain) (starts at 1): a polynomial kernel needs
        # larger scores than exp to concentrate, and weight decay holds the projections back
        self.log_gain = nn.Parameter(torch.zeros(n_heads, device=device, dtype=dtype)) if learn_scale else None
        hybrid = check_hybrid("SATAAttention", window=window, sinks=sinks, taylor_mix=taylor_mix, recentre=recentre,
                              n_taylor=n_taylor, n_q_heads=n_heads, device=torch.device("cpu"))
        self.window, self.sinks = hybrid.window, hybrid.sinks
        self.taylor_mix, self.recentre = hybrid.taylor_mix, hybrid.recentre
        self.mix_param = self.recentre_param = None
        check_learned("SATAAttention", hybrid, learn_mix=learn_mix, learn_recentre=learn_recentre, n_taylor=n_taylor)
        if learn_mix:
            self.mix_param = nn.Parameter(torch.full((n_heads,), softplus_inverse(taylor_mix), device=device,
                                                     dtype=dtype))
        if learn_recentre:
            self.recentre_param = nn.Parameter(torch.full((n_heads,), float(recentre), device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, state: SATAState | None = None, key_padding_mask: torch.Tensor | None = None,
                *, return_state: bool = True) -> tuple[torch.Tensor, SATAState | None]:
        """Attend over ``state`` (earlier tokens) and ``x``.

        Args:
            x (torch.Tensor): ``[B, L, d_model]``, the tokens at positions ``state.n_tokens + (0 .. L-1)``.
            state (SATAState, optional): earlier tokens, ``kv [B, Hkv, D, E + 1]``; never modified.
            key_padding_mask (torch.Tensor, optional): ``[B, L]`` bool, ``True`` = ignore that token as a key.
            return_state (bool): build the state after ``x`` (costs nothing extra when causal).
                Default: ``True``; training passes ``False``.

        Returns:
            ``(y [B, L, d_model], state after x or None)``.
        """
        self._check(x, state, key_padding_mask)
        offset = 0 if state is None else state.n_tokens
        q, k, v = self._qkv(x, offset)
        if self.log_gain is not None:
            q = q * self.log_gain.exp()[:, None, None]                                           # [B, H, L, E]
        out = sata_attention(q, k, v, n_taylor=self.n_taylor, is_causal=self.causal, scale=self.scale,
                             enable_gqa=self.n_kv_heads != self.n_heads, key_padding_mask=key_padding_mask,
                             state=state, return_state=return_state, **self._window_args())
        y, new_state = out if return_state else (out, None)                                  # [B, H, L, E]
        return self._out(y), new_state

    @property
    def windowed(self) -> bool:
        """Whether the layer runs the window mode (a window, sinks or a centre), not the plain op."""
        return bool(self.window or self.sinks or self.recentre is not None)

    def _window_args(self) -> dict:
        """The window-mode arguments of :func:`sata.sata_attention`; ``{}`` for the plain op (its fast paths)."""
        if not self.windowed:
            return {}
        beta = self.taylor_mix if self.mix_param is None else F.softplus(self.mix_param)            # [H]
        alpha = self.recentre if self.recentre_param is None else self.recentre_param            # [H]
        return dict(window=self.window, sinks=self.sinks, taylor_mix=beta, recentre=alpha)

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", n_taylor={self.n_taylor}"
        if self.windowed:
            mix = "learned" if self.mix_param is not None else self.taylor_mix
            alpha = "learned" if self.recentre_param is not None else self.recentre
            text += f", window={self.window}, sinks={self.sinks}, taylor_mix={mix}, recentre={alpha}"
        return text


def _local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: float) -> torch.Tensor:
    """Causal sliding-window softmax attention of ``q [B, H, L, E]`` over the keys of the same positions
    ``k [B, Hkv, L, E]``, ``v [B, Hkv, L, Ev]``: query ``i`` sees keys ``i - window + 1 .. i``.

    Queries go in blocks of ``window``; block ``j`` reads the keys of blocks ``j - 1`` and ``j``, which hold
    every key its queries may see, so the scores take ``O(L window)`` time and memory instead of the dense
    mask's ``O(L^2)``. Returns ``[B, H, L, Ev]``.
    """
    B, H, L, E = q.shape
    if k.shape[1] != H:
        k, v = k.repeat_interleave(H // k.shape[1], dim=1), v.repeat_interleave(H // v.shape[1], dim=1)
    w, Ev = window, v.shape[-1]
    n = -(-L // w)                                                   # blocks; the last one padded
    tail = n * w - L
    q = F.pad(q, (0, 0, 0, tail)).reshape(B, H * n, w, E)                                   # [B, H n, w, E]
    # keys of block j: positions (j - 1) w .. (j + 1) w - 1, zeros before position 0 (masked below)
    k = F.pad(k, (0, 0, w, tail)).unfold(2, 2 * w, w).transpose(-1, -2).reshape(B, H * n, 2 * w, E)
    v = F.pad(v, (0, 0, w, tail)).unfold(2, 2 * w, w).transpose(-1, -2).reshape(B, H * n, 2 * w, Ev)
    a = torch.arange(w, device=q.device)[:, None]                    # query within its block
    c = torch.arange(2 * w, device=q.device)[None, :]                # key within the block pair: position c - w
    band = ((c > a) & (c <= a + w)).expand(n, w, 2 * w).clone()                             # [n, w, 2w]
    band[0, :, :w] = False                                           # block 0 has no previous block
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=band.repeat(H, 1, 1), scale=scale)  # [B, H n, w, Ev]
    return y.reshape(B, H, n * w, Ev)[:, :, :L]


class SoftmaxAttention(_Attention):
    r"""Multi-head softmax attention (SDPA) with a :class:`KVCache`, same interface as :class:`SATAAttention`.

    Args:
        d_model, n_heads, head_dim, n_kv_heads, causal, rope, rope_base, scale, bias: as in
            :class:`SATAAttention`.
        window (int, optional): sliding-window attention: token ``i`` attends to tokens
            ``i - window + 1 .. i`` only (causal), and the cache keeps at most ``2 window``
            positions, so memory and time per token stay constant. Default: ``None`` (all tokens).

    Shapes:
        ``x [B, L, d_model]`` -> ``y [B, L, d_model]``; cache ``2 x [B, Hkv, n_stored, E]``.

    Notes:
        A query with no key to attend to (all masked) outputs 0, as in :class:`SATAAttention`
        (SDPA alone would give NaN).
    """

    state_type = KVCache

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, n_kv_heads: int | None = None, *,
                 causal: bool = True, rope: bool = True, rope_base: float = 10000.0, scale: float | None = None,
                 bias: bool = False, window: int | None = None, device=None, dtype=None):
        super().__init__(d_model, n_heads, head_dim, n_kv_heads, causal=causal, rope=rope, rope_base=rope_base,
                         scale=scale, bias=bias, device=device, dtype=dtype)
        if window is not None and (not isinstance(window, int) or window < 1 or not causal):
            raise ValueError(f"SoftmaxAttention: window must be a positive int with causal=True, got {window!r}")
        self.window = window

    def forward(self, x: torch.Tensor, state: KVCache | None = None, key_padding_mask: torch.Tensor | None = None,
                *, return_state: bool = True) -> tuple[torch.Tensor, KVCache | None]:
        """Attend over ``state`` (cached keys/values) and ``x``; arguments as in :meth:`SATAAttention.forward`.

        Returns:
            ``(y [B, L, d_model], cache after x or None)``.
        """
        self._check(x, state, key_padding_mask)
        B, L, _ = x.shape
        offset = 0 if state is None else state.n_tokens
        q, k, v = self._qkv(x, offset)
        cache, first = None, offset                     # first: absolute position of the first key attended
        if state is not None or return_state:
            if state is None:
                state = KVCache.empty(B, self.n_kv_heads, self.head_dim, dtype=k.dtype, device=k.device)
            cache = state.append(k, v, key_padding_mask)
            k, v, first = cache.keys, cache.values, cache.start                         # [B, Hkv, n, E]
            pad = cache.padding if cache.has_padding else None                          # [B, n]
            if self.window is not None and cache.n_stored > 2 * self.window:
                cache = cache.keep_last(self.window)    # amortised: a copy every `window` tokens
        else:
            pad = key_padding_mask
        gqa = self.n_kv_heads != self.n_heads
        Lk = k.shape[-2]
        windowed = self.window is not None and offset + L - first > self.window
        if pad is None and not windowed and (not self.causal or offset == first or L == 1):
            # fast paths: plain causal over every key, or one new token that sees every key held
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and L > 1, scale=self.scale,
                                               enable_gqa=gqa)                                   # [B, H, L, E]
            return self._out(y), cache if return_state else None
        if pad is None and windowed and offset == first and Lk == L:
            # the keys are the queries' own tokens (training, or a prefill from empty): band blocks, O(L window)
            y = _local_attention(q, k, v, self.window, self.scale)                              # [B, H, L, E]
            return self._out(y), cache if return_state else None
        allowed = torch.ones(L, Lk, dtype=torch.bool, device=x.device)                          # [L, Lk]
        if self.causal:
            qpos = torch.arange(offset, offset + L, device=x.device)[:, None]                   # [L, 1]
            kpos = torch.arange(first, first + Lk, device=x.device)[None, :]                     # [1, Lk]
            allowed = kpos <= qpos
            if self.window is not None:
                allowed = allowed & (kpos > qpos - self.window)
        allowed = allowed[None, None].expand(B, 1, L, Lk)                                       # [B, 1, L, Lk]
        if pad is not None:
            allowed = allowed & ~pad[:, None, None, :]
        empty = ~allowed.any(-1, keepdim=True)                                                  # [B, 1, L, 1]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | empty, scale=self.scale, enable_gqa=gqa)
        y = y.masked_fill(empty, 0.0)                                                           # [B, H, L, E]
        return self._out(y), cache if return_state else None

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.window is None else f", window={self.window}")


ATTENTION_CLASSES: dict[str, type[_Attention]] = {"sata": SATAAttention, "softmax": SoftmaxAttention}
