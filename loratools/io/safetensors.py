"""safetensors on disk: checked headers, byte spans, one-tensor reads, a streaming writer.

A safetensors file is ``u64 header length | JSON header | tensor bytes``, the
header giving each tensor's dtype, shape and ``[start, end)`` byte span in the
data section. Since every shape and dtype of an output file is known before any
tensor is computed, the header can be written first and the tensors streamed
after it: memory holds one tensor (or one block of one), never a file.

- :func:`read_safetensors_layout` parses and checks a header without trusting
  it, so damaged files fail with a clear message; :func:`tensor_spans` turns it
  into each tensor's absolute :class:`Span`.
- :func:`read_tensor` reads one tensor with ``pread`` into memory the caller
  owns (no mmap, so pages of other tensors never count towards the RSS);
  :class:`RowReader` reads one in blocks of rows into a reused buffer.
- :func:`write_at` and :func:`copy_range` put bytes at a planned offset of an
  output file; :class:`ShardWriter` writes a file from a planned list of :class:`Entry`.
- :data:`DTYPE_SIZES`, :data:`DTYPE_CODES`, :data:`CODE_DTYPES`: the one table
  of safetensors dtype codes (pure data, kept in :mod:`loratools.dtypes`).

Only safetensors is ever loaded: nothing here unpickles.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..dtypes import CODE_DTYPES, DTYPE_CODES, DTYPE_SIZES
from ..errors import CorruptFileError, InputNotFoundError, InvalidOptionError, LfsPointerError
from ..validate import load_json

__all__ = [
    "DTYPE_SIZES", "DTYPE_CODES", "CODE_DTYPES", "Entry", "Span", "ShardWriter", "nbytes_of",
    "read_safetensors_header", "read_safetensors_layout", "tensor_spans", "read_tensor",
    "load_safetensors", "save_safetensors", "buffer", "RowReader", "write_at", "copy_range",
]

_MAX_HEADER = 100 * 1024 * 1024
_ALIGN = 8  # the header is padded with spaces so the data section starts 8-byte aligned
_CHUNK = 64 << 20
# Large writes into fresh page cache cost several times the CPU of the same bytes written in pieces of
# ≤ 256 KiB on the VMs the project's issue "Speed" profiled (2.2–3.0 s against 0.4–0.55 s per 1.75 GB).
_PIECE = 256 << 10
_PAGE = 4096



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

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def nbytes_of(dtype: str, shape: Sequence[int]) -> int:
    n = DTYPE_SIZES[dtype]
    for d in shape:
        n *= int(d)
    return n


def read_safetensors_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file, checked: see :func:`read_safetensors_layout`."""
    header, meta, _ = read_safetensors_layout(path)
    return header, meta


def read_safetensors_layout(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, str], int]:
    """``(tensors, metadata, data_start)`` of a safetensors file, checked against the file's size.

    ``data_start`` is the file offset of the data section (8 + header length):
    tensor ``k`` lies at ``data_start + data_offsets``.

    ``tensors`` maps each name to ``{"dtype", "shape", "data_offsets"}``.
    Raises :class:`CorruptFileError` for a truncated file, a damaged header, or
    offsets that point outside the file.
    """
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(p)
    size = p.stat().st_size
    with p.open("rb") as f:
        head = f.read(8)
        if head.startswith(b"version "):  # a Git LFS pointer, not a damaged file
            LfsPointerError.check(p, head + f.read(len(LfsPointerError.MAGIC)))
        if len(head) < 8:
            raise CorruptFileError(p, "shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise CorruptFileError(p, "header length points past the end of the file (truncated?)")
        raw = f.read(n)
    header = load_json(raw, where=p)
    if not isinstance(header, dict):
        raise CorruptFileError(p, "header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CorruptFileError(p, "__metadata__ is not a JSON object of strings")
    _check_layout(p, header, size - 8 - n)
    return header, {str(k): str(v) for k, v in meta.items()}, 8 + n


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_layout(p: Path, header: dict[str, Any], data_len: int) -> None:
    """Every entry well-formed, inside the data section, sized as shape × dtype, and no two overlapping.

    safetensors' own Rust reader (``Metadata::validate`` in ``safetensors/src/tensor.rs``) refuses the same:
    dimensions are non-negative integers, each tensor's bytes are ``prod(shape) · dtype size``, and the
    offsets tile the data section without overlap.
    """
    spans = []
    for name, info in header.items():
        ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str) and info["dtype"] in DTYPE_SIZES
              and isinstance(info.get("shape"), list) and all(_is_count(d) for d in info["shape"])
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
              and all(_is_count(x) for x in info["data_offsets"]))
        if not ok:
            raise CorruptFileError(p, f"tensor {name!r} has a malformed entry (dtype, shape of integers ≥ 0, "
                                      "data_offsets [start, end])")
        start, end = info["data_offsets"]
        if not start <= end <= data_len:
            raise CorruptFileError(p, f"tensor {name!r} lies past the end of the file (truncated?)")
        if end - start != nbytes_of(info["dtype"], info["shape"]):
            raise CorruptFileError(p, f"tensor {name!r} has {end - start} bytes for shape {info['shape']}")
        if end > start:
            spans.append((start, end, name))
    spans.sort()
    for (_, e1, a), (s2, _, b) in zip(spans, spans[1:]):
        if s2 < e1:
            raise CorruptFileError(p, f"tensors {a!r} and {b!r} overlap in the file")


def spans_of(path: Path, header: Mapping[str, Any], data_start: int) -> dict[str, Span]:
    """Each tensor's absolute :class:`Span` from a header checked by :func:`read_safetensors_layout`."""
    return {k: Span(path, str(v["dtype"]), tuple(int(x) for x in v["shape"]),
                    data_start + int(v["data_offsets"][0]), data_start + int(v["data_offsets"][1]))
            for k, v in header.items()}


def tensor_spans(path: str | os.PathLike[str]) -> tuple[dict[str, Span], dict[str, str]]:
    """Each tensor's :class:`Span` in the safetensors file ``path`` (checked), and the file's metadata."""
    p = Path(path)
    header, meta, start = read_safetensors_layout(p)
    return spans_of(p, header, start), meta


def read_tensor(span: Span) -> Tensor:
    """The tensor at ``span``, read with ``pread`` into memory the caller owns."""
    if span.dtype not in CODE_DTYPES:
        raise CorruptFileError(span.path, f"dtype {span.dtype} cannot be read as a torch tensor here")
    dtype = CODE_DTYPES[span.dtype]
    if not span.nbytes:
        return torch.empty(span.shape, dtype=dtype)
    buf = torch.empty(span.nbytes, dtype=torch.uint8)
    fd = os.open(span.path, os.O_RDONLY)
    try:
        _pread_into(fd, buf.numpy().data, span.start, span.path)
    finally:
        os.close(fd)
    return buf.view(dtype).reshape(span.shape)


_local = threading.local()


def buffer(name: str, nbytes: int) -> Tensor:
    """This thread's reusable, page-aligned ``uint8`` buffer ``name`` of at least ``nbytes`` (contents undefined).

    Memory that is written again and again stays mapped and cached, where fresh
    memory for every block would be faulted in page by page. Buffers live as
    long as their thread (the rewriting engine's threads end with each job).
    """
    bufs: dict[str, Tensor] = _local.__dict__.setdefault("buffers", {})
    buf = bufs.get(name)
    if buf is None or buf.numel() < nbytes:
        raw = torch.empty(max(nbytes, 1) + _PAGE, dtype=torch.uint8)
        start = -raw.data_ptr() % _PAGE
        buf = bufs[name] = raw[start:start + max(nbytes, 1)]
    return buf[:nbytes]


def _pread_into(fd: int, view: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise CorruptFileError(path, "ended before a tensor's last byte (truncated?)")
        done += got


def _bytes_of(t: Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return t.reshape(-1).view(torch.uint8).numpy().data


def write_at(fd: int, data: Tensor | bytes, offset: int) -> int:
    """Write ``data`` (bytes, or a contiguous CPU tensor's) at ``offset`` of ``fd`` in ≤ 256 KiB pieces; returns their count."""
    view = _bytes_of(data) if isinstance(data, Tensor) else memoryview(data)
    for start in range(0, len(view), _PIECE):
        piece, done = view[start:start + _PIECE], 0
        while done < len(piece):
            done += os.pwrite(fd, piece[done:], offset + start + done)
    return len(view)


def copy_range(span: Span, fd: int, offset: int) -> None:
    """Copy the bytes of ``span`` to ``offset`` of ``fd``: in the kernel where the OS allows, else through a buffer."""
    src = os.open(span.path, os.O_RDONLY)
    try:
        pos, dst, left = span.start, offset, span.nbytes
        while left > 0:
            try:
                n = os.copy_file_range(src, fd, min(left, _CHUNK), pos, dst)
            except (AttributeError, OSError):
                n = 0
            if n <= 0:  # not supported across these file systems, or EOF: copy through user space
                n = min(left, _PIECE)
                buf = buffer("copy", n)
                _pread_into(src, buf.numpy().data, pos, span.path)
                write_at(fd, buf, dst)
            pos, dst, left = pos + n, dst + n, left - n
    finally:
        os.close(src)


class RowReader:
    """One tensor on disk read in blocks of rows (as a ``(rows, -1)`` matrix) into a reused buffer.

    >>> with RowReader(span, rows=4096) as r:                       # doctest: +SKIP
    ...     block = r.read(0, 128)          # rows 0–127, valid until the next read into "rows"
    """

    def __init__(self, span: Span, rows: int) -> None:
        if span.dtype not in CODE_DTYPES:
            raise CorruptFileError(span.path, f"dtype {span.dtype} cannot be read as a torch tensor here")
        self.span, self.rows = span, max(rows, 1)
        self.dtype = CODE_DTYPES[span.dtype]
        self.row_bytes = span.nbytes // self.rows
        self._fd = os.open(span.path, os.O_RDONLY)

    def read(self, first: int, count: int, *, slot: str = "rows") -> Tensor:
        """Rows ``first … first + count − 1`` in this thread's buffer ``slot`` (overwritten by the next read into it)."""
        n = count * self.row_bytes
        buf = buffer(slot, n)
        if n:
            _pread_into(self._fd, buf.numpy().data, self.span.start + first * self.row_bytes, self.span.path)
        return buf.view(self.dtype).reshape(count, -1) if n else torch.empty((count, 0), dtype=self.dtype)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "RowReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors of a (small) safetensors file, and its metadata; checked first."""
    header, meta = read_safetensors_header(path)
    out: dict[str, Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in header:
                out[key] = f.get_tensor(key)
    except Exception as e:  # safetensors raises its own untyped errors
        raise CorruptFileError(path, str(e).splitlines()[0] if str(e) else e.__class__.__name__) from None
    return out, meta


def save_safetensors(tensors: Mapping[str, Tensor], path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (made contiguous) to ``path``, with the mode of any new file (0666 less the umask).

    safetensors 0.8.0's ``save_file`` writes a private (0600) temporary and renames it over ``path``:
    ``path`` is created first, as a new file is (the kernel applies the umask or a default ACL), and
    the mode it got (an existing file's own) is given back to the file ``save_file`` leaves there. No umask is read or set
    (``os.umask`` is process-wide and would race with other threads).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)  # never truncated: its old bytes may be mapped by the tensors
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=dict(metadata or {}))
    os.chmod(path, mode)


def header_bytes(entries: Sequence[Entry], metadata: Mapping[str, str] | None) -> bytes:
    """The header of a file holding ``entries`` in this order, padded so the data starts 8-byte aligned."""
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
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # less the umask, as `cp` makes files
        head = header_bytes(self._entries, metadata)
        self._pos = write_at(self._fd, head, 0)

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
        self._pos += write_at(self._fd, t, self._pos)

    def copy_from(self, name: str, span: Span) -> None:
        """Append the bytes of ``span`` unchanged (kernel-side copy where the OS allows)."""
        e = self._expect(name)
        if span.nbytes != e.nbytes:
            raise RuntimeError(f"ShardWriter: {name!r} has {span.nbytes} bytes, planned {e.nbytes}")
        copy_range(span, self._fd, self._pos)
        self._pos += e.nbytes

    def close(self) -> None:
        try:
            if self._next != len(self._entries):
                raise RuntimeError(f"ShardWriter: {len(self._entries) - self._next} planned tensors were never written")
        finally:
            self.abort()

    def abort(self) -> None:
        """Close the file without the completeness check (the caller removes it)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
