"""bitsandbytes NF4/FP4/int8 codec (loratools.quant.bnb) against the real bitsandbytes 0.50.2 on CPU."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from loratools.errors import CorruptFileError, LoraToolsError, ShapeMismatchError, UnsupportedConfigError
from loratools.quant.bnb import Bnb4bit, BnbInt8, bnb_codec, parse_quant_state

F = pytest.importorskip("bitsandbytes.functional")


def _bnb_stored(x: torch.Tensor, quant_type: str, nested: bool, blocksize: int = 64) -> dict[str, torch.Tensor]:
    """bitsandbytes' own quantization of ``x`` in the layout transformers saves (``QuantState.as_dict(packed=True)``)."""
    packed, qs = F.quantize_4bit(x, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    return {"w": packed} | {f"w.{k}": v for k, v in qs.as_dict(packed=True).items()}


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_writes_the_bytes_bitsandbytes_writes(quant_type, nested, dtype):
    torch.manual_seed(1)
    x = (torch.randn(96, 320) * 0.05).to(dtype)  # 480 absmax blocks: two nested blocks of 256
    ref = _bnb_stored(x, quant_type, nested)
    mine = Bnb4bit(quant_type, 64, nested).quantize("w", x)
    assert sorted(mine) == sorted(ref)
    for key in ref:
        assert mine[key].dtype == ref[key].dtype and torch.equal(mine[key], ref[key]), key


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_dequantize_equals_bitsandbytes_dequantize_4bit(quant_type, nested, blocksize):
    torch.manual_seed(2)
    x = torch.randn(64, 256) * 0.02
    ref = _bnb_stored(x, quant_type, nested, blocksize)
    packed, qs = F.quantize_4bit(x, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    assert torch.equal(Bnb4bit(quant_type).dequantize("w", ref), F.dequantize_4bit(packed, qs))


def test_a_block_across_rows_dequantizes_flat_as_bitsandbytes_defines_it():
    """in_features 96 with blocks of 64: blocks run over the flattened weight (bitsandbytes' CUDA and default
    kernels; its 0.50.2 CPU AVX2 kernel gives other values for such shapes, see the module's notes)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    torch.manual_seed(3)
    x = torch.randn(64, 96)
    ref = _bnb_stored(x, "nf4", False)
    code = F.get_4bit_type("nf4", device="cpu")
    with torch.compiler.set_stance("force_eager"):  # bitsandbytes compiles it: eager gives the same values, faster
        want = _dequantize_4bit_compute(ref["w"].reshape(-1), ref["w.absmax"], code, 64, (64, 96), torch.float32)
    assert torch.equal(Bnb4bit("nf4").dequantize("w", ref), want)


def test_quantize_like_keeps_the_base_settings_and_stays_within_half_step():
    torch.manual_seed(4)
    base = _bnb_stored(torch.randn(32, 512) * 0.05, "fp4", True, 128)
    x = torch.randn(32, 512) * 0.05
    again = Bnb4bit("fp4").quantize("w", x, like=base)
    ref = _bnb_stored(x, "fp4", True, 128)
    assert all(torch.equal(again[k], ref[k]) for k in ref)
    err = (Bnb4bit("fp4").dequantize("w", again) - x).abs()
    bound = Bnb4bit("fp4").half_step("w", x, base)
    assert (err <= bound).all() and (err > 0.5 * bound).any()  # a bound, and not a loose one


def test_int8_rows_equal_bitsandbytes_vectorwise_quant():
    torch.manual_seed(5)
    x = torch.randn(48, 80)
    cb, scb, _ = F.int8_vectorwise_quant(x.clone())
    mine = BnbInt8().quantize("p.weight", x)
    assert torch.equal(mine["p.weight"], cb) and torch.equal(mine["p.SCB"], scb)
    assert torch.equal(BnbInt8().dequantize("p.weight", mine), F.int8_vectorwise_dequant(cb, scb))
    assert ((BnbInt8().dequantize("p.weight", mine) - x).abs() <= BnbInt8().half_step("p.weight", x, mine)).all()


def _saved_bnb_llama(tmp: Path, config) -> tuple[Path, torch.nn.Module]:
    from transformers import AutoModelForCausalLM

    from helpers import tiny_llama_model

    base = tiny_llama_model(tmp / "base", hidden_size=64, intermediate_size=128, head_dim=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(base, quantization_config=config, device_map="cpu")
    model.save_pretrained(tmp / "q")
    return tmp / "q", model


def test_transformers_saved_nf4_model_dequantizes_as_bitsandbytes(tmp_path):
    from transformers import BitsAndBytesConfig

    from loratools.io.model import ModelReader, read_config

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    saved, model = _saved_bnb_llama(tmp_path, cfg)
    codec = bnb_codec(read_config(saved))
    assert codec == Bnb4bit("nf4", nested=True)
    reader = ModelReader(saved)
    seen = 0
    for name, mod in model.named_modules():
        if type(mod).__name__ == "Linear4bit":
            key = f"{name}.weight"
            stored = {k: reader.get(k) for k in codec.stored_keys(key, reader.keys())}
            want = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
            assert torch.equal(codec.dequantize(key, stored), want.float()), key
            seen += 1
    assert seen == 7  # q, k, v, o, gate, up, down


def test_transformers_saved_int8_model_dequantizes_as_bitsandbytes(tmp_path):
    from transformers import BitsAndBytesConfig

    from loratools.io.model import ModelReader, read_config

    saved, model = _saved_bnb_llama(tmp_path, BitsAndBytesConfig(load_in_8bit=True))
    codec = bnb_codec(read_config(saved))
    reader = ModelReader(saved)
    mod = model.model.layers[0].mlp.down_proj
    key = "model.layers.0.mlp.down_proj.weight"
    stored = {k: reader.get(k) for k in codec.stored_keys(key, reader.keys())}
    assert torch.equal(codec.dequantize(key, stored), F.int8_vectorwise_dequant(mod.weight.data, mod.weight.SCB))


def _blob(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


@pytest.mark.parametrize("blob, error", [
    (_blob("{not json"), CorruptFileError),
    (_blob("[1, 2]"), CorruptFileError),
    (torch.zeros(5000, dtype=torch.uint8), CorruptFileError),
    (_blob('{"quant_type": "nf4", "blocksize": true, "dtype": "float32", "shape": [4, 64]}'), CorruptFileError),
    (_blob('{"quant_type": "nf4", "blocksize": 48, "dtype": "float32", "shape": [4, 64]}'), UnsupportedConfigError),
    (_blob('{"quant_type": "fp4", "blocksize": 64, "dtype": "float32", "shape": [4, 64]}'), CorruptFileError),
    (_blob('{"quant_type": "nf4", "blocksize": 64, "dtype": "int8", "shape": [4, 64]}'), UnsupportedConfigError),
    (_blob('{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [4, -64]}'), CorruptFileError),
    (_blob('{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [4, 64], "evil": 1}'),
     CorruptFileError),
    (_blob('{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [4, 64], "nested_blocksize": 256,'
           ' "nested_dtype": "float32", "nested_offset": NaN}'), CorruptFileError),
])
def test_a_damaged_quant_state_is_refused_in_one_line(blob, error):
    with pytest.raises(error) as info:
        parse_quant_state(blob, "model.layers.0.q_proj.weight", quant_type="nf4")
    assert "\n" not in str(info.value) and "model.layers.0.q_proj.weight" in str(info.value)


def test_stored_tensors_that_disagree_with_their_quant_state_are_refused():
    stored = Bnb4bit("nf4").quantize("w", torch.randn(8, 64))
    wrong_shape = stored | {"w.absmax": stored["w.absmax"][:-1]}
    with pytest.raises(ShapeMismatchError):
        Bnb4bit("nf4").dequantize("w", wrong_shape)
    other_map = stored | {"w.quant_map": stored["w.quant_map"].flip(0)}
    with pytest.raises(CorruptFileError, match="quant_map"):
        Bnb4bit("nf4").dequantize("w", other_map)
    with pytest.raises(LoraToolsError, match="lacks"):
        Bnb4bit("nf4").dequantize("w", {"w": stored["w"]})


def test_a_config_of_another_method_is_not_bitsandbytes():
    assert bnb_codec({"quantization_config": {"quant_method": "fp8"}}) is None
    assert bnb_codec({}) is None
    with pytest.raises(UnsupportedConfigError, match="quant_storage"):
        bnb_codec({"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                           "bnb_4bit_quant_storage": "bfloat16"}})
