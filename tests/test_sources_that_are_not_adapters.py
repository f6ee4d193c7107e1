"""Refusals that name where an adapter came from: a Trainer checkpoint root, peft's ``selected_adapters`` save,
a Git LFS pointer, torchtune's DoRA export. Each is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import loratools as lt
from conftest import run_cli
from loratools.adapter import Adapter, Module
from loratools.formats import write_adapter

POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize 123456\n".format("0" * 64)


def _lora(tmp_path: Path, name: str = "lora", fmt: str = "peft", dora: bool = False) -> Path:
    g = torch.Generator().manual_seed(0)
    m = Module(A=torch.randn(2, 8, generator=g), B=torch.randn(8, 2, generator=g), alpha=4, scale=2.0,
               magnitude=torch.rand(8, generator=g) + 0.5 if dora else None)
    out = tmp_path / name
    write_adapter(Adapter({"model.layers.0.self_attn.q_proj": m}, lt.AdapterConfig()), out, format=fmt)
    return out


def _refused(args: list[object], out: Path, *needles: str) -> str:
    res = run_cli(*args, "-o", out, "--to", "loratools") if args[0] == "convert" else run_cli(*args)
    assert res.returncode == 2 and res.stdout == "", res
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("loratools: error: "), res.stderr
    for needle in needles:
        assert needle in res.stderr, res.stderr
    assert "damaged" not in res.stderr
    assert not out.exists()
    return res.stderr


def test_trainer_checkpoint_root_names_the_adapter_subfolder(tmp_path: Path) -> None:
    ck = tmp_path / "checkpoint-500"
    ck.mkdir()
    (ck / "trainer_state.json").write_text("{}")
    shutil.move(_lora(tmp_path), ck / "adapter")
    _refused(["convert", ck], tmp_path / "out.safetensors", "Trainer checkpoint", str(ck / "adapter"))
    _refused(["inspect", ck], tmp_path / "none", "Trainer checkpoint")


def test_selected_adapters_save_names_each_subfolder(tmp_path: Path) -> None:
    root = tmp_path / "saved"
    root.mkdir()
    for name in ("french", "german"):
        shutil.move(_lora(tmp_path, name), root / name)
    _refused(["convert", root], tmp_path / "out.safetensors", "selected_adapters", str(root / "french"),
             str(root / "german"))


def test_an_empty_directory_keeps_the_plain_refusal(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    _refused(["convert", tmp_path / "empty"], tmp_path / "out.safetensors", "no adapter_config.json")


@pytest.mark.parametrize("where", ["file", "peft weights", "peft config", "mlx weights"])
def test_a_git_lfs_pointer_is_named_with_the_fix(tmp_path: Path, where: str) -> None:
    if where == "file":
        src = pointer = tmp_path / "adapter.safetensors"
    else:
        src = _lora(tmp_path, fmt="mlx" if where.startswith("mlx") else "peft")
        pointer = src / {"peft weights": "adapter_model.safetensors", "peft config": "adapter_config.json",
                         "mlx weights": "adapters.safetensors"}[where]
    pointer.write_text(POINTER)
    _refused(["convert", src], tmp_path / "out.safetensors", f"{pointer} is a Git LFS pointer, not the file",
             "git lfs pull")


def _torchtune(tmp_path: Path) -> Path:
    """A DoRA adapter as torchtune exports it to peft: its minimal config (no use_dora) and magnitudes."""
    d = _lora(tmp_path, "tt", dora=True)
    (d / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4.0, "peft_type": "LORA",
                                                       "target_modules": ["q_proj"]}))
    from safetensors.torch import load_file
    tensors = load_file(d / "adapter_model.safetensors")
    assert any(k.endswith("lora_magnitude_vector") for k in tensors)
    save_file(tensors, d / "adapter_model.safetensors")
    return d


def test_torchtune_dora_is_refused_by_name(tmp_path: Path) -> None:
    d = _torchtune(tmp_path)
    _refused(["convert", d], tmp_path / "out.safetensors", "torchtune DoRA adapter", "lora_magnitude_vector",
             "merge it with torchtune")


def test_torchtune_plain_lora_still_reads(tmp_path: Path) -> None:
    d = _lora(tmp_path, "tt")
    (d / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4.0, "peft_type": "LORA",
                                                       "target_modules": ["q_proj"]}))
    assert lt.read_adapter(d).modules["model.layers.0.self_attn.q_proj"].scale == 2.0
