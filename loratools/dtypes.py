"""The safetensors dtype codes and their torch dtypes: the one table, pure data.

``io`` reads and writes files with it; ``merge.plan`` chooses output dtypes with it
without touching a file.
"""

from __future__ import annotations

import torch

from .errors import InvalidOptionError

__all__ = ["DTYPE_SIZES", "DTYPE_CODES", "CODE_DTYPES", "check_fits"]

#: bytes per element of each safetensors dtype code
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "U16": 2, "U32": 4, "U64": 8,
}
#: the torch dtype of each safetensors code that torch can hold
DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e8m0fnu: "F8_E8M0", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}
CODE_DTYPES: dict[str, torch.dtype] = {v: k for k, v in DTYPE_CODES.items()}


def check_fits(name: str, t: torch.Tensor, dtype: torch.dtype) -> None:
    """Refuse ``t``, bound for a tensor stored as ``dtype``, when a finite value of it lies beyond ``dtype``'s range:
    the cast would write ±inf (70000 in float16). Every cast to an output dtype goes through here.

    >>> check_fits("w", torch.tensor([7e4]), torch.float16)
    Traceback (most recent call last):
    ...
    loratools.errors.InvalidOptionError: w holds 70000, beyond torch.float16's range (±65504): `dtype` float16 would write ±inf; keep the base's dtype or choose bfloat16
    """
    if not dtype.is_floating_point or not t.is_floating_point() or not t.numel():
        return
    limit = torch.finfo(dtype).max
    if limit >= torch.finfo(t.dtype).max:
        return
    big = float(t.abs().nan_to_num(nan=0.0, posinf=0.0).max())
    if big > limit:
        raise InvalidOptionError(f"{name or 'a tensor'} holds {big:.6g}, beyond {dtype}'s range (±{limit:.6g}): "
                                 f"`dtype` {str(dtype).replace('torch.', '')} would write ±inf; keep the base's "
                                 "dtype or choose bfloat16")
