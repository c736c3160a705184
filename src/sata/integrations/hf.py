r"""Hugging Face transformers integration: ``attn_implementation="sata"`` and a constant-size cache.

Importing this module registers two attention implementations (with matching mask
functions, so padding and causality are never silently dropped):

- ``"sata"``: :func:`sata.sata_attention`, the truncated Taylor series of ``exp`` computed
  through its symmetric features (linear in the context, constant per decoded token with
  :class:`SATACache`).
- ``"sata_oracle"``: the same attention computed eagerly, ``T_P`` applied to the
  ``[B, H, Lq, Lk]`` score matrix; the O(n^2) reference the tests compare against.

.. code-block:: python

    import sata.integrations.hf as sata_hf
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sata")
    cache = sata_hf.SATACache(model.config)            # one SATAState per layer, no keys/values
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=100)

``n_taylor`` (number of Taylor terms, default 3) is read from ``config.sata_n_taylor`` when the
model's config has it (it is saved with the model), else from :func:`register`.

The window mode (``MATH.md`` section 6, ``docs/WINDOW.md``) is read from the config the same way:
``config.sata_window`` (recent positions attended exactly, default 0), ``config.sata_sinks`` (first
positions attended exactly, default 0), ``config.sata_taylor_mix`` (``beta``, the weight of the Taylor
part, a float or one per query head, default 1.0) and ``config.sata_recentre`` (``alpha``, the series of
each query expanded around ``mean - alpha * sd`` of its far scores, a float or one per query head,
default None: around 0). The defaults are the plain op. Both attention functions honour them (the
oracle through :func:`sata.naive_sata_attention`), and :class:`SATACache` then holds the window's
and sinks' keys and values beside each state: still constant memory in the context.

How the pieces meet (transformers 5.x): an attention module calls
``past_key_values.update(k, v, layer_idx)`` *before* the attention function, and the
attention function never sees the cache. :class:`SATACacheLayer.update` therefore keeps
no keys: it returns this step's keys and values tagged with the layer, and the attention
function reads the layer's :class:`~sata.SATAState`, attends over state plus new keys, and
stores the new state back. With any other cache (``DynamicCache``, ``StaticCache``) the
attention function receives the full keys and folds the earlier ones into a state on
the fly, so the standard KV-cache path gives the same numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import torch

import sata
from sata._checks import check_n_taylor, compute_dtype_for
from sata._paths.kernel import available as _kernels_available
from sata._paths.run import needs_grad
from sata.budget import format_bytes
from sata.hybrid import check_hybrid

try:
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.masking_utils import (
        AttentionMaskInterface,
        bidirectional_mask_function,
        causal_mask_function,
        prepare_padding_mask,
    )
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "sata.integrations.hf needs transformers (tested: 5.23): pip install 'sata-attention[hf]'"
    ) from e

__all__ = [
    "DEFAULT_N_TAYLOR",
    "ORACLE_NAME",
    "SATACache",
    "SATACacheLayer",
    "SATAMask",
    "check_model_budget",
    "n_taylor_for",
    "register",
    "window_args",
]

logger = logging.getLogger(__name__)

DEFAULT_N_TAYLOR = 3
ORACLE_NAME = "sata_oracle"
# n_taylor per registered implementation name (a config's ``sata_n_taylor`` overrides it)
_REGISTERED: dict[str, int] = {}
# attribute by which SATACacheLayer.update hands its layer to the attention function
_TAG = "_sata_cache_layer"
# attribute by which the mask tensor carries its SATAMask
_MASK_TAG = "_sata_mask"


# --------------------------------------------------------------------------- registration
def register(n_taylor: int = DEFAULT_N_TAYLOR, *, name: str = "sata", oracle: bool = False) -> str:
    """Register an attention implementation and its mask function with transformers.

    Args:
        n_taylor (int): Taylor terms used by models whose config has no ``sata_n_taylor``.
            Default: ``3``.
        name (str): the ``attn_implementation`` name. Default: ``"sata"``. Register several
            names to compare settings side by side (``register(4, name="sata4")``).
        oracle (bool): register the eager O(n^2) reference (``T_P`` on the score matrix)
            instead of the linear-time attention. Default: ``False``.

    Returns:
        ``name``, for ``from_pretrained(..., attn_implementation=name)``.
    """
    check_n_taylor(n_taylor, "register: n_taylor")
    if not isinstance(name, str) or not name:
        raise ValueError(f"register: name must be a non-empty string, got {name!r}")
    fn = _oracle_forward if oracle else _sata_forward
    _REGISTERED[name] = n_taylor
    AttentionInterface.register(name, functools.partial(fn, impl_name=name))
    AttentionMaskInterface.register(name, sata_mask)
    return name


def n_taylor_for(config, name: str | None = None) -> int:
    """Taylor terms a model uses: ``config.sata_n_taylor`` if set, else what ``name`` was registered with."""
    value = getattr(config, "sata_n_taylor", None)
    if value is not None:
        return check_n_taylor(value, "config.sata_n_taylor")
    name = name if name is not None else getattr(config, "_attn_implementation", None)
    return _REGISTERED.get(name, DEFAULT_N_TAYLOR)


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config


_WINDOW_FIELDS = "config.sata_window / sata_sinks / sata_taylor_mix / sata_recentre"
# the config fields that set a SATA layer's attention (SATACacheLayer._settings compares them on every call)
_CONFIG_FIELDS = ("sata_n_taylor", "sata_window", "sata_sinks", "sata_taylor_mix", "sata_recentre")


def _exact_slots(config) -> tuple[int, int]:
    """``(config.sata_window, config.sata_sinks)``, absent or None read as 0 (validated by :func:`window_args`)."""
    return getattr(config, "sata_window", None) or 0, getattr(config, "sata_sinks", None) or 0


def window_args(config, n_taylor: int, n_q_heads: int, device: torch.device | None = None) -> dict:
    """The window-mode keyword arguments of :func:`sata.sata_attention` a model's config asks for.

    Reads ``config.sata_window`` (default 0), ``sata_sinks`` (0), ``sata_taylor_mix`` (1.0; a float or a list of
    ``n_q_heads`` floats) and ``sata_recentre`` (None; likewise). Lists become ``[Hq]`` float64 tensors on ``device``.

    Returns:
        ``{}`` for the plain op (the defaults; a ``taylor_mix`` alone cancels in the normaliser), else
        ``dict(window=, sinks=, taylor_mix=, recentre=)``, validated.

    Raises:
        ValueError, TypeError: naming the config field and the fix.
    """
    window, sinks = _exact_slots(config)
    mix, alpha = getattr(config, "sata_taylor_mix", None), getattr(config, "sata_recentre", None)
    if not window and not sinks and alpha is None and mix is None:
        return {}
    per_head = lambda x: torch.tensor(x, dtype=torch.float64, device=device) if isinstance(x, (list, tuple)) else x
    args = dict(window=window, sinks=sinks, taylor_mix=1.0 if mix is None else per_head(mix), recentre=per_head(alpha))
    hybrid = check_hybrid(_WINDOW_FIELDS, n_taylor=n_taylor, n_q_heads=n_q_heads,
                          device=torch.device(device or "cpu"), **args)
    return {} if hybrid.plain else args


def check_model_budget(config, batch_size: int, n_taylor: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one :class:`~sata.SATAState` per layer for the whole model; raise if over the budget.

    A single attention call may fit the budget while the model's states together do not
    (SmolLM2-135M at ``n_taylor=5``: 0.6 GiB per layer, 19 GiB for 30 layers), so decoders are
    checked as a whole, before anything is allocated. With ``config.sata_window`` / ``sata_sinks`` each
    state also holds that many keys and values per key/value head (:func:`sata.state_size`).

    Raises:
        sata.MemoryBudgetError: with the sizes and the fix.
    """
    cfg = _text_config(config)
    n_layers = int(cfg.num_hidden_layers)
    n_heads = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    head = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
    window_args(cfg, n_taylor, n_heads)  # the window fields validated before they are counted
    window, sinks = _exact_slots(cfg)
    D = sata.feature_dim(head, n_taylor)
    itemsize = compute_dtype_for(dtype).itemsize
    layer_bytes = lambda p: batch_size * n_kv * sata.state_size(head, head, p, window=window, sinks=sinks) * itemsize
    per_layer = layer_bytes(n_taylor)
    total = n_layers * per_layer
    budget = sata.get_memory_budget()
    if total > budget:
        fits = [p for p in range(1, n_taylor) if n_layers * layer_bytes(p) <= budget]
        hint = f"n_taylor<={fits[-1]} fits this model" if fits else "no n_taylor fits this model"
        raise sata.MemoryBudgetError(
            f"SATA attention with n_taylor={n_taylor} and head size {head} has D={D:,} features per head; "
            f"one state per layer for {n_layers} layers x {n_kv} key/value heads x batch {batch_size} needs "
            f"{format_bytes(total, 2)} ({format_bytes(per_layer, 2)} per layer), more than the memory budget of "
            f"{format_bytes(budget, 2)}. "
            f"Use fewer Taylor terms ({hint}) or a smaller batch, or raise the budget with "
            f"sata.set_memory_budget(...) / SATA_MEMORY_BUDGET."
        )
    return total


# --------------------------------------------------------------------------- masks
@dataclasses.dataclass(frozen=True)
class SATAMask:
    """What SATA attention needs to know about a mask, in O(L) memory instead of ``[B, 1, Lq, Lk]``.

    Attributes:
        key_padding_mask (torch.Tensor | None): ``[B, Lk]`` bool, ``True`` = ignore that key
            (padding); ``None`` when no key is padded.
        causal (bool): query ``i`` sees keys at absolute positions ``<= q_offset + i``.
        q_offset (int): absolute position of the first query.
        kv_offset (int): absolute position of the first key.
    """

    key_padding_mask: torch.Tensor | None
    causal: bool
    q_offset: int
    kv_offset: int

    def dense(self, q_length: int, kv_length: int, device=None) -> torch.Tensor:
        """The equivalent boolean mask ``[B or 1, 1, Lq, Lk]``, ``True`` = attend (for the oracle)."""
        keep = torch.ones(1, 1, q_length, kv_length, dtype=torch.bool, device=device)
        if self.causal:
            q_pos = torch.arange(q_length, device=device)[:, None] + self.q_offset
            k_pos = torch.arange(kv_length, device=device)[None, :] + self.kv_offset
            keep = keep & (k_pos <= q_pos)
        if self.key_padding_mask is not None:
            keep = keep & ~self.key_padding_mask[:, None, None, :].to(device)
        return keep


def sata_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    **kwargs,
) -> torch.Tensor:
    """Mask function for ``AttentionMaskInterface``: causal or bidirectional attention with key padding.

    Returns the key-padding mask as a boolean ``[B, 1, 1, Lk]`` tensor (``True`` = attend)
    carrying a :class:`SATAMask` (causality and positions) that the SATA attention
    functions read; being a 4D tensor, it passes through ``generate``'s mask handling
    (static caches precompute masks) untouched. It never materialises ``[Lq, Lk]``.

    Patterns a fixed-size state cannot express (transformers' sliding windows, chunked attention,
    packed sequences, or/and overlays) raise ``NotImplementedError`` instead of being dropped. The
    window mode (``config.sata_window`` etc.) needs nothing here: which visible key is exact (window,
    sinks) and which is read from the Taylor state follows from the positions this mask carries.
    """
    if mask_function is causal_mask_function:
        causal = True
    elif mask_function is bidirectional_mask_function:
        causal = False
    else:
        raise NotImplementedError(
            f"SATA attention supports causal and bidirectional attention with padding masks; this model asked for "
            f"the mask pattern {getattr(mask_function, '__qualname__', mask_function)!r} (sliding window, chunked "
            "attention, packed sequences or a mask overlay), which one state per layer cannot express. Use a "
            "full-attention config (e.g. sliding_window=None; config.sata_window=W with config.sata_taylor_mix=0 "
            "is a sliding window of W positions), pass an attention_mask instead of packed position_ids, or "
            "another attn_implementation."
        )
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    key_padding = None
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)      # [B, >= kv_offset + Lk], True = keep
    if padding is not None:
        key_padding = ~padding[:, kv_offset : kv_offset + kv_length].to(torch.bool)   # [B, Lk], True = ignore
        if not key_padding.any():
            key_padding = None
    info = SATAMask(key_padding_mask=key_padding, causal=causal, q_offset=q_offset, kv_offset=kv_offset)
    if key_padding is None:
        keep = torch.ones(batch_size, 1, 1, kv_length, dtype=torch.bool, device=device)
    else:
        keep = (~key_padding)[:, None, None, :].contiguous()                  # [B, 1, 1, Lk]
    keep.__dict__[_MASK_TAG] = info
    return keep


def _keep_from_tensor(mask: torch.Tensor, q_length: int, kv_length: int) -> torch.Tensor:
    """A user-given 4D mask (bool ``True`` = attend, or additive float) as bool ``[B|1, H|1, Lq, Lk]``."""
    if mask.dim() != 4:
        raise ValueError(f"sata attention: a tensor attention_mask must be 4D [B, 1, Lq, Lk], got shape {tuple(mask.shape)}")
    mask = mask[..., -q_length:, :kv_length]
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


# --------------------------------------------------------------------------- attention functions
def _resolve_mask(module, attention_mask, is_causal, q_length: int, kv_length: int) -> SATAMask | torch.Tensor:
    """The mask's :class:`SATAMask`, or a plain 4D tensor mask given by the user (only the quadratic form can use it)."""
    if isinstance(attention_mask, torch.Tensor):
        return attention_mask.__dict__.get(_MASK_TAG, attention_mask)
    if attention_mask is not None:
        raise TypeError(
            f"sata attention: unsupported attention_mask of type {type(attention_mask).__name__}; "
            "expected the mask built by the 'sata' mask function, a 4D tensor or None"
        )
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # no mask: queries are the last q_length keys (decoding convention)
    return SATAMask(key_padding_mask=None, causal=bool(causal), q_offset=kv_length - q_length, kv_offset=0)


_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(msg)


def _sata_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    *,
    impl_name: str = "sata",
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``AttentionInterface`` function: query ``[B, Hq, Lq, E]``, key/value ``[B, Hkv, Lk, E]`` -> ``[B, Lq, Hq, Ev]``."""
    layer = key.__dict__.get(_TAG)  # SATACache: key/value are this step's only; earlier ones live in the layer's state
    try:
        if getattr(module.config, "sata_qk_adapter", False):  # a converted hybrid (sata convert)
            return _adapted_forward(module, query, key, value, attention_mask, is_causal, scaling,
                                    n_taylor_for(module.config, impl_name))
        if dropout:
            _warn_once("dropout", f"sata attention does not apply attention dropout (p={dropout}); it is ignored")
        if layer is not None:
            return _cache_step(layer, module, query, key, value, attention_mask, scaling, is_causal, impl_name), None
    except BaseException:  # a refused call (bad request, wrong batch) must not leave the cache unusable
        if layer is not None:
            layer._forget(key.shape[2])
        raise

    B, Hq, Lq, E = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    n_taylor = n_taylor_for(module.config, impl_name)
    hybrid = window_args(module.config, n_taylor, Hq, query.device)              # {} for the plain op
    common = dict(n_taylor=n_taylor, scale=scaling, enable_gqa=Hq != Hkv, **hybrid)
    mask = _resolve_mask(module, attention_mask, is_causal, Lq, Lk)

    if isinstance(mask, torch.Tensor):  # arbitrary 4D mask: only the quadratic form can honour it
        _refuse_dense_window(hybrid)
        _warn_once("dense", "sata attention got a 4D tensor mask: computing T_P on the full score matrix (O(L^2))")
        keep = _keep_from_tensor(mask, Lq, Lk)
        out = _taylor_eager(query, key, value, keep, n_taylor, scaling)
        return out.transpose(1, 2).contiguous(), None

    kpm = mask.key_padding_mask
    if not mask.causal:
        out = sata.sata_attention(query, key, value, is_causal=False, key_padding_mask=kpm, **common)
        return out.transpose(1, 2).contiguous(), None

    # causal over a standard KV cache: keys [0, p) are seen by every query, keys [p, p + Lq) causally,
    # keys after the last query (unfilled StaticCache slots) by none
    p = _first_query_key(mask, Lq, Lk, hybrid)
    state = None
    if p > 0:
        state = sata.accumulate_state(
            key[:, :, :p], value[:, :, :p], n_taylor=n_taylor, scale=scaling,
            key_padding_mask=None if kpm is None else kpm[:, :p],
            window=hybrid.get("window", 0), sinks=hybrid.get("sinks", 0),
        )
    out = sata.sata_attention(
        query, key[:, :, p : p + Lq], value[:, :, p : p + Lq], is_causal=True,
        key_padding_mask=None if kpm is None else kpm[:, p : p + Lq], state=state, **common,
    )
    return out.transpose(1, 2).contiguous(), None


def _cache_step(layer: SATACacheLayer, module, query, key, value, attention_mask, scaling, is_causal,
                impl_name: str) -> torch.Tensor:
    """One call through :class:`SATACache`: attend over ``layer.state`` plus this call's keys and store the new
    state back: query ``[B, Hq, Lq, E]``, key/value ``[B, Hkv, Lq, E]`` -> ``[B, Lq, Hq, Ev]``.

    The decode loop's entry, so it is kept short: the config's settings are read once per layer
    (:meth:`SATACacheLayer._settings`), and the state, which the op made and nobody else holds, is updated in place
    (no ``[B, Hkv, D, Ev + 1]`` allocation per step; about a third less memory traffic in the fused decode kernel).
    """
    B, Hq, Lq, E = query.shape
    mask = _resolve_mask(module, attention_mask, is_causal, Lq, key.shape[2])
    if not isinstance(mask, SATAMask) or not mask.causal:
        raise ValueError(
            "SATACache needs causal attention with the 'sata' mask function (decoders); got "
            f"{'a tensor mask' if isinstance(mask, torch.Tensor) else 'a bidirectional mask'}"
        )
    n_taylor, hybrid = layer._settings(module.config, impl_name, Hq, query.device)
    state = layer.state
    if state is None:  # the cache keeps one state per layer: check them all before the first
        check_model_budget(module.config, B, n_taylor, compute_dtype_for(query.dtype))
    # in place unless autograd needs the old state (training through a cache)
    inplace = state is not None and not needs_grad(query, key, value, state)
    out, layer.state = sata.sata_attention(
        query, key, value, n_taylor=n_taylor, is_causal=True, scale=scaling, enable_gqa=Hq != key.shape[1],
        key_padding_mask=mask.key_padding_mask, state=state, return_state=True, inplace=inplace, **hybrid,
    )                                                                            # [B, Hq, Lq, Ev]
    layer._pending = False
    return out.transpose(1, 2).contiguous()


def _first_query_key(mask: SATAMask, q_length: int, kv_length: int, hybrid: dict) -> int:
    """Index ``p`` among the keys of the first query's own key (causal): the queries are keys ``p .. p + Lq - 1``."""
    p = mask.q_offset - mask.kv_offset
    if p < 0 or p + q_length > kv_length:
        raise ValueError(
            f"sata attention: queries at positions {mask.q_offset}..{mask.q_offset + q_length - 1} are not among the "
            f"keys at positions {mask.kv_offset}..{mask.kv_offset + kv_length - 1}"
        )
    if mask.kv_offset and hybrid.get("sinks"):
        raise ValueError(
            f"sata attention: config.sata_sinks={hybrid['sinks']} needs the first keys of the sequence, but the cache "
            f"starts at position {mask.kv_offset} (a sliding cache dropped them); use SATACache or DynamicCache"
        )
    return p


def _refuse_dense_window(hybrid: dict) -> None:
    if hybrid:
        raise NotImplementedError(
            f"sata attention: the window mode ({_WINDOW_FIELDS}) takes causality and padding from the 'sata' mask "
            "function and cannot honour an arbitrary 4D tensor attention_mask; pass a 2D padding mask [B, L] instead"
        )


def _taylor_eager(query, key, value, keep: torch.Tensor, n_taylor: int, scaling: float | None) -> torch.Tensor:
    """``rownorm(keep * T_P(scale Q K^T)) V`` with an explicit mask ``keep`` ``[B|1, H|1, Lq, Lk]``: ``[B, Hq, Lq, Ev]``."""
    return sata.naive_sata_attention(query, key, value, n_taylor=n_taylor, scale=scaling,
                                     enable_gqa=query.shape[1] != key.shape[1], attn_mask=keep)


def _oracle_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    *,
    impl_name: str = ORACLE_NAME,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager reference: ``T_P`` applied to the full score matrix, then masked and row-normalised.

    In the window mode, :func:`sata.naive_sata_attention` with the config's window arguments: the queries sit at
    keys ``p .. p + Lq - 1``, so ``p`` placeholder queries (outputs dropped) put every query at its own key.
    """
    if key.__dict__.get(_TAG) is not None:
        raise ValueError("the oracle attention keeps no state: use it with DynamicCache or no cache, not SATACache")
    n_taylor = n_taylor_for(module.config, impl_name)
    if getattr(module.config, "sata_qk_adapter", False):  # its own quadratic form is the reference
        return _adapted_forward(module, query, key, value, attention_mask, is_causal, scaling, n_taylor)
    B, Hq, Lq, E = query.shape
    Lk = key.shape[2]
    hybrid = window_args(module.config, n_taylor, Hq, query.device)
    mask = _resolve_mask(module, attention_mask, is_causal, Lq, Lk)
    if not hybrid:
        keep = _keep_from_tensor(mask, Lq, Lk) if isinstance(mask, torch.Tensor) else mask.dense(Lq, Lk, query.device)
        out = _taylor_eager(query, key, value, keep, n_taylor, scaling)
        return out.transpose(1, 2).contiguous(), None
    if isinstance(mask, torch.Tensor):
        _refuse_dense_window(hybrid)
    if mask.causal:
        p = _first_query_key(mask, Lq, Lk, hybrid)
        Lk = p + Lq                                                             # later keys: unfilled cache slots
        query = torch.cat([query.new_zeros(B, Hq, p, E), query], dim=2)        # [B, Hq, Lk, E]
    elif Lq != Lk:
        raise ValueError(f"sata_oracle: bidirectional window mode needs as many queries as keys, got {Lq} and {Lk}")
    kpm = mask.key_padding_mask
    out = sata.naive_sata_attention(
        query, key[:, :, :Lk], value[:, :, :Lk], n_taylor=n_taylor, is_causal=mask.causal, scale=scaling,
        enable_gqa=Hq != key.shape[1], key_padding_mask=None if kpm is None else kpm[:, :Lk], **hybrid,
    )[:, :, Lk - Lq :]                                                          # [B, Hq, Lq, Ev]
    return out.transpose(1, 2).contiguous(), None


def _adapted_forward(module, query, key, value, attention_mask, is_causal, scaling, n_taylor: int):
    """The converted hybrid of ``config.sata_qk_adapter`` (:mod:`sata.integrations.adapted`): the window mode with
    learned maps on the Taylor part's queries and keys. Causal, without padding; through :class:`SATACache`
    a prefill then one token per step at constant memory, else the quadratic form over the given keys."""
    from sata.integrations import adapted

    B, Hq, Lq, E = query.shape
    Lk = key.shape[2]
    mask = _resolve_mask(module, attention_mask, is_causal, Lq, Lk)
    if not isinstance(mask, SATAMask) or not mask.causal or mask.key_padding_mask is not None:
        raise NotImplementedError(
            "sata attention: a converted hybrid (config.sata_qk_adapter) runs causal attention without padding; "
            "got a tensor mask, bidirectional attention or padded keys. Run one unpadded sequence per batch row."
        )
    window, sinks = _exact_slots(module.config)
    ad = adapted.adapter_for(module)
    kw = dict(n_taylor=n_taylor, scale=scaling if scaling is not None else E**-0.5, window=window, sinks=sinks)
    layer = key.__dict__.get(_TAG)
    if layer is not None:  # SATACache: this step's keys only
        layer._pending = False
        if layer.state is None:
            # on the CPU without autograd the state the fused decode kernel continues, else the PyTorch one
            fused = query.device.type == "cpu" and not torch.is_grad_enabled() and _kernels_available()
            out, layer.state = adapted.prefill(query, key, value, ad.map_q(query), ad.map_k(key), alpha=ad.alpha,
                                               beta=ad.beta, kernel_state=fused, **kw)   # [B, Hq, Lq, Ev]
        else:
            outs = []
            own = not torch.is_grad_enabled()  # the cache's own state, no graph to keep: updated in place
            for t in range(Lq):
                q1, k1, v1 = (x[:, :, t : t + 1] for x in (query, key, value))
                step = None
                if isinstance(layer.state, sata.SATAState):
                    step = adapted.kernel_decode_step(layer.state, q1, k1, v1, ad, **kw)
                    if step is None:  # the kernel does not serve this step (autograd): PyTorch from here on
                        layer.state = adapted.to_adapted_state(layer.state)
                if step is None:
                    step = adapted.decode_step(layer.state, q1, k1, v1, ad, inplace=own, **kw)
                y, layer.state = step
                outs.append(y)
            out = torch.cat(outs, dim=2)                                         # [B, Hq, Lq, Ev]
        return out.transpose(1, 2).contiguous(), None
    p = _first_query_key(mask, Lq, Lk, {"sinks": sinks})
    k, v = key[:, :, : p + Lq], value[:, :, : p + Lq]                            # later keys: unfilled cache slots
    out = adapted.adapted_attention(query, k, v, ad.map_q(query), ad.map_k(k), alpha=ad.alpha, beta=ad.beta,
                                    q_offset=p, **kw)                           # [B, Hq, Lq, Ev]
    return out.transpose(1, 2).contiguous(), None


# --------------------------------------------------------------------------- cache
class SATACacheLayer(CacheLayerMixin):
    """One decoder layer's cache: a :class:`~sata.SATAState` (fixed size) instead of keys and values.

    ``update`` stores no keys: it counts the positions and hands this step's keys and
    values, tagged with this layer, to the ``"sata"`` attention function, which attends over
    ``state`` plus the new keys and writes the new state back.
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, **kwargs):
        super().__init__()
        self.state: sata.SATAState | None = None
        self.n_seen = 0
        self._pending = False
        self._memo: tuple | None = None     # (config fields read, n_taylor, window-mode arguments)

    def __repr__(self) -> str:
        return f"SATACacheLayer(n_seen={self.n_seen}, state={self.state!r})"

    def _settings(self, config, impl_name: str, n_q_heads: int, device: torch.device) -> tuple[int, dict]:
        """``(n_taylor, window-mode arguments)`` of :func:`n_taylor_for` and :func:`window_args`, validated once.

        Read again only when one of the config's ``sata_*`` fields (its instance attributes: a transformers config's
        ``getattr`` costs microseconds) or the call's heads or device differ from the last call's.
        """
        fields = vars(config)
        # lists (per-head settings) as tuples: a list changed in place must not compare equal to itself
        key = (config, impl_name, n_q_heads, device,
               *(tuple(x) if isinstance(x := fields.get(f), list) else x for f in _CONFIG_FIELDS))
        memo = self._memo
        if memo is None or memo[0] != key:  # tuples compare item by item: identity first, then ==
            n_taylor = n_taylor_for(config, impl_name)
            memo = self._memo = (key, n_taylor, window_args(config, n_taylor, n_q_heads, device))
        return memo[1], memo[2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self._pending:
            raise RuntimeError(
                "SATACache: the previous keys of this layer were never consumed. SATACache works only with "
                "attn_implementation='sata' (model.set_attn_implementation('sata')); other attention functions "
                "would see only the newest keys."
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.n_seen += key_states.shape[-2]
        self._pending = True
        keys = key_states.view_as(key_states)          # a fresh tensor object to carry the tag
        keys.__dict__[_TAG] = self
        return keys, value_states

    def _forget(self, n: int) -> None:
        """The attention of the ``n`` keys :meth:`update` counted failed before using them: uncount them (the
        state, which the op checks before changing it, holds none of them)."""
        self.n_seen -= n
        self._pending = False

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # the attention sees only this step's keys, at absolute positions n_seen .. n_seen + Lq - 1
        return query_length, self.n_seen

    def get_seq_length(self) -> int:
        return self.n_seen

    def get_max_length(self) -> int:
        return -1

    @property
    def nbytes(self) -> int:
        return 0 if self.state is None else self.state.nbytes

    def reset(self) -> None:
        self.state, self.n_seen, self._pending, self._memo = None, 0, False, None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("SATACache cannot forget tokens: a state is a sum over all tokens seen")

    def _map_state(self, fn) -> None:
        """Apply ``fn`` to every tensor of the state (all have the batch first): ``kv`` and the window/sink keys."""
        if self.state is not None:
            self.state = self.state._map(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_state(lambda kv: kv.index_select(0, beam_idx.to(kv.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_state(lambda kv: kv.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_state(lambda kv: kv[indices])

    def offload(self) -> None:
        self._map_state(lambda kv: kv.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized:
            self._map_state(lambda kv: kv.to(self.device, non_blocking=True))


class SATACache(Cache):
    """Generation cache holding one :class:`~sata.SATAState` per layer: memory constant in the number of tokens.

    Use with a model running ``attn_implementation="sata"``::

        cache = SATACache(model.config)
        model.generate(**inputs, past_key_values=cache, max_new_tokens=256)
        cache.nbytes        # the same after 10 or 10,000 tokens

    With ``config.sata_window = W`` and ``config.sata_sinks = S`` each state also keeps the keys and values of
    the last ``W`` positions (a ring) and of the first ``S`` (:class:`~sata.SATAState` ``.exact``); ``nbytes``
    counts them, and they too are allocated once: per layer ``B Hkv (D (E + 1) + (W + S)(2 E))`` floats plus a
    flag per window slot and a position per sink.

    Decoding (no autograd) updates each state in place, so a state read from :attr:`states` changes with the next
    token: keep a snapshot with ``state.clone()`` (or ``copy.deepcopy(cache)``).

    Args:
        config (PreTrainedConfig, optional): the model's config; gives the number of layers and
            lets the whole model's state size be checked against ``sata``'s memory budget up front.
            Without it, layers are added as they are first used.

    Raises:
        sata.MemoryBudgetError: if one state per layer (batch 1 at construction, the real batch
            at the first update) exceeds the memory budget.
        ValueError: if ``config`` selects an attention implementation other than a SATA one.
    """

    def __init__(self, config=None):
        self.config = config
        if config is None:
            super().__init__(layer_class_to_replicate=SATACacheLayer)
            return
        impl = getattr(config, "_attn_implementation", None)
        if impl not in _REGISTERED or impl == ORACLE_NAME:
            raise ValueError(
                f"SATACache needs a model with attn_implementation='sata' (a name registered with "
                f"sata.integrations.hf.register), but config._attn_implementation is {impl!r}; call "
                "model.set_attn_implementation('sata') first"
            )
        check_model_budget(config, 1, n_taylor_for(config))
        n_layers = _text_config(config).num_hidden_layers
        super().__init__(layers=[SATACacheLayer() for _ in range(n_layers)])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.config is not None and layer_idx == 0 and self.get_seq_length(0) == 0:
            check_model_budget(self.config, key_states.shape[0], n_taylor_for(self.config),
                               compute_dtype_for(key_states.dtype))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @property
    def states(self) -> list[sata.SATAState | None]:
        """The per-layer states (``None`` before the first token)."""
        return [layer.state for layer in self.layers]

    @property
    def nbytes(self) -> int:
        """Bytes held by all layers' states, window and sink buffers included."""
        return sum(layer.nbytes for layer in self.layers)


register(DEFAULT_N_TAYLOR, name="sata")
register(DEFAULT_N_TAYLOR, name=ORACLE_NAME, oracle=True)
