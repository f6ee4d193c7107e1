"""merge / unmerge against peft's own merge_and_unload on the same inputs (float32, 1e-6)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loratools import read_adapter
from loratools.io import ModelReader, load_safetensors
from loratools.merge.jobs import merge_model, unmerge_model, verify_merge

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOL = 1e-6


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """peft's reference: load base + adapter, merge_and_unload, the state dict."""
    from peft import PeftModel

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def _model_tensors(path: Path) -> dict[str, torch.Tensor]:
    with ModelReader(path) as r:
        return {k: r.get(k) for k in r.keys()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("name", ["lora", "rslora", "adalora"])
def test_merge_equals_peft_and_unmerge_gives_base(name: str, tiny_llama: Path, adapters: Path, tmp_path: Path) -> None:
    ref = _peft_merged(tiny_llama, adapters / name)
    ad = read_adapter(adapters / name)
    report = merge_model(tiny_llama, [(ad, 1.0)], tmp_path / "m", device="cpu")
    ours = _model_tensors(tmp_path / "m")
    assert set(ours) <= set(ref)
    changed = [k for k in ours if not torch.equal(ours[k], _model_tensors(tiny_llama)[k])]
    assert len(changed) == report.adapted > 0  # ΔW ≠ 0, so the comparison below can fail
    assert _max_diff(ours, ref) < TOL

    unmerge_model(tmp_path / "m", [(ad, 1.0)], tmp_path / "u", device="cpu")
    assert _max_diff(_model_tensors(tmp_path / "u"), _model_tensors(tiny_llama)) < TOL
    assert verify_merge(tiny_llama, [(ad, 1.0)], tmp_path / "m", device="cpu").ok


def test_weighted_sum_of_two_adapters_matches_peft_deltas(tiny_llama: Path, adapters: Path, tmp_path: Path) -> None:
    base = _model_tensors(tiny_llama)
    d1 = {k: v.double() - base[k].double() for k, v in _peft_merged(tiny_llama, adapters / "lora").items() if k in base}
    d2 = {k: v.double() - base[k].double() for k, v in _peft_merged(tiny_llama, adapters / "rslora").items() if k in base}
    merge_model(tiny_llama, [(read_adapter(adapters / "lora"), 0.5), (read_adapter(adapters / "rslora"), -0.25)],
                tmp_path / "m", device="cpu")
    ours = _model_tensors(tmp_path / "m")
    want = {k: base[k].double() + 0.5 * d1[k] - 0.25 * d2[k] for k in base}
    assert _max_diff(ours, want) < TOL
    meta = ModelReader(tmp_path / "m").metadata()
    recorded = json.loads(meta["loratools.merge"])["adapters"]
    assert [(a["source"], a["weight"]) for a in recorded] == [("", 0.5), ("", -0.25)]


def test_gpt2_fan_in_fan_out(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2")
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    pm.save_pretrained(tmp_path / "ad")
    ref = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}

    ad = read_adapter(tmp_path / "ad")
    assert all(m.fan_in_fan_out for m in ad.modules.values())
    merge_model(tmp_path / "gpt2", [(ad, 1.0)], tmp_path / "m", device="cpu")
    ours = _model_tensors(tmp_path / "m")
    base = _model_tensors(tmp_path / "gpt2")
    assert not torch.equal(ours["transformer.h.0.attn.c_attn.weight"], base["transformer.h.0.attn.c_attn.weight"])
    assert _max_diff(ours, ref) < TOL
    unmerge_model(tmp_path / "m", [(ad, 1.0)], tmp_path / "u", device="cpu")
    assert _max_diff(_model_tensors(tmp_path / "u"), base) < TOL


def test_sharded_base_gives_sharded_output_transformers_loads(tiny_llama: Path, adapters: Path, tmp_path: Path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="800KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "sharded" / f).write_bytes((tiny_llama / f).read_bytes())
    src = ModelReader(tmp_path / "sharded")
    assert len(src.shards) > 1
    merge_model(tmp_path / "sharded", [(read_adapter(adapters / "lora"), 1.0)], tmp_path / "m", device="cpu")

    out = ModelReader(tmp_path / "m")
    assert out.shards == src.shards and out.shard_of == src.shard_of
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == out.nbytes()
    assert (tmp_path / "m" / "tokenizer.json").read_bytes() == (tiny_llama / "tokenizer.json").read_bytes()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    ref = _peft_merged(tiny_llama, adapters / "lora")
    got = {k: v for k, v in loaded.state_dict().items()}
    assert _max_diff({k: got[k] for k in ref}, ref) < TOL


def test_modules_to_save_replace_the_base_tensor(tiny_llama: Path, tmp_path: Path) -> None:
    """peft 0.21.2 saves modules_to_save as `base_model.model.lm_head.weight`: merging replaces lm_head."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n or "modules_to_save" in n:
                p.normal_(0, 0.05)
    pm.save_pretrained(tmp_path / "ad")
    assert "base_model.model.lm_head.weight" in load_safetensors(tmp_path / "ad" / "adapter_model.safetensors")[0]
    ref = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}

    ad = read_adapter(tmp_path / "ad")
    merge_model(tiny_llama, [(ad, 1.0)], tmp_path / "m", device="cpu", record=tmp_path / "rec.safetensors")
    ours = _model_tensors(tmp_path / "m")
    assert _max_diff(ours, ref) < TOL
    assert torch.equal(ours["lm_head.weight"], ref["lm_head.weight"])
    from loratools.errors import InvalidOptionError

    with pytest.raises(InvalidOptionError, match="modules_to_save"):
        unmerge_model(tmp_path / "m", [(ad, 1.0)], tmp_path / "u", device="cpu")
    assert not (tmp_path / "u").exists()
    unmerge_model(tmp_path / "m", [(ad, 1.0)], tmp_path / "u", device="cpu", record=tmp_path / "rec.safetensors")
    base = _model_tensors(tiny_llama)
    assert all(torch.equal(v, base[k]) for k, v in _model_tensors(tmp_path / "u").items())
