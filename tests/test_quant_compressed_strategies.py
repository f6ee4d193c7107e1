"""compressed-tensors ``float-quantized`` FP8 with a scale per input group (``strategy: "group"``) or per block
(``strategy: "block"``, ``block_structure`` [bm, bn]): scales, values and dequantization checked against
compressed-tensors 0.20.0 itself (``calculate_qparams``, its float-quantized compressor and decompressor), the
config read, and a merge into such a model that keeps its format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from loratools import read_adapter
from loratools.errors import ShapeMismatchError, UnsupportedConfigError
from loratools.merge import merge_model
from loratools.quant.fp8 import CompressedFp8Format, fp8_format

from helpers import model_with_weights

ct = pytest.importorskip("compressed_tensors", reason="make dev installs compressed-tensors==0.20.0")

ROOT = Path(__file__).resolve().parent.parent
TINY, LORA = ROOT / "fixtures" / "tiny-llama", ROOT / "fixtures" / "adapters" / "lora"


def args(fmt: CompressedFp8Format) -> Any:
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=fmt.strategy, dynamic=False,
                            group_size=fmt.group_size, block_structure=list(fmt.block) if fmt.block else None)


def scheme(fmt: CompressedFp8Format) -> Any:
    from compressed_tensors.quantization import QuantizationScheme

    inputs = args(CompressedFp8Format("tensor")).model_copy(update={"strategy": "token", "dynamic": True})
    return QuantizationScheme(targets=["Linear"], weights=args(fmt), input_activations=inputs)


def ct_scale(x: torch.Tensor, fmt: CompressedFp8Format) -> torch.Tensor:
    """compressed-tensors' ``calculate_qparams`` on each group's (``compute_dynamic_scales_and_zp`` reshapes the
    groups) or each block's min and max (blocks cut as its ``_process_block`` cuts them, zero-padded)."""
    from compressed_tensors.quantization.utils import calculate_qparams, compute_dynamic_scales_and_zp
    from compressed_tensors.quantization.utils.helpers import maybe_pad_tensor_for_block_quant

    if fmt.strategy == "group":
        return compute_dynamic_scales_and_zp(x, args(fmt), module=torch.nn.Module())[0]
    assert fmt.block is not None
    bm, bn = fmt.block
    padded = maybe_pad_tensor_for_block_quant(x, fmt.block)
    blocks = padded.reshape(padded.shape[0] // bm, bm, padded.shape[1] // bn, bn)
    return calculate_qparams(blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3)), args(fmt))[0]


def compressor(fmt: CompressedFp8Format, op: str, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    from compressed_tensors.compressors import BaseCompressor

    comp = BaseCompressor.get_value_from_registry("float-quantized")
    return getattr(comp, op)({"weight": w, "weight_scale": scale}, scheme(fmt))["weight"]


FORMATS = [CompressedFp8Format("group", group_size=32), CompressedFp8Format("group", group_size=128),
           CompressedFp8Format("block", block=(128, 128)), CompressedFp8Format("block", block=(32, 48))]
IDS = ["group32", "group128", "block128x128", "block32x48"]


def tensor(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.logspace(-3, 1, cols)


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_and_dequantize_are_compressed_tensors(fmt: CompressedFp8Format, dtype: torch.dtype) -> None:
    """Our scale is ``calculate_qparams``'s on the tensor in the scale's dtype; our values are the compressor's on
    the float32 tensor with that scale; our dequantization is the decompressor's, bit for bit."""
    shapes = [(128, 256), (64, 128)] + ([(100, 130)] if fmt.strategy == "block" else [])  # partial edge blocks
    for i, (rows, cols) in enumerate(shapes):
        x = tensor(rows, cols, i).to(dtype).float()
        like = ct_scale(x.to(dtype), fmt)
        assert like.dtype == dtype and tuple(like.shape) == fmt.scale_shape((rows, cols))
        w, s = fmt.quantize(x, like=like)
        assert s.dtype == dtype and torch.equal(s, like)
        assert torch.equal(w.view(torch.uint8), compressor(fmt, "compress", x, like).view(torch.uint8))
        theirs = compressor(fmt, "decompress", w, s)
        assert theirs.dtype == dtype and torch.equal(fmt.dequantize(w, s), theirs.float())
        assert bool(((fmt.dequantize(w, s) - x).abs() <= fmt.half_step(x, s)).all())


def test_without_like_the_scales_are_float32_in_compressed_tensors_shape() -> None:
    fmt = CompressedFp8Format("block", block=(32, 48))
    x = tensor(100, 130, 7)
    w, s = fmt.quantize(x)
    assert s.dtype == torch.float32 and tuple(s.shape) == (4, 3)
    assert torch.equal(s, ct_scale(x, fmt))
    zero = CompressedFp8Format("group", group_size=4).quantize(torch.zeros(2, 8), like=torch.ones(2, 2,
                                                                                                   dtype=torch.bfloat16))
    assert not bool(zero[0].float().any()) and bool((zero[1] == torch.finfo(torch.bfloat16).eps).all())


def test_scales_of_another_shape_and_groups_that_do_not_divide_the_columns_are_refused() -> None:
    fmt = CompressedFp8Format("group", group_size=32)
    w = torch.zeros(4, 64, dtype=torch.float8_e4m3fn)
    with pytest.raises(ShapeMismatchError, match=r"expected \(4, 2\)"):
        fmt.dequantize(w, torch.ones(4, 1))
    with pytest.raises(ShapeMismatchError, match="divisible by group_size 32"):
        fmt.quantize(torch.zeros(4, 48))
    with pytest.raises(ShapeMismatchError, match=r"expected \(1, 2\)"):
        CompressedFp8Format("block", block=(128, 32)).dequantize(w, torch.ones(4, 2))


def qconfig(fmt: CompressedFp8Format) -> dict:
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig(config_groups={"group_0": scheme(fmt)}, format="float-quantized", ignore=["lm_head"],
                            quantization_status="compressed")
    return json.loads(json.dumps(qc.model_dump(), default=str))


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_config_is_read(fmt: CompressedFp8Format) -> None:
    assert fp8_format({"quantization_config": qconfig(fmt)}) == fmt


def test_a_block_structure_written_as_a_string_is_read() -> None:
    qc = qconfig(CompressedFp8Format("block", block=(128, 128)))
    qc["config_groups"]["group_0"]["weights"]["block_structure"] = "64x32"
    assert fp8_format({"quantization_config": qc}) == CompressedFp8Format("block", block=(64, 32))


@pytest.mark.parametrize(("field", "value"), [("group_size", None), ("group_size", 0), ("block_structure", [128]),
                                              ("scale_dtype", "torch.uint8")])
def test_a_group_or_block_without_its_size_is_refused_by_name(field: str, value: object) -> None:
    qc = qconfig(CompressedFp8Format("group", group_size=32) if field != "block_structure"
                 else CompressedFp8Format("block", block=(128, 128)))
    qc["config_groups"]["group_0"]["weights"][field] = value
    with pytest.raises(UnsupportedConfigError, match=field):
        fp8_format({"quantization_config": qc})


def test_two_groups_with_different_group_sizes_are_refused() -> None:
    qc = qconfig(CompressedFp8Format("group", group_size=32))
    qc["config_groups"]["group_1"] = json.loads(json.dumps(qc["config_groups"]["group_0"]))
    qc["config_groups"]["group_1"]["weights"]["group_size"] = 64
    with pytest.raises(UnsupportedConfigError, match="one weight strategy"):
        fp8_format({"quantization_config": qc})


def test_an_nvfp4_model_is_read_by_the_nvfp4_codec_not_as_fp8() -> None:
    from loratools.quant.codec import Nvfp4Codec, quant_codec

    weights = {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group", "group_size": 16,
               "dynamic": False}
    qc = {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
          "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}
    with pytest.raises(UnsupportedConfigError, match="nvfp4-pack-quantized"):
        fp8_format({"quantization_config": qc})  # an FP8 layout never stands for NVFP4 weights
    assert isinstance(quant_codec({"quantization_config": qc}), Nvfp4Codec)


def compressed_llama(path: Path, fmt: CompressedFp8Format, dtype: torch.dtype) -> Path:
    out = {}
    for k, t in load_file(TINY / "model.safetensors").items():
        if ".layers." in k and k.endswith("proj.weight"):
            scale = ct_scale(t.to(dtype), fmt)
            out[k], out[k + "_scale"] = compressor(fmt, "compress", t.to(dtype), scale).contiguous(), scale
        else:
            out[k] = t
    model_with_weights(out, TINY, path)
    config = json.loads((TINY / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": qconfig(fmt)}, indent=2))
    return path


@pytest.mark.parametrize(("fmt", "dtype"), [(FORMATS[0], torch.bfloat16), (FORMATS[3], torch.float32)],
                         ids=["group32-bf16", "block32x48-f32"])
def test_a_merge_keeps_the_format(fmt: CompressedFp8Format, dtype: torch.dtype, tmp_path: Path) -> None:
    """Adapted weights re-quantized with scales of the base's shape and dtype; the result within the format's own
    rounding of the exact merge (no worse than quantizing the exact sum); everything else byte for byte."""
    base = compressed_llama(tmp_path / "base", fmt, dtype)
    ad = read_adapter(LORA)
    out = tmp_path / "merged"
    merge_model(base, [ad], out, verify=True)
    b, m = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    adapted = {f"{n}.weight" for n in ad.modules}
    for k in b:
        if k.removesuffix("_scale") not in adapted:
            assert torch.equal(b[k].view(torch.uint8), m[k].view(torch.uint8)), k
            continue
        assert m[k].dtype == b[k].dtype and m[k].shape == b[k].shape
    plain = merge_model(base, [ad], tmp_path / "plain", dtype=torch.float32)
    assert plain.update is None
    exact = load_file(tmp_path / "plain" / "model.safetensors")
    for k in adapted:
        best = fmt.dequantize(*fmt.quantize(exact[k], like=b[k + "_scale"]))
        merged = fmt.dequantize(m[k], m[k + "_scale"])
        assert torch.equal(merged, best), k
