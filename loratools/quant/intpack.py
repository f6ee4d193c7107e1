"""Integer weights as compressed-tensors stores them: ``format: "pack-quantized"`` (the W4A16 / W8A16 presets vLLM
serves, GPTQ and AWQ models saved by llm-compressor) and ``"int-quantized"`` (W8A8: plain int8 values), dequantized
and quantized exactly as compressed-tensors 0.20.0 does, as :class:`~loratools.quant.codec.IntPackCodec` merges them.

A quantized linear ``P`` of shape (rows, cols), b-bit (4 or 8), stores (``compressors/pack_quantized/base.py``
``PackedQuantizationCompressor.compress``; ``compressors/naive_quantized/base.py`` for int-quantized)::

    P.weight_packed      int32 (rows, ⌈cols·b/32⌉)   32/b values per word, column j at bit (j mod 32/b)·b of word
                                                     j·b/32, each stored as q + 2^(b−1) (unsigned)
    P.weight_scale       the weight's dtype          [1] "tensor", (rows, 1) "channel", (rows, cols/g) "group"
    P.weight_shape       int64 [2]                   (rows, cols)
    P.weight_zero_point  asymmetric only: int32 (⌈rows·b/32⌉, G) packed the same way along rows for "group" and
                         "channel"; int8 [1] for "tensor" (``PACK_ZP_STRATS``)
    int-quantized:       P.weight int8 (rows, cols), P.weight_scale, asymmetric P.weight_zero_point int8

(``compressors/pack_quantized/helpers.py`` ``pack_to_int32`` / ``unpack_from_int32``; for 4 and 8 bits a value
never straddles a word, so this module packs only those two and refuses the others by name.)

Dequantization (``quantization/lifecycle/forward_helpers.py`` ``_dequantize``, in the scale's dtype)::

    W = (q − zp) · s               q, zp converted to s's dtype; the product rounded to it (bfloat16 for most)

Quantization (``_quantize`` with ``round_to_quantized_type_args``; ``quantization/utils/helpers.py``
``calculate_range``: q ∈ [−2^(b−1), 2^(b−1) − 1])::

    q = int8(round(clamp(x / s + zp, qmin, qmax)))     in the weight's dtype, ``torch.round`` (half to even)

where x is in the weight's dtype: the scale's, since compressed-tensors' observers compute scales in the weight's
dtype (``calculate_qparams`` returns them in min_vals' dtype; a ``scale_dtype`` is refused).

A merge keeps the base's grid — its scales and zero points — and re-rounds only the values: new q =
clamp(round(x/s + zp)). The grid of a GPTQ or AWQ model was chosen by calibration (scales searched to minimise the
layer's output error on real activations, not the min/max of the weights); recomputing scales by min/max from the
merged weights would throw that away, and a merge's ΔW is usually small next to W, so the old grid still fits.
Values beyond it clamp: :meth:`IntPackFormat.half_step` counts the clamp, and the merge measures how much of ΔW it
kept (its erase guard). Measured on fixtures/tiny-llama min/max-quantized by compressed-tensors, ‖Q(W0+ΔW) −
(W0+ΔW)‖/‖ΔW‖ with the kept grid against a fresh min/max one: W4 group 32 0.91 vs 1.15 with ΔW at 0.1× the
fixture adapter, 0.26 vs 0.16 at 1× (an adapter with ‖ΔW‖ ≈ 0.7‖W0‖, which pushes 5 % of the values beyond the
grid); W8 per channel 0.12 vs 0.10 and 0.14 vs 0.01.

>>> fmt = IntPackFormat(4, "channel", symmetric=True)
>>> x = torch.tensor([[0.5, -1.0, 3.5, 0.0, 1.0, 2.0, -4.0, 0.25]])
>>> scale = torch.tensor([[0.5]])
>>> packed, s, shape = fmt.quantize(x, (torch.zeros(1, 1, dtype=torch.int32), scale, torch.tensor([1, 8])))
>>> packed.dtype, tuple(packed.shape), fmt.dequantize((packed, s, shape)).tolist()
(torch.int32, (1, 1), [[0.5, -1.0, 3.5, 0.0, 1.0, 2.0, -4.0, 0.0]])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ShapeMismatchError, UnsupportedConfigError
from .ct_config import weight_groups

__all__ = ["IntPackFormat", "intpack_format", "pack_int32", "unpack_int32"]

#: the compressed-tensors formats this module reads
FORMATS = ("pack-quantized", "int-quantized")
_BITS = (4, 8)
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def pack_int32(q: Tensor, bits: int) -> Tensor:
    """Signed b-bit values (rows, cols) → int32 words (rows, ⌈cols·b/32⌉), as ``pack_to_int32`` (packed_dim 1):
    value + 2^(b−1) at bit (j mod 32/b)·b, the last word padded with zero bits."""
    per = 32 // bits
    rows, cols = q.shape
    words = -(-cols // per)
    u = torch.zeros(rows, words * per, dtype=torch.int32, device=q.device)
    u[:, :cols] = q.to(torch.int32) + (1 << (bits - 1))
    u = u.reshape(rows, words, per) << (torch.arange(per, dtype=torch.int32, device=q.device) * bits)
    out = u[..., 0]
    for i in range(1, per):  # the fields do not overlap: OR is their sum, wrapping into the sign bit as int32 does
        out = out | u[..., i]
    return out.contiguous()


def unpack_int32(packed: Tensor, bits: int, cols: int) -> Tensor:
    """int32 words (rows, w) → the signed b-bit values (rows, cols) as int8, as ``unpack_from_int32``."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    u = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # arithmetic shift: the mask drops the sign copies
    return (u.reshape(packed.shape[0], -1)[:, :cols] - (1 << (bits - 1))).to(torch.int8)


@dataclass(frozen=True)
class IntPackFormat:
    """compressed-tensors integer weights (the rules in the module's docstring): ``bits`` 4 or 8, ``strategy``
    "tensor", "channel" or "group" (``group_size`` inputs per scale), ``symmetric`` (no zero point stored),
    ``packed`` (pack-quantized int32 words; False: int-quantized int8 values)."""

    bits: int
    strategy: str
    group_size: int | None = None
    symmetric: bool = True
    packed: bool = True

    def __post_init__(self) -> None:
        where = "quantization_config.config_groups.*.weights"
        if self.bits not in _BITS:
            raise UnsupportedConfigError("config.json", f"{where}.num_bits", self.bits,
                                         "loratools reads 4- and 8-bit integer weights (W4A16, W8A16, W8A8)")
        if self.strategy not in ("tensor", "channel", "group"):
            raise UnsupportedConfigError("config.json", f"{where}.strategy", self.strategy,
                                         "loratools reads integer weights with one scale per tensor, channel or group")
        if self.strategy == "group" and not (type(self.group_size) is int and self.group_size > 0):
            raise UnsupportedConfigError("config.json", f"{where}.group_size", self.group_size,
                                         "a group strategy needs a positive group_size")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def stored_keys(self, key: str) -> tuple[str, ...]:
        """``P.weight`` → its parts in codec order: values, scale, (pack-quantized) shape, (asymmetric) zero point."""
        values = key + "_packed" if self.packed else key
        shape = (key + "_shape",) if self.packed else ()
        zp = () if self.symmetric else (key + "_zero_point",)
        return (values, key + "_scale", *shape, zp[0]) if zp else (values, key + "_scale", *shape)

    def _zp_packed(self) -> bool:
        return self.packed and not self.symmetric and self.strategy in ("group", "channel")

    def logical_shape(self, values: tuple[int, ...], scale: tuple[int, ...]) -> tuple[int, int]:
        """(rows, cols) from the stored shapes: a group weight's cols are its scale's groups × group_size; a packed
        channel/tensor weight's are read as whole words (``dequantize`` checks ``weight_shape`` says so)."""
        if len(values) != 2:
            raise ShapeMismatchError("weight_packed" if self.packed else "weight", "a 2-D tensor", values)
        rows, width = values
        if not self.packed:
            return rows, width
        if self.strategy == "group":
            assert self.group_size is not None
            cols = (scale[-1] if scale else 0) * self.group_size
            if -(-cols * self.bits // 32) != width:
                raise ShapeMismatchError("weight_packed", f"{-(-cols * self.bits // 32)} words for {cols} inputs "
                                         f"({scale[-1] if scale else 0} groups of {self.group_size})", values)
            return rows, cols
        return rows, width * 32 // self.bits

    def grid(self, parts: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        """(q int8 (rows, cols), s, zp) broadcast to (rows, cols) in s's dtype (zp None when symmetric)."""
        values, scale = parts[0], parts[1]
        if scale.dtype not in _FLOATS:
            raise UnsupportedConfigError("weight_scale", "dtype", str(scale.dtype).removeprefix("torch."),
                                         "integer weights' scales are float32, bfloat16 or float16")
        if self.packed:
            if values.dtype != torch.int32:
                raise ShapeMismatchError("weight_packed", "int32 words", str(values.dtype).removeprefix("torch."))
            rows, cols = self.logical_shape(tuple(values.shape), tuple(scale.shape))
            shape = [int(v) for v in parts[2].reshape(-1).tolist()]
            if shape != [rows, cols]:
                raise ShapeMismatchError("weight_shape", [rows, cols], shape,
                                         "a weight whose inputs are not whole int32 words is not read")
            q = unpack_int32(values, self.bits, cols)
        else:
            if values.dtype != torch.int8:
                raise ShapeMismatchError("weight", "int8 values", str(values.dtype).removeprefix("torch."))
            rows, cols = values.shape
            q = values
        s = self._expand(scale, rows, cols, "weight_scale")
        zp = None
        if not self.symmetric:
            z = parts[-1]
            if self._zp_packed():
                if z.dtype != torch.int32:
                    raise ShapeMismatchError("weight_zero_point", "int32 words", str(z.dtype).removeprefix("torch."))
                z = unpack_int32(z.t().contiguous(), self.bits, rows).t()  # packed along rows (packed_dim 0)
            zp = self._expand(z.to(scale.dtype), rows, cols, "weight_zero_point")
        return q, s, zp

    def _expand(self, t: Tensor, rows: int, cols: int, name: str) -> Tensor:
        """A scale or zero point over the elements it applies to, checked against the strategy's shape."""
        want = {"tensor": (1,), "channel": (rows, 1)}.get(self.strategy)
        if want is None:
            assert self.group_size is not None
            want = (rows, cols // self.group_size)
        if t.numel() != int(torch.tensor(want).prod()) or (self.strategy != "tensor" and tuple(t.shape) != want):
            raise ShapeMismatchError(name, f"{list(want)} for a {self.strategy} weight of {[rows, cols]}",
                                     tuple(t.shape))
        if self.strategy == "group":
            assert self.group_size is not None
            return t.repeat_interleave(self.group_size, 1)
        return t.reshape(1, 1) if self.strategy == "tensor" else t

    def dequantize(self, parts: Sequence[Tensor]) -> Tensor:
        """W = (q − zp)·s in the scale's dtype, as ``_dequantize``; returned as float32 (exact)."""
        q, s, zp = self.grid(parts)
        w = q.to(s.dtype)
        if zp is not None:
            w = w - zp
        return (w * s).to(torch.float32)

    def quantize(self, x: Tensor, like: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """``x`` on the grid of ``like`` (the base's parts): new values, every other part as the base's."""
        q0, s, zp = self.grid(like)
        if tuple(x.shape) != tuple(q0.shape):
            raise ShapeMismatchError("weight", tuple(q0.shape), tuple(x.shape))
        scaled = x.to(s.dtype) / s  # in the weight's dtype, as _quantize divides
        if zp is not None:
            scaled = scaled + zp
        # 0/0 where a scale is 0 (a damaged grid: every value of it is 0): q 0, not what int8(NaN) is on this CPU
        q = torch.round(torch.clamp(torch.nan_to_num(scaled, nan=0.0), self.qmin, self.qmax)).to(torch.int8)
        values = pack_int32(q, self.bits) if self.packed else q
        return (values, *like[1:])

    def half_step(self, x: Tensor, parts: Sequence[Tensor]) -> Tensor:
        """What quantizing x on these parts' grid may leave, in x's units: ½ step (s) inside the grid, or the distance
        to its end where x/s + zp is beyond it (the clamp), plus the roundings in the weight's dtype (x, x/s, + zp
        and the product, each at most eps of its magnitude): eps·(2|x| + |zp|·s + the above). Steps are |s|; a
        scale of 0 (a damaged grid, whose one value is 0) leaves |x|."""
        _, s, zp = self.grid(parts)
        x32 = x.to(torch.float32)
        a = x32 / s.to(device=x.device, dtype=torch.float32) + (zp.to(device=x.device, dtype=torch.float32)
                                                               if zp is not None else 0.0)
        s32 = s.to(device=x.device, dtype=torch.float32).abs()
        grid = torch.where(s32 == 0, x32.abs(), torch.where(a > self.qmax, (a - self.qmax) * s32, torch.where(
            a < self.qmin, (self.qmin - a) * s32, 0.5 * s32)))
        eps = torch.finfo(s.dtype).eps
        z = zp.to(device=x.device, dtype=torch.float32).abs() * s32 if zp is not None else 0.0
        return grid + eps * (2 * x32.abs() + z + grid) + x32.abs() * 2.0 ** -22


def intpack_format(qc: Mapping[str, Any]) -> IntPackFormat:
    """The integer layout a compressed-tensors ``quantization_config`` declares: format "pack-quantized" or
    "int-quantized", and every group's weights (compressed-tensors 0.20.0 ``quantization/quant_args.py``
    ``QuantizationArgs``, its defaults where a field is absent: num_bits 8, type "int", symmetric true) integer,
    static, one strategy (inferred from group_size as ``validate_model_after`` does), no ``scale_dtype``, int8 zero
    points, no activation ordering by group (its ``weight_g_idx``; false is none, ``validate_actorder``). ``num_bits``
    and ``group_size`` must be JSON integers and ``symmetric`` a boolean, as ``model_dump`` writes them: pydantic
    would read "false" or 0 as false, so any other value is refused by name rather than read by its truthiness."""
    fmt = qc.get("format")
    found: set[IntPackFormat] = set()
    for where, w in weight_groups(qc, FORMATS, "pack-quantized and int-quantized models"):
        found.add(_weights(f"{where}.weights", w, fmt == "pack-quantized"))
    if len(found) > 1:
        shown = sorted(f"{f.bits}-bit {f.strategy}{f.group_size or ''}{'' if f.symmetric else ' asym'}"
                       for f in found)
        raise UnsupportedConfigError("config.json", "quantization_config.config_groups", shown,
                                     "loratools reads one weight scheme per model")
    return found.pop()


def _weights(where: str, w: object, packed: bool) -> IntPackFormat:
    if not isinstance(w, Mapping):
        raise UnsupportedConfigError("config.json", where, w, "it must be an object of quantization arguments")
    for field_, want, default in (("type", "int", "int"), ("dynamic", False, False), ("scale_dtype", None, None)):
        if w.get(field_, default) != want:
            raise UnsupportedConfigError("config.json", f"{where}.{field_}", w.get(field_, default),
                                         f"loratools reads {want!r} only (static integer weights, scales in the "
                                         "weight's dtype)")
    if w.get("zp_dtype") not in (None, "torch.int8"):
        raise UnsupportedConfigError("config.json", f"{where}.zp_dtype", w.get("zp_dtype"),
                                     "loratools reads int8 zero points")
    if w.get("actorder") not in (None, False, "weight", "static"):  # "group" adds a weight_g_idx permutation
        raise UnsupportedConfigError("config.json", f"{where}.actorder", w.get("actorder"),
                                     "loratools reads weights whose groups are contiguous inputs")
    group, strategy = w.get("group_size"), w.get("strategy")
    for name, value, kinds in (("group_size", group, (int, type(None))), ("num_bits", w.get("num_bits", 8), (int,)),
                               ("symmetric", w.get("symmetric", True), (bool,))):
        if type(value) not in kinds:  # exact types: "false" (or 0) would read as true, True as 1
            raise UnsupportedConfigError("config.json", f"{where}.{name}", value,
                                         f"it must be {'true or false' if bool in kinds else 'an integer'}")
    if strategy is None:
        strategy = "tensor" if group is None else "group" if group > 0 else "channel"
    return IntPackFormat(w.get("num_bits", 8), str(strategy), group if strategy == "group" else None,
                         w.get("symmetric", True), packed)
