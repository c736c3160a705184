"""A small decoder-only language model whose attention is SATA or softmax (one config field).

Pre-norm blocks (RMSNorm), SwiGLU or GELU MLP, tied input/output embeddings, byte-level
vocabulary of 256 by default (no tokenizer). Saved as ``model.safetensors`` + ``config.json``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ._files import write_atomic
from .hybrid import check_hybrid, check_learned, softplus_inverse
from .layers import ATTENTION_CLASSES, ShortConv, SoftmaxAttention

__all__ = ["LMConfig", "TransformerLM"]

_MODEL_TYPE = "sata-lm"
_CONFIG_FILE = "config.json"
_WEIGHTS_FILE = "model.safetensors"


@dataclass
class LMConfig:
    """Configuration of :class:`TransformerLM`.

    Attributes:
        vocab_size: tokens; 256 = raw bytes. Default: 256.
        d_model: width. Default: 256.
        n_layers: blocks. Default: 4.
        n_heads: query heads. Default: 4.
        head_dim: per head; ``None`` = ``d_model // n_heads``.
        n_kv_heads: key/value heads (grouped-query attention); ``None`` = ``n_heads``.
        attention: ``"sata"`` or ``"softmax"``. Default: ``"sata"``.
        n_taylor: Taylor terms of SATA attention (ignored by softmax). Default: 3.
        mlp: ``"swiglu"`` or ``"gelu"``. Default: ``"swiglu"``.
        d_ff: MLP hidden width; ``None`` = ``8/3 d_model`` rounded up to 32 (swiglu) or ``4 d_model`` (gelu).
        rope: rotary position embeddings. Default: True.
        short_conv: kernel of a causal depthwise convolution on the attention input (the local
            mixing of linear-attention models; state = the last ``short_conv - 1`` inputs);
            0 = none. Default: 0.
        local_layers: indices of layers that use sliding-window softmax attention over the last
            ``local_window`` tokens instead of ``attention`` (a hybrid, as in Based: exact local
            attention plus a constant-size global state; cost per token stays constant). Default: none.
        local_window: window of those layers. Default: 64.
        learn_scale: SATA layers learn a per-head gain on the queries (``exp`` of a parameter
            starting at 0, not weight-decayed). Default: False.
        window, sinks, taylor_mix, recentre, learn_mix, learn_recentre: the window mode of the SATA
            layers (:class:`sata.layers.SATAAttention`, ``MATH.md`` section 6): each token attends
            exactly to its ``window`` most recent tokens and the first ``sinks``, and through the Taylor
            state (weight ``taylor_mix``, series around ``mean - recentre * sd`` of the far scores) to
            the rest, under one normaliser; ``learn_mix`` / ``learn_recentre`` learn ``taylor_mix`` /
            ``recentre`` per head from those starting values. SATA layers only (a softmax model's
            window is ``local_layers``). Defaults: ``0, 0, 1.0, None, False, False`` (the plain op).
        rope_base: Default: 10000.
        norm_eps: RMSNorm epsilon. Default: 1e-5.
        init_std: std of the normal initialisation. Default: 0.02.
    """

    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    head_dim: int | None = None
    n_kv_heads: int | None = None
    attention: str = "sata"
    n_taylor: int = 3
    mlp: str = "swiglu"
    d_ff: int | None = None
    rope: bool = True
    short_conv: int = 0
    local_layers: list[int] = field(default_factory=list)
    local_window: int = 64
    learn_scale: bool = False
    window: int = 0
    sinks: int = 0
    taylor_mix: float = 1.0
    recentre: float | None = None
    learn_mix: bool = False
    learn_recentre: bool = False
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_CLASSES:
            raise ValueError(f"LMConfig.attention must be one of {sorted(ATTENTION_CLASSES)}, got {self.attention!r}")
        if self.mlp not in ("swiglu", "gelu"):
            raise ValueError(f"LMConfig.mlp must be 'swiglu' or 'gelu', got {self.mlp!r}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_taylor"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LMConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.short_conv, int) or self.short_conv < 0 or self.short_conv == 1:
            raise ValueError(f"LMConfig.short_conv must be 0 (none) or a kernel size >= 2, got {self.short_conv!r}")
        self.local_layers = sorted(set(self.local_layers))
        if any(not isinstance(i, int) or not 0 <= i < self.n_layers for i in self.local_layers):
            raise ValueError(f"LMConfig.local_layers must be layer indices in [0, {self.n_layers}), got {self.local_layers}")
        if not isinstance(self.local_window, int) or self.local_window < 1:
            raise ValueError(f"LMConfig.local_window must be a positive int, got {self.local_window!r}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"LMConfig: d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim")
        self._check_window_mode()

    def _check_window_mode(self) -> None:
        for name in ("learn_mix", "learn_recentre"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LMConfig.{name} must be a bool, got {getattr(self, name)!r}")
        hybrid = check_hybrid("LMConfig", window=self.window, sinks=self.sinks, taylor_mix=self.taylor_mix,
                              recentre=self.recentre, n_taylor=self.n_taylor, n_q_heads=self.n_heads,
                              device=torch.device("cpu"))
        # as the checked values: ints from JSON or a caller become floats, numpy numbers Python's (JSON writes them)
        self.window, self.sinks = hybrid.window, hybrid.sinks
        self.taylor_mix, self.recentre = hybrid.taylor_mix, hybrid.recentre
        check_learned("LMConfig", hybrid, learn_mix=self.learn_mix, learn_recentre=self.learn_recentre,
                      n_taylor=self.n_taylor)
        if hybrid.plain and not (self.learn_mix or self.learn_recentre) and self.taylor_mix == 1.0:
            return
        if self.attention != "sata":
            raise ValueError("LMConfig: window, sinks, taylor_mix, recentre, learn_mix and learn_recentre set the window "
                             f"mode of SATA layers, but attention={self.attention!r}; for sliding-window softmax use "
                             "local_layers (every layer: local_layers=list(range(n_layers))) and local_window")
        if len(self.local_layers) == self.n_layers:
            raise ValueError("LMConfig: window, sinks, taylor_mix, recentre, learn_mix and learn_recentre set the window "
                             "mode of SATA layers, but local_layers makes every layer sliding-window softmax; "
                             "drop them or use fewer local_layers")

    @property
    def mixer(self) -> str:
        """The token mixer in a few words, e.g. ``"sata P=3 + window 64 (mix, recentre learned), conv 4"``."""
        if len(self.local_layers) == self.n_layers:
            text = f"local window {self.local_window}"
        else:
            text = f"sata P={self.n_taylor}" if self.attention == "sata" else self.attention
            exact = [f"window {self.window}"] * bool(self.window) + [f"sinks {self.sinks}"] * bool(self.sinks)
            if exact:
                text += " + " + " + ".join(exact)
            learned = ["mix"] * self.learn_mix + ["recentre"] * self.learn_recentre
            if learned:
                text += f" ({', '.join(learned)} learned)"
            if self.local_layers:
                text += f", local window {self.local_window} at layers {','.join(map(str, self.local_layers))}"
        return text + (f", conv {self.short_conv}" if self.short_conv else "")

    @property
    def resolved_head_dim(self) -> int:
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def resolved_d_ff(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "gelu":
            return 4 * self.d_model
        return 32 * math.ceil(8 * self.d_model / 3 / 32)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LMConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"model_type", "format_version"})
        if unknown:
            raise ValueError(f"LMConfig: unknown fields {unknown} (written by a newer sata?)")
        return cls(**{k: v for k, v in d.items() if k in known})


class MLP(nn.Module):
    """SwiGLU ``W_down (silu(W_gate x) * W_up x)`` or GELU ``W_down gelu(W_up x)``: ``[..., d] -> [..., d]``."""

    def __init__(self, d_model: int, d_ff: int, kind: str):
        super().__init__()
        self.kind = kind
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.gate = nn.Linear(d_model, d_ff, bias=False) if kind == "swiglu" else None
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.gate(x)) * self.up(x) if self.gate is not None else F.gelu(self.up(x))
        return self.down(h)


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))``, then ``+ mlp(norm(.))``."""

    def __init__(self, c: LMConfig, index: int = 0):
        super().__init__()
        self.attn_norm = nn.RMSNorm(c.d_model, eps=c.norm_eps)
        kw = dict(causal=True, rope=c.rope, rope_base=c.rope_base)
        if index in c.local_layers:
            self.attn = SoftmaxAttention(c.d_model, c.n_heads, c.head_dim, c.n_kv_heads, window=c.local_window, **kw)
        else:
            if c.attention == "sata":
                kw.update(n_taylor=c.n_taylor, learn_scale=c.learn_scale, window=c.window, sinks=c.sinks,
                          taylor_mix=c.taylor_mix, recentre=c.recentre, learn_mix=c.learn_mix,
                          learn_recentre=c.learn_recentre)
            self.attn = ATTENTION_CLASSES[c.attention](c.d_model, c.n_heads, c.head_dim, c.n_kv_heads, **kw)
        self.conv = ShortConv(c.d_model, c.short_conv) if c.short_conv else None
        self.mlp_norm = nn.RMSNorm(c.d_model, eps=c.norm_eps)
        self.mlp = MLP(c.d_model, c.resolved_d_ff, c.mlp)

    def forward(self, x, state=None, key_padding_mask=None, return_state=False):
        """State: the attention's, or ``(attention state, convolution state)`` with a short convolution."""
        h = self.attn_norm(x)                                                             # [B, L, d]
        if self.conv is not None:
            attn_state, conv_state = (None, None) if state is None else state
            h, conv_state = self.conv(h, conv_state)
            a, attn_state = self.attn(h, attn_state, key_padding_mask, return_state=return_state)
            state = (attn_state, conv_state) if return_state else None
        else:
            a, state = self.attn(h, state, key_padding_mask, return_state=return_state)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), state


class TransformerLM(nn.Module):
    r"""Decoder-only language model: embeddings, ``n_layers`` pre-norm blocks, RMSNorm, tied output.

    ``forward(tokens [B, L], states=None) -> (logits [B, L, vocab], states)`` where ``states`` is
    one attention state per layer (:class:`sata.SATAState` or :class:`sata.layers.KVCache`),
    ``None`` for an empty context. Decoding one token at a time with the returned states gives
    the same logits as a full forward pass.
    """

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual output projections scaled by ``1/sqrt(2 n_layers)`` (GPT-2)."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() == 2:
                s = std / math.sqrt(2 * self.config.n_layers) if name.endswith(("o_proj.weight", "down.weight")) else std
                nn.init.normal_(p, 0.0, s)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            elif name.endswith("log_gain"):
                nn.init.zeros_(p)
            elif name.endswith("mix_param"):  # beta starts at taylor_mix, alpha at recentre
                nn.init.constant_(p, softplus_inverse(self.config.taylor_mix))
            elif name.endswith("recentre_param"):
                nn.init.constant_(p, self.config.recentre)
            elif name.endswith("conv.weight"):  # the identity: the block starts as one without it
                with torch.no_grad():
                    p.zero_()[:, 0, -1] = 1.0
            else:  # norm weights
                nn.init.ones_(p)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, tokens: torch.Tensor, states: list | None = None, key_padding_mask: torch.Tensor | None = None,
                *, return_states: bool = False) -> tuple[torch.Tensor, list | None]:
        """Next-token logits.

        Args:
            tokens (torch.Tensor): ``[B, L]`` int64 in ``[0, vocab_size)``.
            states (list, optional): per layer, the state after the earlier tokens (or ``None``).
            key_padding_mask (torch.Tensor, optional): ``[B, L]`` bool, ``True`` = padding.
            return_states (bool): return the states after ``tokens``. Default: ``False``.

        Returns:
            ``(logits [B, L, vocab_size] float32, states or None)``.
        """
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32, torch.uint8):
            raise ValueError(f"TransformerLM: tokens must be an integer tensor [batch, length], got "
                             f"{tokens.dtype} {tuple(tokens.shape)}")
        if tokens.numel():
            lo, hi = (int(t) for t in torch.aminmax(tokens))
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"TransformerLM: token ids must be in [0, {self.config.vocab_size}), got [{lo}, {hi}]")
        if states is not None and len(states) != len(self.blocks):
            raise ValueError(f"TransformerLM: states must hold one state per layer ({len(self.blocks)}), got {len(states)}")
        x = self.embed(tokens.long())                                                     # [B, L, d]
        new_states = []
        for i, block in enumerate(self.blocks):
            x, s = block(x, None if states is None else states[i], key_padding_mask, return_states)
            new_states.append(s)
        logits = F.linear(self.norm(x), self.embed.weight)                                # [B, L, V]
        return logits, (new_states if return_states else None)

    def state_nbytes(self, states: list | None) -> int:
        """Bytes held by ``states`` (constant for SATA; growing with the context for softmax)."""
        def nbytes(s) -> int:
            if isinstance(s, tuple):
                return sum(nbytes(t) for t in s)
            if isinstance(s, torch.Tensor):
                return s.numel() * s.element_size()
            return 0 if s is None else s.nbytes

        return 0 if states is None else sum(nbytes(s) for s in states)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into ``directory``, each atomically
        (:func:`sata._files.write_atomic`: mode 0644 under the usual umask, no temporary left behind)."""
        from safetensors.torch import save

        directory = Path(directory)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        write_atomic(directory / _WEIGHTS_FILE, save(tensors, metadata={"format": "pt", "model_type": _MODEL_TYPE}))
        config = {"model_type": _MODEL_TYPE, "format_version": 1, **self.config.to_dict()}
        write_atomic(directory / _CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> TransformerLM:
        """Load a model written by :meth:`save_pretrained`: its folder, or the output folder of ``sata train``
        (whose ``model/`` it reads)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / _CONFIG_FILE).is_file() and (directory / "model" / _CONFIG_FILE).is_file():
            directory = directory / "model"  # a run's folder: its finished model
        cfg_path, w_path = directory / _CONFIG_FILE, directory / _WEIGHTS_FILE
        if not cfg_path.is_file() or not w_path.is_file():
            raise FileNotFoundError(f"{directory} does not hold a sata model ({_CONFIG_FILE} and {_WEIGHTS_FILE}); "
                                    "pass the output folder of `sata train` (or its model/ or checkpoint/ folder)")
        try:
            raw = json.loads(cfg_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{cfg_path} is not valid JSON ({e}); write the model again with save_pretrained") from None
        if not isinstance(raw, dict) or raw.get("model_type") != _MODEL_TYPE:
            found = raw.get("model_type") if isinstance(raw, dict) else raw
            raise ValueError(f"{cfg_path} is not a {_MODEL_TYPE} config (model_type={found!r})")
        model = cls(LMConfig.from_dict(raw))
        try:  # read on the CPU: only the file's own faults are reported as a damaged file (not a device's)
            weights = load_file(str(w_path), device="cpu")
        except SafetensorError as e:  # a truncated or overwritten file
            raise ValueError(f"{w_path} is not a readable safetensors file ({e}); write the model again with "
                             "save_pretrained, or load another checkpoint") from None
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:
            raise ValueError(f"{w_path} does not hold the weights {cfg_path.name} describes: {e}") from None
        return model.to(map_location)
