"""Every error a user can cause: one line on stderr, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file


def assert_one_line_error(res, *fragments: str) -> None:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert lines[0].startswith("loratools: error: ")
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def copy_peft(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def lora_copy(adapters, tmp_path):
    return copy_peft(adapters / "lora", tmp_path / "lora")


def test_missing_path(cli, tmp_path):
    assert_one_line_error(cli("inspect", tmp_path / "nope"), "not found", "nope")


def test_truncated_file(cli, adapters, tmp_path):
    data = (adapters / "lora.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    assert_one_line_error(cli("inspect", tmp_path / "t.safetensors"), "t.safetensors")


def test_truncated_weights_in_a_peft_dir(cli, lora_copy):
    f = lora_copy / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    assert_one_line_error(cli("inspect", lora_copy), "truncated")


@pytest.mark.parametrize("offset", [8, 20, 40])
def test_flipped_bytes_in_the_header(cli, lora_copy, offset):
    f = lora_copy / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    data[offset] ^= 0xFF
    f.write_bytes(bytes(data))
    assert_one_line_error(cli("inspect", lora_copy), "adapter_model.safetensors")


def test_a_model_is_not_an_adapter(cli, tiny_llama):
    assert_one_line_error(cli("inspect", tiny_llama / "model.safetensors"), "not a LoRA/AdaLoRA adapter")


def test_a_directory_without_an_adapter(cli, tiny_llama):
    assert_one_line_error(cli("inspect", tiny_llama), "not a LoRA/AdaLoRA adapter")


def test_peft_dir_with_a_missing_tensor(cli, lora_copy):
    from loratools.io import load_safetensors

    tensors, meta = load_safetensors(lora_copy / "adapter_model.safetensors")
    del tensors["base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, str(lora_copy / "adapter_model.safetensors"), meta)
    assert_one_line_error(cli("inspect", lora_copy), "model.layers.2.self_attn.v_proj.lora_B", "missing")


def test_mismatched_a_b_shapes(cli, lora_copy):
    from loratools.io import load_safetensors

    tensors, meta = load_safetensors(lora_copy / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    tensors[key] = tensors[key][:, :5].contiguous()
    save_file(tensors, str(lora_copy / "adapter_model.safetensors"), meta)
    assert_one_line_error(cli("inspect", lora_copy), "model.layers.1.self_attn.q_proj", "shape mismatch")


def test_rank_disagreeing_with_the_config(cli, lora_copy):
    cfg = json.loads((lora_copy / "adapter_config.json").read_text())
    cfg["r"] = 4
    (lora_copy / "adapter_config.json").write_text(json.dumps(cfg))
    assert_one_line_error(cli("inspect", lora_copy), "rank 4")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights(cli, lora_copy, value):
    from loratools.io import load_safetensors

    tensors, meta = load_safetensors(lora_copy / "adapter_model.safetensors")
    key = "base_model.model.model.layers.3.self_attn.v_proj.lora_A.weight"
    tensors[key][0, 0] = value
    save_file(tensors, str(lora_copy / "adapter_model.safetensors"), meta)
    assert_one_line_error(cli("inspect", lora_copy), "model.layers.3.self_attn.v_proj", "NaN or Inf")


def test_broken_config_json(cli, lora_copy):
    (lora_copy / "adapter_config.json").write_text("{not json")
    assert_one_line_error(cli("inspect", lora_copy), "adapter_config.json", "not valid JSON")


def test_pickle_only_adapter_is_refused_without_unpickling(cli, lora_copy):
    (lora_copy / "adapter_model.safetensors").unlink()
    (lora_copy / "adapter_model.bin").write_bytes(b"\x80\x04 this would be a pickle")
    assert_one_line_error(cli("inspect", lora_copy), "safetensors only")


def test_unsupported_peft_type(cli, lora_copy):
    cfg = json.loads((lora_copy / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (lora_copy / "adapter_config.json").write_text(json.dumps(cfg))
    assert_one_line_error(cli("inspect", lora_copy), "IA3")


def test_altered_single_file_is_caught(cli, adapters, tmp_path):
    from loratools.io import load_safetensors

    tensors, meta = load_safetensors(adapters / "lora.safetensors")
    key = "model.layers.0.self_attn.q_proj.lora_B"
    tensors[key] = torch.cat([tensors[key], tensors[key]])  # now claims a 256-row base weight
    modules = json.loads(meta["modules"])
    save_file(tensors, str(tmp_path / "x.safetensors"), meta)
    assert modules
    assert_one_line_error(cli("inspect", tmp_path / "x.safetensors"), "fingerprint")


def test_write_failure_leaves_nothing(adapters, tmp_path, monkeypatch):
    from loratools import read_adapter, write_adapter
    from loratools.formats import peft as peft_format

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(peft_format, "save_safetensors", boom)
    with pytest.raises(OSError):
        write_adapter(read_adapter(adapters / "lora"), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_lora_bias_on_a_layer_without_a_bias_is_refused_before_writing(cli, lora_copy, tiny_llama, tmp_path):
    # peft cannot merge it either ("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias")
    from loratools.io import load_safetensors

    tensors, meta = load_safetensors(lora_copy / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B"
    tensors[key + ".bias"] = torch.ones(tensors[key + ".weight"].shape[0])
    save_file(tensors, str(lora_copy / "adapter_model.safetensors"), meta)
    cfg = json.loads((lora_copy / "adapter_config.json").read_text())
    (lora_copy / "adapter_config.json").write_text(json.dumps({**cfg, "lora_bias": True}))
    assert_one_line_error(cli("merge", tiny_llama, lora_copy, "-o", tmp_path / "out"),
                          "model.layers.0.self_attn.q_proj.bias", "lora_bias")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field, value, words", [
    ("alora_invocation_tokens", [5, 6], "invocation tokens"),
    ("layer_replication", [[0, 2], [1, 3]], "replicated"),
    ("use_bdlora", {"blocks": 2}, "variant"),
    ("target_parameters", ["mlp.experts.gate_up_proj"], "target_parameters"),
])
def test_peft_configs_loratools_cannot_merge_are_refused_with_one_line(field, value, words, cli, lora_copy, tiny_llama,
                                                                       tmp_path):
    # an expert LoRA the base cannot place is refused as well as the variants
    cfg = json.loads((lora_copy / "adapter_config.json").read_text())
    (lora_copy / "adapter_config.json").write_text(json.dumps({**cfg, field: value}))
    if field == "target_parameters":  # a module named as peft names a wrapped expert parameter
        from loratools.io import load_safetensors

        tensors, meta = load_safetensors(lora_copy / "adapter_model.safetensors")
        tensors = {k.replace("self_attn.q_proj", "mlp.experts"): t for k, t in tensors.items()}
        save_file(tensors, str(lora_copy / "adapter_model.safetensors"), meta)
    r = cli("merge", tiny_llama, lora_copy, "-o", tmp_path / "out")
    assert_one_line_error(r, words)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. "
                                                                 "DefaultCPUAllocator: can't allocate memory: you "
                                                                 "tried to allocate 68719476736 bytes")])
def test_running_out_of_memory_is_one_line_with_what_to_try(cli, adapters, monkeypatch, error):
    """Python's MemoryError and torch's allocator failure end as one line naming the command and what to try,
    exit 2, no traceback; any other RuntimeError is a bug and keeps its traceback."""
    import loratools.inspect_job

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(loratools.inspect_job, "inspect_file", fail)
    assert_one_line_error(cli("inspect", adapters / "lora"), "out of memory in `inspect`", "nothing was written")
    monkeypatch.setattr(loratools.inspect_job, "inspect_file",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        cli("inspect", adapters / "lora")
