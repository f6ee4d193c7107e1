"""NVFP4 (compressed-tensors ``nvfp4-pack-quantized``): packed e2m1 codes, e4m3 group scales and the float32 global
scale, each byte-equal to what compressed-tensors 0.20.0 computes for the same tensor, and dequantization equal to
its decompressor's."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from loratools.errors import ShapeMismatchError, UnsupportedConfigError
from loratools.quant.nvfp4 import E2M1_VALUES, Nvfp4Format, nvfp4_format

ct = pytest.importorskip("compressed_tensors", reason="make dev installs compressed-tensors==0.20.0")

FMT = Nvfp4Format()


def scheme(preset: str = "NVFP4") -> Any:
    from compressed_tensors.quantization import preset_name_to_scheme

    return preset_name_to_scheme(preset, ["Linear"])


def compressor() -> Any:
    from compressed_tensors.compressors import BaseCompressor

    return BaseCompressor.get_value_from_registry("nvfp4-pack-quantized")


def producer(x: torch.Tensor, global_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """What llm-compressor stores for a weight x (in its own dtype): the global scale by ``generate_gparam`` (unless
    given), the group scales by ``compute_dynamic_scales_and_zp`` (``calculate_qparams`` per group of 16), then the
    NVFP4 compressor."""
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp, generate_gparam

    gs = generate_gparam(x.amin(), x.amax()) if global_scale is None else global_scale
    scale = compute_dynamic_scales_and_zp(x, scheme().weights, module=torch.nn.Module(), global_scale=gs)[0]
    return compressor().compress({"weight": x, "weight_scale": scale, "weight_global_scale": gs}, scheme())


def decompressed(packed: torch.Tensor, scale: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    state = {"weight_packed": packed, "weight_scale": scale, "weight_global_scale": gs}
    return compressor().decompress(state, scheme())["weight"]


def weights(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Values over five decades, a group of zeros, a group of tiny negatives (they round to −0, code 8), a −0.0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(48, 256, generator=g) * torch.logspace(-4, 1, 256)
    x[3, :16], x[5, 16:32], x[6, 7] = 0.0, -1e-30, -0.0
    return x.to(dtype)


def ties() -> torch.Tensor:
    """One group whose amax is 6 in a tensor whose amax is 6: global scale 448, group scale 448, so x / step = x,
    with every rounding tie of the e2m1 grid and its negative."""
    row = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, -0.0])
    return torch.stack([row, row.flip(0)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_is_byte_equal_to_compressed_tensors(dtype: torch.dtype) -> None:
    for x in (weights(dtype), ties().to(dtype)):
        theirs = producer(x)
        packed, scale, gs = FMT.quantize(x.float(), dtype=dtype)
        assert gs.dtype == torch.float32 and torch.equal(gs, theirs["weight_global_scale"])
        assert scale.dtype == torch.float8_e4m3fn and torch.equal(scale.view(torch.uint8),
                                                                 theirs["weight_scale"].view(torch.uint8))
        assert packed.dtype == torch.uint8 and torch.equal(packed, theirs["weight_packed"])


def test_ties_round_to_the_even_code_and_a_small_negative_is_negative_zero() -> None:
    packed, scale, gs = FMT.quantize(ties())
    assert float(gs) == 448.0 and float(scale[0, 0]) == 448.0
    got = FMT.dequantize(packed, scale, gs)[0].tolist()
    assert got == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0, -0.0]
    assert int(packed[0, 4]) & 0x0F == 0x08 and int(packed[0, 7]) >> 4 == 0  # −0.25: code 8 (−0); −0.0: code 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_is_the_decompressors(dtype: torch.dtype) -> None:
    theirs = producer(weights(dtype, seed=1))
    packed, scale, gs = theirs["weight_packed"], theirs["weight_scale"], theirs["weight_global_scale"]
    ref = decompressed(packed, scale, gs)
    assert ref.dtype == torch.bfloat16 and torch.equal(FMT.dequantize(packed, scale, gs), ref.float())


def test_every_byte_unpacks_as_compressed_tensors_unpacks_it() -> None:
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    every = torch.arange(256, dtype=torch.uint8).reshape(8, 32)
    ones = torch.ones(8, 4, dtype=torch.float8_e4m3fn)
    ref = unpack_fp4_from_uint8(every, 8, 64, dtype=torch.float32)
    assert torch.equal(FMT.dequantize(every, ones, torch.ones(1)), ref)
    assert sorted(set(ref.abs().flatten().tolist())) == list(E2M1_VALUES)


def test_requantizing_keeps_the_bases_global_scale() -> None:
    """A merge keeps the base's global scale (fused q/k/v share one in vLLM): the group scales and codes are then
    compressed-tensors' for that global scale; the dequantized tensor re-quantizes to the same values in every group
    whose e4m3 scale is normal."""
    x = weights(torch.float32, seed=2)
    packed, scale, gs = FMT.quantize(x)
    shared = gs * 0.5  # as llm-compressor's update_fused_layer_weight_global_scales may lower it
    p2, s2, g2 = FMT.quantize(x, global_scale=shared)
    theirs = producer(x, global_scale=shared)
    assert g2 is shared and torch.equal(p2, theirs["weight_packed"])
    assert torch.equal(s2.view(torch.uint8), theirs["weight_scale"].view(torch.uint8))
    deq = FMT.dequantize(packed, scale, gs)
    p3, s3, _ = FMT.quantize(deq, global_scale=gs)
    normal = (scale.float() >= 2.0 ** -6).repeat_interleave(16, 1)  # a subnormal e4m3 group scale may move
    assert bool(normal.any()) and torch.equal(FMT.dequantize(p3, s3, gs)[normal], deq[normal])


def test_the_rounding_is_within_half_a_step() -> None:
    x = weights(torch.float32, seed=3)
    packed, scale, gs = FMT.quantize(x)
    err = (FMT.dequantize(packed, scale, gs) - x).abs()
    assert bool((err <= FMT.half_step(x, scale, gs)).all())
    assert float(err.max()) > 0
    clamped = (x.abs() > 6 * (scale.float() / gs).repeat_interleave(16, 1))
    assert bool(clamped.any())  # small groups' subnormal scales rounded down: the bound covers their clamp too


def test_shapes_and_dtypes_it_cannot_read_are_refused() -> None:
    packed, scale, gs = FMT.quantize(weights(torch.float32))
    with pytest.raises(ShapeMismatchError, match="weight_scale"):
        FMT.dequantize(packed, scale[:, :-1], gs)
    with pytest.raises(ShapeMismatchError, match="weight_scale"):
        FMT.dequantize(packed, scale.float(), gs)
    with pytest.raises(ShapeMismatchError, match="weight_packed"):
        FMT.dequantize(packed.view(torch.int8), scale, gs)
    with pytest.raises(ShapeMismatchError, match="divisible by 16"):
        FMT.quantize(torch.ones(2, 24))
    with pytest.raises(UnsupportedConfigError, match="group_size"):
        Nvfp4Format(32)


def qconfig(preset: str, fmt: str = "nvfp4-pack-quantized") -> dict:
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig(config_groups={"group_0": scheme(preset)}, format=fmt, quantization_status="compressed")
    return json.loads(json.dumps(qc.model_dump(), default=str))


@pytest.mark.parametrize("preset", ["NVFP4", "NVFP4A16"])
def test_config_is_read(preset: str) -> None:
    assert nvfp4_format(qconfig(preset)) == Nvfp4Format()


def test_other_fp4_configs_are_refused_by_name() -> None:
    with pytest.raises(UnsupportedConfigError, match="mxfp4-pack-quantized"):
        nvfp4_format(qconfig("MXFP4A16", "mxfp4-pack-quantized"))
    qc = qconfig("NVFP4")
    qc["config_groups"]["group_0"]["weights"]["group_size"] = 32
    with pytest.raises(UnsupportedConfigError, match="group_size = 32"):
        nvfp4_format(qc)
