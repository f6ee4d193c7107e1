"""loratools reads what peft writes and peft loads what loratools writes — checked with the real peft."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
from peft import AdaLoraConfig, LoraConfig  # noqa: E402

from helpers import logits, peft_adapter, peft_deltas, tiny_gpt2  # noqa: E402
from loratools import Adapter, AdapterConfig, Module, read_adapter, write_adapter  # noqa: E402

FIXTURE_ADAPTERS = ["lora", "rslora", "adalora"]


def assert_deltas_match(adapter: Adapter, reference: dict[str, torch.Tensor], *, tol: float = 1e-6) -> None:
    nonzero = {n: m for n, m in adapter.items() if m.rank > 0}
    assert set(nonzero) <= set(reference)
    for name, m in nonzero.items():
        ours, theirs = m.delta(), reference[name]
        assert ours.shape == theirs.shape, name
        scale = theirs.abs().max().clamp_min(1e-12)
        assert float((ours - theirs).abs().max() / scale) <= tol, name


@pytest.mark.parametrize("name", FIXTURE_ADAPTERS)
def test_reads_peft_files_with_peft_deltas(name, adapters, tiny_llama):
    adapter = read_adapter(adapters / name)
    reference, _ = peft_deltas(tiny_llama, adapters / name)
    assert_deltas_match(adapter, reference)
    if name == "adalora":
        assert any(m.rank == 0 for m in adapter.modules.values()), "the fixture keeps a rank-0 module"


@pytest.mark.parametrize("name", FIXTURE_ADAPTERS)
@pytest.mark.parametrize("via", ["peft", "loratools"])
def test_round_trip_loads_in_peft_with_same_logits(name, via, adapters, tiny_llama, tmp_path):
    original = read_adapter(adapters / name)
    if via == "loratools":
        write_adapter(original, tmp_path / "single.safetensors", format="loratools")
        original = read_adapter(tmp_path / "single.safetensors")
    write_adapter(original, tmp_path / "peft")
    _, theirs = peft_deltas(tiny_llama, adapters / name)
    reference, ours = peft_deltas(tiny_llama, tmp_path / "peft")
    assert_deltas_match(original, reference)
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=0, atol=1e-6)


def test_adapter_made_from_scratch_loads_in_peft(tiny_llama, tmp_path):
    """Mixed ranks and alphas, rsLoRA: the writer must express them as rank_pattern/alpha_pattern."""
    g = torch.Generator().manual_seed(7)
    shapes = {"model.layers.0.self_attn.q_proj": (128, 128), "model.layers.1.self_attn.k_proj": (64, 128),
              "model.layers.2.mlp.down_proj": (128, 256), "model.layers.3.self_attn.q_proj": (128, 128)}
    ranks = [2, 4, 4, 7]
    alphas = [3.0, 8.0, 5.5, 8.0]
    modules = {}
    for (name, (out, inp)), r, a in zip(shapes.items(), ranks, alphas):
        modules[name] = Module(A=torch.randn(r, inp, generator=g), B=torch.randn(out, r, generator=g),
                               alpha=a, scale=a / r**0.5)
    adapter = Adapter(modules, AdapterConfig(use_rslora=True))
    write_adapter(adapter, tmp_path / "a")
    reference, _ = peft_deltas(tiny_llama, tmp_path / "a")
    assert set(reference) == set(modules)
    assert_deltas_match(adapter, reference)


@pytest.mark.parametrize("kind", ["lora", "adalora"])
def test_gpt2_fan_in_fan_out(kind, tmp_path):
    base = tiny_gpt2(tmp_path / "gpt2")
    if kind == "lora":
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    else:
        config = AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, total_step=10, target_modules=["c_attn"],
                               fan_in_fan_out=True)
    peft_adapter(base, tmp_path / "a", config, seed=3)
    adapter = read_adapter(tmp_path / "a")
    assert adapter.config.fan_in_fan_out
    m = adapter.modules["transformer.h.0.attn.c_attn"]
    assert m.weight_shape == (64, 192)  # Conv1D stores (in, out)
    reference, theirs = peft_deltas(base, tmp_path / "a")
    assert_deltas_match(adapter, reference)
    write_adapter(adapter, tmp_path / "b")
    _, ours = peft_deltas(base, tmp_path / "b")
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=0, atol=1e-6)


def test_unknown_config_fields_survive_a_rewrite(adapters, tmp_path):
    import json

    write_adapter(read_adapter(adapters / "rslora"), tmp_path / "x")
    before = json.loads((adapters / "rslora" / "adapter_config.json").read_text())
    after = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    for key in ("eva_config", "layers_to_transform", "megatron_core", "peft_version", "task_type"):
        assert after[key] == before[key]


def test_embedding_and_modules_to_save(tiny_llama, tmp_path):
    """lora_embedding_A/B (no .weight) and modules_to_save tensors survive a round trip."""
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"])
    peft_adapter(tiny_llama, tmp_path / "a", config, seed=5)
    adapter = read_adapter(tmp_path / "a")
    emb = adapter.modules["model.embed_tokens"]
    assert emb.kind == "embedding" and emb.weight_shape == (259, 128)
    assert adapter.saved, "modules_to_save tensors are kept"
    reference, theirs = peft_deltas(tiny_llama, tmp_path / "a")
    assert_deltas_match(adapter, reference)
    write_adapter(adapter, tmp_path / "b")
    _, ours = peft_deltas(tiny_llama, tmp_path / "b")
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=0, atol=1e-6)
