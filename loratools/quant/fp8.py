"""FP8 (e4m3) weights with float scales beside them, in the two layouts loratools reads: fine-grained blocks
(:class:`Fp8Format`, transformers' ``quant_method: "fp8"``) and one scale per tensor or per row
(:class:`CompressedFp8Format`, compressed-tensors' ``float-quantized``). Both answer :class:`Fp8Layout`, all a merge
needs: where a weight's scale lives, dequantize, quantize, and the rounding a quantization may leave.

Fine-grained FP8 weights (DeepSeek-V3 style): e4m3 values, one float32 scale per block.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ..errors import ShapeMismatchError, UnsupportedConfigError

__all__ = ["E4M3", "E4M3_MAX", "CompressedFp8Format", "Fp8Format", "Fp8Layout", "fp8_format"]

E4M3 = torch.float8_e4m3fn
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
    """Block-wise e4m3 weights with float32 ``…weight_scale_inv`` blocks of ``block`` = (rows, cols)."""

    block: tuple[int, int]

    def __post_init__(self) -> None:
        if len(self.block) != 2 or not all(type(b) is int and b > 0 for b in self.block):  # JSON true is no size
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

    def quantize(self, x: Tensor, *, like: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(e4m3 values, float32 ``scale_inv`` per block) of the float tensor ``x``, by the producer's rule above
        (``like`` is not needed: the scales are always float32 blocks)."""
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


@dataclass(frozen=True)
class CompressedFp8Format:
    """compressed-tensors ``float-quantized`` e4m3 weights (vLLM / llm-compressor): ``P.weight`` (e4m3, (rows, cols))
    and ``P.weight_scale`` (float32 or bfloat16; shape [1] or [] for ``strategy`` "tensor", (rows, 1) for "channel").

    As compressed-tensors 0.20.0 does it (``quantization/lifecycle/forward_helpers.py`` ``_dequantize`` and
    ``_quantize``, ``quantization/utils/helpers.py`` ``calculate_qparams``, ``quantization/quant_args.py``
    ``round_to_quantized_type_args``; symmetric weights, no zero point)::

        W = (w in scale's dtype) · scale                        (so a bfloat16 scale gives bfloat16 values)
        scale = amax(|x|) / 448 in the scale's dtype, amax over the tensor or each row;  finfo(dtype).eps if 0
        w = e4m3(clamp(x / scale, −448, 448))                   (x in float32: torch's cast, ties to even)

    >>> fmt = CompressedFp8Format("channel")
    >>> w, s = fmt.quantize(torch.tensor([[1.0, -2.0], [0.25, 0.0]]))
    >>> w.dtype, tuple(s.shape), fmt.dequantize(w, s).tolist()           # one scale per row, amax/448
    (torch.float8_e4m3fn, (2, 1), [[1.0, -2.0], [0.25, 0.0]])
    """

    strategy: str

    def __post_init__(self) -> None:
        if self.strategy not in ("tensor", "channel"):
            raise UnsupportedConfigError("quantization_config", "config_groups.*.weights.strategy", self.strategy,
                                         "loratools reads float-quantized weights with one scale per tensor or "
                                         "per channel (row); dequantize the model first")

    @staticmethod
    def scale_key(key: str) -> str:
        """``model.layers.0.q_proj.weight`` → ``model.layers.0.q_proj.weight_scale`` (compressed-tensors' naming)."""
        return key + "_scale"

    def _check(self, scale: Tensor, shape: tuple[int, ...]) -> Tensor:
        ok = scale.numel() == 1 and scale.dim() <= 1 if self.strategy == "tensor" else \
            tuple(scale.shape) == (shape[0], 1)
        if not ok:
            want = "[1] or []" if self.strategy == "tensor" else f"({shape[0]}, 1)"
            raise ShapeMismatchError("weight_scale", f"{want} for a {tuple(shape)} weight ({self.strategy} strategy)",
                                     tuple(scale.shape))
        return scale

    def dequantize(self, w: Tensor, scale: Tensor) -> Tensor:
        """W as compressed-tensors computes it (in the scale's dtype), returned as float32 (exact)."""
        s = self._check(scale, tuple(w.shape))
        return (w.to(s.dtype) * s).to(torch.float32)

    def quantize(self, x: Tensor, *, like: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(e4m3 values, scale) of the float tensor ``x`` by the rule above; the scale takes ``like``'s dtype and
        shape (the base's scale), float32 and compressed-tensors' own shape without it."""
        x32 = x.to(torch.float32)
        dtype = like.dtype if like is not None else torch.float32
        amax = x32.abs().amax() if self.strategy == "tensor" else x32.abs().amax(dim=1, keepdim=True)
        scale = amax.to(dtype) / torch.tensor(E4M3_MAX, dtype=dtype)
        scale = torch.where(scale == 0, torch.tensor(torch.finfo(dtype).eps, dtype=dtype), scale)
        q = (x32 / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)  # float32 / bfloat16 is computed in float32
        shape = tuple(like.shape) if like is not None else ((1,) if self.strategy == "tensor" else (x.shape[0], 1))
        return q, self._check(scale.reshape(shape), tuple(x.shape))

    def half_step(self, x: Tensor, scale: Tensor) -> Tensor:
        """½ e4m3 ulp at each |x| on its scale's grid, plus what rounding to the scale's dtype may add (the
        product W, and a scale rounded below amax/448 that clamps the largest values): |x|·eps of that dtype."""
        s = self._check(scale, tuple(x.shape)).to(torch.float32)
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
                                     "loratools merges into fp8 (block-wise e4m3) and compressed-tensors "
                                     "float-quantized (e4m3) models only; dequantize the model first")
    assert isinstance(qc, Mapping)
    return reader(qc)


def _fine_grained(qc: Mapping[str, Any]) -> Fp8Format:
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


def _compressed(qc: Mapping[str, Any]) -> CompressedFp8Format:
    """Every config group's weight settings must be symmetric 8-bit float with one strategy; activation settings
    (``input_activations``, ``kv_cache_scheme``) change no weight and stay in the config as they are."""
    if qc.get("format") != "float-quantized":
        raise UnsupportedConfigError("config.json", "quantization_config.format", qc.get("format"),
                                     "loratools reads compressed-tensors float-quantized (e4m3) weights only")
    groups = qc.get("config_groups")
    weights = [(name, g.get("weights")) for name, g in (groups.items() if isinstance(groups, Mapping) else ())
               if isinstance(g, Mapping) and g.get("weights") is not None]
    if not weights:
        raise UnsupportedConfigError("config.json", "quantization_config.config_groups", groups,
                                     "no group quantizes weights")
    strategies: set[str] = set()
    for name, w in weights:
        where = f"quantization_config.config_groups.{name}.weights"
        # compressed-tensors' defaults where a field is absent: num_bits 8, type "int", symmetric true
        for field_, want, default in (("num_bits", 8, 8), ("type", "float", "int"), ("symmetric", True, True)):
            got = w.get(field_, default) if isinstance(w, Mapping) else w
            if got != want:
                raise UnsupportedConfigError("config.json", f"{where}.{field_}", got,
                                             f"loratools reads {want!r} only (8-bit e4m3, symmetric)")
        strategy = str(w.get("strategy") if isinstance(w, Mapping) else w)
        CompressedFp8Format(strategy)  # refuses group, block, token… by name
        strategies.add(strategy)
    if len(strategies) > 1:
        raise UnsupportedConfigError("config.json", "quantization_config.config_groups", sorted(strategies),
                                     "loratools reads one weight strategy per model")
    return CompressedFp8Format(strategies.pop())


#: quant_method → the reader of its quantization_config
_METHODS: dict[str, Callable[[Mapping[str, Any]], Fp8Layout]] = {"fp8": _fine_grained,
                                                                 "compressed-tensors": _compressed}
