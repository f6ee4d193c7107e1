"""A bounded walk of a GGUF file's header, before the ``gguf`` package's reader sees it.

``gguf.GGUFReader`` (gguf 0.19) trusts the counts it reads: an array of numbers whose count claims 2⁴⁰
items makes it loop once per item past the end of the file (hours, on a file of a few hundred bytes), and a
big-endian file is read and its tensors then dequantized as little-endian (other numbers, silently).
:func:`check_gguf_header` walks the same layout as llama.cpp's ``gguf_init_from_file_impl``
(``ggml/src/gguf.cpp``, as vendored in llama-cpp-python 0.3.36) with every length and count bounded by the
bytes left in the file, and refuses what llama.cpp refuses:

- version 2 or 3 only, little-endian only (llama.cpp reads a version whose low 16 bits are 0 as a file for
  big-endian hosts, and refuses it);
- key/value types 0-12, no nested arrays; ``general.alignment`` a uint32 power of two (32 unless set);
- at most 4 (``GGML_MAX_DIMS``) non-negative dims per tensor whose element count fits int64 and whose rows
  are whole blocks of a known ggml type;
- each tensor's data at an offset that is a multiple of the alignment, and inside the file.

Duplicate keys and tensor names are left to the reader, which refuses them.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

from ..errors import CorruptFileError
from .quants import require_gguf

__all__ = ["check_gguf_header"]

_MAX_DIMS = 4  # GGML_MAX_DIMS
_STRING, _ARRAY = 8, 9
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType → bytes
_ALIGNMENT_KEY = "general.alignment"


class _Cursor:
    """Reads little-endian values from ``buf`` at ``pos``, refusing any read past its end."""

    def __init__(self, buf: Any, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, why: str) -> CorruptFileError:
        return CorruptFileError(self.path, why)

    def need(self, n: int, what: str) -> None:
        if n > len(self.buf) - self.pos:
            raise self.fail(f"its {what} claims {n} bytes at offset {self.pos}, past the end of the file "
                            f"({len(self.buf)} bytes): the file is cut short or damaged")

    def unpack(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v[0] if len(v) == 1 else v

    def string(self, what: str) -> bytes:
        n = self.unpack("<Q", what)
        self.need(n, what)
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return s


def _value(c: _Cursor, vtype: int, key: str, nested: bool = False) -> Any:
    """Skip (and for scalars return) one value of type ``vtype``."""
    if vtype in _SCALAR_SIZES:
        fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[_SCALAR_SIZES[vtype]]
        return c.unpack(fmt, f"value of {key!r}")
    if vtype == _STRING:
        return c.string(f"string value of {key!r}")
    if vtype != _ARRAY or nested:
        raise c.fail(f"the key {key!r} has the value type {vtype}, which GGUF does not define"
                     + (" inside an array" if nested else ""))
    itype, count = c.unpack("<IQ", f"array header of {key!r}")
    if itype in _SCALAR_SIZES:
        c.need(count * _SCALAR_SIZES[itype], f"array {key!r} of {count} items")
        c.pos += count * _SCALAR_SIZES[itype]
        return None
    c.need(count * 8, f"array {key!r} of {count} items")  # every item takes at least its 8-byte length
    for _ in range(count):
        _value(c, itype, key, nested=True)
    return None


def _key_values(c: _Cursor, n_kv: int) -> int:
    """Walk ``n_kv`` key/values; the alignment they set (32 unless set)."""
    c.need(n_kv * 13, f"key/value count {n_kv}")  # key length 8, type 4, value at least 1
    alignment = 32
    for _ in range(n_kv):
        key = c.string("key").decode("utf-8", "replace")
        vtype = c.unpack("<I", f"type of {key!r}")
        v = _value(c, vtype, key)
        if key == _ALIGNMENT_KEY:
            if vtype != 4 or v == 0 or v & (v - 1):
                shown = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
                raise c.fail(f"{_ALIGNMENT_KEY} must be a uint32 power of two (llama.cpp refuses anything else), "
                             f"got {shown!r} of value type {vtype}")
            alignment = v
    return alignment


def _tensor_info(c: _Cursor, sizes: dict[int, tuple[int, int]]) -> tuple[str, int, int]:
    """One tensor info: ``(name, data offset, data bytes)``."""
    name = c.string("tensor name").decode("utf-8", "replace")
    n_dims = c.unpack("<I", f"dimension count of {name!r}")
    if n_dims > _MAX_DIMS:
        raise c.fail(f"tensor {name!r} has {n_dims} dimensions; ggml has at most {_MAX_DIMS}")
    dims = [c.unpack("<Q", f"dimensions of {name!r}") for _ in range(n_dims)]
    qtype, offset = c.unpack("<IQ", f"type and offset of {name!r}")
    n = 1
    for d in dims:
        n *= d
    if any(d >= 1 << 63 for d in dims) or n >= 1 << 63:
        raise c.fail(f"tensor {name!r} has dimensions {dims}: negative, or more elements than int64 holds")
    if qtype not in sizes:
        raise c.fail(f"tensor {name!r} has the ggml type id {qtype}, which the gguf package does not know")
    block, size = sizes[qtype]
    if dims and dims[0] % block:
        raise c.fail(f"tensor {name!r} has rows of {dims[0]} values, not whole blocks of {block} of its type")
    return name, offset, n // block * size


def check_gguf_header(path: str | Path) -> None:
    """Refuse, as one :class:`~loratools.errors.CorruptFileError`, a GGUF file whose header or tensor layout is
    damaged, big-endian, or claims more than the file holds (see the module's docstring); reads only the header."""
    p = Path(path)
    gguf = require_gguf()
    sizes = {int(t): (int(b), int(s)) for t, (b, s) in gguf.GGML_QUANT_SIZES.items()}
    with p.open("rb") as f:
        if p.stat().st_size < 24:
            raise CorruptFileError(p, "it is shorter than a GGUF header (24 bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            c = _Cursor(buf, p)
            magic, version, n_tensors, n_kv = c.unpack("<IIQQ", "header")
            if magic != 0x46554747:
                raise c.fail("it does not start with GGUF's magic bytes")
            if version and not version & 0xFFFF:
                raise c.fail("it is a big-endian GGUF file (for big-endian hosts); llama.cpp refuses it on "
                             "little-endian ones, and so does loratools")
            if version not in (2, 3):
                raise c.fail(f"it is GGUF version {version}; loratools reads versions 2 and 3, as llama.cpp does")
            alignment = _key_values(c, n_kv)
            c.need(n_tensors * 24, f"tensor count {n_tensors}")  # name length, dims count, type, offset
            infos = [_tensor_info(c, sizes) for _ in range(n_tensors)]
            start = c.pos + -c.pos % alignment
            for name, offset, nbytes in infos:
                if offset % alignment:
                    raise c.fail(f"tensor {name!r} starts at data offset {offset}, not a multiple of the alignment "
                                 f"{alignment} (llama.cpp refuses it)")
                if start + offset + nbytes > len(buf):
                    raise c.fail(f"the {nbytes} bytes of tensor {name!r} at offset {start + offset} run past the end "
                                 f"of the file ({len(buf)} bytes): the file is cut short or damaged")
