r"""Convert a pretrained Llama-family model to the window + re-centred SATA hybrid (issue 17).

Two stages, each resumable from its checkpoint file:

(a) **attention transfer**, layer by layer with the original layer inputs (teacher forcing): the query/key
    maps of the Taylor part, alpha and beta (:class:`~sata.integrations.adapted.QKAdapter`), trained with
    Adam on the relative squared error of the attention block's output (after ``o_proj``) against softmax:

    .. math:: \min \| o(\mathrm{hybrid}(q, k, v; A q, B k, \alpha, \beta)) - o(\mathrm{softmax}(q, k, v)) \|^2 / \|\cdot\|^2

(b) **distillation**: the whole model against the original's next-token distributions,
    ``KL(teacher || student)`` per token, training the adapters and LoRA on ``q/k/v/o_proj``
    (``W + B A``, ``B = 0`` at the start), with gradient checkpointing per decoder layer so 2,048-token
    windows fit; LoRA is folded into the weights at the end.

The window-only baseline runs (b) alone with ``taylor_mix = 0`` (no Taylor part: nothing for (a) to train).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn.utils import parametrize

from sata.integrations import adapted
from sata.integrations.convert import _apply_rotary, _attention_modules

__all__ = ["HybridConfig", "configure", "distill", "fold_lora", "next_token_nll", "save", "transfer"]

_VOCAB_CHUNK = 512  # tokens per lm_head call: [chunk, vocab] logits at a time, never [L, vocab]


@dataclass
class HybridConfig:
    """The converted model's attention and the training budget (defaults: the headline's)."""

    n_taylor: int = 3
    window: int = 64
    sinks: int = 4
    recentre: float = 0.0          # alpha at the start (the centre c = mean - alpha sd of the far scores)
    taylor_mix: float = 1.0        # beta at the start; 0: the window-only baseline
    transfer_steps: int = 100      # Adam steps per layer, stage (a)
    transfer_lr: float = 5e-3
    distill_steps: int = 200       # stage (b)
    distill_lr: float = 5e-4
    lora_rank: int = 8
    batch: int = 1                 # windows per step
    seed: int = 0

    @property
    def window_only(self) -> bool:
        return self.taylor_mix == 0


def configure(model, hc: HybridConfig) -> list[adapted.QKAdapter] | None:
    """Set the model's config to the hybrid of ``hc`` (window, sinks, n_taylor) and attach identity adapters
    (none for the window-only baseline, which runs :func:`sata.sata_attention` with ``taylor_mix=0``)."""
    cfg = model.config
    cfg.sata_n_taylor, cfg.sata_window, cfg.sata_sinks = hc.n_taylor, hc.window, hc.sinks
    if hc.window_only:
        cfg.sata_taylor_mix, cfg.sata_recentre = 0.0, None
        return None
    cfg.sata_qk_adapter = True
    ads = adapted.attach_adapters(model)
    with torch.no_grad():
        for ad in ads:
            ad.alpha.fill_(hc.recentre)
            ad.log_beta.fill_(math.log(hc.taylor_mix))
    return ads


# --------------------------------------------------------------------------- (a) attention transfer
@torch.no_grad()
def capture(model, windows: torch.Tensor, progress=None) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer the attention block's input ``x [N, L, hidden]`` and softmax output ``y [N, L, hidden]``."""
    attn = _attention_modules(model)
    store = {i: ([], []) for i in range(len(attn))}
    hooks = []
    for i, a in enumerate(attn):
        hooks.append(a.register_forward_pre_hook(lambda m, args, kw, i=i: store[i][0].append(kw["hidden_states"]),
                                                 with_kwargs=True))
        hooks.append(a.register_forward_hook(lambda m, args, kw, out, i=i: store[i][1].append(out[0]), with_kwargs=True))
    try:
        for ids in windows.split(1):
            model(ids, use_cache=False)
            if progress is not None:
                progress.update(1)
    finally:
        for h in hooks:
            h.remove()
    return {i: (torch.cat(x), torch.cat(y)) for i, (x, y) in store.items()}


def transfer_layer(model, i: int, ad: adapted.QKAdapter, x: torch.Tensor, y: torch.Tensor, hc: HybridConfig,
                   bar=None) -> dict:
    """Stage (a) for layer ``i``: train ``ad`` on windows ``x, y [N, L, hidden]`` (the last held out); keep the best."""
    a = _attention_modules(model)[i]
    N, L, _ = x.shape
    Hq, Hkv = model.config.num_attention_heads, model.config.num_key_value_heads
    E = a.head_dim
    cos, sin = getattr(model, "model", model).rotary_emb(x[:1], torch.arange(L)[None])     # [1, L, E]
    with torch.no_grad():
        q = a.q_proj(x).view(N, L, Hq, E).transpose(1, 2)                                   # [N, Hq, L, E]
        k = a.k_proj(x).view(N, L, Hkv, E).transpose(1, 2)                                  # [N, Hkv, L, E]
        v = a.v_proj(x).view(N, L, Hkv, E).transpose(1, 2)                                  # [N, Hkv, L, E]
        q, k = _apply_rotary(q, k, cos, sin)

    def loss_on(idx):
        out = adapted.adapted_attention(q[idx], k[idx], v[idx], ad.map_q(q[idx]), ad.map_k(k[idx]),
                                        n_taylor=hc.n_taylor, scale=a.scaling, window=hc.window, sinks=hc.sinks,
                                        alpha=ad.alpha, beta=ad.beta)                        # [b, Hq, L, E]
        out = a.o_proj(out.transpose(1, 2).reshape(len(idx), L, Hq * E))                    # [b, L, hidden]
        return ((out - y[idx]) ** 2).mean() / (y[idx] ** 2).mean()

    held, n_train = torch.tensor([N - 1]), max(1, N - 1)
    with torch.no_grad():
        start = loss_on(held).item()
    best = (start, {n: p.detach().clone() for n, p in ad.state_dict().items()})
    opt = torch.optim.Adam(ad.parameters(), lr=hc.transfer_lr)
    gen = torch.Generator().manual_seed(hc.seed + i)
    eval_every = max(1, hc.transfer_steps // 5)
    for step in range(hc.transfer_steps):
        _cosine(opt, hc.transfer_lr, step, hc.transfer_steps)
        loss = loss_on(torch.randint(0, n_train, (min(hc.batch, n_train),), generator=gen))
        opt.zero_grad()
        if torch.isfinite(loss):
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ad.parameters(), 1.0)
            opt.step()
        if (step + 1) % eval_every == 0 or step + 1 == hc.transfer_steps:
            with torch.no_grad():
                h = loss_on(held).item()
            if math.isfinite(h) and h < best[0]:
                best = (h, {n: p.detach().clone() for n, p in ad.state_dict().items()})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(layer=i, loss=f"{loss.item():.3f}", best=f"{best[0]:.3f}")
    ad.load_state_dict(best[1])
    return {"layer": i, "heldout_error_start": start, "heldout_error_after": best[0]}


def transfer(model, windows: torch.Tensor, hc: HybridConfig, checkpoint: Path, progress: bool = True) -> list[dict]:
    """Stage (a) over every layer; after each layer its adapter goes into ``checkpoint`` (resumed from there)."""
    ads = [a.sata_adapter for a in _attention_modules(model)]
    done = torch.load(checkpoint) if checkpoint.exists() else {"adapters": {}, "report": []}
    for i, sd in done["adapters"].items():
        ads[i].load_state_dict(sd)
    todo = [i for i in range(len(ads)) if i not in done["adapters"]]
    if not todo:
        return done["report"]
    bar = _bar(progress, len(windows), "(a) capture softmax attention")
    teacher_impl = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    data = capture(model, windows, bar)
    model.set_attn_implementation(teacher_impl)
    _close(bar)
    bar = _bar(progress, len(todo) * hc.transfer_steps, "(a) attention transfer")
    for i in todo:
        t0 = time.perf_counter()
        row = transfer_layer(model, i, ads[i], *data[i], hc, bar)
        row["seconds"] = time.perf_counter() - t0
        done["adapters"][i] = ads[i].state_dict()
        done["report"].append(row)
        _atomic_save(done, checkpoint)
    _close(bar)
    return done["report"]


# --------------------------------------------------------------------------- (b) distillation with LoRA
class _LoRA(torch.nn.Module):
    """Parametrization ``W -> W + B A`` (``A [r, in]`` small random, ``B [out, r]`` zero: the start is ``W``)."""

    def __init__(self, out_features: int, in_features: int, rank: int, gen: torch.Generator):
        super().__init__()
        self.A = torch.nn.Parameter(torch.randn(rank, in_features, generator=gen) / math.sqrt(in_features))
        self.B = torch.nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, W):
        return W + self.B @ self.A


def add_lora(model, rank: int, seed: int = 0) -> list[torch.nn.Parameter]:
    """LoRA on every ``q/k/v/o_proj``; returns its parameters."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for a in _attention_modules(model):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = getattr(a, name)
            lora = _LoRA(lin.out_features, lin.in_features, rank, gen)
            parametrize.register_parametrization(lin, "weight", lora)
            params += [lora.A, lora.B]
    return params


def fold_lora(model) -> None:
    """``W <- W + B A`` in every projection carrying LoRA: an ordinary model again."""
    for a in _attention_modules(model):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = getattr(a, name)
            if parametrize.is_parametrized(lin, "weight"):
                parametrize.remove_parametrizations(lin, "weight", leave_parametrized=True)


def hidden_states(model, ids: torch.Tensor) -> torch.Tensor:
    """The final hidden states ``[B, L, hidden]`` (before ``lm_head``)."""
    return getattr(model, "model", model)(ids, use_cache=False).last_hidden_state


def next_token_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """``-log p(ids[:, t + 1] | ids[:, :t + 1])`` for every position ``[B, L - 1]``, ``lm_head`` in chunks."""
    h = hidden_states(model, ids)[:, :-1]                                       # [B, L - 1, hidden]
    out = []
    for a in range(0, h.shape[1], _VOCAB_CHUNK):
        logits = model.lm_head(h[:, a:a + _VOCAB_CHUNK]).float()                # [B, c, V]
        tgt = ids[:, 1 + a:1 + a + _VOCAB_CHUNK]
        out.append(torch.nn.functional.cross_entropy(logits.mT, tgt, reduction="none"))   # [B, c]
    return torch.cat(out, dim=1)


def _kl_chunk(lm_head, hs, ht):
    logp = torch.log_softmax(lm_head(hs).float(), -1)                           # [B, c, V]
    logq = torch.log_softmax(lm_head(ht).float(), -1)
    return (logq.exp() * (logq - logp)).sum(-1).sum()


def _kl(student, teacher, ids) -> torch.Tensor:
    """Mean ``KL(teacher || student)`` per token; each chunk of logits recomputed in the backward pass."""
    with torch.no_grad():
        ht = hidden_states(teacher, ids)                                        # [B, L, hidden]
    hs = hidden_states(student, ids)
    total = sum(torch.utils.checkpoint.checkpoint(_kl_chunk, student.lm_head, hs[:, a:a + _VOCAB_CHUNK],
                                                  ht[:, a:a + _VOCAB_CHUNK], use_reentrant=False)
                for a in range(0, ids.shape[1], _VOCAB_CHUNK))
    return total / ids.numel()


def distill(student, teacher, windows: torch.Tensor, hc: HybridConfig, checkpoint: Path, progress: bool = True,
            save_every: int = 10) -> dict:
    """Stage (b): adapters (if any) and LoRA trained on KL to the teacher; state saved to ``checkpoint`` every
    ``save_every`` steps (resumed from there). LoRA stays attached: :func:`fold_lora` after."""
    for p in student.parameters():
        p.requires_grad_(False)
    params = add_lora(student, hc.lora_rank, hc.seed)
    if not hc.window_only:
        params += [p for a in _attention_modules(student) for p in a.sata_adapter.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=hc.distill_lr)
    gen = torch.Generator().manual_seed(hc.seed)
    state = {"step": 0, "kl": [], "seconds": 0.0}
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        with torch.no_grad():
            for p, q in zip(params, saved["params"]):
                p.copy_(q)
        opt.load_state_dict(saved["opt"])
        gen.set_state(saved["gen"])
        state = saved["state"]
    student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    bar = _bar(progress, hc.distill_steps, "(b) distillation" + (" (window only)" if hc.window_only else ""))
    if bar is not None:
        bar.update(state["step"])
    try:
        while state["step"] < hc.distill_steps:
            t0 = time.perf_counter()
            _cosine(opt, hc.distill_lr, state["step"], hc.distill_steps)
            ids = windows[torch.randint(0, len(windows), (hc.batch,), generator=gen)]     # [b, L]
            kl = _kl(student, teacher, ids)
            opt.zero_grad()
            if torch.isfinite(kl):
                kl.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
            state["kl"].append(kl.item())
            state["step"] += 1
            state["seconds"] += time.perf_counter() - t0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(kl=f"{state['kl'][-1]:.3f}")
            if state["step"] % save_every == 0 or state["step"] == hc.distill_steps:
                _atomic_save({"params": [p.detach() for p in params], "opt": opt.state_dict(),
                              "gen": gen.get_state(), "state": state}, checkpoint)
    finally:
        _close(bar)
        student.activation_checkpointing_disable()
        student.eval()
        for p in student.parameters():
            p.requires_grad_(False)
    tenth = max(1, len(state["kl"]) // 10)
    return {"steps": state["step"], "kl_first": sum(state["kl"][:tenth]) / tenth,
            "kl_last": sum(state["kl"][-tenth:]) / tenth, "seconds": state["seconds"],
            "seconds_per_step": state["seconds"] / max(1, state["step"]), "config": asdict(hc)}


# --------------------------------------------------------------------------- checkpoint of the converted model
def save(model, tokenizer, directory: Path) -> None:
    """An ordinary HF checkpoint: weights (LoRA folded), the config's window/sinks/alpha/beta, and for the hybrid
    the query/key maps in ``sata_adapters.safetensors`` (attached on first use by ``attn_implementation="sata"``)."""
    from safetensors.torch import save_file

    fold_lora(model)
    directory.mkdir(parents=True, exist_ok=True)
    attn = _attention_modules(model)
    ads = [getattr(a, "sata_adapter", None) for a in attn]
    if ads[0] is not None:
        save_file(adapted.adapter_state_dict(model), str(directory / adapted.ADAPTER_FILE))
    for a in attn:  # the maps are not weights of the architecture: kept out of model.safetensors
        a.__dict__.pop("sata_adapter", None)
        a._modules.pop("sata_adapter", None)
    try:
        model.hf_quantizer = None                       # a GGUF model was dequantized on load
        for holder in (model, model.config):
            if hasattr(holder, "quantization_config"):
                delattr(holder, "quantization_config")
        model.is_quantized = False
        model.save_pretrained(directory)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(directory)
    finally:
        for a, ad in zip(attn, ads):
            if ad is not None:
                a.sata_adapter = ad


# --------------------------------------------------------------------------- helpers
def _cosine(opt, lr: float, step: int, steps: int) -> None:
    for group in opt.param_groups:
        group["lr"] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")                                # a kill mid-write keeps the old file
    torch.save(obj, tmp)
    tmp.replace(path)


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=True, mininterval=5)


def _close(bar) -> None:
    if bar is not None:
        bar.close()
