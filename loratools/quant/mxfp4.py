"""MXFP4 weights as gpt-oss ships them: 32 FP4 (e2m1) values per block sharing one power-of-two (E8M0) scale.

A parameter ``P`` (gpt-oss: ``model.layers.L.mlp.experts.gate_up_proj`` / ``down_proj``) is stored as
``P_blocks`` (uint8, (n, rows, G, 16): two 4-bit codes per byte) and ``P_scales`` (uint8, (n, rows, G));
``P`` itself, as transformers' GptOss model holds it, is (n, G·32, rows): the stored rows are its last dimension.
Dequantization (transformers 5.23 ``integrations/mxfp4.py`` ``_convert_moe_packed_tensors``, called by
``Mxfp4Dequantize`` when a model is loaded dequantized, as it is on a CPU)::

    byte b of a block holds elements 2b (low nibble) and 2b+1 (high nibble)
    value = FP4_VALUES[code] · 2^(scale − 127)           (torch.ldexp, in the float dtype)
    P = values.reshape(n, rows, G·32).transpose(1, 2)

with FP4_VALUES = ±{0, 0.5, 1, 1.5, 2, 3, 4, 6} (codes 0–7 positive, 8–15 the same magnitudes negative).

Quantization follows llama.cpp's reference rule (``ggml-quants.c`` ``quantize_row_mxfp4_ref``, the same as gguf 0.19
``gguf/quants.py`` ``MXFP4.quantize_blocks``), which is the OCP Microscaling v1.0 rule (shared exponent from the
block's amax, elements to the nearest e2m1 value, clamped at ±6) except at exact midpoints::

    e = floor(log2f(amax)) − 2 + 127   (0 for an all-zero block; clamped to [0, 254])   s = 2^(e − 127)
    code = the e2m1 value nearest x/s, a tie going to the smaller magnitude (llama.cpp's first-minimum search;
           OCP says ties to even), |x/s| ≥ 6 → ±6, −0 → +0

The bytes are those of gguf's quantizer with llama.cpp's nibble order (element j low, j + 16 high) repacked into
gpt-oss's (2b low, 2b + 1 high). llama.cpp stores the exponent in a uint8 without a clamp, so a block whose amax is
below 2⁻¹²⁵ wraps there; here it takes e = 0.

>>> fmt = Mxfp4Format()
>>> x = torch.linspace(-3, 3, 64).reshape(1, 32, 2)             # (n, in, out): 2 stored rows of one block each
>>> blocks, scales = fmt.quantize(x)
>>> tuple(blocks.shape), tuple(scales.shape), scales.flatten().tolist()   # amax 3 → e = 1 − 2 + 127
((1, 2, 1, 16), (1, 2, 1), [126, 126])
>>> bool(((fmt.dequantize(blocks, scales) - x).abs() <= fmt.half_step(x, scales)).all())
True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ShapeMismatchError

__all__ = ["FP4_VALUES", "BLOCK", "Mxfp4Format"]

#: the e2m1 value of each 4-bit code (transformers 5.23 ``integrations/mxfp4.py`` ``FP4_VALUES``)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
#: elements per block (one scale each)
BLOCK = 32
_BIAS = 127
#: midpoints between consecutive e2m1 magnitudes: |x/s| above the k-th rounds up to magnitude code k + 1
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


@dataclass(frozen=True)
class Mxfp4Format:
    """gpt-oss MXFP4: ``P_blocks`` + ``P_scales`` ↔ the float parameter ``P`` (n, G·32, rows)."""

    @staticmethod
    def parts(key: str) -> tuple[str, str]:
        """``…experts.down_proj`` → (``…experts.down_proj_blocks``, ``…experts.down_proj_scales``)."""
        return key + "_blocks", key + "_scales"

    @staticmethod
    def logical_shape(blocks: tuple[int, ...], scales: tuple[int, ...]) -> tuple[int, int, int]:
        """The shape of ``P`` from its stored parts' shapes; refuses parts that do not go together."""
        if len(blocks) != 4 or blocks[3] != BLOCK // 2 or tuple(scales) != tuple(blocks[:3]):
            raise ShapeMismatchError("MXFP4 blocks and scales", "(n, rows, G, 16) and (n, rows, G)",
                                     (tuple(blocks), tuple(scales)))
        n, rows, groups, _ = blocks
        return n, groups * BLOCK, rows

    def dequantize(self, blocks: Tensor, scales: Tensor) -> Tensor:
        """``P`` in float32, exactly as transformers' ``convert_moe_packed_tensors(…, dtype=torch.float32)``
        (one expert at a time: the index tensors are 8 bytes per stored byte)."""
        n, inner, rows = self.logical_shape(tuple(blocks.shape), tuple(scales.shape))
        lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
        out = torch.empty((n, inner, rows), dtype=torch.float32)
        for i in range(n):
            b = blocks[i].to(torch.uint8)
            vals = torch.stack((lut[(b & 0x0F).long()], lut[(b >> 4).long()]), dim=-1).flatten(-2)  # (rows, G, 32)
            vals = torch.ldexp(vals, (scales[i].to(torch.int32) - _BIAS).unsqueeze(-1))
            out[i] = vals.reshape(rows, inner).T
        return out

    def quantize(self, x: Tensor, *, like: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(blocks, scales) of the float parameter ``x`` (n, G·32, rows) by the rule above, one expert at a time
        (``like`` is not needed: the parts are always uint8 of these shapes)."""
        if x.dim() != 3 or x.shape[1] % BLOCK:
            raise ShapeMismatchError("MXFP4 parameter", f"(n, a multiple of {BLOCK}, rows)", tuple(x.shape))
        n, inner, rows = x.shape
        blocks = torch.empty((n, rows, inner // BLOCK, BLOCK // 2), dtype=torch.uint8)
        scales = torch.empty((n, rows, inner // BLOCK), dtype=torch.uint8)
        for i in range(n):
            v = x[i].to(torch.float32).T.reshape(rows, inner // BLOCK, BLOCK)
            scales[i] = e = self.exponents(v.abs().amax(dim=-1))
            u = v.abs() / _power_of_two(e).unsqueeze(-1)  # exact: a power of two
            mag = torch.zeros(u.shape, dtype=torch.uint8)
            for m in _MIDPOINTS:  # the magnitude code: how many midpoints |x/s| is strictly above
                mag += u > m
            codes = mag | (((v < 0) & (mag > 0)).to(torch.uint8) << 3)
            blocks[i] = codes[..., 0::2] | (codes[..., 1::2] << 4)
        return blocks, scales

    @staticmethod
    def exponents(amax: Tensor) -> Tensor:
        """E8M0 scale of each block: floor(log2f(amax)) − 2 + 127 in float32 (llama.cpp's), 0 for a zero block."""
        safe = torch.where(amax > 0, amax, 1.0).to(torch.float32)
        e = torch.floor(torch.log2(safe)) - 2 + _BIAS
        return torch.where(amax > 0, e, 0.0).clamp(0, 254).to(torch.uint8)

    def half_step(self, x: Tensor, scales: Tensor) -> Tensor:
        """The most a quantization of ``x`` with these ``scales`` may be off at each element, in ``x``'s units:
        half the e2m1 step at |x|/s (s/4 below 2, s/2 below 4, s up to 6), and |x| − 6s beyond ±6 (the clamp)."""
        n, inner, rows = x.shape
        s = _power_of_two(scales).repeat_interleave(BLOCK, dim=-1).reshape(n, rows, inner).transpose(1, 2)
        v = x.to(torch.float32).abs() / s
        step = torch.where(v < 2, 0.25, torch.where(v < 4, 0.5, 1.0))
        return torch.maximum(step, v - 6) * s


def _power_of_two(scales: Tensor) -> Tensor:
    """2^(scale − 127) of E8M0 ``scales``, in float32 (exact: subnormal below 2⁻¹²⁶)."""
    return torch.ldexp(torch.ones(scales.shape, dtype=torch.float32), scales.to(torch.int32) - _BIAS)
