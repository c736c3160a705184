"""Integrations with other libraries, each optional and imported on use.

- :mod:`sata.integrations.hf` — Hugging Face transformers: ``attn_implementation="sata"``
  and :class:`~sata.integrations.hf.SATACache` for constant-size ``generate``
  (needs the ``hf`` extra: ``pip install "sata-attention[hf]"``).
- :mod:`sata.integrations.convert` — adapt a pretrained Llama-family model to SATA
  attention by attention transfer (the ``sata convert`` command).
"""
