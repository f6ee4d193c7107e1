"""GPTQ and AutoAWQ (GEMM) integer weights as their producers save them and vLLM reads them, dequantized and
re-quantized on the base's own grid, as :class:`~loratools.quant.codec.GptqCodec` merges them.

A quantized linear ``P`` of logical shape (out, in), b-bit, stores (AutoGPTQ / GPTQModel ``QuantLinear``; vLLM
0.32.0 ``model_executor/layers/quantization/auto_gptq.py`` ``create_weights``, ``utils/quant_utils.py``
``pack_rows``)::

    P.qweight  int32 (in/(32/b), out)   packed along the inputs: word r holds input rows 32/b·r … at bit j·b
    P.qzeros   int32 (G, out/(32/b))    packed along the outputs: word c holds output columns 32/b·c … at bit j·b
    P.scales   float16 (G, out)
    P.g_idx    int32 (in,)              the group of each input row: i // group_size, or with act-order (desc_act)
                                        a permuted assignment; absent, contiguous groups of ``group_size``

and AutoAWQ's GEMM layout (compressed-tensors 0.20.0 ``entrypoints/convert/converters/autoawq.py``
``AutoAWQConverter``, written by the vLLM project; vLLM ``quant_utils.py`` ``awq_pack``), 4-bit only::

    P.qweight  int32 (in, out/8)        packed along the outputs, word c holding columns 8c + [0, 2, 4, 6, 1, 3, 5, 7]
    P.qzeros   int32 (G, out/8)         the same order (absent, or unused, with ``zero_point: false``: zero 8)
    P.scales   float16 (G, out)         G = in / group_size, groups of contiguous inputs

Values and zeros are unsigned (0 … 2^b − 1). Dequantization (GPTQModel ``nn_modules/qlinear/__init__.py``
``PackableQuantLinear.dequantize_weight``; vLLM ``quantize_weights``'s ``w_ref``; the converter's output as
compressed-tensors decompresses it) in the scales' dtype::

    W[o, i] = (q[i, o] − z[g(i), o]) · s[g(i), o]      the integer difference exact, the product rounded once

A GPTQ ``checkpoint_format`` "gptq" (v1, the default) stores every zero minus one, as one subtraction on each
int32 word: stored = words(z) − Σ_j 2^(j·b) mod 2^32, read back as words(z) = stored + Σ_j 2^(j·b) (GPTQModel
``utils/model.py`` ``convert_gptq_v2_to_v1_format_module`` and ``convert_gptq_v1_to_v2_format_module``, which
transformers' GPTQ loading calls); "gptq_v2" stores z as it is. The word arithmetic gives every zero back, a zero of
0 included (its −1 borrows from the next field, and the addition carries it back); a reading field by field (vLLM's
exllama kernel adds one to each field) differs only where a stored field is 2^b − 1, which it reads as the zero 2^b,
outside the grid: never a quantizer's zero, always such a borrow.

A merge keeps the base's grid — scales, zeros, g_idx — and re-rounds only the values, as
:class:`~loratools.quant.intpack.IntPackFormat` does for compressed-tensors: q = clamp(round(x/s + z), 0, 2^b − 1),
x/s in float32 (GPTQ's quantizer divides in float32). Both are one integer grid: shifted by 2^(b−1), q and z are
compressed-tensors' signed values and zero points, and the grid an int-quantized ``IntPackFormat`` of "group"
strategy over the logical (out, in), whose dequantization, quantization and half step this module uses as they are
— with act-order, on the inputs sorted by group (GPTQ's groups are equal), else with one group per element.

>>> fmt = GptqFormat(4, 8, v1=False)
>>> x = (torch.arange(-4.0, 4.0) / 4).expand(8, 8)  # (out, in)
>>> like = fmt.pack(torch.zeros(8, 8, dtype=torch.int16), torch.full((1, 8), 8), torch.full((1, 8), 0.25))
>>> parts = fmt.quantize(x, like)
>>> [tuple(p.shape) for p in parts], fmt.dequantize(parts)[0].tolist()
([(1, 8), (1, 1), (1, 8), (8,)], [-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import CorruptFileError, InvalidOptionError, ShapeMismatchError, UnsupportedConfigError
from .intpack import IntPackFormat

__all__ = ["AwqFormat", "GptqFormat", "awq_format", "gptq_format"]

Shapes = Mapping[str, tuple[str, tuple[int, ...]]]

#: the float dtypes (and safetensors codes) scales are stored in
_SCALE_CODES = frozenset({"F16", "BF16", "F32"})
#: AutoAWQ's order of the eight 4-bit columns within a word (vLLM ``awq_pack``'s interleave)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
#: GPTQModel's ``FORMAT`` values whose tensors are the GPTQ layout above
GPTQ_FORMATS = ("gptq", "gptq_v2")


def _unpack(words: Tensor, bits: int, dim: int) -> Tensor:
    """int32 words → their unsigned b-bit fields (int16), field j of a word at bit j·b, the fields of a word
    consecutive along ``dim`` (0: rows, 1: columns)."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    f = ((words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).to(torch.int16)  # (r, c, per)
    if dim == 1:
        return f.reshape(words.shape[0], -1)
    return f.permute(0, 2, 1).reshape(-1, words.shape[1])


def _pack(fields: Tensor, bits: int, dim: int) -> Tensor:
    """The inverse of :func:`_unpack`: unsigned b-bit fields → int32 words (the sign bit wraps as int32 does)."""
    per = 32 // bits
    f = fields.to(torch.int32)
    f = f.reshape(f.shape[0], -1, per) if dim == 1 else f.reshape(-1, per, f.shape[1]).permute(0, 2, 1)
    f = f << (torch.arange(per, dtype=torch.int32) * bits)
    out = f[..., 0]
    for j in range(1, per):  # the fields do not overlap: OR is their sum
        out = out | f[..., j]
    return out.contiguous()


def _dtype_name(t: Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


class _IntGrid:
    """What GPTQ and AWQ share: a grid read by :meth:`grid` — unsigned values q (out, in), zeros z and scales s
    (G, out), each input's group g (in,) — written back by :meth:`values`, and :class:`IntPackFormat`'s arithmetic
    on it."""

    bits: int

    def grid(self, parts: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def values(self, q: Tensor, like: Sequence[Tensor]) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def spread(self, parts: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """(q, z, s) each over the logical (out, in): every input's zero and scale those of its group."""
        q, z, s, g = self.grid(parts)
        return q, z[g].t(), s[g].t()

    def _as_intpack(self, parts: Sequence[Tensor], s_dtype: torch.dtype | None = None
                    ) -> tuple[IntPackFormat, tuple[Tensor, Tensor, Tensor], Tensor | None]:
        """The grid as compressed-tensors' int-quantized "group" one, signed (q and z shifted by 2^(b−1)), and the
        order of the inputs it is in: None when the groups are contiguous inputs; with act-order, the inputs
        sorted by group (every group the same size), else one group per element."""
        q, z, s, g = self.grid(parts)
        off, n_in = 1 << (self.bits - 1), q.shape[1]
        size, order = n_in // s.shape[0], None
        if n_in % s.shape[0] or not torch.equal(g, torch.arange(n_in) // size):
            order = torch.argsort(g, stable=True)
            if n_in % s.shape[0] or not torch.equal(g[order], torch.arange(n_in) // size):
                z, s, size, order = z[g], s[g], 1, None
            else:
                q = q[:, order]
        fmt = IntPackFormat(self.bits, "group", size, symmetric=False, packed=False)
        return fmt, ((q - off).to(torch.int8), (s if s_dtype is None else s.to(s_dtype)).t(), (z - off).t()), order

    def dequantize(self, parts: Sequence[Tensor]) -> Tensor:
        """W = (q − z)·s in the scales' dtype (the module's rule), as float32 (exact)."""
        fmt, signed, order = self._as_intpack(parts)
        return _unsorted(fmt.dequantize(signed), order)

    def quantize(self, x: Tensor, like: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """``x`` (out, in) on the grid of ``like`` (the base's parts): new values, every other part as the base's."""
        fmt, signed, order = self._as_intpack(like, torch.float32)
        if tuple(x.shape) != tuple(signed[0].shape):
            raise ShapeMismatchError("weight", tuple(signed[0].shape), tuple(x.shape))
        x = x.to(torch.float32) if order is None else x.to(torch.float32)[:, order.to(x.device)]
        q = fmt.quantize(x, signed)[0].to(torch.int16) + (1 << (self.bits - 1))
        return self.values(_unsorted(q, order), like)

    def half_step(self, x: Tensor, parts: Sequence[Tensor]) -> Tensor:
        """:meth:`IntPackFormat.half_step` on the grid: ½ s inside it, the clamp beyond it, and the roundings of the
        scales' dtype."""
        fmt, signed, order = self._as_intpack(parts)
        return _unsorted(fmt.half_step(x if order is None else x[:, order.to(x.device)], signed), order)


def _unsorted(t: Tensor, order: Tensor | None) -> Tensor:
    """``t``'s columns, in ``order`` (the inputs sorted by group), put back in input order."""
    if order is None:
        return t
    out = torch.empty_like(t)
    out[:, order.to(t.device)] = t
    return out


def _shown(stored: tuple[str, tuple[int, ...]]) -> str:
    """A stored tensor's code and shape as messages (and the shape checks) write them: ``I32 [8, 64]``."""
    return f"{stored[0]} {[int(d) for d in stored[1]]}"


def _check_scales(key: str, shapes: Shapes, want: tuple[int, ...]) -> None:
    if shapes[key][0] not in _SCALE_CODES or tuple(shapes[key][1]) != want:
        raise ShapeMismatchError(key, f"float {list(want)}", _shown(shapes[key]))


def _need(fmt: str, values: str, part: str, shapes: Shapes) -> None:
    if part not in shapes:
        raise InvalidOptionError(f"{values} is stored as {fmt} values but the model has no {part}; it is not a "
                                 f"{fmt} model loratools can read")


@dataclass(frozen=True)
class GptqFormat(_IntGrid):
    """GPTQ (the module's docstring): ``bits`` 4 or 8, ``group_size`` inputs per group (−1: one group), ``v1``
    (checkpoint format "gptq": zeros stored minus one), ``sym`` (the config's ``sym: true``: every zero must be
    2^(b−1), checked when read)."""

    bits: int
    group_size: int
    v1: bool = True
    name: str = "GPTQ"
    #: a check on the tensors, not a layout: two formats that differ only here read the same model
    sym: bool = field(default=False, compare=False)

    @property
    def per(self) -> int:
        return 32 // self.bits

    def stored_keys(self, prefix: str, shapes: Shapes) -> tuple[str, ...]:
        """``P`` → its parts: qweight, qzeros, scales, and g_idx when the model has one."""
        keys = (f"{prefix}.qweight", f"{prefix}.qzeros", f"{prefix}.scales")
        return (*keys, f"{prefix}.g_idx") if f"{prefix}.g_idx" in shapes else keys

    def logical_shape(self, prefix: str, shapes: Shapes) -> tuple[int, int]:
        """(out, in) from the stored shapes, each part's shape checked against the others."""
        parts = self.stored_keys(prefix, shapes)
        for p in parts[1:3]:
            _need("GPTQ", parts[0], p, shapes)
        rows, out = _matrix(parts[0], shapes)
        n_in = rows * self.per
        groups = shapes[parts[2]][1][0] if len(shapes[parts[2]][1]) == 2 else 0
        if groups < 1:
            raise ShapeMismatchError(parts[2], "float [groups, outputs], one group or more", _shown(shapes[parts[2]]))
        if len(parts) == 3 and groups != self._groups(n_in):
            raise ShapeMismatchError(parts[2], f"{self._groups(n_in)} groups of {self.group_size} inputs", groups)
        _check_scales(parts[2], shapes, (groups, out))
        if out % self.per or _shown(shapes[parts[1]]) != f"I32 {[groups, out // self.per]}":
            raise ShapeMismatchError(parts[1], f"I32 {[groups, out // self.per]}", _shown(shapes[parts[1]]))
        if len(parts) == 4 and _shown(shapes[parts[3]]) != f"I32 {[n_in]}":
            raise ShapeMismatchError(parts[3], f"I32 {[n_in]} (a group index per input)", _shown(shapes[parts[3]]))
        return out, n_in

    def _groups(self, n_in: int) -> int:
        return 1 if self.group_size == -1 else -(-n_in // self.group_size)

    def grid(self, parts: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(q, z, s, g): z with v1's one added back, s in the scales' dtype, g from g_idx (checked: a group the
        weight has) or contiguous groups of ``group_size``."""
        qweight, qzeros, scales = parts[0], parts[1], parts[2]
        q = _unpack(qweight, self.bits, 0).t().contiguous()
        n_in = q.shape[1]
        g = parts[3].long() if len(parts) > 3 else \
            torch.arange(n_in) // (n_in if self.group_size == -1 else self.group_size)
        if g.numel() and (int(g.min()) < 0 or int(g.max()) >= scales.shape[0]):
            raise CorruptFileError("g_idx", f"it names groups {int(g.min())}…{int(g.max())} of a weight with "
                                            f"{scales.shape[0]}; the model is damaged, download it again")
        z = _unpack(qzeros + self._v1_words() if self.v1 else qzeros, self.bits, 1)
        if self.sym and not bool((z == 1 << (self.bits - 1)).all()):  # vLLM would read 2^(b−1), transformers z
            raise CorruptFileError("qzeros", f"config.json says sym but it holds zeros other than "
                                             f"{1 << (self.bits - 1)}{' (stored minus one, format gptq)' * self.v1}; "
                                             "the model is damaged or its quantization_config is not its own")
        return q, z, scales, g

    def values(self, q: Tensor, like: Sequence[Tensor]) -> tuple[Tensor, ...]:
        return (_pack(q.t(), self.bits, 0), *like[1:])

    def pack(self, q: Tensor, z: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Parts from unsigned values q (out, in), zeros z and scales s (G, out), contiguous groups: how a GPTQ
        checkpoint of this format stores them (v1: zeros minus one)."""
        n_in = q.shape[1]
        g = torch.arange(n_in, dtype=torch.int32) // (n_in if self.group_size == -1 else self.group_size)
        zeros = _pack(z, self.bits, 1)
        return (_pack(q.t(), self.bits, 0), zeros - self._v1_words() if self.v1 else zeros, s.to(torch.float16), g)

    def _v1_words(self) -> Tensor:
        """Σ_j 2^(j·b): one in every field of a word, what v1 subtracts from each word of zeros (int32 arithmetic
        wraps, as the uint32 words it stands for)."""
        return torch.tensor(sum(1 << (j * self.bits) for j in range(self.per)), dtype=torch.int32)


@dataclass(frozen=True)
class AwqFormat(_IntGrid):
    """AutoAWQ GEMM (the module's docstring): 4-bit, ``group_size`` contiguous inputs per group (−1: one group),
    ``zero_point`` (asymmetric; without it every zero is 8)."""

    group_size: int
    zero_point: bool = True
    bits: int = 4
    name: str = "AWQ"

    def stored_keys(self, prefix: str, shapes: Shapes) -> tuple[str, ...]:
        """``P`` → its parts: qweight, scales, and qzeros with zero points (without, a stored qzeros is extra)."""
        keys = (f"{prefix}.qweight", f"{prefix}.scales")
        return (*keys, f"{prefix}.qzeros") if self.zero_point else keys

    def logical_shape(self, prefix: str, shapes: Shapes) -> tuple[int, int]:
        parts = self.stored_keys(prefix, shapes)
        for p in parts[1:]:
            _need("AWQ", parts[0], p, shapes)
        n_in, words = _matrix(parts[0], shapes)
        size = n_in if self.group_size == -1 else self.group_size
        if n_in % size:
            raise ShapeMismatchError(parts[0], f"inputs in whole groups of {size}", n_in)
        _check_scales(parts[1], shapes, (n_in // size, 8 * words))
        if self.zero_point and _shown(shapes[parts[2]]) != f"I32 {[n_in // size, words]}":
            raise ShapeMismatchError(parts[2], f"I32 {[n_in // size, words]}", _shown(shapes[parts[2]]))
        return 8 * words, n_in

    def grid(self, parts: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(q, z, s, g), the columns put back in order, g contiguous groups."""
        qweight, scales = parts[0], parts[1]
        q = _awq_columns(_unpack(qweight, 4, 1)).t().contiguous()
        z = _awq_columns(_unpack(parts[2], 4, 1)) if self.zero_point else torch.full(scales.shape, 8, dtype=torch.int16)
        return q, z, scales, torch.arange(q.shape[1]) // (q.shape[1] // scales.shape[0])

    def values(self, q: Tensor, like: Sequence[Tensor]) -> tuple[Tensor, ...]:
        return (_pack(_awq_fields(q.t()), 4, 1), *like[1:])


def _awq_columns(fields: Tensor) -> Tensor:
    """Unpacked AWQ fields (r, 8c) → the values in column order (field j of word c is column 8c + AWQ_ORDER[j])."""
    out = torch.empty_like(fields)
    idx = (torch.arange(fields.shape[1]) // 8) * 8 + torch.tensor(AWQ_ORDER).repeat(fields.shape[1] // 8)
    out[:, idx] = fields
    return out


def _awq_fields(values: Tensor) -> Tensor:
    """The inverse of :func:`_awq_columns`: values in column order → the fields to pack."""
    idx = (torch.arange(values.shape[1]) // 8) * 8 + torch.tensor(AWQ_ORDER).repeat(values.shape[1] // 8)
    return values[:, idx]


def _matrix(key: str, shapes: Shapes) -> tuple[int, int]:
    code, shape = shapes[key]
    if code != "I32" or len(shape) != 2 or min(shape) < 1:
        raise ShapeMismatchError(key, "a 2-D I32 tensor of packed values", _shown((code, shape)))
    return int(shape[0]), int(shape[1])


def _int_field(qc: Mapping[str, Any], names: Sequence[str], default: int) -> int:
    value = next((qc[n] for n in names if n in qc), default)
    if type(value) is not int or (value <= 0 and value != -1):
        raise UnsupportedConfigError("config.json", f"quantization_config.{names[0]}", value,
                                     "it must be a positive integer (or -1 for one group)")
    return value


def _named_format(qc: Mapping[str, Any], legacy: str, default: str) -> str:
    """The layout a config names in ``format`` or its ``legacy`` field, lower-cased. transformers 5.23's
    ``GPTQConfig``/``AwqConfig`` let the legacy field win and write both equal; two that differ are refused, as
    runtimes that read one or the other would read the model differently (v1 zeros are stored minus one)."""
    names = {f: str(qc[f]).lower() for f in ("format", legacy) if qc.get(f) is not None}
    if len(set(names.values())) > 1:
        raise UnsupportedConfigError("config.json", f"quantization_config.{legacy}", names[legacy],
                                     f"it differs from quantization_config.format {names['format']!r}; make them "
                                     "the same (the one the checkpoint was saved in)")
    return next(iter(names.values()), default)


def gptq_format(qc: Mapping[str, Any]) -> GptqFormat:
    """The GPTQ layout a ``quantization_config`` (``quant_method: "gptq"``) declares, with transformers 5.23
    ``utils/quantization_config.py`` ``GPTQConfig``'s fields and defaults: ``bits``, ``group_size`` (128),
    ``format`` or the older ``checkpoint_format`` ("gptq"; :func:`_named_format`), ``desc_act`` (any: g_idx
    carries it) and ``sym`` (a boolean). Refuses 2- and 3-bit weights, other formats, other pack dtypes and
    per-module ``dynamic`` rules. With ``sym`` true, a zero other than 2^(b−1) is refused when read: vLLM 0.32.0
    (``auto_gptq.py``, ``zero_points=False``) dequantizes with 2^(b−1) and never reads qzeros, GPTQModel's torch
    kernel (transformers' loading) with the stored zeros, so such a model has no one meaning."""
    bits = qc.get("bits")
    if type(bits) is not int or bits not in (4, 8):  # 4.0 or "4" is not what GPTQConfig writes
        raise UnsupportedConfigError("config.json", "quantization_config.bits", bits,
                                     "loratools reads quant_method gptq with 4- or 8-bit weights; dequantize "
                                     "the model first")
    fmt = _named_format(qc, "checkpoint_format", "gptq")
    if fmt not in GPTQ_FORMATS:
        raise UnsupportedConfigError("config.json", "quantization_config.checkpoint_format", fmt,
                                     "loratools reads the gptq (v1) and gptq_v2 formats; save the model in one")
    if qc.get("pack_dtype", "int32") not in ("int32", "torch.int32"):
        raise UnsupportedConfigError("config.json", "quantization_config.pack_dtype", qc.get("pack_dtype"),
                                     "loratools reads GPTQ values packed in int32")
    if qc.get("dynamic"):
        raise UnsupportedConfigError("config.json", "quantization_config.dynamic", qc.get("dynamic"),
                                     "loratools reads GPTQ models with one setting for every module")
    sym = qc.get("sym")
    if sym is not None and type(sym) is not bool:  # "false" would read as true
        raise UnsupportedConfigError("config.json", "quantization_config.sym", sym, "it must be true or false")
    return GptqFormat(bits, _int_field(qc, ("group_size",), 128), v1=fmt == "gptq", sym=sym is True)


def awq_format(qc: Mapping[str, Any]) -> AwqFormat:
    """The AutoAWQ layout a ``quantization_config`` (``quant_method: "awq"``) declares: transformers 5.23
    ``AwqConfig`` (``format``, or the older ``version``, "gemm"; ``bits``, ``group_size`` 128, ``zero_point``
    true) and vLLM ``auto_awq.py`` ``AutoAWQConfig.from_config`` (``w_bit``, ``q_group_size``). Refuses other bits
    and the gemv, gemv_fast and llm-awq layouts by name — llm-awq also as ``backend: "llm-awq"``, which
    ``AwqConfig.post_init`` reads as that format whatever ``version`` says."""
    version = _named_format(qc, "version", "gemm")
    if version != "gemm" or str(qc.get("backend")).lower() == "llm-awq":
        raise UnsupportedConfigError("config.json", "quantization_config.version", version if version != "gemm"
                                     else "gemm with backend llm-awq",
                                     "loratools reads AutoAWQ's gemm layout only; dequantize the model first")
    bits = next((qc[n] for n in ("bits", "w_bit") if n in qc), 4)
    if type(bits) is not int or bits != 4:
        raise UnsupportedConfigError("config.json", "quantization_config.bits", bits,
                                     "AutoAWQ's gemm layout is 4-bit; loratools reads no other")
    zero_point = qc.get("zero_point", True)
    if type(zero_point) is not bool:
        raise UnsupportedConfigError("config.json", "quantization_config.zero_point", zero_point,
                                     "it must be true or false")
    return AwqFormat(_int_field(qc, ("group_size", "q_group_size"), 128), zero_point)
