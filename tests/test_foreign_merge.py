"""``merge``/``unmerge``/``verify`` read foreign kohya and GGUF adapters against the model they are given,
as ``convert --base`` does: flattened kohya names, GPT-2's Conv1D layout, llama.cpp's GGUF without head counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratools import read_adapter
from loratools.io import ModelReader

TOL = 1e-6


def strip_loratools_metadata(src: Path, dst: Path) -> Path:
    """A kohya file as other tools write it: the same tensors, only ss_* metadata."""
    save_file(load_file(src), str(dst), metadata={"ss_network_module": "networks.lora"})
    return dst


def tensors(path: Path) -> dict[str, torch.Tensor]:
    r = ModelReader(path)
    return {k: r.get(k) for k in r.spans}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_foreign_kohya_merges_unmerges_and_verifies_against_the_base(tiny_llama, adapters, tmp_path, cli):
    assert cli("convert", adapters / "rslora", "-o", tmp_path / "k.safetensors", "--to", "kohya").returncode == 0
    foreign = strip_loratools_metadata(tmp_path / "k.safetensors", tmp_path / "foreign.safetensors")
    assert all(n.startswith("lora_te_") for n in read_adapter(foreign).modules)  # no names without a base
    assert cli("merge", tiny_llama, adapters / "rslora", "-o", tmp_path / "ref").returncode == 0
    r = cli("merge", tiny_llama, foreign, "-o", tmp_path / "m", "--verify")
    assert r.returncode == 0, r.stderr
    assert max_diff(tensors(tmp_path / "m"), tensors(tmp_path / "ref")) < TOL
    assert cli("verify", tiny_llama, foreign, tmp_path / "m").returncode == 0
    r = cli("unmerge", tmp_path / "m", foreign, "-o", tmp_path / "u")
    assert r.returncode == 0, r.stderr
    assert max_diff(tensors(tmp_path / "u"), tensors(tiny_llama)) < TOL


def test_llama_cpp_gguf_without_head_counts_merges_against_the_base(tiny_llama, adapters, tmp_path, cli):
    gguf = pytest.importorskip("gguf")
    assert cli("convert", adapters / "lora", "-o", tmp_path / "ours.gguf", "--to", "gguf",
               "--base", tiny_llama).returncode == 0
    reader = gguf.GGUFReader(str(tmp_path / "ours.gguf"))
    w = gguf.GGUFWriter(str(tmp_path / "foreign.gguf"), "llama")  # as convert_lora_to_gguf.py writes: no head counts
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(reader.fields["adapter.lora.alpha"].parts[-1][0]))
    for t in reader.tensors:
        w.add_tensor(t.name, t.data.reshape([int(x) for x in reversed(t.shape)]).copy())
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    assert "head_count" not in " ".join(gguf.GGUFReader(str(tmp_path / "foreign.gguf")).fields)

    assert cli("merge", tiny_llama, adapters / "lora", "-o", tmp_path / "ref").returncode == 0
    r = cli("merge", tiny_llama, tmp_path / "foreign.gguf", "-o", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    assert max_diff(tensors(tmp_path / "m"), tensors(tmp_path / "ref")) < TOL
    r = cli("unmerge", tmp_path / "m", tmp_path / "foreign.gguf", "-o", tmp_path / "u")
    assert r.returncode == 0, r.stderr
    assert max_diff(tensors(tmp_path / "u"), tensors(tiny_llama)) < TOL


def test_gpt2_kohya_of_another_tool_keeps_fan_in_fan_out(tmp_path, cli):
    peft = pytest.importorskip("peft")
    from helpers import peft_adapter, peft_deltas, tiny_gpt2

    base = tiny_gpt2(tmp_path / "gpt2")
    ad = peft_adapter(base, tmp_path / "ad", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                                             fan_in_fan_out=True))
    assert cli("convert", ad, "-o", tmp_path / "k.safetensors", "--to", "kohya").returncode == 0
    foreign = strip_loratools_metadata(tmp_path / "k.safetensors", tmp_path / "foreign.safetensors")
    r = cli("convert", foreign, "-o", tmp_path / "p", "--to", "peft", "--base", base)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    want, _ = peft_deltas(base, ad)
    got, _ = peft_deltas(base, tmp_path / "p")  # peft itself loads the converted adapter
    assert set(got) == set(want) and max(float((got[k] - want[k]).abs().max()) for k in want) < TOL

    assert cli("merge", base, ad, "-o", tmp_path / "ref").returncode == 0
    r = cli("merge", base, foreign, "-o", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    assert max_diff(tensors(tmp_path / "m"), tensors(tmp_path / "ref")) < TOL
