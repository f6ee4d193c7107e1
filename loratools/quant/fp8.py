"""FP8 (e4m3) weights with float scales beside them, in the two layouts loratools reads: fine-grained blocks
(:class:`Fp8Format`, transformers' ``quant_method: "fp8"``, float32 or power-of-two "ue8m0" scales) and
compressed-tensors' ``float-quantized`` (:class:`CompressedFp8Format`: one scale per tensor, row, input group or
block). Both answer :class:`Fp8Layout`, all a merge needs: where a weight's scale lives, dequantize, quantize, and
the rounding a quantization may leave.

Fine-grained FP8 weights (DeepSeek-V3 style): e4m3 values, one float32 scale per block.

A quantized linear ``P.weight`` (e4m3, shape (rows, cols)) has ``P.weight_scale_inv`` (float32, shape
(⌈rows/bm⌉, ⌈cols/bn⌉) for ``weight_block_size`` [bm, bn]); block (i, j) dequantizes as::

    W[i·bm:(i+1)·bm, j·bn:(j+1)·bn] = float32(w[...]) · scale_inv[i, j]        (edge blocks partial)

and a float block quantizes as (transformers 5.23 ``integrations/finegrained_fp8.py``, ``Fp8Quantize._quantize_one``;
DeepSeek-V3 ``inference/kernel.py`` ``act_quant`` uses the same s = amax/448 for its activation blocks)::

    s = 448 / amax(|block|)  (1 for an all-zero block)     scale_inv = float32(1 / s)
    w = e4m3(clamp(block · s, −448, 448))                  (torch's cast: round to nearest, ties to even)

With ``"scale_fmt": "ue8m0"`` (DeepSeek-V3.1) scale_inv is first rounded *up* to a power of two and the block is
divided by that (transformers 5.23 ``Fp8Quantize._quantize_one``: "Round it before quantizing and derive the forward
scale from it"; DeepSeek-V3 ``inference/kernel.py`` ``act_quant_kernel``: s = 2^⌈log2(amax/448)⌉, y = x/s)::

    scale_inv = 2^⌈log2(float32(1 / s))⌉    w = e4m3(clamp(block / scale_inv, −448, 448))

Rounding after quantizing instead (values divided by amax/448, scale stored rounded up) would multiply every
dequantized value of the block by up to 2: the bug this order avoids. Dequantization is the same product.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ..errors import ShapeMismatchError, UnsupportedConfigError
from .ct_config import weight_groups

__all__ = ["E4M3", "E4M3_MAX", "UE8M0", "CompressedFp8Format", "Fp8Format", "Fp8Layout", "fp8_format", "pow2_ceil"]

E4M3 = torch.float8_e4m3fn
#: OCP MX's E8M0 scale: an exponent byte b meaning 2^(b−127) (255 is NaN)
UE8M0 = torch.float8_e8m0fnu
#: the largest finite e4m3fn value (``torch.finfo(torch.float8_e4m3fn).max``)
E4M3_MAX = 448.0
_SCALE_SUFFIX = "_scale_inv"


class Fp8Layout(Protocol):
    """What a merge needs of an FP8 layout. ``like`` is the base's scale of the weight being re-quantized: a layout
    whose scales may be stored in several dtypes or shapes writes the new scale in the same ones."""

    def scale_key(self, key: str) -> str: ...

    def dequantize(self, w: Tensor, scale: Tensor) -> Tensor: ...

    def quantize(self, x: Tensor, *, like: Tensor | None = None) -> tuple[Tensor, Tensor]: ...

    def half_step(self, x: Tensor, scale: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class Fp8Format:
    """Block-wise e4m3 weights with ``…weight_scale_inv`` blocks of ``block`` = (rows, cols).

    ``scale_fmt`` "float": any float32 scale (DeepSeek-V3, transformers' default). "ue8m0" (DeepSeek-V3.1's
    ``"scale_fmt": "ue8m0"``): each scale is a power of two, rounded *up* before the block is quantized, so the
    values use the scale they are multiplied by (:meth:`quantize`). Its checkpoints store the powers of two as float32
    (DeepSeek-V3 ``inference/model.py`` ``Linear``: a float32 ``scale`` parameter whatever ``scale_fmt``);
    transformers 5.23's own quantizer stores ``torch.float8_e8m0fnu`` and MXFP8 checkpoints store the exponent byte
    as uint8 (``quantizers/quantizer_finegrained_fp8.py`` ``_process_model_after_weight_loading``; ``Fp8Dequantize``
    reads a byte b as 2^(b−127)): all three are read, and a re-quantized scale is written in its base's dtype.
    """

    block: tuple[int, int]
    scale_fmt: str = "float"

    def __post_init__(self) -> None:
        if len(self.block) != 2 or not all(type(b) is int and b > 0 for b in self.block):  # JSON true is no size
            raise UnsupportedConfigError("quantization_config", "weight_block_size", list(self.block),
                                         "it must be two positive integers [rows, cols]")
        if self.scale_fmt not in ("float", "ue8m0"):
            raise UnsupportedConfigError("quantization_config", "scale_fmt", self.scale_fmt,
                                         "loratools reads float32 and ue8m0 (power-of-two) scales")

    @staticmethod
    def scale_key(key: str) -> str:
        """``model.layers.0.q_proj.weight`` → ``model.layers.0.q_proj.weight_scale_inv`` (transformers' naming)."""
        return key + _SCALE_SUFFIX

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """The scale grid of a 2-D weight of ``shape``: one per block, edge blocks partial."""
        return math.ceil(shape[0] / self.block[0]), math.ceil(shape[1] / self.block[1])

    def _float_scales(self, scale: Tensor) -> Tensor:
        """The stored scales as float32: float dtypes as they are; e8m0 (``float8_e8m0fnu``, or its byte as uint8
        under ``ue8m0``) as 2^(b−127)."""
        if scale.dtype == torch.uint8 and self.scale_fmt == "ue8m0":
            return scale.view(UE8M0).to(torch.float32)
        if not scale.dtype.is_floating_point:
            raise UnsupportedConfigError("weight_scale_inv", "dtype", str(scale.dtype).removeprefix("torch."),
                                         "block scales are float (uint8 exponents only with scale_fmt ue8m0)")
        return scale.to(torch.float32)

    def _expand(self, scale: Tensor, shape: tuple[int, ...]) -> Tensor:
        bm, bn = self.block
        if tuple(scale.shape) != self.scale_shape(shape):
            raise ShapeMismatchError("weight_scale_inv", f"{self.scale_shape(shape)} for a {tuple(shape)} weight "
                                     f"in {bm}×{bn} blocks", tuple(scale.shape))
        s = self._float_scales(scale)
        return s.repeat_interleave(bm, 0)[:shape[0]].repeat_interleave(bn, 1)[:, :shape[1]]

    def _blocked(self, shape: tuple[int, ...]) -> tuple[int, int, int, int] | None:
        """(gm, bm, gn, bn) when ``shape`` is whole blocks (nearly always): the tensor viewed as (gm, bm, gn, bn)
        meets its scales viewed as (gm, 1, gn, 1) by broadcasting, with no expanded copy of the scales and no
        padding; None for partial edge blocks (:meth:`_expand`)."""
        bm, bn = self.block
        rows, cols = shape
        return (rows // bm, bm, cols // bn, bn) if rows % bm == 0 and cols % bn == 0 else None

    def _grid(self, scale: Tensor, shape: tuple[int, ...]) -> Tensor:
        """``scale`` as float32, checked against ``shape``, viewed (gm, 1, gn, 1) to broadcast over its blocks."""
        if tuple(scale.shape) != self.scale_shape(shape):
            self._expand(scale, shape)  # raises the shape error
        s = self._float_scales(scale)
        return s.reshape(s.shape[0], 1, s.shape[1], 1)

    def dequantize(self, w: Tensor, scale_inv: Tensor) -> Tensor:
        """W = float32(w) · scale_inv, each scale over its block (float32, as transformers' ``Fp8Dequantize``)."""
        shape = tuple(w.shape)
        blocks = self._blocked(shape)
        if blocks is None:
            return self._values(w) * self._expand(scale_inv, shape)
        s = self._grid(scale_inv, shape)
        out = self._values(w)  # a new tensor: multiplied in place, block by block
        out.reshape(blocks).mul_(s)
        return out

    @staticmethod
    def _values(w: Tensor) -> Tensor:
        """float32(w) of e4m3 ``w``: on CPU looked up, 64 Ki elements at a time, in the table of torch's own cast
        of the 256 bytes (the same bits; torch's element-wise cast from e4m3 is about 3× slower there)."""
        w = _e4m3(w)
        if w.device.type != "cpu":
            return w.to(torch.float32)
        table = torch.arange(256, dtype=torch.uint8).view(E4M3).to(torch.float32)
        flat = w.contiguous().view(torch.uint8).reshape(-1)
        out = torch.empty(flat.numel(), dtype=torch.float32)
        step = 1 << 16
        for i in range(0, flat.numel(), step):
            torch.index_select(table, 0, flat[i:i + step].to(torch.int32), out=out[i:i + step])
        return out.reshape(w.shape)

    def quantize(self, x: Tensor, *, like: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(e4m3 values, ``scale_inv`` per block) of the float tensor ``x``, by the producer's rule above: float32
        scales, or under ``ue8m0`` powers of two in ``like``'s dtype (float32 without it)."""
        rows, cols = x.shape
        gm, gn = self.scale_shape((rows, cols))
        bm, bn = self.block
        x32 = x.to(torch.float32)
        blocks = self._blocked((rows, cols))
        if blocks is not None:  # whole blocks: max(amax, −amin) is amax(|x|), without a copy of |x|; each reduced
            xb = x32.reshape(blocks)  # along the rows' contiguous blocks first (2× faster than both dims at once)
            amax = torch.maximum(xb.amax(dim=3).amax(dim=1), xb.amin(dim=3).amin(dim=1).neg_())
        else:
            pad = torch.zeros(gm * bm, gn * bn, dtype=torch.float32, device=x.device)
            pad[:rows, :cols] = x32.abs()  # zeros outside the tensor do not change a partial block's amax
            amax = pad.reshape(gm, bm, gn, bn).amax(dim=(1, 3))
        scale = torch.where(amax > 0, E4M3_MAX / torch.where(amax > 0, amax, 1.0), 1.0)
        inv = (1.0 / scale).to(torch.float32)
        stored = inv
        if self.scale_fmt == "ue8m0":
            inv = pow2_ceil(inv)
            scale, stored = 1.0 / inv, _as_ue8m0(inv, like)  # 1/2^k is exact: the values use the stored scale
        if blocks is not None:
            scaled = (xb * scale.reshape(gm, 1, gn, 1)).reshape(rows, cols)
        else:
            scaled = x32 * self._expand(scale, (rows, cols))
        return scaled.clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3), stored

    def half_step(self, x: Tensor, scale_inv: Tensor) -> Tensor:
        """½ e4m3 ulp at each |x| on its block's grid (x/scale_inv), in x's units: the rounding a quantization of
        x may leave (3 mantissa bits; subnormal step 2⁻⁹). A power-of-two scale is ≥ amax/448 too: nothing clamps."""
        shape = tuple(x.shape)
        blocks = self._blocked(shape)
        if blocks is None:
            s = self._expand(scale_inv, shape)
            v = (x.to(torch.float32) / s).abs().clamp(min=2.0 ** -6)
            return torch.exp2(torch.floor(torch.log2(v)) - 4) * s
        g = self._grid(scale_inv, shape)  # the same operations in place on one new tensor, blocks broadcast
        v = x.to(torch.float32).reshape(blocks) / g
        v.abs_().clamp_(min=2.0 ** -6).log2_().floor_().sub_(4).exp2_().mul_(g)
        return v.reshape(shape)


def pow2_ceil(x: Tensor) -> Tensor:
    """The least power of two ≥ x, for positive float32 x (at least 2⁻¹²⁶, float32's least normal, as transformers
    clamps): x = m·2ᵉ with ½ ≤ m < 1 gives 2ᵉ⁻¹ when m = ½ (x is a power of two) and 2ᵉ otherwise. Exact, where
    transformers' float32 ``2 ** ceil(log2(x))`` can round log2 down to an integer for an x just above a power of two.

    >>> pow2_ceil(torch.tensor([1.0, 1.5, 0.3, 2.0 ** -20 * 1.0000001])).tolist()
    [1.0, 2.0, 0.5, 1.9073486328125e-06]
    """
    m, e = torch.frexp(x.to(torch.float32).clamp(min=torch.finfo(torch.float32).tiny))
    return torch.ldexp(torch.ones_like(m), torch.where(m == 0.5, e - 1, e))


def _as_ue8m0(inv: Tensor, like: Tensor | None) -> Tensor:
    """Power-of-two scales in the dtype of the base's (``like``): float32, ``float8_e8m0fnu``, or its uint8 byte."""
    dtype = like.dtype if like is not None else torch.float32
    if dtype == torch.float32:
        return inv
    if dtype in (UE8M0, torch.uint8):
        e8 = inv.to(UE8M0)  # exact: a power of two in [2⁻¹²⁶, 2¹²⁷]
        return e8 if dtype == UE8M0 else e8.view(torch.uint8)
    raise UnsupportedConfigError("weight_scale_inv", "dtype", str(dtype).removeprefix("torch."),
                                 "ue8m0 scales are stored as float32, float8_e8m0fnu or uint8")


def _e4m3(w: Tensor) -> Tensor:
    """``w`` when it is e4m3; any other dtype (e5m2 …) is refused, never read as e4m3."""
    if w.dtype != E4M3:
        raise UnsupportedConfigError("a quantized weight", "dtype", str(w.dtype).removeprefix("torch."),
                                     "the model's config declares e4m3 weights; dequantize the model first")
    return w


@dataclass(frozen=True)
class CompressedFp8Format:
    """compressed-tensors ``float-quantized`` e4m3 weights (vLLM / llm-compressor): ``P.weight`` (e4m3, (rows, cols))
    and ``P.weight_scale`` (float32 or bfloat16, the model's dtype), whose shape the ``strategy`` sets: [1] or [] for
    "tensor", (rows, 1) for "channel", (rows, cols/g) for "group" (``group_size`` g along the input dimension, which
    it must divide), (⌈rows/bm⌉, ⌈cols/bn⌉) for "block" (``block_structure`` [bm, bn], edge blocks partial).

    As compressed-tensors 0.20.0 does it (``quantization/lifecycle/forward_helpers.py`` ``_dequantize``,
    ``_quantize``, ``_process_group`` and ``_process_block``; ``quantization/utils/helpers.py``
    ``calculate_qparams``; ``quantization/quant_args.py`` ``round_to_quantized_type_args``; symmetric weights, no
    zero point), with s the scale of the element's tensor, row, group or block::

        W = (w in scale's dtype) · s                          (so a bfloat16 scale gives bfloat16 values)
        s = amax(|x|) / 448 in the scale's dtype, amax over its elements;   finfo(dtype).eps if 0
        w = e4m3(clamp(x / s, −448, 448))                     (x in float32: torch's cast, ties to even)

    >>> fmt = CompressedFp8Format("channel")
    >>> w, s = fmt.quantize(torch.tensor([[1.0, -2.0], [0.25, 0.0]]))
    >>> w.dtype, tuple(s.shape), fmt.dequantize(w, s).tolist()           # one scale per row, amax/448
    (torch.float8_e4m3fn, (2, 1), [[1.0, -2.0], [0.25, 0.0]])
    >>> tuple(CompressedFp8Format("group", group_size=2).quantize(torch.ones(3, 4))[1].shape)
    (3, 2)
    """

    strategy: str
    group_size: int | None = None
    block: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        where = "config_groups.*.weights"
        if self.strategy not in ("tensor", "channel", "group", "block"):
            raise UnsupportedConfigError("quantization_config", f"{where}.strategy", self.strategy,
                                         "loratools reads float-quantized weights with one scale per tensor, channel "
                                         "(row), group or block; dequantize the model first")
        g, b = self.group_size, self.block
        if (self.strategy == "group") != (g is not None) or g is not None and not (type(g) is int and g > 0):
            raise UnsupportedConfigError("quantization_config", f"{where}.group_size", g,
                                         "the group strategy, and only it, needs a positive group_size")
        if (self.strategy == "block") != (b is not None) or b is not None and not (
                len(b) == 2 and all(type(n) is int and n > 0 for n in b)):
            raise UnsupportedConfigError("quantization_config", f"{where}.block_structure", b,
                                         "the block strategy, and only it, needs two positive integers [rows, cols]")

    @staticmethod
    def scale_key(key: str) -> str:
        """``model.layers.0.q_proj.weight`` → ``model.layers.0.q_proj.weight_scale`` (compressed-tensors' naming)."""
        return key + "_scale"

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The scale grid of a 2-D weight of ``shape`` (compressed-tensors' own shape for "tensor": [1])."""
        rows, cols = shape
        if self.strategy == "group":
            assert self.group_size is not None
            if cols % self.group_size:  # compressed-tensors' _process_group raises on it too
                raise ShapeMismatchError("weight_scale", f"a column count divisible by group_size {self.group_size}",
                                         tuple(shape))
            return rows, cols // self.group_size
        if self.strategy == "block":
            assert self.block is not None
            return math.ceil(rows / self.block[0]), math.ceil(cols / self.block[1])
        return (1,) if self.strategy == "tensor" else (rows, 1)

    def _expand(self, scale: Tensor, shape: tuple[int, ...]) -> Tensor:
        """``scale`` over the elements it scales (in its dtype): broadcastable for tensor and channel, full for group
        and block."""
        want = self.scale_shape(shape)
        ok = scale.numel() == 1 and scale.dim() <= 1 if self.strategy == "tensor" else tuple(scale.shape) == want
        if not ok:
            raise ShapeMismatchError("weight_scale", f"{'[1] or []' if self.strategy == 'tensor' else want} for a "
                                     f"{tuple(shape)} weight ({self.strategy} strategy)", tuple(scale.shape))
        if self.strategy == "group":
            assert self.group_size is not None
            return scale.repeat_interleave(self.group_size, 1)
        if self.strategy == "block":
            assert self.block is not None
            bm, bn = self.block
            return scale.repeat_interleave(bm, 0)[:shape[0]].repeat_interleave(bn, 1)[:, :shape[1]]
        return scale.reshape(-1, 1)

    def _amax(self, x: Tensor) -> Tensor:
        """amax(|x|) over each scale's elements, in the scale grid's shape."""
        a = x.abs()
        rows, cols = x.shape
        if self.strategy == "tensor":
            return a.amax().reshape(1)
        if self.strategy == "channel":
            return a.amax(dim=1, keepdim=True)
        gm, gn = self.scale_shape((rows, cols))
        if self.strategy == "group":
            return a.reshape(gm, gn, cols // gn).amax(dim=2)
        assert self.block is not None
        bm, bn = self.block
        pad = torch.zeros(gm * bm, gn * bn, dtype=a.dtype, device=a.device)
        pad[:rows, :cols] = a  # compressed-tensors pads with zeros: a partial block's amax is its elements'
        return pad.reshape(gm, bm, gn, bn).amax(dim=(1, 3))

    def dequantize(self, w: Tensor, scale: Tensor) -> Tensor:
        """W as compressed-tensors computes it (in the scale's dtype), returned as float32 (exact)."""
        s = self._expand(scale, tuple(w.shape))
        return (_e4m3(w).to(s.dtype) * s).to(torch.float32)

    def quantize(self, x: Tensor, *, like: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(e4m3 values, scale) of the float tensor ``x`` by the rule above; the scale takes ``like``'s dtype and
        shape (the base's scale), float32 and compressed-tensors' own shape without it."""
        x32 = x.to(torch.float32)
        dtype = like.dtype if like is not None else torch.float32
        scale = self._amax(x32).to(dtype) / torch.tensor(E4M3_MAX, dtype=dtype)
        scale = torch.where(scale == 0, torch.tensor(torch.finfo(dtype).eps, dtype=dtype), scale)
        q = (x32 / self._expand(scale, tuple(x.shape))).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)  # float32 / bf16: float32
        scale = scale.reshape(tuple(like.shape) if like is not None else scale.shape)
        self._expand(scale, tuple(x.shape))  # the base's shape is one this strategy reads
        return q, scale

    def half_step(self, x: Tensor, scale: Tensor) -> Tensor:
        """½ e4m3 ulp at each |x| on its scale's grid, plus what rounding to the scale's dtype may add (the
        product W, and a scale rounded below amax/448 that clamps the largest values): |x|·eps of that dtype."""
        s = self._expand(scale, tuple(x.shape)).to(torch.float32)
        v = (x.to(torch.float32) / s).abs().clamp(min=2.0 ** -6)
        return torch.exp2(torch.floor(torch.log2(v)) - 4) * s + x.to(torch.float32).abs() * torch.finfo(scale.dtype).eps


def fp8_format(config: Mapping[str, Any] | None) -> Fp8Layout | None:
    """The FP8 layout a model's ``config.json`` declares; None when it declares no ``quantization_config``.

    Raises :class:`UnsupportedConfigError` naming a ``quant_method`` (or an option of one) loratools does not read.
    """
    qc = (config or {}).get("quantization_config")
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, Mapping) else None
    reader = _METHODS.get(method) if isinstance(method, str) else None
    if reader is None:
        raise UnsupportedConfigError("config.json", "quantization_config.quant_method", method,
                                     "loratools reads fp8 (block-wise e4m3), compressed-tensors "
                                     "float-quantized (e4m3), nvfp4-pack-quantized, pack-quantized and "
                                     "int-quantized (int4/int8), gptq, awq (gemm), mxfp4 (gpt-oss) and "
                                     "bitsandbytes models only; dequantize the model first")
    assert isinstance(qc, Mapping)
    return reader(qc)


def _fine_grained(qc: Mapping[str, Any]) -> Fp8Format:
    """transformers 5.23 ``utils/quantization_config.py`` ``FineGrainedFP8Config``: ``scale_fmt`` "float" (its
    default) or "ue8m0"; DeepSeek's own configs also write ``"fmt": "e4m3"``, and none writes e5m2 weights."""
    fmt, scale_fmt = qc.get("fmt", "e4m3"), qc.get("scale_fmt")
    if fmt != "e4m3":
        raise UnsupportedConfigError("config.json", "quantization_config.fmt", fmt,
                                     "loratools reads e4m3 fp8 weights only; dequantize the model first")
    if scale_fmt not in (None, "float", "float32", "ue8m0"):
        raise UnsupportedConfigError("config.json", "quantization_config.scale_fmt", scale_fmt,
                                     "loratools reads float32 and ue8m0 (power-of-two) block scales")
    block = qc.get("weight_block_size")
    if not isinstance(block, list | tuple):
        raise UnsupportedConfigError("config.json", "quantization_config.weight_block_size", block,
                                     "loratools reads block-wise fp8 ([rows, cols] blocks)")
    return Fp8Format(tuple(block), "ue8m0" if scale_fmt == "ue8m0" else "float")  # type: ignore[arg-type]


def _compressed(qc: Mapping[str, Any]) -> CompressedFp8Format:
    """Every config group's weight settings must be symmetric 8-bit float with one strategy (and group size or
    block); activation settings (``input_activations``, ``kv_cache_scheme``) change no weight and stay in the config
    as they are."""
    formats: set[CompressedFp8Format] = set()
    for where, w in weight_groups(qc, ["float-quantized"],  # the other compressed-tensors formats: quant.codec
                                  "compressed-tensors float-quantized (e4m3), nvfp4-pack-quantized, pack-quantized "
                                  "and int-quantized weights (each by its own reader)"):
        formats.add(_compressed_weights(f"{where}.weights", w))
    if len(formats) > 1:
        shown = sorted(f"{f.strategy}{f.group_size or ''}{list(f.block) if f.block else ''}" for f in formats)
        raise UnsupportedConfigError("config.json", "quantization_config.config_groups", shown,
                                     "loratools reads one weight strategy (one group size or block) per model")
    return formats.pop()


def _compressed_weights(where: str, w: object) -> CompressedFp8Format:
    """One group's ``weights`` (compressed-tensors 0.20.0 ``quantization/quant_args.py`` ``QuantizationArgs``: its
    defaults where a field is absent, num_bits 8, type "int", symmetric true, dynamic false; a missing strategy is
    inferred from group_size as its ``validate_model_after`` does; a string block_structure "AxB" is [A, B])."""
    if not isinstance(w, Mapping):
        raise UnsupportedConfigError("config.json", where, w, "it must be an object of quantization arguments")
    for field_, want, default in (("num_bits", 8, 8), ("type", "float", "int"), ("symmetric", True, True),
                                  ("dynamic", False, False), ("scale_dtype", None, None)):
        got = w.get(field_, default)
        if got != want:
            raise UnsupportedConfigError("config.json", f"{where}.{field_}", got,
                                         f"loratools reads {want!r} only (8-bit e4m3, symmetric, static scales "
                                         "in the weight's dtype)")
    group, block, strategy = w.get("group_size"), w.get("block_structure"), w.get("strategy")
    if strategy is None:
        strategy = "tensor" if group is None else "channel" if group == -1 else "group"
    if isinstance(block, str) and "x" in block and all(p.isdigit() for p in block.split("x")):
        block = [int(p) for p in block.split("x")]
    if strategy != "group" and group in (None, -1):
        group = None
    if not isinstance(block, list | tuple | type(None)):
        raise UnsupportedConfigError("config.json", f"{where}.block_structure", block, "it must be [rows, cols]")
    return CompressedFp8Format(str(strategy), group, tuple(block) if block is not None else None)  # refuses token…


#: quant_method → the reader of its quantization_config
_METHODS: dict[str, Callable[[Mapping[str, Any]], Fp8Layout]] = {"fp8": _fine_grained,
                                                                 "compressed-tensors": _compressed}
