"""Streaming safetensors: read one tensor at a time, write one tensor at a time.

A safetensors file is ``u64 header length | JSON header | tensor bytes``, the
header giving each tensor's dtype, shape and ``[start, end)`` byte span in the
data section. Since every shape and dtype of an output shard is known before
any tensor is computed, the header can be written first and the tensors
streamed after it in header order: memory holds one tensor, never a shard.

- :func:`tensor_spans` maps each tensor of a file to its absolute byte span.
- :func:`read_tensor` reads one tensor with ``pread`` into fresh memory (no
  mmap, so pages of other tensors never count towards the process's RSS).
- :class:`ShardWriter` writes a file from a planned list of entries; tensors
  are given as tensors (:meth:`ShardWriter.write`) or copied byte for byte from
  another file by the kernel (:meth:`ShardWriter.copy_from`).

Only safetensors is read here: nothing unpickles.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor

from .errors import CorruptFileError, InvalidOptionError
from .io import DTYPE_SIZES, read_safetensors_layout

__all__ = ["Entry", "Span", "ShardWriter", "tensor_spans", "read_tensor", "DTYPE_CODES", "CODE_DTYPES", "nbytes_of"]

DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
CODE_DTYPES: dict[str, torch.dtype] = {v: k for k, v in DTYPE_CODES.items()}
_ALIGN = 8  # the header is padded with spaces so the data section starts 8-byte aligned
_CHUNK = 64 << 20


@dataclass(frozen=True)
class Entry:
    """One planned tensor of an output file: name, safetensors dtype code, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape)


@dataclass(frozen=True)
class Span:
    """Where one tensor's bytes lie in a file: ``[start, end)`` from the file's beginning."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def nbytes_of(dtype: str, shape: Sequence[int]) -> int:
    n = DTYPE_SIZES[dtype]
    for d in shape:
        n *= int(d)
    return n


def tensor_spans(path: str | os.PathLike[str]) -> tuple[dict[str, Span], dict[str, str]]:
    """Each tensor's :class:`Span` in the safetensors file ``path`` (checked), and the file's metadata."""
    p = Path(path)
    header, meta, base = read_safetensors_layout(p)
    spans = {
        k: Span(p, str(v["dtype"]), tuple(int(x) for x in v["shape"]),
                base + int(v["data_offsets"][0]), base + int(v["data_offsets"][1]))
        for k, v in header.items()
    }
    return spans, meta


def read_tensor(span: Span) -> Tensor:
    """The tensor at ``span``, read with ``pread`` into memory the caller owns."""
    if span.dtype not in CODE_DTYPES:
        raise CorruptFileError(span.path, f"dtype {span.dtype} cannot be read as a torch tensor here")
    size = span.end - span.start
    buf = np.empty(size, dtype=np.uint8)
    fd = os.open(span.path, os.O_RDONLY)
    try:
        view, done = memoryview(buf), 0
        while done < size:
            got = os.preadv(fd, [view[done:]], span.start + done)
            if got <= 0:
                raise CorruptFileError(span.path, "ended before a tensor's last byte (truncated?)")
            done += got
    finally:
        os.close(fd)
    t = torch.from_numpy(buf)
    return t.view(CODE_DTYPES[span.dtype]).reshape(span.shape) if size else torch.empty(span.shape, dtype=CODE_DTYPES[span.dtype])


def _header_bytes(entries: Sequence[Entry], metadata: Mapping[str, str] | None) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % _ALIGN)
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Write one safetensors file whose entries are planned up front, one tensor at a time.

    Tensors must arrive in the planned order with the planned dtype and shape;
    :meth:`close` checks that every entry was written.

    >>> entries = [Entry("a", "F32", (2,)), Entry("b", "BF16", (3,))]
    >>> with ShardWriter("/tmp/x.safetensors", entries) as w:          # doctest: +SKIP
    ...     w.write("a", torch.zeros(2)); w.write("b", torch.ones(3, dtype=torch.bfloat16))
    """

    def __init__(self, path: str | os.PathLike[str], entries: Sequence[Entry], metadata: Mapping[str, str] | None = None) -> None:
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise InvalidOptionError("a safetensors file cannot hold two tensors with the same name")
        self.path = Path(path)
        self._entries = list(entries)
        self._next = 0
        self._f: BinaryIO = self.path.open("wb")
        self._f.write(_header_bytes(self._entries, metadata))

    def _expect(self, name: str) -> Entry:
        if self._next >= len(self._entries) or self._entries[self._next].name != name:
            want = self._entries[self._next].name if self._next < len(self._entries) else "nothing"
            raise RuntimeError(f"ShardWriter: got {name!r}, expected {want!r}")
        self._next += 1
        return self._entries[self._next - 1]

    def write(self, name: str, tensor: Tensor) -> None:
        """Append ``tensor`` (moved to the CPU, made contiguous) as the next planned entry."""
        e = self._expect(name)
        t = tensor.detach().to("cpu").contiguous()
        if DTYPE_CODES.get(t.dtype) != e.dtype or tuple(t.shape) != e.shape:
            raise RuntimeError(f"ShardWriter: {name!r} is {t.dtype} {tuple(t.shape)}, planned {e.dtype} {e.shape}")
        if t.numel():
            self._f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))

    def copy_from(self, name: str, span: Span) -> None:
        """Append the bytes of ``span`` unchanged (kernel-side copy where the OS allows)."""
        e = self._expect(name)
        if span.end - span.start != e.nbytes:
            raise RuntimeError(f"ShardWriter: {name!r} has {span.end - span.start} bytes, planned {e.nbytes}")
        self._f.flush()
        out_fd = self._f.fileno()
        with open(span.path, "rb") as src:
            in_fd, pos, left = src.fileno(), span.start, span.end - span.start
            while left > 0:
                try:
                    n = os.copy_file_range(in_fd, out_fd, min(left, _CHUNK), pos)
                except (AttributeError, OSError):
                    n = 0
                if n <= 0:  # not supported across these file systems, or EOF: copy through user space
                    chunk = os.pread(in_fd, min(left, _CHUNK), pos)
                    if not chunk:
                        raise CorruptFileError(span.path, "ended before a tensor's last byte (truncated?)")
                    self._f.write(chunk)
                    self._f.flush()
                    n = len(chunk)
                pos += n
                left -= n

    def close(self) -> None:
        try:
            if self._next != len(self._entries):
                raise RuntimeError(f"ShardWriter: {len(self._entries) - self._next} planned tensors were never written")
        finally:
            self._f.close()

    def abort(self) -> None:
        """Close the file without the completeness check (the caller removes it)."""
        self._f.close()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._f.close()
