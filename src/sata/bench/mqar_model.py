"""The MQAR model as Zoology configures it, and the sequence mixers under test.

Source: Zoology (github.com/HazyResearch/zoology: ``zoology/model.py``, ``zoology/mixers/``; the
Based paper's recall figure, ``zoology/experiments/paper_configs/arxiv24_based_figure2/configs.py``),
studied, not copied. Two layers, no MLP, no position embeddings, tied embeddings:

    x = Embed(tokens)                                                 [B, L, d]
    layer 0: BaseConv     y = ShortConv_3(u) * (W u + b) + u,  u = LN(x)
    layer 1: mixer under test (softmax, sliding window, Based, SATA, SATA + window)
    logits = LN(x) E^T at the query positions only                    [B, N, V]

wired as Zoology's ``TransformerBlock`` with an ``Identity`` state mixer: each block adds its
``LayerNorm``-ed residual to the next block's input (``_forward``), embedding dropout 0.1.

Zoology's state accounting (``state_size`` of its mixers, x 4 bytes, summed over the layers):
the convolution layer holds ``d K`` floats (``K = 3``), plus

- softmax: the KV cache at the longest test sequence, ``2 d L``;
- sliding window ``w``: ``2 d w``;
- Based (feature dim ``f``, ``H`` heads, values ``d / H`` wide): ``H D (d / H + 1)`` with the
  packed ``D = f (f + 1) / 2 + f + 1`` (Zoology counts Based's state packed; its implementation
  keeps the unpacked square, ``1 + f + f^2`` features: ``state_floats(..., as_implemented=True)``);
- SATA (head size ``E``, ``P`` terms, ``H`` heads): ``H D (d / H + 1)``, ``D = C(E + P - 1, P - 1)``;
- SATA + window ``W`` and ``S`` sinks: SATA's plus the exact keys and values, ``H (W + S) (E + d / H)``.

A new mixer is one class with ``__init__(d_model, **params)``, ``forward(x [B, L, d]) -> [B, L, d]``,
``state_floats(d_model, max_len, **params)`` and ``label(**params)``, registered in :data:`MIXERS`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..basis import feature_dim
from ..layers import ShortConv
from ..ops import sata_attention

__all__ = ["MIXERS", "MQARModel", "model_state_bytes"]

CONV_KERNEL = 3      # Zoology's BaseConv kernel in the recall figure
EMBED_DROPOUT = 0.1  # Zoology's ModelConfig.embed_dropout


def _positive(where: str, **values) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{where}: {name} must be a positive int, got {value!r}")


def _heads(where: str, d_model: int, n_heads: int) -> int:
    """Value width per head, ``d_model / n_heads``."""
    _positive(where, d_model=d_model, n_heads=n_heads)
    if d_model % n_heads:
        raise ValueError(f"{where}: d_model={d_model} is not divisible by n_heads={n_heads}; pick n_heads dividing d_model")
    return d_model // n_heads


# ---------------------------------------------------------------------------- softmax
class Softmax(nn.Module):
    r"""Causal softmax attention, Zoology's ``MHA``: fused QKV with bias, ``H`` heads of ``d / H``.

    Args:
        d_model (int): ``d``.
        n_heads (int): Default: ``1`` (Zoology's recall figure).
        dropout (float): on the attention weights while training. Default: ``0.1`` (Zoology's).
        window (int, optional): attend to the last ``window`` tokens only (the query's included).
            Default: ``None`` (every earlier token).
    """

    def __init__(self, d_model: int, n_heads: int = 1, dropout: float = 0.1, window: int | None = None):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, _heads(type(self).__name__, d_model, n_heads)
        if window is not None:
            _positive(type(self).__name__, window=window)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{type(self).__name__}: dropout must be in [0, 1), got {dropout!r}")
        self.dropout, self.window = float(dropout), window
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, d = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x [B, H, L, E]
        p = self.dropout if self.training else 0.0
        if self.window is None or self.window >= L:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)             # [B, H, L, E]
        else:
            i = torch.arange(L, device=x.device)
            allowed = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - self.window)        # [L, L]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)          # [B, H, L, E]
        return self.out_proj(y.transpose(1, 2).reshape(B, L, d))

    @staticmethod
    def state_floats(d_model: int, max_len: int, n_heads: int = 1, dropout: float = 0.1, window: int | None = None) -> int:
        return 2 * d_model * (max_len if window is None else min(window, max_len))

    @staticmethod
    def label(n_heads: int = 1, dropout: float = 0.1, window: int | None = None) -> str:
        return f"H={n_heads}" if window is None else f"w={window} H={n_heads}"


class SlidingWindow(Softmax):
    """Sliding-window softmax, Zoology's ``SlidingAttn`` (no attention dropout): :class:`Softmax` with ``window``.

    Zoology's mask lets a query see ``window + 1`` tokens and counts ``window`` in the state; we
    let it see ``window`` (as :class:`sata.layers.SoftmaxAttention` does).
    """

    def __init__(self, d_model: int, window: int, n_heads: int = 1, dropout: float = 0.0):
        super().__init__(d_model, n_heads=n_heads, dropout=dropout, window=window)

    @staticmethod
    def state_floats(d_model: int, max_len: int, window: int, n_heads: int = 1, dropout: float = 0.0) -> int:
        return 2 * d_model * min(window, max_len)

    @staticmethod
    def label(window: int, n_heads: int = 1, dropout: float = 0.0) -> str:
        return f"w={window}" + ("" if n_heads == 1 else f" H={n_heads}")


# ---------------------------------------------------------------------------- Based
class Based(nn.Module):
    r"""Based's linear attention as Zoology configures it (``zoology/mixers/based.py``, ``taylor_exp``).

    .. math::
        \phi(x) = [1,\ x / f^{1/4},\ \mathrm{vec}(x x^T) / \sqrt{2 f}] \in R^{1 + f + f^2},\qquad
        y_i = \frac{\sum_{j \le i} \phi(q_i)\cdot\phi(k_j)\, v_j}{\sum_{j \le i} \phi(q_i)\cdot\phi(k_j) + 10^{-12}}

    so ``phi(q).phi(k) = T_3(q.k / sqrt(f))``, with the unpacked square. Queries and keys are
    projected to ``f`` per head, values keep ``d / H`` per head; no biases, no rotary embedding.
    Computed as Zoology's ``train_view="quadratic"`` (the ``[L, L]`` matrix of feature products).

    Args:
        d_model (int): ``d``.
        feature_dim (int): ``f``. Default: ``16``.
        n_heads (int): ``H``. Default: ``1`` (Zoology's recall figure).
    """

    EPS = 1e-12   # Zoology's

    def __init__(self, d_model: int, feature_dim: int = 16, n_heads: int = 1):
        super().__init__()
        self.d_value = _heads("Based", d_model, n_heads)
        _positive("Based", feature_dim=feature_dim)
        self.feature_dim, self.n_heads = feature_dim, n_heads
        self.q_proj = nn.Linear(d_model, n_heads * feature_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_heads * feature_dim, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., f] -> [..., 1 + f + f^2]`` (unpacked: both ``x_a x_b`` and ``x_b x_a``)."""
        f = self.feature_dim
        square = (x[..., :, None] * x[..., None, :]).flatten(-2) / math.sqrt(2 * f)             # [..., f^2]
        return torch.cat([torch.ones_like(x[..., :1]), x / f**0.25, square], dim=-1)            # [..., 1+f+f^2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, d = x.shape
        fq = self.features(self.q_proj(x).view(B, L, self.n_heads, -1).transpose(1, 2))          # [B, H, L, F]
        fk = self.features(self.k_proj(x).view(B, L, self.n_heads, -1).transpose(1, 2))          # [B, H, L, F]
        v = self.v_proj(x).view(B, L, self.n_heads, self.d_value).transpose(1, 2)                 # [B, H, L, Ev]
        A = (fq @ fk.transpose(-1, -2)).tril()                                                   # [B, H, L, L]
        y = (A @ v) / (A.sum(-1, keepdim=True) + self.EPS)                                       # [B, H, L, Ev]
        return self.out_proj(y.transpose(1, 2).reshape(B, L, d))

    @staticmethod
    def state_floats(d_model: int, max_len: int, feature_dim: int = 16, n_heads: int = 1,
                     as_implemented: bool = False) -> int:
        f = feature_dim
        D = 1 + f + f * f if as_implemented else f * (f + 1) // 2 + f + 1
        return n_heads * D * (d_model // n_heads + 1)

    @staticmethod
    def label(feature_dim: int = 16, n_heads: int = 1) -> str:
        return f"f={feature_dim}" + ("" if n_heads == 1 else f" H={n_heads}")


# ---------------------------------------------------------------------------- SATA
class SATA(nn.Module):
    r"""SATA linear attention: ``exp`` truncated to ``P`` Taylor terms on the packed symmetric basis.

    .. math:: y_i = \frac{\sum_{j \le i} T_P(q_i \cdot k_j / \sqrt{E})\, v_j}{\sum_{j \le i} T_P(q_i \cdot k_j / \sqrt{E})}

    Queries and keys are projected to ``E`` per head, values keep ``d / H`` per head; no biases,
    no rotary embedding (as :class:`Based`, which is ``P = 3``, ``E = f``, the same function).

    Args:
        d_model (int): ``d``.
        n_taylor (int): ``P``. Default: ``3``.
        head_dim (int): ``E``, the query/key size per head. Default: ``16``.
        n_heads (int, optional): ``H``. Default: ``d_model // head_dim`` (values ``E`` wide, as
            :class:`sata.layers.SATAAttention`); ``1`` is Based's layout.
    """

    def __init__(self, d_model: int, n_taylor: int = 3, head_dim: int = 16, n_heads: int | None = None):
        super().__init__()
        _positive("SATA", n_taylor=n_taylor, head_dim=head_dim)
        n_heads = d_model // head_dim if n_heads is None else n_heads
        if n_heads < 1:
            raise ValueError(f"SATA: head_dim={head_dim} > d_model={d_model}; pass n_heads=1 or a smaller head_dim")
        self.d_value = _heads("SATA", d_model, n_heads)
        self.n_taylor, self.head_dim, self.n_heads = n_taylor, head_dim, n_heads
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, d = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)               # [B, H, L, E]
        k = self.k_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)               # [B, H, L, E]
        v = self.v_proj(x).view(B, L, self.n_heads, self.d_value).transpose(1, 2)                # [B, H, L, Ev]
        y = sata_attention(q, k, v, n_taylor=self.n_taylor, is_causal=True)                      # [B, H, L, Ev]
        return self.out_proj(y.transpose(1, 2).reshape(B, L, d))

    @staticmethod
    def state_floats(d_model: int, max_len: int, n_taylor: int = 3, head_dim: int = 16, n_heads: int | None = None) -> int:
        H = d_model // head_dim if n_heads is None else n_heads
        return H * feature_dim(head_dim, n_taylor) * (d_model // H + 1)

    @staticmethod
    def label(n_taylor: int = 3, head_dim: int = 16, n_heads: int | None = None) -> str:
        return f"P={n_taylor} E={head_dim}" + ("" if n_heads is None else f" H={n_heads}")


class SATAWindow(SATA):
    r"""SATA with an exact softmax window and sinks beside the Taylor state, under one normaliser.

    .. math:: y_i = \frac{\sum_{j \in E_i} e^{s_{ij} - m_i} v_j + \beta_h e^{c_i - m_i} \sum_{j \in F_i} T_P(s_{ij} - c_i) v_j}
              {\text{the same with } 1 \text{ for } v_j}

    ``E_i``: the ``window`` most recent keys and the first ``sinks``; ``F_i``: the older keys, read from
    the state around ``c_i = mu_i - alpha_h sd_i`` (``MATH.md`` section 6). ``beta_h = softplus(.)``
    (start 1) and ``alpha_h`` (start 0) are learned per head.

    Args:
        d_model, n_taylor, head_dim, n_heads: as :class:`SATA`.
        window (int): ``W`` exact recent keys. Default: ``32``.
        sinks (int): ``S`` exact first keys. Default: ``0``.
    """

    def __init__(self, d_model: int, n_taylor: int = 3, head_dim: int = 16, n_heads: int | None = None,
                 window: int = 32, sinks: int = 0):
        super().__init__(d_model, n_taylor, head_dim, n_heads)
        _positive("SATA+window", window=window)
        if not isinstance(sinks, int) or isinstance(sinks, bool) or sinks < 0:
            raise ValueError(f"SATA+window: sinks must be a non-negative int, got {sinks!r}")
        self.window, self.sinks = window, sinks
        self.mix_param = nn.Parameter(torch.full((self.n_heads,), math.log(math.e - 1)))     # softplus -> 1
        self.recentre = nn.Parameter(torch.zeros(self.n_heads)) if n_taylor >= 3 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, d = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)               # [B, H, L, E]
        k = self.k_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)               # [B, H, L, E]
        v = self.v_proj(x).view(B, L, self.n_heads, self.d_value).transpose(1, 2)                # [B, H, L, Ev]
        y = sata_attention(q, k, v, n_taylor=self.n_taylor, is_causal=True, window=self.window, sinks=self.sinks,
                           taylor_mix=F.softplus(self.mix_param), recentre=self.recentre)         # [B, H, L, Ev]
        return self.out_proj(y.transpose(1, 2).reshape(B, L, d))

    @staticmethod
    def state_floats(d_model: int, max_len: int, n_taylor: int = 3, head_dim: int = 16, n_heads: int | None = None,
                     window: int = 32, sinks: int = 0) -> int:
        H = d_model // head_dim if n_heads is None else n_heads
        exact = H * (window + sinks) * (head_dim + d_model // H)                 # ring buffer + sinks: keys, values
        return SATA.state_floats(d_model, max_len, n_taylor, head_dim, n_heads) + exact

    @staticmethod
    def label(n_taylor: int = 3, head_dim: int = 16, n_heads: int | None = None, window: int = 32, sinks: int = 0) -> str:
        return SATA.label(n_taylor, head_dim, n_heads) + f" W={window}" + (f" S={sinks}" if sinks else "")


# name -> mixer class
MIXERS: dict[str, type[nn.Module]] = {"softmax": Softmax, "sliding": SlidingWindow, "based": Based, "sata": SATA,
                                      "sata+window": SATAWindow}


def _mixer_class(mixer: str) -> type[nn.Module]:
    if mixer not in MIXERS:
        raise ValueError(f"MQAR: unknown mixer {mixer!r}; choose one of {sorted(MIXERS)}")
    return MIXERS[mixer]


def model_state_bytes(mixer: str, d_model: int, max_len: int, params: dict, **kw) -> int:
    """Zoology's state accounting of the whole model: 4 bytes x (convolution ``d K`` + mixer floats)."""
    return 4 * (d_model * CONV_KERNEL + _mixer_class(mixer).state_floats(d_model, max_len, **params, **kw))


# ---------------------------------------------------------------------------- the model
class _BaseConv(nn.Module):
    """Zoology's ``BaseConv``: ``ShortConv(u) * (W u + b) + u`` (a gated causal convolution)."""

    def __init__(self, d_model: int, kernel_size: int = CONV_KERNEL):
        super().__init__()
        self.conv = ShortConv(d_model, kernel_size)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.conv(u)[0] * self.proj(u) + u                                                # [B, L, d]


class MQARModel(nn.Module):
    r"""Zoology's two-layer recall model around one mixer (module docstring).

    Args:
        vocab_size (int): ``V``.
        d_model (int): ``d``.
        mixer (str): a key of :data:`MIXERS`.
        params (dict): the mixer's keyword arguments (``n_taylor``, ``head_dim``, ``window``, ...).

    Initialisation as Zoology's: weights N(0, 0.02), biases 0, output projections
    N(0, 0.02 / sqrt(2 n_layers)); the convolution as ``nn.Conv1d``'s default.
    """

    N_LAYERS = 2

    def __init__(self, vocab_size: int, d_model: int, mixer: str, params: dict | None = None):
        super().__init__()
        _positive("MQARModel", vocab_size=vocab_size, d_model=d_model)
        self.embed = nn.Embedding(vocab_size, d_model)
        self.drop = nn.Dropout(EMBED_DROPOUT)
        self.layers = nn.ModuleList([_BaseConv(d_model), _mixer_class(mixer)(d_model, **(params or {}))])
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(2 * self.N_LAYERS))     # per block: before, after
        self.norm_f = nn.LayerNorm(d_model)
        for name, p in self.named_parameters():
            if name.endswith("conv.weight"):   # nn.Conv1d's default: U(+-1/sqrt(K))
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                std = 0.02 / math.sqrt(2 * self.N_LAYERS) if name.endswith("out_proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``tokens [B, L]``, ``positions [B, N]`` -> logits ``[B, N, V]`` at those positions only."""
        h, residual = self.drop(self.embed(tokens)), None                                        # [B, L, d]
        for i, layer in enumerate(self.layers):
            residual = h if residual is None else h + residual
            residual = layer(self.norms[2 * i](residual)) + residual
            h = self.norms[2 * i + 1](residual)        # Zoology's Identity state mixer after norm2
        out = self.norm_f(h + residual)                                                          # [B, L, d]
        at = out.gather(1, positions[..., None].expand(-1, -1, out.shape[-1]))                    # [B, N, d]
        return at @ self.embed.weight.T                                                          # [B, N, V]
