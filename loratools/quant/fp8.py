"""Fine-grained FP8 weights (DeepSeek-V3 style, transformers' ``quant_method: "fp8"``): e4m3 values, one float32
scale per block.

A quantized linear ``P.weight`` (e4m3, shape (rows, cols)) has ``P.weight_scale_inv`` (float32, shape
(⌈rows/bm⌉, ⌈cols/bn⌉) for ``weight_block_size`` [bm, bn]); block (i, j) dequantizes as::

    W[i·bm:(i+1)·bm, j·bn:(j+1)·bn] = float32(w[...]) · scale_inv[i, j]        (edge blocks partial)

and a float block quantizes as (transformers 5.23 ``integrations/finegrained_fp8.py``, ``Fp8Quantize._quantize_one``;
DeepSeek-V3 ``inference/kernel.py`` ``weight_quant`` stores the same s = amax/448)::

    s = 448 / amax(|block|)  (1 for an all-zero block)     scale_inv = float32(1 / s)
    w = e4m3(clamp(block · s, −448, 448))                  (torch's cast: round to nearest, ties to even)

>>> fmt = Fp8Format((2, 2))
>>> x = torch.tensor([[1.0, -2.0, 0.5], [0.25, 3.0, 0.0]])
>>> w, s = fmt.quantize(x)
>>> w.dtype, tuple(s.shape)
(torch.float8_e4m3fn, (1, 2))
>>> bool(((fmt.dequantize(w, s) - x).abs() <= fmt.half_step(x, s)).all())   # within half an e4m3 step
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ShapeMismatchError, UnsupportedConfigError

__all__ = ["E4M3", "E4M3_MAX", "Fp8Format", "fp8_format"]

E4M3 = torch.float8_e4m3fn
#: the largest finite e4m3fn value (``torch.finfo(torch.float8_e4m3fn).max``)
E4M3_MAX = 448.0
_SCALE_SUFFIX = "_scale_inv"


@dataclass(frozen=True)
class Fp8Format:
    """Block-wise e4m3 weights with float32 ``…weight_scale_inv`` blocks of ``block`` = (rows, cols)."""

    block: tuple[int, int]

    def __post_init__(self) -> None:
        if len(self.block) != 2 or not all(isinstance(b, int) and b > 0 for b in self.block):
            raise UnsupportedConfigError("quantization_config", "weight_block_size", list(self.block),
                                         "it must be two positive integers [rows, cols]")

    @staticmethod
    def scale_key(key: str) -> str:
        """``model.layers.0.q_proj.weight`` → ``model.layers.0.q_proj.weight_scale_inv`` (transformers' naming)."""
        return key + _SCALE_SUFFIX

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """The scale grid of a 2-D weight of ``shape``: one per block, edge blocks partial."""
        return math.ceil(shape[0] / self.block[0]), math.ceil(shape[1] / self.block[1])

    def _expand(self, scale: Tensor, shape: tuple[int, ...]) -> Tensor:
        bm, bn = self.block
        if tuple(scale.shape) != self.scale_shape(shape):
            raise ShapeMismatchError("weight_scale_inv", f"{self.scale_shape(shape)} for a {tuple(shape)} weight "
                                     f"in {bm}×{bn} blocks", tuple(scale.shape))
        s = scale.to(torch.float32)
        return s.repeat_interleave(bm, 0)[:shape[0]].repeat_interleave(bn, 1)[:, :shape[1]]

    def dequantize(self, w: Tensor, scale_inv: Tensor) -> Tensor:
        """W = float32(w) · scale_inv, each scale over its block (float32, as transformers' ``Fp8Dequantize``)."""
        return w.to(torch.float32) * self._expand(scale_inv, tuple(w.shape))

    def quantize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(e4m3 values, float32 ``scale_inv`` per block) of the float tensor ``x``, by the producer's rule above."""
        rows, cols = x.shape
        gm, gn = self.scale_shape((rows, cols))
        bm, bn = self.block
        x32 = x.to(torch.float32)
        pad = torch.zeros(gm * bm, gn * bn, dtype=torch.float32, device=x.device)
        pad[:rows, :cols] = x32.abs()  # zeros outside the tensor do not change a partial block's amax
        amax = pad.reshape(gm, bm, gn, bn).amax(dim=(1, 3))
        scale = torch.where(amax > 0, E4M3_MAX / torch.where(amax > 0, amax, 1.0), 1.0)
        inv = (1.0 / scale).to(torch.float32)
        scaled = x32 * self._expand(scale, (rows, cols))
        return scaled.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), inv

    def half_step(self, x: Tensor, scale_inv: Tensor) -> Tensor:
        """½ e4m3 ulp at each |x| on its block's grid (x/scale_inv), in x's units: the rounding a quantization of
        x may leave (3 mantissa bits; subnormal step 2⁻⁹)."""
        s = self._expand(scale_inv, tuple(x.shape))
        v = (x.to(torch.float32) / s).abs().clamp(min=2.0 ** -6)
        return torch.exp2(torch.floor(torch.log2(v)) - 4) * s


def fp8_format(config: Mapping[str, Any] | None) -> Fp8Format | None:
    """The FP8 format a model's ``config.json`` declares; None when it declares no ``quantization_config``.

    Raises :class:`UnsupportedConfigError` naming a ``quant_method`` (or an fp8 option) loratools does not read.
    """
    qc = (config or {}).get("quantization_config")
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, Mapping) else None
    if method != "fp8":
        raise UnsupportedConfigError("config.json", "quantization_config.quant_method", method,
                                     "loratools merges into fp8 (block-wise e4m3) quantized models only; "
                                     "dequantize the model first")
    fmt, scale_fmt = qc.get("fmt", "e4m3"), qc.get("scale_fmt")
    if fmt != "e4m3" or scale_fmt not in (None, "float32"):
        what, value = ("fmt", fmt) if fmt != "e4m3" else ("scale_fmt", scale_fmt)
        raise UnsupportedConfigError("config.json", f"quantization_config.{what}", value,
                                     "loratools reads e4m3 weights with float32 scales")
    block = qc.get("weight_block_size")
    if not isinstance(block, list | tuple):
        raise UnsupportedConfigError("config.json", "quantization_config.weight_block_size", block,
                                     "loratools reads block-wise fp8 ([rows, cols] blocks)")
    return Fp8Format(tuple(block))  # type: ignore[arg-type]
