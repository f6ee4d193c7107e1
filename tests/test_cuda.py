"""The GPU path, against the CPU result of the same job (skipped without a CUDA device).

What each job promises on CUDA:
- merge: each merged tensor within one ulp of the output dtype of the CPU merge (both sum in float32,
  but cuBLAS may order the rank-r products' additions differently);
- extract: the same relative error per layer to 1e-4 (the randomized SVD draws its sketch on the CPU
  generator, so both devices start from the same Ω);
- combine: the same exact sum to 1e-6;
- train: a few steps give a loss within 1e-2 of the CPU run's, and peft loads the adapter.

No GPU was lent to the session that wrote these (they have not run yet); they run on any machine with CUDA.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import ADAPTERS, FIXTURES, TINY_LLAMA

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU path cannot run here")


def _ulp(t: torch.Tensor) -> torch.Tensor:
    a = t.abs().float()
    return (torch.nextafter(a, torch.full_like(a, float("inf"))) - a)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_merge_on_cuda_matches_cpu_within_one_ulp(tmp_path: Path, dtype: torch.dtype | None) -> None:
    from safetensors.torch import load_file

    from loratools import merge_model, read_adapter

    ad = read_adapter(ADAPTERS / "lora")
    merge_model(TINY_LLAMA, [(ad, 1.0)], tmp_path / "cpu", dtype=dtype, device="cpu")
    merge_model(TINY_LLAMA, [(ad, 1.0)], tmp_path / "cuda", dtype=dtype, device="cuda")
    cpu, gpu = load_file(tmp_path / "cpu" / "model.safetensors"), load_file(tmp_path / "cuda" / "model.safetensors")
    assert cpu.keys() == gpu.keys()
    for k in cpu:
        diff = (cpu[k].float() - gpu[k].float()).abs()
        assert bool((diff <= _ulp(cpu[k])).all()), k


def test_extract_on_cuda_matches_cpu(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from loratools import extract_adapter

    base = load_file(TINY_LLAMA / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    tuned = {k: (t + torch.randn(t.shape[0], 4, generator=g) @ torch.randn(4, t.shape[1], generator=g) * 0.01
                 if t.ndim == 2 and ".layers." in k else t) for k, t in base.items()}
    res_cpu = extract_adapter(base, tuned, rank=4, device="cpu")
    res_gpu = extract_adapter(base, tuned, rank=4, device="cuda")
    assert [r.name for r in res_cpu.layers] == [r.name for r in res_gpu.layers]
    for a, b in zip(res_cpu.layers, res_gpu.layers):
        assert abs(a.rel_error - b.rel_error) <= 1e-4, a.name


def test_combine_on_cuda_matches_cpu() -> None:
    from loratools import combine_adapters, read_adapter

    a, b = read_adapter(ADAPTERS / "lora"), read_adapter(ADAPTERS / "rslora")
    cpu = combine_adapters([(a, 1.0), (b, -0.5)], device="cpu").adapter
    gpu = combine_adapters([(a, 1.0), (b, -0.5)], device="cuda").adapter
    for name, m in cpu.items():
        d_cpu, d_gpu = m.delta(dtype=torch.float64), gpu.modules[name].delta(dtype=torch.float64)
        assert float((d_cpu - d_gpu).norm() / d_cpu.norm()) <= 1e-6, name


def test_train_on_cuda_matches_cpu_and_loads_in_peft(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loratools import TrainConfig
    from loratools.train.loop import train_adapter

    results = {}
    for device in ("cpu", "cuda"):
        cfg = TrainConfig(steps=3, rank=4, lr=1e-3, seq_len=16, eval_split=0.0, seed=0, device=device, dtype="float32")
        results[device] = train_adapter(TINY_LLAMA, FIXTURES / "corpus.txt", tmp_path / device, cfg)
    loss_cpu, loss_gpu = results["cpu"].losses[-1]["loss"], results["cuda"].losses[-1]["loss"]
    assert abs(loss_cpu - loss_gpu) <= 1e-2
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_LLAMA), tmp_path / "cuda")
    assert json.loads((tmp_path / "cuda" / "adapter_config.json").read_text())["r"] == 4
    assert model is not None
    shutil.rmtree(tmp_path / "cpu")
