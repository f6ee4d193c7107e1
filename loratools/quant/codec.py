"""One protocol over every quantized weight format a merge reads and writes: a *logical* float tensor (what an
adapter adapts, what transformers holds after loading) stored as one or more *parts* under their own keys.

- FP8 (:mod:`.fp8`): logical ``P.weight`` = parts (``P.weight`` e4m3, ``P.weight_scale_inv`` or
  ``P.weight_scale``), the same shape; activation parameters beside them (``input_scale``…) are *extras*.
- MXFP4 (:mod:`.mxfp4`, gpt-oss): logical ``P`` (n, G·32, rows) = parts (``P_blocks``, ``P_scales``).
- NVFP4 (:mod:`.nvfp4`, compressed-tensors ``nvfp4-pack-quantized``): logical ``P.weight`` (rows, 2c) = parts
  (``P.weight_packed`` (rows, c), ``P.weight_scale``, ``P.weight_global_scale``); ``input_global_scale`` is extra.
- bitsandbytes (:mod:`.bnb`, as transformers saves it): 4-bit logical ``P.weight`` (out, in), the shape its quant
  state names = parts (``P.weight`` packed uint8 (⌈out·in/2⌉, 1), ``P.weight.absmax``, ``P.weight.quant_map``,
  ``P.weight.quant_state.bitsandbytes__nf4|fp4``, and with double quantization ``P.weight.nested_absmax``,
  ``P.weight.nested_quant_map``); int8 logical ``P.weight`` = parts (``P.weight`` int8, ``P.SCB``,
  ``P.weight_format``).
- GPTQ and AutoAWQ GEMM (:mod:`.gptq`): logical ``P.weight`` (out, in) = parts (``P.qweight``, ``P.qzeros``,
  ``P.scales``, GPTQ's ``P.g_idx``).

A codec finds its tensors in a model's ``{key: (dtype code, shape)}``, dequantizes parts to float32, quantizes a
float tensor back into parts like the base's, and says how far a quantization may round (verify's tolerance).

>>> codec = quant_codec({"quantization_config": {"quant_method": "mxfp4"}})
>>> st = codec.find({"e.down_proj_blocks": ("U8", (2, 8, 1, 16)), "e.down_proj_scales": ("U8", (2, 8, 1))})
>>> st["e.down_proj"].parts, st["e.down_proj"].shape
(('e.down_proj_blocks', 'e.down_proj_scales'), (2, 32, 8))
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from ..dtypes import CODE_DTYPES
from ..errors import InvalidOptionError, UnsupportedConfigError
from .bnb import Bnb4bit, Bnb4bitState, BnbInt8, bnb_codec
from .fp8 import Fp8Layout, fp8_format
from .gptq import AwqFormat, GptqFormat, awq_format, gptq_format
from .intpack import FORMATS as _INT_FORMATS
from .intpack import IntPackFormat, intpack_format
from .mxfp4 import Mxfp4Format
from .nvfp4 import Nvfp4Format, nvfp4_format

__all__ = ["ACTIVATION_PARAMS", "BnbCodec", "Fp8Codec", "GptqCodec", "IntPackCodec", "Mxfp4Codec", "Nvfp4Codec",
           "QuantCodec", "Stored", "model_dtype", "quant_codec", "reading"]

Shapes = Mapping[str, tuple[str, tuple[int, ...]]]

#: a quantized linear's activation parameters beside its weight (transformers fp8 ``activation_scale``,
#: compressed-tensors ``input_scale``, NVFP4's ``input_global_scale``…): no weight depends on them, so a merge that
#: keeps the format copies them and a plain merge, which leaves nothing quantized to use them, drops them with the
#: scales
ACTIVATION_PARAMS = ("activation_scale", "input_scale", "input_global_scale", "input_zero_point", "output_scale",
                     "output_zero_point")


@dataclass(frozen=True)
class Stored:
    """How one logical float tensor is stored: its ``parts`` (the first holds the values), its logical ``shape``,
    and ``extra`` tensors that serve only the quantized kernel (kept with the format, dropped by a plain write)."""

    key: str
    parts: tuple[str, ...]
    shape: tuple[int, ...]
    extra: tuple[str, ...] = ()


class QuantCodec(Protocol):
    """What a merge needs of a quantized format (see the module docstring)."""

    @property
    def name(self) -> str:
        """The format's name in messages ("FP8", "MXFP4")."""

    def find(self, shapes: Shapes) -> dict[str, Stored]: ...

    def dequantize(self, parts: Sequence[Tensor]) -> Tensor: ...

    def quantize(self, x: Tensor, like: Sequence[Tensor]) -> tuple[Tensor, ...]: ...

    def half_step(self, x: Tensor, parts: Sequence[Tensor]) -> Tensor:
        """The rounding a quantization of x on ``parts``' scales may leave, per element, on x's device (verify
        computes x where it runs; the parts are read on the CPU)."""


@dataclass(frozen=True)
class Fp8Codec:
    """An FP8 layout (:class:`~loratools.quant.fp8.Fp8Layout`) as a codec: every 2-D e4m3 tensor with its scale."""

    layout: Fp8Layout
    name: str = "FP8"

    def find(self, shapes: Shapes) -> dict[str, Stored]:
        """Refuses an e4m3 weight without its scale."""
        out = {}
        for k, (code, shape) in shapes.items():
            if code != "F8_E4M3" or len(shape) != 2:
                continue
            scale = self.layout.scale_key(k)
            if scale not in shapes:
                raise InvalidOptionError(f"{k} is stored as F8_E4M3 but the model has no {scale}; it is not an "
                                         "fp8 model loratools can read")
            extra = tuple(p for name in ACTIVATION_PARAMS if (p := k.removesuffix("weight") + name) in shapes)
            out[k] = Stored(k, (k, scale), tuple(shape), extra)
        return out

    def dequantize(self, parts: Sequence[Tensor]) -> Tensor:
        return self.layout.dequantize(parts[0], parts[1])

    def quantize(self, x: Tensor, like: Sequence[Tensor]) -> tuple[Tensor, ...]:
        return self.layout.quantize(x, like=like[1])

    def half_step(self, x: Tensor, parts: Sequence[Tensor]) -> Tensor:
        return self.layout.half_step(x, parts[1].to(x.device))


@dataclass(frozen=True)
class Mxfp4Codec:
    """gpt-oss MXFP4 (:class:`~loratools.quant.mxfp4.Mxfp4Format`): every uint8 ``P_blocks`` with its ``P_scales``."""

    fmt: Mxfp4Format = Mxfp4Format()
    name: str = "MXFP4"

    def find(self, shapes: Shapes) -> dict[str, Stored]:
        """Refuses blocks without their scales, and parts whose shapes do not go together."""
        out = {}
        for k, (code, shape) in shapes.items():
            if code != "U8" or not k.endswith("_blocks"):
                continue
            key = k.removesuffix("_blocks")
            blocks, scales = self.fmt.parts(key)
            if scales not in shapes:
                raise InvalidOptionError(f"{k} is stored as MXFP4 blocks but the model has no {scales}; it is not "
                                         "an mxfp4 model loratools can read")
            out[key] = Stored(key, (blocks, scales), self.fmt.logical_shape(tuple(shape), tuple(shapes[scales][1])))
        return out

    def dequantize(self, parts: Sequence[Tensor]) -> Tensor:
        return self.fmt.dequantize(parts[0], parts[1])

    def quantize(self, x: Tensor, like: Sequence[Tensor]) -> tuple[Tensor, ...]:
        return self.fmt.quantize(x)

    def half_step(self, x: Tensor, parts: Sequence[Tensor]) -> Tensor:
        return self.fmt.half_step(x, parts[1].to(x.device))


@dataclass(frozen=True)
class Nvfp4Codec:
    """compressed-tensors NVFP4 (:class:`~loratools.quant.nvfp4.Nvfp4Format`): every 2-D uint8 ``P.weight_packed``
    with its ``P.weight_scale`` and ``P.weight_global_scale``, as the logical ``P.weight`` that compressed-tensors'
    decompressor (and transformers loading the model dequantized) names it, the module peft's adapter keys name.

    ``dtype`` is the model's (config.json ``dtype``, ``torch_dtype`` before transformers 5), in which llm-compressor
    computed the group amax/6 it quantized with; a re-quantization keeps the base's global scale (fused q/k/v and
    gate/up share one, :mod:`.nvfp4`).

    >>> codec = Nvfp4Codec()
    >>> st = codec.find({"m.q.weight_packed": ("U8", (4, 8)), "m.q.weight_scale": ("F8_E4M3", (4, 1)),
    ...                  "m.q.weight_global_scale": ("F32", (1,)), "m.q.input_global_scale": ("F32", (1,))})
    >>> st["m.q.weight"].parts[0], st["m.q.weight"].shape, st["m.q.weight"].extra
    ('m.q.weight_packed', (4, 16), ('m.q.input_global_scale',))
    """

    fmt: Nvfp4Format = Nvfp4Format()
    dtype: torch.dtype = torch.float32
    name: str = "NVFP4"

    def find(self, shapes: Shapes) -> dict[str, Stored]:
        """Refuses packed codes without their group or global scale."""
        out = {}
        for k, (code, shape) in shapes.items():
            if code != "U8" or not k.endswith("weight_packed") or len(shape) != 2:
                continue
            key = k.removesuffix("_packed")
            parts = self.fmt.stored_keys(key)
            for part in parts[1:]:
                if part not in shapes:
                    raise InvalidOptionError(f"{k} is stored as NVFP4 codes but the model has no {part}; it is not "
                                             "an nvfp4 model loratools can read")
            extra = tuple(p for name in ACTIVATION_PARAMS if (p := key.removesuffix("weight") + name) in shapes)
            out[key] = Stored(key, parts, (shape[0], 2 * shape[1]), extra)
        return out

    def dequantize(self, parts: Sequence[Tensor]) -> Tensor:
        return self.fmt.dequantize(parts[0], parts[1], parts[2])

    def quantize(self, x: Tensor, like: Sequence[Tensor]) -> tuple[Tensor, ...]:
        return self.fmt.quantize(x, global_scale=like[2], dtype=self.dtype)

    def half_step(self, x: Tensor, parts: Sequence[Tensor]) -> Tensor:
        return self.fmt.half_step(x, parts[1].to(x.device), parts[2].to(x.device))


class _FormatOps(Protocol):
    def dequantize(self, parts: Sequence[Tensor]) -> Tensor: ...

    def quantize(self, x: Tensor, like: Sequence[Tensor]) -> tuple[Tensor, ...]: ...

    def half_step(self, x: Tensor, parts: Sequence[Tensor]) -> Tensor: ...


class _ByFormat:
    """A codec whose format (``fmt``) reads and writes the parts in codec order: the three verbs are its own."""

    fmt: _FormatOps

    def dequantize(self, parts: Sequence[Tensor]) -> Tensor:
        return self.fmt.dequantize(parts)

    def quantize(self, x: Tensor, like: Sequence[Tensor]) -> tuple[Tensor, ...]:
        return self.fmt.quantize(x, like)

    def half_step(self, x: Tensor, parts: Sequence[Tensor]) -> Tensor:
        return self.fmt.half_step(x, parts)


@dataclass(frozen=True)
class IntPackCodec(_ByFormat):
    """compressed-tensors integer weights (:class:`~loratools.quant.intpack.IntPackFormat`, ``pack-quantized`` and
    ``int-quantized``): every 2-D int32 ``P.weight_packed`` (or int8 ``P.weight``) with its ``P.weight_scale``,
    ``P.weight_shape`` and, asymmetric, ``P.weight_zero_point``, as the logical ``P.weight`` compressed-tensors'
    decompressor names it. A re-quantization keeps the base's scales and zero points (its grid, :mod:`.intpack`).

    >>> codec = IntPackCodec(IntPackFormat(4, "group", 32))
    >>> st = codec.find({"m.q.weight_packed": ("I32", (4, 8)), "m.q.weight_scale": ("BF16", (4, 2)),
    ...                  "m.q.weight_shape": ("I64", (2,))})
    >>> st["m.q.weight"].parts, st["m.q.weight"].shape
    (('m.q.weight_packed', 'm.q.weight_scale', 'm.q.weight_shape'), (4, 64))
    """

    fmt: IntPackFormat
    name: str = "compressed-tensors int"

    def find(self, shapes: Shapes) -> dict[str, Stored]:
        """Refuses values without their scale, shape or zero point, and a group permutation (``weight_g_idx``)."""
        code, suffix = ("I32", "weight_packed") if self.fmt.packed else ("I8", "weight")
        out = {}
        for k, (c, shape) in shapes.items():
            if c != code or not k.endswith(suffix) or len(shape) != 2:
                continue
            key = k.removesuffix("_packed")
            parts = self.fmt.stored_keys(key)
            missing = [p for p in parts[1:] if p not in shapes]
            odd = missing[0] if missing else key + "_g_idx" if key + "_g_idx" in shapes else None
            if odd is not None:  # a g_idx permutes the groups (activation order "group", before 0.20)
                raise InvalidOptionError(f"{k} is stored as {self.fmt.bits}-bit integers but the model has "
                                         f"{'no ' if missing else 'a '}{odd}; it is not a compressed-tensors model "
                                         "loratools can read")
            extra = tuple(p for name in ACTIVATION_PARAMS if (p := key.removesuffix("weight") + name) in shapes)
            out[key] = Stored(key, parts, self.fmt.logical_shape(tuple(shape), tuple(shapes[parts[1]][1])), extra)
        return out


@dataclass(frozen=True)
class GptqCodec(_ByFormat):
    """GPTQ (v1 and v2, act-order included) or AutoAWQ GEMM (:mod:`.gptq`): every 2-D int32 ``P.qweight`` with its
    ``P.qzeros`` and ``P.scales`` (and GPTQ's ``P.g_idx``), as the logical ``P.weight`` (out, in) of the
    ``nn.Linear`` it replaced, the module peft's adapter keys name. A re-quantization keeps the base's scales,
    zeros and g_idx (its grid) and re-rounds the values.

    >>> codec = GptqCodec(GptqFormat(4, 128))
    >>> st = codec.find({"m.q.qweight": ("I32", (32, 64)), "m.q.qzeros": ("I32", (2, 8)),
    ...                  "m.q.scales": ("F16", (2, 64)), "m.q.g_idx": ("I32", (256,)), "m.q.bias": ("F16", (64,))})
    >>> st["m.q.weight"].parts, st["m.q.weight"].shape
    (('m.q.qweight', 'm.q.qzeros', 'm.q.scales', 'm.q.g_idx'), (64, 256))
    """

    fmt: GptqFormat | AwqFormat

    @property
    def name(self) -> str:
        return self.fmt.name

    def find(self, shapes: Shapes) -> dict[str, Stored]:
        """Refuses values without their zeros or scales, and parts whose shapes do not go together."""
        out = {}
        for k, (code, shape) in shapes.items():
            if not k.endswith(".qweight"):
                continue
            prefix = k.removesuffix(".qweight")
            parts = self.fmt.stored_keys(prefix, shapes)
            extra = tuple(p for p in (f"{prefix}.qzeros",) if p in shapes and p not in parts)
            out[f"{prefix}.weight"] = Stored(f"{prefix}.weight", parts, self.fmt.logical_shape(prefix, shapes), extra)
        return out


#: the key :class:`BnbCodec` gives :mod:`.bnb` for a weight known by its parts alone (the codec protocol passes
#: tensors, not keys); :meth:`BnbCodec.find` has checked every real key's parts before any is read
_BNB_KEY = "bitsandbytes.weight"
_QS = ".quant_state.bitsandbytes__"
#: the safetensors codes bitsandbytes stores codes in: a tensor of these that no weight owns cannot be placed
_BNB_CODES = frozenset({"U8", "I8"})


@dataclass(frozen=True)
class BnbCodec:
    """bitsandbytes weights as transformers 5.23 saves them (:mod:`.bnb`, bitsandbytes 0.50.2): ``inner`` is the
    4-bit (NF4/FP4, double-quantized or not) or int8 codec of the model's ``quantization_config``; ``read`` reads a
    stored tensor (the 4-bit logical shape (out, in) is in each weight's quant state, a small JSON blob).

    A re-quantized 4-bit weight keeps the base's blocksize, nesting and dtype (from its quant state). With double
    quantization its quant state holds the new ``nested_offset`` (the mean absmax): bitsandbytes reads the blob
    with ``json.loads`` and the offset as float32, so the blob is written at the base's length (rewrite_model plans
    every offset first) — padded with spaces, or with the offset as the shortest decimal of the same float32.

    >>> import torch
    >>> from loratools.quant.bnb import Bnb4bit
    >>> t = {f"p.{k}": v for k, v in Bnb4bit("nf4").quantize("weight", torch.ones(4, 64)).items()}
    >>> codec = BnbCodec(Bnb4bit("nf4"), t.__getitem__)
    >>> st = codec.find({k: ({torch.uint8: "U8"}.get(v.dtype, "F32"), tuple(v.shape)) for k, v in t.items()})
    >>> st["p.weight"].shape, len(st["p.weight"].parts)
    ((4, 64), 4)
    """

    inner: Bnb4bit | BnbInt8
    read: Callable[[str], Tensor]
    _states: dict[str, Bnb4bitState] = field(default_factory=dict, compare=False, repr=False)

    @property
    def name(self) -> str:
        if isinstance(self.inner, BnbInt8):
            return "bitsandbytes int8"
        return f"bitsandbytes {self.inner.quant_type.upper()}"

    def find(self, shapes: Shapes) -> dict[str, Stored]:
        """Every 4-bit weight (by its quant state) or int8 weight (an int8 2-D ``P.weight``), checked against its
        quant state; refuses a weight without its parts, and a uint8/int8 tensor that no weight owns."""
        out = self._find4(shapes) if isinstance(self.inner, Bnb4bit) else self._find8(shapes)
        owned = {p for st in out.values() for p in st.parts}
        stray = sorted(k for k, (code, _) in shapes.items() if code in _BNB_CODES and k not in owned)
        if stray:
            raise InvalidOptionError(f"{stray[0]} is stored as {shapes[stray[0]][0]} but is no part of a "
                                     f"{self.name} weight loratools can place; it is not a bitsandbytes model "
                                     "loratools can read (dequantize it with transformers first)")
        return out

    def _find4(self, shapes: Shapes) -> dict[str, Stored]:
        assert isinstance(self.inner, Bnb4bit)
        out = {}
        for k in shapes:
            if _QS not in k:
                continue
            key, quant_type = k.rsplit(_QS, 1)
            if quant_type != self.inner.quant_type:
                raise InvalidOptionError(f"{k} holds a bitsandbytes {quant_type} weight but config.json's "
                                         f"bnb_4bit_quant_type is {self.inner.quant_type}; it is not a bitsandbytes "
                                         "model loratools can read")
            parts = self.inner.stored_keys(key, shapes)
            missing = [p for p in parts if p not in shapes]
            if missing:
                raise InvalidOptionError(f"{key} is stored as bitsandbytes {quant_type} but the model has no "
                                         f"{missing[0]}; it is not a bitsandbytes model loratools can read")
            out[key] = Stored(key, tuple(parts), self._state(key, parts, shapes).shape)
        return out

    def _state(self, key: str, parts: Sequence[str], shapes: Shapes) -> Bnb4bitState:
        """``key``'s quant state, checked with its parts' shapes and dtypes (the small tables read, the rest
        described), read once."""
        assert isinstance(self.inner, Bnb4bit)
        if key not in self._states:
            small = {f"{key}.quant_map", f"{key}.nested_quant_map", self.inner.state_key(key)}
            stored = {p: self.read(p) if p in small else
                      torch.empty(shapes[p][1], dtype=CODE_DTYPES[shapes[p][0]], device="meta") for p in parts}
            self._states[key] = self.inner.state(key, stored)
        return self._states[key]

    def _find8(self, shapes: Shapes) -> dict[str, Stored]:
        assert isinstance(self.inner, BnbInt8)
        out = {}
        for k, (code, shape) in shapes.items():
            if code != "I8":
                continue
            scb = self.inner.scb_key(k)
            if not k.endswith("weight") or len(shape) != 2 or shapes.get(scb) != ("F32", (shape[0],)):
                raise InvalidOptionError(f"{k} is stored as int8 {list(shape)} but the model has no float32 {scb} of "
                                         f"{shape[0] if shape else '?'} row scales beside it; it is not a "
                                         "bitsandbytes int8 model loratools can read")
            parts = self.inner.stored_keys(k, shapes)
            fmt = parts[2:]
            if fmt and int(self.read(fmt[0]).reshape(-1)[0]) != 0:
                raise UnsupportedConfigError(fmt[0], "weight_format", int(self.read(fmt[0]).reshape(-1)[0]),
                                             "bitsandbytes 0.50.2 saves the row format (0) only")
            out[k] = Stored(k, tuple(parts), tuple(shape))
        return out

    def _names(self, n: int) -> list[str]:
        """The stored keys of ``n`` parts, in :meth:`find`'s order (the optional ones last)."""
        every = {f"{_BNB_KEY}.nested_absmax": None, _BNB_KEY.removesuffix("weight") + "weight_format": None}
        return self.inner.stored_keys(_BNB_KEY, every)[:n]

    def _dtype(self, stored: Mapping[str, Tensor]) -> torch.dtype:
        """The dtype a 4-bit weight was quantized from (its quant state's ``dtype``), float32 for int8."""
        if isinstance(self.inner, BnbInt8):
            return torch.float32
        return _MODEL_DTYPES[self.inner.state(_BNB_KEY, stored).dtype]

    def dequantize(self, parts: Sequence[Tensor]) -> Tensor:
        """As ``dequantize_4bit`` gives it: code · absmax in float32, rounded to the quant state's dtype (what a
        bitsandbytes linear of a bfloat16 model computes with, and what peft merges into), held in float32."""
        stored = dict(zip(self._names(len(parts)), parts))
        return self.inner.dequantize(_BNB_KEY, stored).to(self._dtype(stored)).to(torch.float32)

    def quantize(self, x: Tensor, like: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """bitsandbytes' rule on ``x`` in the weight's dtype, as transformers quantizes a model and peft re-quantizes
        a merge (``Params4bit(w)``, ``w`` in the model's dtype)."""
        names = self._names(len(like))
        stored = dict(zip(names, like))
        out = self.inner.quantize(_BNB_KEY, x.to(self._dtype(stored)), like=stored)
        if isinstance(self.inner, Bnb4bit):
            state = self.inner.state_key(_BNB_KEY)
            out[state] = _fit_state(out[state], like[names.index(state)].numel())
        return tuple(out[k] for k in names)

    def half_step(self, x: Tensor, parts: Sequence[Tensor]) -> Tensor:
        """:mod:`.bnb`'s bound, and for a bfloat16/float16 weight the rounding of x to that dtype before quantizing
        and of the result after: at most eps·(|x| + the bound) more."""
        stored = dict(zip(self._names(len(parts)), parts))
        bound = self.inner.half_step(_BNB_KEY, x, stored)
        dtype = self._dtype(stored)
        if dtype == torch.float32:
            return bound
        eps = torch.finfo(dtype).eps
        return bound * (1 + eps) + eps * x.abs().float()


def _fit_state(blob: Tensor, size: int) -> Tensor:
    """A quant state's JSON blob at ``size`` bytes: as bitsandbytes writes it when it has that length, else with
    the nested offset as the shortest decimal of its float32 value (what bitsandbytes reads it as) and padded with
    spaces, which ``json.loads`` skips. Refused when even that does not fit."""
    if blob.numel() != size:
        d = json.loads(bytes(blob.tolist()).decode("utf-8"))
        if blob.numel() > size and "nested_offset" in d:
            d["nested_offset"] = float(str(np.float32(d["nested_offset"])))
            blob = torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)
        if blob.numel() > size:
            raise InvalidOptionError(f"a re-quantized bitsandbytes quant state needs {blob.numel()} bytes where the "
                                     f"base's has {size}; merge with `dtype` bfloat16 to write the model unquantized")
        blob = torch.cat([blob, torch.full((size - blob.numel(),), ord(" "), dtype=torch.uint8)])
    return blob


def reading(codec: QuantCodec, read: Callable[[str], Tensor]) -> QuantCodec:
    """``codec`` finding its tensors in another model, read by ``read`` (a merged model checked against its base:
    a bitsandbytes codec reads each weight's quant state from the model it is given)."""
    return replace(codec, read=read, _states={}) if isinstance(codec, BnbCodec) else codec


#: config.json's dtype names of the float dtypes a model is quantized from
_MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_dtype(config: Mapping[str, Any]) -> torch.dtype:
    """The dtype a model's weights had when quantized: config.json ``dtype`` (``torch_dtype`` before transformers 5;
    ``text_config``'s for a multimodal model), float32 (transformers' default) when it names none."""
    found = [c.get(f) for c in (config, config.get("text_config")) if isinstance(c, Mapping)
             for f in ("dtype", "torch_dtype") if c.get(f) is not None]
    if not found:
        return torch.float32
    name = str(found[0]).removeprefix("torch.")
    if name not in _MODEL_DTYPES:
        raise UnsupportedConfigError("config.json", "dtype", found[0], "a quantized model's dtype is one of "
                                     + ", ".join(_MODEL_DTYPES))
    return _MODEL_DTYPES[name]


def quant_codec(config: Mapping[str, Any] | None, read: Callable[[str], Tensor] | None = None) -> QuantCodec | None:
    """The codec a model's ``config.json`` declares (``quantization_config.quant_method``: ``mxfp4``;
    ``compressed-tensors`` with format ``nvfp4-pack-quantized``, ``pack-quantized`` or ``int-quantized``; ``gptq``;
    ``awq`` (GEMM); ``bitsandbytes``, whose codec reads each weight's
    quant state through ``read``; or the FP8 methods of :func:`~loratools.quant.fp8.fp8_format`); None without a
    ``quantization_config``. Refuses other methods by name."""
    qc = (config or {}).get("quantization_config")
    inner = bnb_codec(config)
    if inner is not None:
        if read is None:
            raise InvalidOptionError("a bitsandbytes model's codec reads its quant states: pass `read`")
        assert isinstance(inner, Bnb4bit | BnbInt8)
        return BnbCodec(inner, read)
    if isinstance(qc, Mapping) and qc.get("quant_method") == "mxfp4":
        return Mxfp4Codec()
    if isinstance(qc, Mapping) and qc.get("quant_method") in ("gptq", "awq"):
        return GptqCodec(gptq_format(qc) if qc["quant_method"] == "gptq" else awq_format(qc))
    if isinstance(qc, Mapping) and qc.get("quant_method") == "compressed-tensors" \
            and qc.get("format") == "nvfp4-pack-quantized":
        assert config is not None
        return Nvfp4Codec(nvfp4_format(qc), model_dtype(config))
    if isinstance(qc, Mapping) and qc.get("quant_method") == "compressed-tensors" \
            and qc.get("format") in _INT_FORMATS:
        return IntPackCodec(intpack_format(qc))
    layout = fp8_format(config)
    return Fp8Codec(layout) if layout is not None else None
