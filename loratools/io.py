"""Reading and writing weights on disk: lazily, safely, atomically.

- :class:`ModelReader` opens a Hugging Face model directory (one
  ``model.safetensors``, or shards with ``model.safetensors.index.json``) or a
  single ``.safetensors`` file and reads tensors one at a time.
- :func:`atomic_output` gives a temporary path beside the destination and
  renames it into place only when the block finishes without error.
- :func:`read_safetensors_header` parses and checks a safetensors header
  without trusting it, so damaged files fail with a clear message.

Only safetensors is ever loaded: nothing here unpickles.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .errors import CorruptFileError, InputNotFoundError, InvalidOptionError, OutputExistsError

__all__ = [
    "ModelReader",
    "atomic_output",
    "check_output",
    "read_safetensors_header",
    "read_safetensors_layout",
    "DTYPE_SIZES",
    "load_safetensors",
    "save_safetensors",
    "INDEX_NAME",
    "WEIGHTS_NAME",
]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024

#: bytes per element of each safetensors dtype code
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}


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
        if len(head) < 8:
            raise CorruptFileError(p, "shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise CorruptFileError(p, "header length points past the end of the file (truncated?)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(p, f"header is not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise CorruptFileError(p, "header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise CorruptFileError(p, "__metadata__ is not a JSON object")
    data_len = size - 8 - n
    for name, info in header.items():
        try:
            start, end = (int(x) for x in info["data_offsets"])
            count = 1
            for d in info["shape"]:
                count *= int(d)
            width = DTYPE_SIZES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise CorruptFileError(p, f"tensor {name!r} has a malformed entry") from None
        if not 0 <= start <= end <= data_len:
            raise CorruptFileError(p, f"tensor {name!r} lies past the end of the file (truncated?)")
        if end - start != count * width:
            raise CorruptFileError(p, f"tensor {name!r} has {end - start} bytes for shape {info['shape']}")
    return header, {str(k): str(v) for k, v in meta.items()}, 8 + n


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
    """Write ``tensors`` (made contiguous) to ``path``."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=dict(metadata or {}))


class ModelReader:
    """Lazy, read-only view of a model's tensors.

    >>> with ModelReader("fixtures/tiny-llama") as model:          # doctest: +SKIP
    ...     w = model.get("model.layers.0.self_attn.q_proj.weight")
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise InputNotFoundError(self.path, "model")
        self.shard_of: dict[str, str] = {}
        self.index: dict[str, Any] | None = None
        if self.path.is_dir():
            index = self.path / INDEX_NAME
            single = self.path / WEIGHTS_NAME
            if index.is_file():
                try:
                    self.index = json.loads(index.read_text())
                    self.shard_of = {str(k): str(v) for k, v in self.index["weight_map"].items()}
                except (json.JSONDecodeError, KeyError, AttributeError) as e:
                    raise CorruptFileError(index, f"not a safetensors index ({e.__class__.__name__})") from None
                self.root = self.path
            elif single.is_file():
                self.root = self.path
            else:
                raise CorruptFileError(self.path, f"no {WEIGHTS_NAME} or {INDEX_NAME} in this model directory")
            shard_names = sorted(set(self.shard_of.values())) if self.index is not None else [WEIGHTS_NAME]
        else:
            self.root = self.path.parent
            shard_names = [self.path.name]
        self.shards: list[str] = shard_names
        self._headers: dict[str, dict[str, Any]] = {}
        self._meta: dict[str, dict[str, str]] = {}
        for shard in shard_names:
            f = self.root / shard
            if not f.is_file():
                raise InputNotFoundError(f, "model shard")
            self._headers[shard], self._meta[shard] = read_safetensors_header(f)
        if self.index is None:
            self.shard_of = {k: shard_names[0] for k in self._headers[shard_names[0]]}
        else:
            for key, shard in self.shard_of.items():
                if key not in self._headers[shard]:
                    raise CorruptFileError(self.root / shard, f"the index lists {key!r} but the shard lacks it")
        self._handles: dict[str, Any] = {}

    # -- metadata, no tensor data read --------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.shard_of)

    def __contains__(self, key: object) -> bool:
        return key in self.shard_of

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(x) for x in self._headers[self.shard_of[key]][key]["shape"])

    def dtype_name(self, key: str) -> str:
        """safetensors dtype code, e.g. ``"BF16"``."""
        return str(self._headers[self.shard_of[key]][key]["dtype"])

    def shard_keys(self, shard: str) -> list[str]:
        """Keys of one shard in file order (by data offset)."""
        h = self._headers[shard]
        return sorted(h, key=lambda k: int(h[k]["data_offsets"][0]))

    def metadata(self, shard: str | None = None) -> dict[str, str]:
        return dict(self._meta[shard or self.shards[0]])

    @property
    def files(self) -> list[Path]:
        return [self.root / s for s in self.shards]

    def nbytes(self) -> int:
        return sum(int(v["data_offsets"][1]) - int(v["data_offsets"][0]) for h in self._headers.values() for v in h.values())

    # -- tensor data ----------------------------------------------------------------
    def get(self, key: str) -> Tensor:
        shard = self.shard_of[key]
        handle = self._handles.get(shard)
        if handle is None:
            try:
                handle = safe_open(str(self.root / shard), framework="pt")
            except Exception as e:
                raise CorruptFileError(self.root / shard, str(e).splitlines()[0] if str(e) else "unreadable") from None
            self._handles[shard] = handle
        return handle.get_tensor(key)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "ModelReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def check_output(path: str | os.PathLike[str], *, force: bool = False,
                 inputs: Sequence[str | os.PathLike[str]] = (), what: str = "output") -> None:
    """Refuse ``path`` up front, before any long work: when it is, contains or lies inside
    one of ``inputs``, or when it exists and ``force`` is not given."""
    dest = Path(path)
    real = dest.resolve()
    for inp in inputs:
        ri = Path(inp).resolve()
        if real == ri or ri in real.parents or real in ri.parents:
            raise InvalidOptionError(f"{what} {dest} overlaps the input {inp}; choose another path")
    if dest.exists() and not force:
        raise OutputExistsError(dest)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, force: bool = False, inputs: tuple[str | os.PathLike[str], ...] = ()) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` on success.

    The caller writes a file or a directory at the yielded path. On any error
    the temporary is removed and ``path`` is untouched. ``path`` may not be one
    of ``inputs`` (nor inside one), and an existing ``path`` needs ``force``.
    """
    dest = Path(path)
    check_output(dest, force=force, inputs=inputs)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written to {tmp}")
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(dest, old)
            os.replace(tmp, dest)
            _remove(old)
        else:
            os.replace(tmp, dest)
    except BaseException:
        _remove(tmp)
        raise
