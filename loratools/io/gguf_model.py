"""GGUF *model* files (one file or a ``-00001-of-0000N.gguf`` split set): read the layout once, and write a
copy whose tensors are given one at a time.

The GGUF layout (llama.cpp ``ggml/include/gguf.h``, version 3)::

    magic "GGUF" · version u32 · n_tensors u64 · n_kv u64 · key/values · tensor infos
    (name · n_dims u32 · dims u64… (ggml order) · type u32 · offset u64) · padding · tensor data

with every tensor's offset (from the start of the data) a multiple of ``general.alignment`` (32 unless set).

The key/values are copied as the source's raw bytes (``ReaderField.parts``), not re-packed through
``gguf.GGUFWriter``: that writer drops empty strings and arrays (``add_string``/``add_array`` return on
empty values) and puts ``general.architecture`` first, so it would not copy metadata unchanged. Tensor data
is read and written with file reads and writes (not the memory map), so memory stays flat: one block of
rows at a time, and untouched tensors go file to file in chunks.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..errors import CorruptFileError, InvalidOptionError
from ..gguf.arch import GGUFBase
from ..validate import get_field

__all__ = ["GGUFTensor", "GGUFModelFile", "split_paths", "out_split_paths", "open_gguf", "open_gguf_model",
           "gguf_field", "gguf_scalars", "gguf_count", "gguf_heads", "gguf_model_info", "write_gguf_model",
           "is_gguf_model_path", "layout_mismatch", "file_sha256"]

_SPLIT = re.compile(r"^(?P<prefix>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.gguf$")
_MAGIC = 0x46554747  # b"GGUF" little-endian
_PSEUDO = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")  # the reader's header entries, not key/values
_STRING = 8  # GGUFValueType.STRING
_COPY_CHUNK = 16 << 20


def is_gguf_model_path(path: str | Path) -> bool:
    """Whether ``path`` names a ``.gguf`` file (a model to merge into, rather than a safetensors model)."""
    p = Path(path)
    return p.suffix.lower() == ".gguf" and p.is_file()


def split_paths(path: Path) -> list[Path]:
    """Every file of the split set ``path`` belongs to (llama.cpp's ``%s-%05d-of-%05d.gguf``), or ``[path]``."""
    m = _SPLIT.match(path.name)
    if not m:
        return [path]
    n = int(m["n"])
    paths = [path.with_name(f"{m['prefix']}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    for p in paths:
        if not p.is_file():
            raise CorruptFileError(path, f"it is split {int(m['i'])} of {n}, and split {p.name} is missing")
    return paths


def out_split_paths(out: Path, n: int) -> list[Path]:
    """Where ``n`` output splits go: ``out`` itself for one file; for a split set, ``out`` when it is named
    like split 1 of ``n``, else ``<out without .gguf>-0000i-of-0000n.gguf``."""
    if n == 1:
        return [out]
    m = _SPLIT.match(out.name)
    prefix = m["prefix"] if m and int(m["n"]) == n and int(m["i"]) == 1 else out.name.removesuffix(".gguf")
    return [out.with_name(f"{prefix}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF model: numpy-order ``shape``, ggml ``qtype`` name, and where its bytes lie."""

    name: str
    shape: tuple[int, ...]
    qtype: str
    split: int
    offset: int  # absolute, in its split file
    nbytes: int

    @property
    def rows(self) -> int:
        n = 1
        for d in self.shape[:-1]:
            n *= d
        return n


@dataclass
class GGUFModelFile:
    """A GGUF model read once: per split its raw key/values and tensors, in file order."""

    paths: list[Path]
    version: int
    alignment: int
    kv: list[list[tuple[str, bytes]]]  # per split: (key, raw bytes of the whole entry)
    tensors: list[list[GGUFTensor]]  # per split, in file order
    fields: dict[str, Any]  # the first split's values (architecture, head counts …)

    def all_tensors(self) -> Iterator[GGUFTensor]:
        for ts in self.tensors:
            yield from ts

    def by_name(self) -> dict[str, GGUFTensor]:
        return {t.name: t for t in self.all_tensors()}

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.paths)

    def read(self, t: GGUFTensor, first_row: int = 0, n_rows: int | None = None) -> bytes:
        """The raw bytes of rows ``first_row …`` of ``t`` (all rows by default)."""
        row = t.nbytes // max(1, t.rows)
        n = t.rows - first_row if n_rows is None else n_rows
        with self.paths[t.split].open("rb") as f:
            f.seek(t.offset + first_row * row)
            data = f.read(n * row)
        if len(data) != n * row:
            raise CorruptFileError(self.paths[t.split], f"tensor {t.name} is cut short")
        return data


def _value(field: Any) -> Any:
    """A field's value, or None when it is damaged (absent to every caller, which says what is missing)."""
    try:
        return field.contents()
    except Exception:  # a damaged value: absent, the caller says what is missing
        return None


def open_gguf(path: str | os.PathLike[str]) -> Any:
    """A ``gguf.GGUFReader`` of ``path``; a damaged file is one :class:`CorruptFileError` naming it. The header is
    walked first (:func:`~loratools.gguf.header.check_gguf_header`: every count bounded by the file, little-endian,
    tensors aligned and inside it), since gguf 0.19's reader loops once per item an array claims."""
    from ..gguf.header import check_gguf_header
    from ..gguf.quants import require_gguf

    gguf = require_gguf()
    check_gguf_header(Path(path))
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises bare ValueError/struct errors on damaged files
        raise CorruptFileError(path, f"not a readable GGUF file ({e.__class__.__name__}: {e})") from None


def gguf_field(reader: Any, key: str) -> Any:
    """The value of ``key`` in an open reader (arrays too), or None when absent or damaged."""
    f = reader.get_field(key)
    return _value(f) if f is not None else None


def gguf_scalars(reader: Any) -> dict[str, Any]:
    """Every scalar and string key/value of an open reader (damaged ones as None). Arrays are left out: a
    vocabulary takes seconds to decode and no caller needs it here (:func:`gguf_field` reads one array)."""
    return {k: _value(f) for k, f in reader.fields.items() if k not in _PSEUDO and len(f.types) == 1}


def gguf_count(fields: Mapping[str, Any], key: str, *, where: object) -> int | None:
    """A count key/value (heads, experts) as an int; absent, damaged or 0 is None. Any other type (a string,
    a float, a list) is a damaged file: :class:`~loratools.errors.InvalidFieldError` naming ``where`` and ``key``."""
    n = get_field(fields, key, int, where=where, default=None, nullable=True, check=lambda v: v >= 0,
                  expected="a non-negative integer")
    return n or None


def gguf_heads(fields: Mapping[str, Any], arch: str, *, where: object) -> tuple[int | None, int | None]:
    """``(head_count, head_count_kv)`` of ``arch`` (the kv count defaults to the head count), typed."""
    n = gguf_count(fields, f"{arch}.attention.head_count", where=where)
    return n, gguf_count(fields, f"{arch}.attention.head_count_kv", where=where) or n


def gguf_model_info(path: Path) -> tuple[GGUFBase, list[str]]:
    """``(base, tensor names)`` of a ``.gguf`` (a model, or an adapter that records its head counts), parsed once
    (a model's vocabulary takes seconds to parse)."""
    r = open_gguf(path)
    fields = gguf_scalars(r)
    arch = get_field(fields, "general.architecture", str, where=path, default=None, nullable=True)
    if not arch:
        raise CorruptFileError(path, "no general.architecture")
    n, kv = gguf_heads(fields, arch, where=path)
    names = [str(t.name) for t in r.tensors]
    # a model file without output.weight ties lm_head to token_embd (adapter files carry no such hint)
    tied = fields.get("general.type") != "adapter" and "output.weight" not in names
    return GGUFBase(arch, n, kv, tied, gguf_count(fields, f"{arch}.expert_count", where=path)), names


def open_gguf_model(path: str | os.PathLike[str]) -> GGUFModelFile:
    """Read the layout of a GGUF model (and of all its splits) without reading tensor data."""
    paths = split_paths(Path(path))
    kv, tensors, version, alignment, first = [], [], 3, 32, {}
    for i, p in enumerate(paths):
        r = open_gguf(p)
        if i == 0:
            version, alignment = int(r.fields["GGUF.version"].parts[0][0]), int(r.alignment)
            first = gguf_scalars(r)
        elif int(r.alignment) != alignment:
            raise CorruptFileError(p, "its alignment differs from the first split's")
        kv.append([(k, b"".join(bytes(part.tobytes()) for part in f.parts))
                   for k, f in r.fields.items() if k not in _PSEUDO])
        tensors.append([GGUFTensor(t.name, tuple(int(x) for x in reversed(t.shape.tolist())), t.tensor_type.name, i,
                                   int(t.data_offset), int(t.n_bytes)) for t in r.tensors])
        del r
    if first.get("general.type") == "adapter":
        raise InvalidOptionError(f"`base` {path} is a GGUF adapter, not a model")
    return GGUFModelFile(paths, version, alignment, kv, tensors, first)


def _pad(n: int, align: int) -> int:
    return -n % align


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def string_kv(key: str, value: str) -> bytes:
    """The raw bytes of a string key/value entry."""
    return _string(key) + struct.pack("<I", _STRING) + _string(value)


def _header(version: int, kv: list[bytes], infos: list[tuple[str, tuple[int, ...], int, int]], align: int) -> bytes:
    out = bytearray(struct.pack("<IIQQ", _MAGIC, version, len(infos), len(kv)))
    for entry in kv:
        out += entry
    for name, shape, qtype, offset in infos:
        out += _string(name) + struct.pack("<I", len(shape))
        out += b"".join(struct.pack("<Q", d) for d in reversed(shape))
        out += struct.pack("<IQ", qtype, offset)
    out += b"\0" * _pad(len(out), align)
    return bytes(out)


def copy_bytes(src: Path, offset: int, n: int, dst: IO[bytes]) -> None:
    """``n`` bytes of ``src`` from ``offset`` appended to ``dst``, a chunk at a time."""
    with src.open("rb") as f:
        f.seek(offset)
        while n > 0:
            chunk = f.read(min(n, _COPY_CHUNK))
            if not chunk:
                raise CorruptFileError(src, "a tensor is cut short")
            dst.write(chunk)
            n -= len(chunk)


def _infos(ts: list[GGUFTensor], out_types: dict[str, tuple[str, int]],
           align: int) -> tuple[list[tuple[str, tuple[int, ...], int, int]], int]:
    """Tensor infos with the offsets :func:`write_gguf_model` gives them (each tensor padded to ``align``),
    and the size of the data section."""
    from ..gguf.quants import require_gguf

    enum = require_gguf().GGMLQuantizationType
    infos, offset = [], 0
    for t in ts:
        qtype, nbytes = out_types.get(t.name, (t.qtype, t.nbytes))
        infos.append((t.name, t.shape, int(enum[qtype]), offset))
        offset += nbytes + _pad(nbytes, align)
    return infos, offset


def layout_mismatch(model: GGUFModelFile) -> str | None:
    """Why :func:`write_gguf_model` would not rewrite ``model``'s files byte for byte from what was read (None
    when it would): its header as written from the key/values and tensor infos, each tensor at the next offset
    aligned to ``general.alignment``, and nothing after the last tensor's padding. llama.cpp
    (``ggml/src/gguf.cpp`` ``gguf_write_to_buf``) and the ``gguf`` package's ``GGUFWriter`` write files so."""
    for path, entries, ts in zip(model.paths, model.kv, model.tensors):
        infos, size = _infos(ts, {}, model.alignment)
        head = _header(model.version, [raw for _, raw in entries], infos, model.alignment)
        with path.open("rb") as f:
            if f.read(len(head)) != head:
                return f"{path.name}'s header is not laid out as llama.cpp writes one"
        for t, info in zip(ts, infos):
            if t.offset != len(head) + info[3]:
                return f"{path.name}'s tensor {t.name} is not at the next aligned offset"
        if path.stat().st_size != len(head) + size:
            return f"{path.name} holds bytes after its last tensor"
    return None


def file_sha256(path: Path) -> str:
    """sha256 of a whole file, read a chunk at a time."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_gguf_model(paths: list[Path], model: GGUFModelFile, kv: list[list[bytes]],
                     out_types: dict[str, tuple[str, int]],
                     data: Any) -> None:
    """Write one file per split of ``model`` to ``paths``: key/values ``kv[i]`` (raw entries), the same tensors
    in the same order, tensor ``name`` as ``out_types[name] = (type name, nbytes)`` (its own otherwise), each
    tensor's bytes from ``data(tensor, file)`` (which appends exactly those bytes to ``file``)."""
    align = model.alignment
    for path, entries, ts in zip(paths, kv, model.tensors):
        infos, _ = _infos(ts, out_types, align)
        with path.open("wb") as f:
            f.write(_header(model.version, entries, infos, align))
            for t in ts:
                start = f.tell()
                data(t, f)
                n = f.tell() - start
                want = out_types.get(t.name, (t.qtype, t.nbytes))[1]
                if n != want:
                    raise RuntimeError(f"{t.name}: wrote {n} bytes, not {want}")
                f.write(b"\0" * _pad(n, align))


def raw_kv(model: GGUFModelFile, extra: Iterable[tuple[str, bytes | None]] = ()) -> list[list[bytes]]:
    """Each split's key/value entries as raw bytes, with ``extra`` (key, entry) set in the first split
    (an existing key of that name is replaced in place, a new one goes last; an entry None removes the key)."""
    out = []
    for i, entries in enumerate(model.kv):
        d = dict(entries)
        if i == 0:
            for k, v in extra:
                if v is None:
                    d.pop(k, None)
                else:
                    d[k] = v
        out.append(list(d.values()))
    return out
