"""Compare llama.cpp's logits (check.mjs) with transformers+peft's (make.py); see make.py."""

import json
import os

import torch

WORK = os.environ.get("WORK", "/tmp/llama-cpp-check")
ref = json.load(open(WORK + "/ref.json")); cpp = json.load(open(WORK + "/llamacpp.json"))
T = {k: torch.tensor(v, dtype=torch.float64) for k, v in ref.items() if k in ("base", "lora")}
C = {k: torch.tensor(v, dtype=torch.float64) for k, v in cpp.items()}
rel = lambda a, b: float((a - b).norm() / b.norm())
print(f"transformers: adapter moves the last-token logits by {rel(T['lora'], T['base']):.4f} (relative L2)")
print(f"llama.cpp no adapter  vs transformers base : {rel(C['none'], T['base']):.4f}")
print(f"llama.cpp + ours.gguf vs transformers+peft : {rel(C['ours'], T['lora']):.4f}")
print(f"llama.cpp + wrong    vs transformers+peft : {rel(C['wrong'], T['lora']):.4f}")
d_t = T['lora'] - T['base']
for k in ("ours", "wrong"):
    d_c = C[k] - C['none']
    cos = float(d_c @ d_t / (d_c.norm() * d_t.norm()))
    print(f"adapter's effect on logits, llama.cpp ({k}) vs peft: cosine {cos:.4f}, relative error {rel(d_c, d_t):.4f}")
print("top tokens: transformers+peft", int(T['lora'].argmax()), "llama.cpp+ours", int(C['ours'].argmax()), "wrong", int(C['wrong'].argmax()))
