"""llama.cpp's own quantizers, called through ctypes from the ggml library `make llama-ref` builds.

The library (``libggml-base.so``, llama.cpp from the llama-cpp-python 0.3.36 sdist, CPU only,
``GGML_NATIVE=OFF``) is looked for at ``$LORATOOLS_GGML_LIB`` or
``.cache/llama.cpp/build/bin/libggml-base.so``; :func:`load` returns None when it is absent.
Test/bench-only: loratools never loads it.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LIB = Path(os.environ.get("LORATOOLS_GGML_LIB", ROOT / ".cache" / "llama.cpp" / "build" / "bin" / "libggml-base.so"))


class _Traits(ctypes.Structure):
    # struct ggml_type_traits in ggml/include/ggml.h (ggml 0.25.3)
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64), ("blck_size_interleave", ctypes.c_int64),
                ("type_size", ctypes.c_size_t), ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


class GGML:
    """``quantize``/``dequantize`` by llama.cpp: ``ggml_quantize_chunk`` (no importance matrix, so the
    reference quantizers ``quantize_row_*_ref``) and the type's ``to_float``."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
        lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        self._to_float = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)

    def quantize(self, x: np.ndarray, qtype: int) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows = x.reshape(-1, x.shape[-1])
        out = np.zeros((rows.shape[0], self.lib.ggml_row_size(qtype, rows.shape[1])), np.uint8)
        n = self.lib.ggml_quantize_chunk(qtype, rows.ctypes.data, out.ctypes.data, 0, rows.shape[0], rows.shape[1], None)
        assert n == out.nbytes
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def dequantize(self, data: np.ndarray, qtype: int, shape: tuple[int, ...]) -> np.ndarray:
        raw = np.ascontiguousarray(data).view(np.uint8)
        out = np.empty(shape, np.float32)
        self._to_float(self.lib.ggml_get_type_traits(qtype).contents.to_float)(raw.ctypes.data, out.ctypes.data,
                                                                                 out.size)
        return out


def load() -> GGML | None:
    return GGML(ctypes.CDLL(str(LIB))) if LIB.is_file() else None
