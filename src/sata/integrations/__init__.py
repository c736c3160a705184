"""Integrations with other libraries, each optional and imported on use.

- :mod:`sata.integrations.hf` — Hugging Face transformers: ``attn_implementation="sata"``
  and :class:`~sata.integrations.hf.SATACache` for constant-size ``generate``
  (needs the ``hf`` extra: ``pip install "sata-attention[hf]"``).
- :mod:`sata.integrations.convert` — adapt a pretrained Llama-family model to plain SATA
  attention by attention transfer (library functions; text and model loading).
- ``sata convert`` (:mod:`~sata.integrations.convert_cli`) — convert to the window + re-centred
  hybrid: :mod:`~sata.integrations.adapted` (the attention with learned query/key maps on its Taylor
  part, and its decode state), :mod:`~sata.integrations.hybrid_convert` (attention transfer, KL
  distillation with LoRA, the checkpoint), :mod:`~sata.integrations.corpus` (text split by document),
  :mod:`~sata.integrations.evaluation` (perplexity by position, passkey retrieval).
"""
