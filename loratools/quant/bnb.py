"""bitsandbytes weights: 4-bit NF4/FP4 (plain or with double-quantized absmax) and LLM.int8 rows, dequantized and
quantized exactly as bitsandbytes 0.50.2 does on CPU, as pure torch (bitsandbytes itself is never imported).

A quantized weight is *several stored tensors* behind one logical key. For a 4-bit linear ``P`` (logical key
``P.weight``, logical shape (out, in)) transformers 5.23 saves (bitsandbytes ``functional.py`` ``QuantState.as_dict``
with ``packed=True``, ``nn/modules.py`` ``Linear4bit._save_to_state_dict``)::

    P.weight                                  uint8 (⌈out·in/2⌉, 1): two codes a byte, the first in the high nibble
    P.weight.absmax                           float32 (⌈n/bs⌉,) — or uint8 codes when the absmax is nested
    P.weight.quant_map                        float32 (16,): the code table
    P.weight.nested_absmax                    float32 (⌈blocks/256⌉,)        (double quantization only)
    P.weight.nested_quant_map                 float32 (256,): the 8-bit dynamic map
    P.weight.quant_state.bitsandbytes__nf4    uint8 JSON: quant_type, blocksize, dtype, shape, nested_* fields

and an int8 linear (``nn/modules.py`` ``Linear8bitLt._save_to_state_dict``) saves ``P.weight`` (int8 (out, in)),
``P.SCB`` (float32 (out,), each row's absmax) and ``P.weight_format`` (uint8 0 = "row").

The rules (bitsandbytes 0.50.2 ``backends/default/ops.py`` ``quantize_4bit`` — there is no CPU kernel for it —
``backends/cpu/ops.py`` + ``csrc/cpu_ops.cpp`` ``dequantizeBlockwise4bitCpu`` and ``quantize_cpu_impl``,
``functional.py`` ``quantize_4bit``/``dequantize_4bit``/``quantize_blockwise``)::

    4-bit, over the flattened weight in blocks of bs:  a = max|x| (float32);  q = bucketize(clamp(x·(1/a), −1, 1),
          midpoints of the sorted code)  (a tie goes to the lower code);  W = code[q] · a   (float32)
    nested absmax:  o = mean(a);  a − o in blocks of 256 on the 8-bit dynamic map: s = max|a − o|,
          p = a code next to (a − o)/s (``_quantize_8bit_dynamic``);  a' = map[p] · s + o
    int8 (``ops.py`` ``int8_vectorwise_quant``/``int8_vectorwise_dequant``):  SCB = max|row|;
          w = round(x · (127/SCB));  W = w · SCB · 0.007874015718698502

Blocks run over the flattened weight, across rows (the CUDA kernels and the default backend's
``_dequantize_4bit_compute``). bitsandbytes 0.50.2's CPU AVX2 dequantize kernel gives other values for some
weights whose in_features is not a multiple of the blocksize (measured: (64, 96) in blocks of 64); loratools
follows the format, and its tests compare with that kernel where it agrees with it (in_features % blocksize = 0,
every Llama-family projection).

>>> x = torch.linspace(-1, 1, 128).reshape(2, 64)
>>> codec = Bnb4bit("nf4", blocksize=64, nested=False)
>>> stored = codec.quantize("p.weight", x)
>>> sorted(stored)
['p.weight', 'p.weight.absmax', 'p.weight.quant_map', 'p.weight.quant_state.bitsandbytes__nf4']
>>> w = codec.dequantize("p.weight", stored)
>>> bool(((w - x).abs() <= codec.half_step("p.weight", x, stored)).all())
True
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ..errors import CorruptFileError, ShapeMismatchError, UnsupportedConfigError

__all__ = ["BLOCKSIZES", "Bnb4bit", "Bnb4bitState", "BnbInt8", "BnbCodec", "bnb_codec", "dequantize_codes",
           "dynamic_map", "four_bit_code", "parse_quant_state"]

#: the blocksizes bitsandbytes 0.50.2 ``quantize_4bit``/``dequantize_4bit`` accept
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: the largest quant_state JSON blob read: a real one is under 300 bytes
_MAX_STATE_BYTES = 4096
_QS_FIELDS = {"quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: ``functional.py`` ``get_4bit_type`` (the values bitsandbytes hard-codes; FP4 in bit-pattern order)
_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
_FP4 = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]
#: the int8 dequantization factor, 1/127 as bitsandbytes writes it (``_ops.py`` ``int8_vectorwise_dequant``)
_INV127 = 7.874015718698502e-3


class BnbCodec(Protocol):
    """A quantized weight stored as several tensors: what a merge needs to read, rewrite and bound it.

    ``key`` is the logical weight (``P.weight``); ``stored`` maps stored keys to tensors (it may hold others)."""

    def stored_keys(self, key: str, available: Mapping[str, Any] | None = None) -> list[str]: ...

    def dequantize(self, key: str, stored: Mapping[str, Tensor]) -> Tensor: ...

    def quantize(self, key: str, x: Tensor, like: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]: ...

    def half_step(self, key: str, x: Tensor, stored: Mapping[str, Tensor]) -> Tensor: ...


def four_bit_code(quant_type: str) -> Tensor:
    """The 16-value table of ``quant_type`` in code order, float32, as ``get_4bit_type`` builds it (÷ max |v|)."""
    data = torch.tensor(_NF4 if quant_type == "nf4" else _FP4, dtype=torch.float32)
    return data / data.abs().max()


def dynamic_map() -> Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``functional.py`` ``create_dynamic_map(signed=True)``): 256 sorted
    values from −0.99297 to 1.0, the nested map a quantization stores."""
    data: list[float] = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


@dataclass(frozen=True)
class Bnb4bitState:
    """The JSON fields of ``…quant_state.bitsandbytes__<type>`` (``QuantState.as_dict``), checked."""

    quant_type: str
    blocksize: int
    dtype: str
    shape: tuple[int, int]
    nested_blocksize: int | None = None
    nested_dtype: str | None = None
    nested_offset: float | None = None

    @property
    def nested(self) -> bool:
        return self.nested_blocksize is not None

    def to_json(self) -> Tensor:
        """The uint8 blob as ``pack_dict_to_tensor`` writes it (``json.dumps`` of the fields, in this order)."""
        d: dict[str, Any] = {"quant_type": self.quant_type, "blocksize": self.blocksize, "dtype": self.dtype,
                             "shape": list(self.shape)}
        if self.nested:
            d |= {"nested_blocksize": self.nested_blocksize, "nested_dtype": self.nested_dtype,
                  "nested_offset": self.nested_offset}
        return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def _int_field(where: str, d: Mapping[str, Any], name: str, ok: Any) -> int:
    value = d.get(name)
    if type(value) is not int or not ok(value):  # JSON true is no size
        raise CorruptFileError(where, f"quant_state {name} = {str(value)[:40]!r} is not valid")
    return value


def parse_quant_state(blob: Tensor, where: str, *, quant_type: str) -> Bnb4bitState:
    """The checked fields of a quant_state blob (a uint8 tensor of JSON), ``quant_type`` being the key's suffix.

    Refuses (:class:`CorruptFileError`) a blob over 4 KiB, not UTF-8 JSON of an object, an unknown field, a
    mismatched ``quant_type`` or a bad shape, blocksize, dtype or offset; and (:class:`UnsupportedConfigError`) a
    blocksize or dtype bitsandbytes 0.50.2 does not quantize with."""
    if blob.dtype != torch.uint8 or blob.dim() != 1 or blob.numel() > _MAX_STATE_BYTES:
        raise CorruptFileError(where, f"the quant_state must be a uint8 vector of at most {_MAX_STATE_BYTES} "
                                      f"bytes, got {blob.dtype} {tuple(blob.shape)}")
    try:
        d = json.loads(bytes(blob.tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CorruptFileError(where, f"the quant_state is not JSON ({type(exc).__name__})") from None
    if not isinstance(d, dict) or not set(d) <= _QS_FIELDS:
        extra = sorted(set(d) - _QS_FIELDS) if isinstance(d, dict) else type(d).__name__
        raise CorruptFileError(where, f"the quant_state holds unknown fields {str(extra)[:60]}")
    if d.get("quant_type") != quant_type:
        raise CorruptFileError(where, f"quant_state quant_type = {str(d.get('quant_type'))[:20]!r} does not "
                                      f"match its key's {quant_type!r}")
    block = _int_field(where, d, "blocksize", lambda b: b > 0)
    if block not in BLOCKSIZES:
        raise UnsupportedConfigError(where, "quant_state.blocksize", block, f"bitsandbytes uses {list(BLOCKSIZES)}")
    shape = d.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(s) is int and 0 < s < 2 ** 31 for s in shape)):
        raise CorruptFileError(where, f"quant_state shape = {str(shape)[:40]} is not two positive integers "
                                      "(loratools reads 2-D linear weights)")
    dtype = d.get("dtype")
    if dtype not in _DTYPES:
        raise UnsupportedConfigError(where, "quant_state.dtype", dtype, f"bitsandbytes uses {sorted(_DTYPES)}")
    state = Bnb4bitState(quant_type, block, dtype, (shape[0], shape[1]))
    if "nested_blocksize" not in d and not {"nested_dtype", "nested_offset"} & set(d):
        return state
    offset = d.get("nested_offset")
    if not isinstance(offset, int | float) or isinstance(offset, bool) or not math.isfinite(offset):
        raise CorruptFileError(where, f"quant_state nested_offset = {str(offset)[:40]!r} is not a finite number")
    if d.get("nested_dtype") != "float32":
        raise UnsupportedConfigError(where, "quant_state.nested_dtype", d.get("nested_dtype"),
                                     "bitsandbytes nests float32 absmax")
    nb = _int_field(where, d, "nested_blocksize", lambda b: 0 < b <= 2 ** 20)
    return Bnb4bitState(quant_type, block, dtype, state.shape, nb, "float32", float(offset))


def _blocks(n: int, size: int) -> int:
    return -(-n // size)


def _quantize_8bit_dynamic(a: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """(uint8 codes, float32 absmax per block) of float32 ``a`` on the sorted 256-value ``code``, as bitsandbytes
    0.50.2's CPU kernel does it (``csrc/cpu_ops.cpp`` ``quantize_cpu_impl``, ``build_quantize_lut``,
    ``norm_to_lut_index``): v = clamp(a · (1/s), −1, 1) with s the block's max |a|, then a 65536-entry table
    — entry i holds the number of code midpoints below −1 + 2i/65535 — read at ⌊((v + 1)·0.5)·65535 + 0.5⌋.
    This is the nearest code except within 1/65535 of a midpoint; an all-zero block gets code 0."""
    n = a.numel()
    nb = _blocks(n, blocksize)
    pad = torch.zeros(nb * blocksize, dtype=torch.float32, device=a.device)
    pad[:n] = a.abs()
    absmax = pad.reshape(nb, blocksize).amax(dim=1)
    inv = (1.0 / absmax).repeat_interleave(blocksize)[:n]
    v = torch.clamp(a * inv, -1.0, 1.0)
    code = code.to(a.device)
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32, device=a.device)) / 65535.0
    lut = torch.bucketize(grid, 0.5 * (code[:-1] + code[1:]))
    q = lut[((v + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int64)]
    zero = (absmax == 0).repeat_interleave(blocksize)[:n]
    return torch.where(zero, 0, q).to(torch.uint8), absmax


def _dequantize_8bit(q: Tensor, absmax: Tensor, code: Tensor, blocksize: int) -> Tensor:
    """code[q] · absmax of q's block, float32 (``csrc/cpu_ops.cpp`` ``dequantizeBlockwise8bitCpu``)."""
    return code[q.long()] * absmax.repeat_interleave(blocksize)[:q.numel()]


def dequantize_codes(packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, shape: tuple[int, int]) -> Tensor:
    """code[q] · absmax of q's block (float32, ``shape``): q the two 4-bit codes of each byte of ``packed``, the
    high nibble first, over the flattened weight (``csrc/cpu_ops.cpp`` ``dequantizeBlockwise4bitCpu``)."""
    n = shape[0] * shape[1]
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)  # byte b → (code[b>>4], code[b&15])
    values = pairs[packed.reshape(-1).int()].reshape(-1)[:n]
    full = n - n % blocksize
    out = torch.empty(n, dtype=torch.float32, device=values.device)
    out[:full] = (values[:full].view(-1, blocksize) * absmax[:full // blocksize].view(-1, 1)).reshape(-1)
    out[full:] = values[full:] * absmax[full // blocksize:][:1]
    return out.reshape(shape)


@dataclass(frozen=True)
class Bnb4bit:
    """bitsandbytes 4-bit weights (``quant_type`` nf4 or fp4), blocks of ``blocksize``, absmax nested or not.

    ``quantize(key, x, like=stored)`` takes every setting from ``like``'s quant state (its quant_type must be
    this codec's), so a merge writes the weight as the base had it."""

    quant_type: str = "nf4"
    blocksize: int = 64
    nested: bool = False
    nested_blocksize: int = 256

    def __post_init__(self) -> None:
        if self.quant_type not in ("nf4", "fp4"):
            raise UnsupportedConfigError("quantization_config", "bnb_4bit_quant_type", self.quant_type,
                                         "bitsandbytes 4-bit weights are nf4 or fp4")
        if self.blocksize not in BLOCKSIZES:
            raise UnsupportedConfigError("quantization_config", "blocksize", self.blocksize,
                                         f"bitsandbytes uses {list(BLOCKSIZES)}")

    def state_key(self, key: str) -> str:
        return f"{key}.quant_state.bitsandbytes__{self.quant_type}"

    def stored_keys(self, key: str, available: Mapping[str, Any] | None = None) -> list[str]:
        """The stored keys of logical ``key``; with ``available``, the nested ones only when it holds them."""
        keys = [key, f"{key}.absmax", f"{key}.quant_map", self.state_key(key)]
        nested = self.nested if available is None else f"{key}.nested_absmax" in available
        return keys + ([f"{key}.nested_absmax", f"{key}.nested_quant_map"] if nested else [])

    def state(self, key: str, stored: Mapping[str, Tensor]) -> Bnb4bitState:
        """The checked quant state of ``key``, its tensors' shapes and dtypes checked against it."""
        missing = [k for k in self.stored_keys(key, stored) if k not in stored]
        if missing:
            raise CorruptFileError(key, f"the bitsandbytes {self.quant_type} weight lacks {missing[0]}")
        st = parse_quant_state(stored[self.state_key(key)], key, quant_type=self.quant_type)
        n = st.shape[0] * st.shape[1]
        nb = _blocks(n, st.blocksize)
        want = {key: ((_blocks(n, 2), 1), torch.uint8), f"{key}.quant_map": ((16,), torch.float32),
                f"{key}.absmax": ((nb,), torch.uint8 if st.nested else torch.float32)}
        if st.nested != (f"{key}.nested_absmax" in stored):
            raise CorruptFileError(key, "the quant_state's nested fields and the nested_absmax tensor disagree")
        if st.nested:
            assert st.nested_blocksize is not None
            want |= {f"{key}.nested_absmax": ((_blocks(nb, st.nested_blocksize),), torch.float32),
                     f"{key}.nested_quant_map": ((256,), torch.float32)}
        for k, (shape, dtype) in want.items():
            if tuple(stored[k].shape) != shape or stored[k].dtype != dtype:
                raise ShapeMismatchError(k, f"{dtype} {shape} for a {st.shape} {self.quant_type} weight",
                                         f"{stored[k].dtype} {tuple(stored[k].shape)}")
        if not torch.equal(stored[f"{key}.quant_map"].cpu(), four_bit_code(self.quant_type)):
            raise CorruptFileError(key, f"quant_map is not bitsandbytes' {self.quant_type} table "
                                        "(bitsandbytes dequantizes with its own table)")
        return st

    def absmax(self, key: str, stored: Mapping[str, Tensor], st: Bnb4bitState) -> Tensor:
        """The float32 absmax per block; a nested one dequantized and the offset added (``dequantize_4bit``)."""
        a = stored[f"{key}.absmax"]
        if not st.nested:
            return a
        assert st.nested_blocksize is not None and st.nested_offset is not None
        deq = _dequantize_8bit(a, stored[f"{key}.nested_absmax"], stored[f"{key}.nested_quant_map"],
                               st.nested_blocksize)
        return deq + torch.tensor(st.nested_offset, dtype=torch.float32, device=deq.device)

    def dequantize(self, key: str, stored: Mapping[str, Tensor]) -> Tensor:
        """W (float32, the quant state's (out, in)) = code[q] · absmax of q's block."""
        st = self.state(key, stored)
        return dequantize_codes(stored[key], self.absmax(key, stored, st),
                                four_bit_code(self.quant_type).to(stored[key].device), st.blocksize, st.shape)

    def quantize(self, key: str, x: Tensor, like: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The stored tensors of float ``x`` (out, in) by bitsandbytes' rule; settings from ``like`` if given."""
        codec = self
        dtype = str(x.dtype).removeprefix("torch.")
        if like is not None:
            st = self.state(key, like)
            codec = Bnb4bit(self.quant_type, st.blocksize, st.nested, st.nested_blocksize or 256)
            dtype = st.dtype
        elif dtype not in _DTYPES:
            raise UnsupportedConfigError(key, "dtype", dtype, f"bitsandbytes quantizes {sorted(_DTYPES)}")
        if x.dim() != 2:
            raise ShapeMismatchError(key, "a 2-D (out, in) weight", tuple(x.shape))
        q, absmax = codec._codes(x)
        packed = ((q[::2] << 4) | q[1::2]).unsqueeze(1)
        out = {key: packed, f"{key}.quant_map": four_bit_code(self.quant_type).to(x.device)}
        st = Bnb4bitState(self.quant_type, codec.blocksize, dtype, (x.shape[0], x.shape[1]))
        if codec.nested:
            offset = absmax.mean()
            code = dynamic_map().to(x.device)
            qa, nested_absmax = _quantize_8bit_dynamic(absmax - offset, code, codec.nested_blocksize)
            out |= {f"{key}.absmax": qa, f"{key}.nested_absmax": nested_absmax, f"{key}.nested_quant_map": code}
            st = Bnb4bitState(st.quant_type, st.blocksize, dtype, st.shape, codec.nested_blocksize, "float32",
                              offset.item())
        else:
            out[f"{key}.absmax"] = absmax
        out[self.state_key(key)] = st.to_json()
        return out

    def _codes(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(uint8 codes padded to an even count, float32 absmax): ``backends/default/ops.py`` ``quantize_4bit``."""
        flat = x.reshape(-1).float()
        n, bs = flat.numel(), self.blocksize
        full = n - n % bs
        blocks = flat[:full].reshape(-1, bs)
        absmax = blocks.abs().max(dim=-1)[0]
        scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
        if n % bs:
            am = flat[full:].abs().max().clamp(min=1e-38)
            absmax = torch.cat([absmax, am.unsqueeze(0)])
            scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
        if scaled.numel() % 2:
            scaled = torch.nn.functional.pad(scaled, (0, 1))
        code = four_bit_code(self.quant_type).to(flat.device)
        order = torch.argsort(code, stable=True)
        bounds = (code[order[:-1]] + code[order[1:]]) / 2
        q = order[torch.bucketize(scaled, bounds, out_int32=True).long()]
        return q.to(torch.uint8), absmax

    def half_step(self, key: str, x: Tensor, stored: Mapping[str, Tensor]) -> Tensor:
        """A bound on |deq(quantize(x, like=stored)) − x| per element: half the code's largest gap times the
        block's max |x|; with a nested absmax, plus the 8-bit rounding of that absmax (half the dynamic map's
        largest gap times its block's max |a − mean(a)|); plus 4 float32 ulps of |x| for the products."""
        st = self.state(key, stored)
        code = four_bit_code(self.quant_type).sort().values
        flat = x.reshape(-1).float()
        n = flat.numel()
        nb = _blocks(n, st.blocksize)
        pad = torch.zeros(nb * st.blocksize, device=x.device)
        pad[:n] = flat.abs()
        a = pad.reshape(nb, st.blocksize).amax(dim=1)
        bound = a * (code.diff().max().item() / 2)
        if st.nested:
            assert st.nested_blocksize is not None
            dyn = dynamic_map()
            _, s = _quantize_8bit_dynamic(a - a.mean(), dyn, st.nested_blocksize)
            bound = bound + (s * (dyn.diff().max().item() / 2)).repeat_interleave(st.nested_blocksize)[:nb] * 1.0001
        per = bound.repeat_interleave(st.blocksize)[:n].reshape(x.shape)
        return per + flat.abs().reshape(x.shape) * 4 * torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class BnbInt8:
    """bitsandbytes LLM.int8 weights: ``P.weight`` int8 (out, in), ``P.SCB`` float32 row absmax (module docstring)."""

    @staticmethod
    def scb_key(key: str) -> str:
        """``P.weight`` → ``P.SCB`` (``Linear8bitLt._save_to_state_dict`` saves it on the module)."""
        return key.removesuffix("weight") + "SCB"

    def stored_keys(self, key: str, available: Mapping[str, Any] | None = None) -> list[str]:
        fmt = key.removesuffix("weight") + "weight_format"
        keep = available is None or fmt in available
        return [key, self.scb_key(key)] + ([fmt] if keep else [])

    def _check(self, key: str, stored: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        w, scb = stored.get(key), stored.get(self.scb_key(key))
        if w is None or scb is None:
            raise CorruptFileError(key, f"the int8 weight lacks {key if w is None else self.scb_key(key)}")
        if w.dtype != torch.int8 or w.dim() != 2 or scb.dtype != torch.float32 or tuple(scb.shape) != w.shape[:1]:
            raise ShapeMismatchError(key, "int8 (out, in) and a float32 (out,) SCB",
                                     f"{w.dtype} {tuple(w.shape)} and {scb.dtype} {tuple(scb.shape)}")
        fmt = stored.get(key.removesuffix("weight") + "weight_format")
        if fmt is not None and (fmt.numel() != 1 or int(fmt.reshape(-1)[0]) != 0):
            raise UnsupportedConfigError(key, "weight_format", fmt.tolist(), "bitsandbytes reads the row format only")
        return w, scb

    def dequantize(self, key: str, stored: Mapping[str, Tensor]) -> Tensor:
        w, scb = self._check(key, stored)
        return w * scb.view(-1, 1) * _INV127

    @staticmethod
    def matmul_weight(codes: Tensor, scb: Tensor) -> Tensor:
        """The float32 weight bitsandbytes 0.50.2 multiplies by when training on CPU (``autograd/_functions.py``
        ``MatMul8bitFp``: ``CB.to(A.dtype).mul_(SCB.unsqueeze(1).mul(1.0 / 127.0))``): code · (SCB · (1/127)),
        the scale rounded first, so it may differ from :meth:`dequantize`'s (code · SCB) · (1/127) by an ulp."""
        return codes.to(torch.float32) * (scb.to(torch.float32) * _INV127).unsqueeze(1)

    def quantize(self, key: str, x: Tensor, like: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """(int8 rows, SCB) of ``x`` as ``int8_vectorwise_quant`` (threshold 0) computes them; an all-zero row,
        whose 0·(127/0) bitsandbytes leaves to the platform, is written as zeros."""
        if x.dim() != 2:
            raise ShapeMismatchError(key, "a 2-D (out, in) weight", tuple(x.shape))
        scb = torch.max(x.abs(), dim=1).values.float()
        w = torch.round(x * (127.0 / scb.unsqueeze(-1)))
        out = {key: torch.nan_to_num(w, nan=0.0).to(torch.int8), self.scb_key(key): scb}
        if like is None or key.removesuffix("weight") + "weight_format" in like:
            out[key.removesuffix("weight") + "weight_format"] = torch.tensor(0, dtype=torch.uint8)
        return out

    def half_step(self, key: str, x: Tensor, stored: Mapping[str, Tensor]) -> Tensor:
        """½ of a step SCB/127 of each row (x's own row absmax), plus 4 float32 ulps of |x|."""
        scb = x.abs().amax(dim=1, keepdim=True).float()
        return (scb / 254).expand(x.shape) + x.abs().float() * 4 * torch.finfo(torch.float32).eps


def bnb_codec(config: Mapping[str, Any] | None) -> BnbCodec | None:
    """The codec a model's ``config.json`` declares (``quant_method: "bitsandbytes"``), None for any other method;
    the 4-bit settings of each weight come from its own quant state (``stored``)."""
    qc = (config or {}).get("quantization_config")
    if not isinstance(qc, Mapping) or qc.get("quant_method") != "bitsandbytes":
        return None
    if qc.get("load_in_8bit") is True:
        return BnbInt8()
    if qc.get("load_in_4bit") is not True:
        raise UnsupportedConfigError("config.json", "quantization_config.load_in_4bit", qc.get("load_in_4bit"),
                                     "a bitsandbytes model is 4-bit or 8-bit")
    if qc.get("bnb_4bit_quant_storage", "uint8") != "uint8":
        raise UnsupportedConfigError("config.json", "quantization_config.bnb_4bit_quant_storage",
                                     qc.get("bnb_4bit_quant_storage"), "loratools reads uint8 storage")
    return Bnb4bit(str(qc.get("bnb_4bit_quant_type", "fp4")), nested=bool(qc.get("bnb_4bit_use_double_quant")))
