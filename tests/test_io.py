"""Lazy model reading (single, sharded, one file) and atomic outputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from loratools.errors import CorruptFileError, InvalidOptionError, OutputExistsError
from loratools.io import ModelReader, atomic_output


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from conftest import TINY_LLAMA

    out = tmp_path_factory.mktemp("sharded")
    AutoModelForCausalLM.from_pretrained(TINY_LLAMA).save_pretrained(out, max_shard_size="1MB")
    return out


def test_single_file_model(tiny_llama):
    expected = load_file(str(tiny_llama / "model.safetensors"))
    with ModelReader(tiny_llama) as model:
        assert set(model.keys()) == set(expected)
        key = "model.layers.1.self_attn.k_proj.weight"
        assert model.shape(key) == (64, 128) and model.dtype_name(key) == "F32"
        assert torch.equal(model.get(key), expected[key])
    with ModelReader(tiny_llama / "model.safetensors") as one:
        assert set(one.keys()) == set(expected)


def test_sharded_model_reads_every_tensor_from_its_shard(sharded, tiny_llama):
    expected = load_file(str(tiny_llama / "model.safetensors"))
    with ModelReader(sharded) as model:
        assert len(model.shards) > 1
        assert set(model.keys()) == set(expected)
        for key in expected:
            assert torch.equal(model.get(key), expected[key]), key
        assert sum(len(model.shard_keys(s)) for s in model.shards) == len(expected)


def test_index_pointing_at_a_missing_tensor(sharded, tmp_path):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(sharded, copy)
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost.weight"] = next(iter(index["weight_map"].values()))
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CorruptFileError, match="ghost.weight"):
        ModelReader(copy)


def test_atomic_output_renames_only_on_success(tmp_path):
    dest = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_output(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_output(dest) as tmp:
        tmp.write_text("whole")
    assert dest.read_text() == "whole" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_output_refuses_existing_and_inputs(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(OutputExistsError, match="--force"):
        with atomic_output(dest):
            pass
    with pytest.raises(InvalidOptionError, match="overlaps the input"):
        with atomic_output(dest, force=True, inputs=(dest,)):
            pass
    with atomic_output(dest, force=True) as tmp:
        tmp.mkdir()
        (tmp / "x").write_text("new")
    assert (dest / "x").read_text() == "new"
