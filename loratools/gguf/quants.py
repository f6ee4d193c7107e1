"""GGUF tensor types: quantize and dequantize rows of float32 weights, in numpy.

The ``gguf`` package quantizes F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (and
TQ1_0, TQ2_0, MXFP4) and dequantizes every type; this module delegates those to it
and adds quantizers for the K-quants most published GGUF models use (``Q4_K_M``
mixes Q4_K and Q6_K, ``Q5_K_M`` Q5_K and Q6_K, ``Q3_K_M``/``Q2_K`` add Q3_K and Q2_K).

The K-quants (:mod:`loratools.gguf.kquants`) follow llama.cpp's reference quantizers
``quantize_row_q*_K_ref`` (``ggml/src/ggml-quants.c``, llama.cpp commit 0c1e570 as vendored
by llama-cpp-python 0.3.36) operation for operation, so their bytes equal llama.cpp's; the
delegated types equal llama.cpp's too (gguf's Q4_1/Q5_1 minimum is corrected for the sign of a
zero). ``tests/test_gguf_quants_llama.py`` checks all of it against llama.cpp's own library
(``make llama-ref``). Dequantizing is ``gguf.quants.dequantize``, bit-identical to llama.cpp's.

>>> import numpy as np
>>> w = np.linspace(-1, 1, 512, dtype=np.float32).reshape(2, 256)
>>> q = quantize(w, "Q6_K"); q.shape
(2, 210)
>>> float(abs(dequantize(q, "Q6_K", w.shape) - w).max()) < 0.02
True
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from ..errors import InvalidOptionError, MissingDependencyError, NonFiniteError
from .kquants import K_QUANTS, QK_K, QUANTIZERS

__all__ = ["quantize", "dequantize", "can_quantize", "block_sizes", "type_name", "require_gguf", "QK_K", "K_QUANTS"]

_F32 = np.float32
# super-blocks quantized together: bounds the temporaries (about 20 arrays of CHUNK·256 floats)
_CHUNK = 512


def require_gguf() -> Any:
    """The ``gguf`` package (llama.cpp's own reader/writer and tables), or a one-line error naming the extra."""
    try:
        import gguf
    except ImportError:
        raise MissingDependencyError("gguf", "gguf") from None
    return gguf


def type_name(qtype: Any) -> str:
    """``"Q4_K"`` for ``"q4_k"``, ``GGMLQuantizationType.Q4_K`` or its number (12)."""
    if isinstance(qtype, str):
        return qtype.upper()
    if hasattr(qtype, "name"):
        return str(qtype.name)
    return require_gguf().GGMLQuantizationType(int(qtype)).name


def _enum(name: str) -> Any:
    gguf = require_gguf()
    try:
        return gguf.GGMLQuantizationType[name]
    except KeyError:
        raise InvalidOptionError(f"{name!r} is not a GGUF tensor type") from None


@functools.cache
def can_quantize(qtype: Any) -> bool:
    """Whether :func:`quantize` can write ``qtype``: the K-quants here, and what ``gguf.quants.quantize``
    does (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, TQ1_0, TQ2_0, MXFP4 in gguf 0.19)."""
    name = type_name(qtype)
    if name in K_QUANTS:
        return True
    gguf = require_gguf()
    t = gguf.GGMLQuantizationType.__members__.get(name)
    if t is None:
        return False
    try:  # gguf has no public list of what it can quantize: ask it with one zero block
        gguf.quants.quantize(np.zeros((1, gguf.GGML_QUANT_SIZES[t][0]), _F32), t)
    except NotImplementedError:
        return False
    return True


def block_sizes(qtype: Any) -> tuple[int, int]:
    """``(weights, bytes)`` per block of ``qtype``: ``(256, 144)`` for Q4_K, ``(1, 2)`` for F16."""
    name = type_name(qtype)
    if name in K_QUANTS:
        return QK_K, K_QUANTS[name]
    return tuple(require_gguf().GGML_QUANT_SIZES[_enum(name)])  # type: ignore[return-value]


def quantize(array: np.ndarray, qtype: Any, *, what: str = "the tensor") -> np.ndarray:
    """Rows of ``array`` as ``qtype``'s bytes: uint8 of shape ``(*array.shape[:-1], row bytes)``.

    The last axis must be a multiple of the block size (256 for the K-quants, 32 for Q8_0 …).
    Rows are quantized a chunk at a time (memory stays flat). Refused, naming ``what``: NaN/Inf
    values, and values too large for the type (its float16 scales, or F16 itself, would overflow;
    a chunk whose bytes do not dequantize to finite values is never returned).
    """
    name = type_name(qtype)
    if not can_quantize(name):
        raise InvalidOptionError(f"loratools cannot quantize to {name}; choose one of F32, F16, BF16, Q8_0, Q4_0, "
                                 f"Q4_1, Q5_0, Q5_1, {', '.join(K_QUANTS)}, TQ1_0, TQ2_0, MXFP4")
    x = np.asarray(array, dtype=_F32)
    block, size = block_sizes(name)
    if x.ndim == 0 or x.shape[-1] % block:
        raise InvalidOptionError(f"{what} cannot be {name}: its rows of {x.shape[-1] if x.ndim else 0} values are not "
                                 f"a multiple of {name}'s block of {block}")
    rows = x.reshape(-1, x.shape[-1])
    out = np.empty((rows.shape[0], x.shape[-1] // block * size), np.uint8)
    step = max(1, _CHUNK * QK_K // max(1, x.shape[-1]))
    for s in range(0, rows.shape[0], step):
        chunk = rows[s:s + step]
        if not np.isfinite(chunk).all():
            raise NonFiniteError(what)
        q = _quantize_rows(chunk, name)
        if not np.isfinite(dequantize(q, name, chunk.shape)).all():
            raise InvalidOptionError(f"{what} cannot be {name}: values as large as {np.abs(chunk).max():.3g} overflow "
                                     f"its float16 scales; choose F32 or BF16")
        out[s:s + step] = q
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _quantize_rows(rows: np.ndarray, name: str) -> np.ndarray:
    """(r, n) float32 → (r, n/block·bytes) uint8.

    Overflow and 0/0 happen as in the C code (flat or all-zero sub-blocks, subnormal ranges, scales past
    float16): those lanes are masked out, or come out inf/NaN as llama.cpp's do, which quantize() refuses.
    """
    with np.errstate(all="ignore"):
        return _quantize_rows_raw(rows, name)


def _quantize_rows_raw(rows: np.ndarray, name: str) -> np.ndarray:
    if name not in K_QUANTS:
        q = np.ascontiguousarray(require_gguf().quants.quantize(rows, _enum(name))).view(np.uint8)
        if name in ("Q4_1", "Q5_1"):
            # the block minimum m (bytes 2-3): gguf takes numpy's min, which may be −0.0 where llama.cpp's
            # loop keeps the first zero it meets; argmin is that first one. Same values, now same bytes.
            b = rows.reshape(-1, 32)
            m = np.take_along_axis(b, b.argmin(axis=1)[:, None], axis=1).astype(np.float16)
            q.reshape(b.shape[0], -1)[:, 2:4] = m.view(np.uint8)
        return q.reshape(rows.shape[0], -1)
    return QUANTIZERS[name](rows.reshape(-1, QK_K)).reshape(rows.shape[0], -1)


def dequantize(data: np.ndarray, qtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    """``qtype``'s bytes (as :func:`quantize` returns them, or a ``GGUFReader`` tensor's ``data``) back to
    float32 of ``shape``, by ``gguf.quants.dequantize`` (bit-identical to llama.cpp's ``to_float``)."""
    raw = np.ascontiguousarray(data).view(np.uint8)
    out = require_gguf().quants.dequantize(raw, _enum(type_name(qtype)))
    return np.asarray(out, dtype=_F32).reshape(shape)
