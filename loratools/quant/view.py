"""A quantized model's tensors as the float tensors they stand for, read-only: what the commands that only read a
base (``extract``, ``inspect --base``) see, and the plan's view of a merge (:mod:`loratools.merge.quantized`).

Each tensor a codec (:mod:`.codec`) finds is listed under its logical name and shape in float32 and dequantized
when read (FP8 ``P.weight`` from ``P.weight`` + its scale; MXFP4 ``P`` from ``P_blocks`` + ``P_scales``; NVFP4
``P.weight`` from ``P.weight_packed`` + its two scales; GPTQ and AWQ ``P.weight`` (out, in) from ``P.qweight``,
``P.qzeros``, ``P.scales`` (and ``P.g_idx``); bitsandbytes ``P.weight`` (out, in) from its packed codes,
absmax and quant state, or its int8 rows and ``SCB``); its parts are not listed; every other tensor is as stored.
The view reads through its ``source`` (a :class:`~loratools.io.ModelReader`, or anything with ``shapes()`` and
``get(key)``): it opens no file itself.

>>> import torch
>>> from loratools.quant.mxfp4 import Mxfp4Format
>>> blocks, scales = Mxfp4Format().quantize(torch.ones(1, 32, 2))
>>> class Src:
...     t = {"e.down_proj_blocks": blocks, "e.down_proj_scales": scales, "norm": torch.ones(2)}
...     def shapes(self): return {k: ({torch.uint8: "U8"}.get(v.dtype, "F32"), tuple(v.shape)) for k, v in self.t.items()}
...     def get(self, key): return self.t[key]
>>> view = dequantized(Src(), {"quantization_config": {"quant_method": "mxfp4"}})
>>> view.keys(), view.shape("e.down_proj"), view.get("e.down_proj").unique().tolist()
(['norm', 'e.down_proj'], (1, 32, 2), [1.0])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

from torch import Tensor

from ..errors import InvalidOptionError, NonFiniteError
from ..linalg import all_finite
from .codec import QuantCodec, Shapes, Stored, quant_codec

__all__ = ["Dequantized", "TensorSource", "dequantized", "logical_shapes"]

#: the safetensors codes of float tensors (``loratools.dtypes``), which no codec stores quantized
_FLOAT = frozenset({"F64", "F32", "F16", "BF16"})
#: the key endings of packed integer values that no plain model has: GPTQ/AWQ ``qweight``, compressed-tensors'
#: ``weight_packed`` (:mod:`.codec`), whose settings older producers kept beside config.json
_PARTS = (".qweight", ".weight_packed")


class TensorSource(Protocol):
    def shapes(self) -> dict[str, tuple[str, tuple[int, ...]]]: ...

    def get(self, key: str) -> Tensor: ...


def logical_shapes(codec: QuantCodec, shapes: Shapes) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``shapes`` (``{key: (code, shape)}``) with each tensor ``codec`` finds as its logical float32 tensor, its
    parts left out."""
    found = codec.find(shapes)
    parts = {p for st in found.values() for p in st.parts}
    out = {k: (c, tuple(s)) for k, (c, s) in shapes.items() if k not in parts}
    return {**out, **{k: ("F32", st.shape) for k, st in found.items()}}


@dataclass(frozen=True)
class Dequantized:
    """``source``'s tensors with each quantized one dequantized (see the module docstring); ``config`` is the
    model's config.json, ``name`` what it is called (its path) where something written names it."""

    source: TensorSource
    codec: QuantCodec
    config: Mapping[str, Any] = field(default_factory=dict)
    name: str | None = None

    @cached_property
    def tensors(self) -> dict[str, Stored]:
        """Logical key → how it is stored."""
        return self.codec.find(self.source.shapes())

    def shapes(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return logical_shapes(self.codec, self.source.shapes())

    def keys(self) -> list[str]:
        return list(self.shapes())

    def __contains__(self, key: object) -> bool:
        return key in self.shapes()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.shapes()[key][1]

    def get(self, key: str) -> Tensor:
        """``key`` as float32 when it is stored quantized, else as stored. Refuses a quantized tensor that
        dequantizes to NaN or ±inf (its scales hold one: the model is damaged), which would reach an SVD or a
        norm as a non-finite weight."""
        st = self.tensors.get(key)
        if st is None:
            return self.source.get(key)
        w = self.codec.dequantize([self.source.get(p) for p in st.parts])
        if not all_finite(w):
            raise NonFiniteError(key, f"{self.name or 'the model'}, dequantized by its scales,")
        return w


def dequantized(source: TensorSource, config: Mapping[str, Any] | None, *,
                name: str | None = None) -> Dequantized | None:
    """The dequantized view of ``source`` when its ``config`` declares a ``quantization_config`` and it holds
    quantized (non-float) tensors; None otherwise (read it as it is). Refuses a ``quant_method`` no codec reads,
    and a model that holds a quantized weight's parts without a ``quantization_config`` to read them by (an old
    AutoGPTQ checkpoint keeps it in ``quantize_config.json``, which vLLM reads and transformers does not)."""
    if not config or "quantization_config" not in config:
        part = next((k for k, (code, _) in source.shapes().items() if code not in _FLOAT and k.endswith(_PARTS)), None)
        if part is not None:
            raise InvalidOptionError(f"{part} is part of a quantized weight but {name or 'the model'} has no "
                                     "quantization_config in config.json; add the one it was saved with (an AutoGPTQ "
                                     "quantize_config.json's fields, with quant_method) to read it")
        return None
    if all(code in _FLOAT for code, _ in source.shapes().values()):
        return None  # a dequantized save that kept its config
    codec = quant_codec(config, source.get)
    return Dequantized(source, codec, config, name) if codec is not None else None
