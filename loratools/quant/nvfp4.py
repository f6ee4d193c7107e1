"""NVFP4 weights as compressed-tensors stores them (``format: "nvfp4-pack-quantized"``, llm-compressor's NVFP4 and
NVFP4A16 schemes): dequantize and quantize, as :class:`~loratools.quant.codec.Nvfp4Codec` merges them.

A quantized linear ``P`` of shape (rows, cols) stores three tensors (compressed-tensors 0.20.0
``compressors/nvfp4/base.py`` ``NVFP4PackedCompressor``)::

    P.weight_packed        uint8 (rows, cols/2)       two e2m1 codes per byte: column 2j in the low nibble, 2j+1 high
    P.weight_scale         e4m3  (rows, cols/16)      one scale per group of 16 inputs
    P.weight_global_scale  float32 [1]                one per tensor

An e2m1 code is a sign bit (8) and a magnitude index (0–7) into 0, 0.5, 1, 1.5, 2, 3, 4, 6 (``compressors/nvfp4/
helpers.py`` ``unpack_fp4_from_uint8``, ``kE2M1ToFloat``). Dequantization is its decompressor's
(``NVFP4PackedCompressor.decompress`` → ``quantization/lifecycle/forward_helpers.py`` ``_process_group`` and
``_dequantize``), a bfloat16 result::

    W = bfloat16( e2m1(code) · (float32(scale) / global_scale) )       (the product and quotient in float32)

Quantization is what llm-compressor computes with compressed-tensors' helpers (``quantization/utils/helpers.py``
``generate_gparam`` and ``calculate_qparams`` with ``scale_dtype`` e4m3 as the NVFP4 preset in
``quantization/quant_scheme.py`` sets it, then ``compressors/nvfp4/helpers.py`` ``quantize_and_pack_fp4``, whose
CPU path is ``_quantize`` + ``quantization/utils/fp4_utils.py`` ``cast_to_fp4`` + ``pack_fp4_to_uint8``)::

    global_scale = float32(448·6 / max(amax(|x|), tiny))   (1 where that is inf or NaN), shape [1]
    scale = e4m3(clamp(global_scale · (amax(|group|) / 6), ±448))    0.125 (e4m3's eps there) where it is 0
                 (amax, 448·6/amax and amax/6 in the weight's dtype, as the helpers receive it; the product float32)
    v = clamp(x / (float32(scale) / global_scale), −6, 6)          code = nearest e2m1 to |v|, ties to the even
    sign bit = (v < 0)                                             code (a tiny negative is −0, code 8; −0 is +0)

A model's fused projections share one global scale: llm-compressor sets q/k/v's (and gate/up's) to the least of
theirs, "a requirement currently being set by vLLM" (``src/llmcompressor/modifiers/utils/helpers.py``
``update_fused_layer_weight_global_scales``). So a re-quantization keeps the base's global scale (``global_scale=``)
and recomputes only the group scales; a group whose new amax needs a scale above 448 then clamps (as do the groups
whose scale is an e4m3 subnormal, rounded down), :meth:`Nvfp4Format.half_step` counts the clamp, and a merge
measures what it kept (as it does for FP8).

How it plugs into a merge (:class:`~loratools.quant.codec.Nvfp4Codec`, whose parts are several stored tensors):
``find`` maps each uint8 ``P.weight_packed`` (rows, c) to the logical ``P.weight`` (rows, 2c) with parts
:meth:`Nvfp4Format.stored_keys` (refusing a missing scale or global scale), and ``input_global_scale`` /
``input_scale`` beside it as extras; ``dequantize(parts)`` is ``dequantize(*parts)``; ``quantize(x, like)`` is
``quantize(x, global_scale=like[2], dtype=<the model's dtype>)`` (the base's global scale kept, above); and
``half_step(x, parts)`` is ``half_step(x, parts[1], parts[2])``. A record patches all three parts.

>>> fmt = Nvfp4Format()
>>> x = torch.tensor([[0.5, -1.0, 3.0, 6.0] * 4, [0.0] * 16])
>>> packed, scale, gs = fmt.quantize(x)
>>> packed.dtype, tuple(packed.shape), scale.dtype, tuple(scale.shape), float(gs)
(torch.uint8, (2, 8), torch.float8_e4m3fn, (2, 1), 448.0)
>>> fmt.dequantize(packed, scale, gs)[0, :4].tolist()
[0.5, -1.0, 3.0, 6.0]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ShapeMismatchError, UnsupportedConfigError
from .ct_config import weight_groups
from .fp8 import E4M3, E4M3_MAX

__all__ = ["E2M1_MAX", "E2M1_VALUES", "Nvfp4Format", "nvfp4_format"]

#: the e2m1 magnitudes, by the code's low three bits
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
#: compressed-tensors' stand-in for a zero e4m3 scale (``quantization/utils/helpers.py`` ``_get_dtype_eps``)
_E4M3_EPS = 0.125
#: 2·magnitude (0, 1, 2, 3, 4, 6, 8, 12) → its code
_CODE_OF_TWICE = torch.tensor([0, 1, 2, 3, 4, 0, 5, 0, 6, 0, 0, 0, 7], dtype=torch.uint8)


@dataclass(frozen=True)
class Nvfp4Format:
    """compressed-tensors ``nvfp4-pack-quantized`` weights (the rules in the module's docstring)."""

    group_size: int = 16

    def __post_init__(self) -> None:
        if self.group_size != 16:  # compressed-tensors' NVFP4PackedCompressor.can_compress: group_size == 16
            raise UnsupportedConfigError("quantization_config", "config_groups.*.weights.group_size",
                                         self.group_size, "NVFP4 groups are 16 inputs")

    @staticmethod
    def stored_keys(key: str) -> tuple[str, str, str]:
        """``P.weight`` → (``P.weight_packed``, ``P.weight_scale``, ``P.weight_global_scale``)."""
        return key + "_packed", key + "_scale", key + "_global_scale"

    def _check(self, shape: tuple[int, ...], scale: Tensor, global_scale: Tensor) -> None:
        rows, cols = shape
        if cols % self.group_size:
            raise ShapeMismatchError("weight_packed", f"a column count divisible by {self.group_size}", shape)
        if tuple(scale.shape) != (rows, cols // self.group_size) or scale.dtype != E4M3:
            raise ShapeMismatchError("weight_scale", f"e4m3 {(rows, cols // self.group_size)} for a {shape} weight",
                                     f"{str(scale.dtype).removeprefix('torch.')} {tuple(scale.shape)}")
        if global_scale.numel() != 1 or not global_scale.dtype.is_floating_point:
            raise ShapeMismatchError("weight_global_scale", "one float", tuple(global_scale.shape))

    def _step(self, scale: Tensor, global_scale: Tensor) -> Tensor:
        """float32(scale) / global_scale per element (float32, as ``_dequantize`` and ``_quantize`` divide)."""
        eff = scale.to(torch.float32) / global_scale.to(torch.float32).reshape(1)
        return eff.repeat_interleave(self.group_size, 1)

    def dequantize(self, packed: Tensor, scale: Tensor, global_scale: Tensor) -> Tensor:
        """W as the decompressor computes it (bfloat16), returned as float32 (exact)."""
        if packed.dtype != torch.uint8 or packed.dim() != 2:
            raise ShapeMismatchError("weight_packed", "a 2-D uint8 tensor",
                                     f"{str(packed.dtype).removeprefix('torch.')} {tuple(packed.shape)}")
        rows, half = packed.shape
        self._check((rows, 2 * half), scale, global_scale)
        codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(rows, 2 * half)
        values = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=packed.device)[(codes & 0x07).long()]
        values = torch.where((codes & 0x08) != 0, -values, values)
        return (values * self._step(scale, global_scale)).to(torch.bfloat16).to(torch.float32)

    def quantize(self, x: Tensor, *, global_scale: Tensor | None = None,
                 dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
        """(packed codes, e4m3 group scales, float32 global scale) of the float tensor ``x`` by the rule above;
        ``global_scale`` (the base's) is kept when given, computed from ``x`` otherwise. compressed-tensors computes
        amax/6 and 448·6/amax in the weight's own ``dtype`` (the model's: bfloat16 for most) before the float32
        product; ``x`` itself is divided in float32."""
        x32 = x.to(torch.float32)
        rows, cols = x32.shape
        if cols % self.group_size:
            raise ShapeMismatchError("weight", f"a column count divisible by {self.group_size}", (rows, cols))
        if global_scale is None:
            amax = x32.abs().amax().to(dtype).clamp(min=torch.finfo(dtype).tiny)
            global_scale = torch.nan_to_num(E4M3_MAX * E2M1_MAX / amax, nan=1.0, posinf=1.0, neginf=1.0) \
                .to(torch.float32).reshape(1)
        gs = global_scale.to(device=x.device, dtype=torch.float32).reshape(1)
        group_amax = x32.abs().reshape(rows, cols // self.group_size, self.group_size).amax(dim=2).to(dtype)
        scale = (gs * (group_amax / torch.tensor(E2M1_MAX, dtype=dtype))).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
        scale = torch.where(scale.to(torch.float32) == 0, torch.tensor(_E4M3_EPS, device=x.device).to(E4M3), scale)
        v = (x32 / self._step(scale, gs)).clamp(-E2M1_MAX, E2M1_MAX)
        codes = _CODE_OF_TWICE.to(x.device)[(2 * _round_e2m1(v.abs())).to(torch.long)] | ((v < 0).to(torch.uint8) << 3)
        pairs = codes.reshape(rows, cols // 2, 2)
        return pairs[..., 0] | (pairs[..., 1] << 4), scale, global_scale

    def half_step(self, x: Tensor, scale: Tensor, global_scale: Tensor) -> Tensor:
        """What quantizing x on these scales may leave, in x's units: ½ e2m1 step at each |x| on its group's grid
        (0.25, 0.5 or 1 times the group's step below 2, 4 and 6), or |x| − 6·step where |x| is beyond the grid (a
        group scale rounded below amax/6 clamps; in e4m3's subnormals, below 2⁻⁶, it may round down by half), plus
        the bfloat16 rounding of the dequantized product, up to 2⁻⁸ of the *rounded* value (|x| + the above: a value
        rounded up from a quarter step doubles), plus 2⁻²⁰·|x| for the float32 roundings of x/step and the product."""
        self._check(tuple(x.shape), scale, global_scale)
        step = self._step(scale, global_scale)
        a = x.to(torch.float32).abs()
        v = a / step
        half = torch.where(v < 2, 0.25, torch.where(v < 4, 0.5, 1.0)) * step
        grid = torch.where(v > E2M1_MAX, a - E2M1_MAX * step, half)
        return grid + (a + grid) * 2.0 ** -8 + a * 2.0 ** -20


def _round_e2m1(a: Tensor) -> Tensor:
    """The nearest e2m1 magnitude to each a in [0, 6], ties to the even code (0.25 → 0, 0.75 → 1, 1.25 → 1,
    1.75 → 2, 2.5 → 2, 3.5 → 4, 5 → 4), as ``cast_to_fp4``'s intervals do: steps of 0.5 below 2, 1 below 4, then 2;
    ``torch.round`` rounds half to even."""
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    return (torch.round(a / step) * step).clamp(max=E2M1_MAX)


def nvfp4_format(qc: Mapping[str, Any]) -> Nvfp4Format:
    """The NVFP4 layout a compressed-tensors ``quantization_config`` declares: format "nvfp4-pack-quantized", and
    every group's weights 4-bit float, symmetric, strategy "tensor_group" with group_size 16 (the NVFP4 and NVFP4A16
    presets of compressed-tensors 0.20.0 ``quantization/quant_scheme.py``)."""
    for where, w in weight_groups(qc, ["nvfp4-pack-quantized"], "nvfp4-pack-quantized models"):
        where = f"{where}.weights"
        for field_, want in (("num_bits", 4), ("type", "float"), ("symmetric", True), ("strategy", "tensor_group"),
                             ("group_size", 16), ("dynamic", False)):
            got = w.get(field_) if isinstance(w, Mapping) else w
            if got != want:
                raise UnsupportedConfigError("config.json", f"{where}.{field_}", got,
                                             f"NVFP4 weights have {field_} {want!r}")
    return Nvfp4Format()
