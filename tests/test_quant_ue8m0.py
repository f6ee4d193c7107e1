"""Power-of-two (UE8M0) block scales, DeepSeek-V3.1's ``"scale_fmt": "ue8m0"``: the scale rounded up to a power
of two *before* the block is quantized, checked against a float64 computation of that rule and against transformers
5.23's own quantizer and loader; re-quantization, the stored scale dtypes, a merge that keeps the format."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from loratools import read_adapter
from loratools.errors import UnsupportedConfigError
from loratools.merge import merge_model
from loratools.quant.fp8 import UE8M0, Fp8Format, fp8_format, pow2_ceil

from helpers import fp8_dequantized, fp8_llama_with, transformers_state

ROOT = Path(__file__).resolve().parent.parent
TINY, LORA = ROOT / "fixtures" / "tiny-llama", ROOT / "fixtures" / "adapters" / "lora"
QCONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "scale_fmt": "ue8m0",
           "weight_block_size": [128, 128]}
FMT = Fp8Format((128, 128), "ue8m0")


def weights(seed: int = 0) -> torch.Tensor:
    """256×384 values spanning eight decades across columns (so the six blocks' scales differ), with one block whose
    largest magnitude is exactly 448·2⁻⁵ (a power-of-two amax/448: no rounding up)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 384, generator=g) * torch.logspace(-6, 2, 384)
    x[0:128, 0:128] *= 448 * 2.0 ** -5 / x[0:128, 0:128].abs().max()
    return x


def rule_in_float64(x: torch.Tensor, bm: int, bn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cited rule computed densely in float64, block by block: p = 2^⌈log2(amax/448)⌉ (the exponent from
    math.frexp, exact), w = e4m3(x / p), W = w · p."""
    x64 = x.double()
    rows, cols = x.shape
    deq, scales = torch.empty_like(x64), torch.empty(math.ceil(rows / bm), math.ceil(cols / bn), dtype=torch.float64)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            block = x64[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
            amax = float(block.abs().max())
            m, e = math.frexp(amax / 448 if amax > 0 else 1.0)
            p = 2.0 ** (e - 1 if m == 0.5 else e)
            scales[i, j] = p
            deq[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] = (block / p).clamp(-448, 448).to(torch.float8_e4m3fn) \
                .double() * p
    return deq, scales


def test_quantize_and_dequantize_follow_the_rule_in_float64() -> None:
    x = weights()
    w, s = FMT.quantize(x)
    ref_deq, ref_scales = rule_in_float64(x, 128, 128)
    assert s.dtype == torch.float32 and torch.equal(s.double(), ref_scales)
    assert torch.equal(FMT.dequantize(w, s).double(), ref_deq)
    assert s[0, 0] == 2.0 ** -5  # amax/448 already a power of two: kept, not doubled
    partial = torch.randn(64, 200)  # partial edge blocks, as in a 64-row k_proj
    w, s = FMT.quantize(partial)
    assert torch.equal(FMT.dequantize(w, s).double(), rule_in_float64(partial, 128, 128)[0])


def test_every_new_scale_is_a_power_of_two_at_least_amax_over_448() -> None:
    x = weights(1)
    w, s = FMT.quantize(x)
    mantissa, _ = torch.frexp(s)
    assert bool((mantissa == 0.5).all())
    amax = x.abs().reshape(2, 128, 3, 128).amax(dim=(1, 3))
    assert bool((s >= amax / 448).all()) and bool((s < 2 * amax / 448).all())
    top = w.float().abs().reshape(2, 128, 3, 128).amax(dim=(1, 3))
    assert bool((top >= 224).all()) and bool((top <= 448).all())  # each block uses e4m3's top binade, none clamps


def test_rounding_the_scale_after_quantizing_is_not_the_rule() -> None:
    """The bug the order avoids: values divided by amax/448, then the scale stored rounded up, dequantize too large."""
    x = weights(2)
    inv = Fp8Format((128, 128)).quantize(x)[1]
    wrong = Fp8Format((128, 128)).quantize(x)[0].float() * Fp8Format((128, 128))._expand(pow2_ceil(inv), x.shape)
    right = FMT.dequantize(*FMT.quantize(x))
    assert float((wrong - x).abs().max()) > 10 * float((right - x).abs().max())


def test_requantizing_the_dequantized_tensor_gives_the_same_values_and_bytes() -> None:
    """Q(deq(w, s)) = (w, s) byte for byte, except a block whose largest |w| rounded down onto 224 (the top binade's
    floor): the rule then picks half the scale and twice the values, the same products."""
    x = weights(3)
    x[128:, 128:256] *= 228 * 2.0 ** -3 / x[128:, 128:256].abs().max()  # amax/p = 228 → its e4m3 value is 224
    w, s = FMT.quantize(x)
    deq = FMT.dequantize(w, s)
    w2, s2 = FMT.quantize(deq, like=s)
    assert torch.equal(FMT.dequantize(w2, s2), deq)
    same = torch.ones_like(s, dtype=torch.bool)
    same[1, 1] = False
    assert s[1, 1] == 2.0 ** -3 and s2[1, 1] == 2.0 ** -4
    assert torch.equal(s2[same], s[same])
    blocks = (w.view(torch.uint8).reshape(2, 128, 3, 128) == w2.view(torch.uint8).reshape(2, 128, 3, 128))
    assert bool(blocks.all(dim=(1, 3))[same].all()) and not bool(blocks[1, :, 1, :].all())


def producer(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers 5.23's quantizer with ``scale_fmt="ue8m0"`` (``Fp8Quantize._quantize_one``; it stores
    ``float8_e8m0fnu`` scales)."""
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    config = SimpleNamespace(weight_block_size=[128, 128], scale_fmt="ue8m0")
    out = Fp8Quantize(SimpleNamespace(quantization_config=config))._quantize_one("w.weight", x)
    return out["w.weight"], out["w.weight_scale_inv"]


@pytest.mark.parametrize("dtype", [torch.float32, UE8M0, torch.uint8])
def test_quantize_is_transformers_in_each_stored_scale_dtype(dtype: torch.dtype) -> None:
    """float32 (DeepSeek-V3.1's checkpoints), float8_e8m0fnu (transformers' own) and its uint8 byte (MXFP8 files):
    the same values and the same scales, written in the base's dtype."""
    x = weights(4)
    rw, rs = producer(x)
    like = {torch.float32: rs.to(torch.float32), UE8M0: rs, torch.uint8: rs.view(torch.uint8)}[dtype]
    w, s = FMT.quantize(x, like=like)
    assert s.dtype == dtype and torch.equal(s.view(torch.uint8), like.view(torch.uint8))
    assert torch.equal(w.view(torch.uint8), rw.view(torch.uint8))
    assert torch.equal(FMT.dequantize(w, s), FMT.dequantize(rw, rs.to(torch.float32)))


def test_uint8_scales_are_refused_without_ue8m0() -> None:
    w, s = FMT.quantize(weights())
    with pytest.raises(UnsupportedConfigError, match="uint8"):
        Fp8Format((128, 128)).dequantize(w, s.to(UE8M0).view(torch.uint8))
    with pytest.raises(UnsupportedConfigError, match="bfloat16"):
        FMT.quantize(weights(), like=s.to(torch.bfloat16))


def test_an_e5m2_weight_is_refused_not_read_as_e4m3() -> None:
    w, s = FMT.quantize(weights())
    with pytest.raises(UnsupportedConfigError, match="float8_e5m2"):
        FMT.dequantize(w.float().to(torch.float8_e5m2), s)


def ue8m0_llama(path: Path) -> Path:
    """fixtures/tiny-llama with every decoder linear quantized by the rule, scales float32 as DeepSeek-V3.1 stores
    them."""
    return fp8_llama_with(path, FMT.quantize, QCONFIG)


def dequantized(path: Path) -> dict[str, torch.Tensor]:
    return fp8_dequantized(path, FMT)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ue8m0_llama(tmp_path_factory.mktemp("ue8m0") / "base")


def test_config_is_read_and_other_scale_formats_are_refused(base: Path) -> None:
    assert fp8_format(json.loads((base / "config.json").read_text())) == FMT
    assert fp8_format({"quantization_config": {**QCONFIG, "scale_fmt": "float"}}) == Fp8Format((128, 128))
    for field, value in (("scale_fmt", "e4m3"), ("fmt", "e5m2")):
        with pytest.raises(UnsupportedConfigError, match=f"{field} = '{value}'"):
            fp8_format({"quantization_config": {**QCONFIG, field: value}})


def test_transformers_loads_it_as_we_dequantize(base: Path) -> None:
    ours, theirs = dequantized(base), transformers_state(base)
    assert set(ours) - {"lm_head.weight"} <= set(theirs)
    for k, v in ours.items():
        assert torch.equal(v, theirs[k]), k


def test_a_merge_keeping_the_format_writes_power_of_two_scales(base: Path, tmp_path: Path) -> None:
    ad = read_adapter(LORA)
    out = tmp_path / "merged"
    merge_model(base, [ad], out, verify=True)
    b, m = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    changed = [k for k in m if k.endswith("_scale_inv") and not torch.equal(m[k], b[k])]
    assert changed and all(m[k].dtype == torch.float32 and bool((torch.frexp(m[k])[0] == 0.5).all()) for k in changed)
    assert json.loads((out / "config.json").read_text())["quantization_config"] == QCONFIG
    merged, loaded = dequantized(out), transformers_state(out)
    for k in merged:
        assert torch.equal(merged[k], loaded[k]), k
