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


# ---- config.json: one reader, one failure ---------------------------------------------------------

BAD_CONFIGS = {"non-utf8": b'{"model_type": "\xff\xfe"}', "deep": b"[" * 5000 + b"]" * 5000,
               "nested-object": b'{"a": ' * 70 + b"1" + b"}" * 70, "list": b'[{"model_type": "llama"}]',
               "bad-json": b'{"model_type": '}


def _base_with_config(tiny_llama, tmp_path, raw: bytes):
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").symlink_to(tiny_llama / "model.safetensors")
    (base / "config.json").write_bytes(raw)
    return base


def test_read_config_finds_the_config_of_a_directory_a_weights_file_and_itself(tiny_llama, tmp_path):
    from loratools.io import read_config

    want = json.loads((tiny_llama / "config.json").read_text())
    assert read_config(tiny_llama) == want
    assert read_config(tiny_llama / "model.safetensors") == want
    assert read_config(tiny_llama / "config.json") == want
    assert read_config(tmp_path) is None  # no config.json: None, never an error


@pytest.mark.parametrize("kind", sorted(BAD_CONFIGS))
def test_read_config_refuses_a_damaged_config_naming_it(kind, tiny_llama, tmp_path):
    from loratools.io import read_config

    base = _base_with_config(tiny_llama, tmp_path, BAD_CONFIGS[kind])
    with pytest.raises(CorruptFileError) as e:
        read_config(base)
    assert str(base / "config.json") in str(e.value)


@pytest.mark.parametrize("kind", ["non-utf8", "deep", "list"])
@pytest.mark.parametrize("command", ["merge", "convert", "inspect"])
def test_a_damaged_config_is_one_line_and_exit_2_for_every_command(command, kind, tiny_llama, adapters, tmp_path,
                                                                    cli):
    base = _base_with_config(tiny_llama, tmp_path, BAD_CONFIGS[kind])
    if command == "merge":
        args = ["merge", base, adapters / "lora", "-o", tmp_path / "out"]
    elif command == "convert":
        args = ["convert", adapters / "lora", "-o", tmp_path / "out.safetensors", "--to", "kohya", "--base", base]
    else:  # inspect reads a base for a DoRA adapter only
        from dora_models import llama_dora

        llama_dora(tiny_llama, tmp_path / "dora", targets=["q_proj"])
        args = ["inspect", tmp_path / "dora", "--base", base]
    r = cli(*args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"{base / 'config.json'} is damaged" in lines[0], lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.safetensors").exists()


def test_gguf_head_counts_are_typed(tmp_path):
    from loratools.errors import InvalidFieldError
    from loratools.gguf.arch import base_from_hparams
    from loratools.io.gguf_model import gguf_heads

    assert gguf_heads({"llama.attention.head_count": 8}, "llama", where="m.gguf") == (8, 8)
    assert gguf_heads({}, "llama", where="m.gguf") == (None, None)
    for bad in ("8", [8], 8.0, True, -1):
        with pytest.raises(InvalidFieldError, match="head_count"):
            gguf_heads({"llama.attention.head_count": bad}, "llama", where="m.gguf")
        with pytest.raises(InvalidFieldError, match="num_attention_heads"):
            base_from_hparams({"model_type": "llama", "num_attention_heads": bad})


def _two_shards(root):
    """A model of two shards: ``p_blocks``, packed ``q`` and ``norm`` in the first, ``p_scales`` alone in the second."""
    from safetensors.torch import save_file

    root.mkdir()
    save_file({"norm": torch.ones(4), "p_blocks": torch.zeros(2, 8, dtype=torch.uint8),
               "q": torch.zeros(8, 1, dtype=torch.uint8)}, root / "model-00001-of-00002.safetensors")
    save_file({"p_scales": torch.zeros(2, dtype=torch.uint8)}, root / "model-00002-of-00002.safetensors")
    wmap = {"norm": "model-00001-of-00002.safetensors", "p_blocks": "model-00001-of-00002.safetensors",
            "q": "model-00001-of-00002.safetensors", "p_scales": "model-00002-of-00002.safetensors"}
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    (root / "config.json").write_text("{}")
    return root


def test_rewrite_gives_tensors_their_own_shapes_and_writes_no_shard_of_dropped_tensors(tmp_path):
    """``shapes``: a tensor added beside a dropped one (MXFP4's P for P_blocks) and a key whose shape changes (a
    bitsandbytes P.weight unpacked); a shard whose tensors are all dropped is neither written nor indexed."""
    from loratools.io import rewrite_model

    model = ModelReader(_two_shards(tmp_path / "m"))
    new = {"p": torch.arange(32.0).reshape(2, 16), "q": torch.eye(4)}
    codes = {"norm": "F32", "p": "F32", "q": "F32"}
    rewrite_model(model, tmp_path / "out", codes=codes, metadata={}, compute=new.get, added={"p": "p_blocks"},
                  dropped={"p_blocks", "p_scales"}, shapes={"p": (2, 16), "q": (4, 4)})
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == [
        "config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json"]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {"norm", "p", "q"} and set(index["weight_map"].values()) == {
        "model-00001-of-00002.safetensors"}
    out = ModelReader(tmp_path / "out")
    assert out.shard_keys("model-00001-of-00002.safetensors") == ["norm", "p", "q"]
    assert torch.equal(out.get("p"), new["p"]) and torch.equal(out.get("q"), new["q"])
    assert torch.equal(out.get("norm"), torch.ones(4))
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in out.spans.values())
    with pytest.raises(RuntimeError, match="q has a shape of its own"):  # a caller's bug: never a copy of P's bytes
        rewrite_model(model, tmp_path / "bad", codes=codes, metadata={}, compute={"p": new["p"]}.get,
                      added={"p": "p_blocks"}, dropped={"p_blocks", "p_scales"}, shapes={"p": (2, 16), "q": (4, 4)})
