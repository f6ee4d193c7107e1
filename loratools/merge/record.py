"""The record of a merge: the file that holds its patches (:mod:`.patch`) for an exact un-merge.

The *record* of a merge is a safetensors file: tensor ``"<key>::<part>"`` for
each part of each tensor's patch, and in its metadata ``loratools.record = "1"``,
a checksum of every base tensor it restores (``digests``, JSON: ``"xxh3_128:<hex>"``
each; records written before 2026-11-24 hold bare sha256 hex under ``sha256``) and
the merge's stamp (which adapters and weights). :class:`RecordWriter` writes it while the
merge streams; :func:`read_record` opens it for an un-merge.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import xxhash
from torch import Tensor

from ..errors import CorruptFileError, InvalidFieldError, WrongBaseError
from ..io import DTYPE_CODES, Entry, ShardWriter, Span, read_tensor, tensor_spans, write_at
from ..io.paths import temporary_path
from ..validate import get_field, load_json
from .patch import check_patch
from .plan import METADATA_KEY, AdapterInput, content_sha256, stamp_entries

__all__ = ["RecordWriter", "read_record", "read_patch", "Digest"]

RECORD_KEY = "loratools.record"
#: the checksum of each restored tensor: XXH3-128 runs at 16 GB/s here, where sha256 (1.8 GB/s) was a fifth of
#: ``merge --record``'s time; it guards against a restore that is not bit-exact (another BLAS, a changed merged
#: model), not against an adversary, who could rewrite the record's checksums as easily as the tensors
DIGEST = "xxh3_128"
_DIGEST_FORM = re.compile(r"xxh3_128:[0-9a-f]{32}|[0-9a-f]{64}")


class Digest:
    """A running checksum of a tensor's bytes; :meth:`value` is ``"xxh3_128:<hex>"``, or bare sha256 hex
    when made ``like`` such a value (the records of older versions)."""

    def __init__(self, like: str | None = None) -> None:
        self.sha256 = like is not None and ":" not in like
        self._h = hashlib.sha256() if self.sha256 else xxhash.xxh3_128()

    def update(self, data: bytes | memoryview) -> None:
        self._h.update(data)

    def value(self) -> str:
        return self._h.hexdigest() if self.sha256 else f"{DIGEST}:{self._h.hexdigest()}"


class RecordWriter:
    """Collects each tensor's patch as the merge streams, then writes the record (atomically) at the end.

    Patches are appended to a scratch file beside the record as they come (from
    several threads) and copied by :meth:`finish` into ``tmp``, the record's
    temporary from :func:`~loratools.io.atomic_output` (whose lock, held for the
    whole merge, covers the scratch too: a killed merge's scratch is swept by the
    next run to the same record). Memory stays flat whatever the record's size.
    The scratch stays private (0600) and is removed on :meth:`close`.
    """

    def __init__(self, path: Path, tmp: Path) -> None:
        self.path, self.tmp = path, tmp
        self.scratch = temporary_path(path, "scratch")  # fits NAME_MAX whatever the record's name
        self.entries: list[Entry] = []
        self.hashes: dict[str, str] = {}
        self._lock = threading.Lock()
        # made at the first patch: a merge refused before it writes anything (a layout `record` cannot restore,
        # an adapter GGUF refuses) leaves no scratch beside the record, whatever its caller's order of cleanup
        self._fd = -1
        self._pos = 0
        # set by close(): a worker still finishing a block after an interrupt must not make the scratch again
        self._closed = False

    def add(self, key: str, patch: dict[str, Tensor], digest: str) -> None:
        with self._lock:
            if self._closed:
                return
            self.hashes[key] = digest
            if patch and self._fd < 0:
                self._fd = os.open(self.scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            for part, t in patch.items():
                t = t.contiguous()
                self._pos += write_at(self._fd, t, self._pos)
                self.entries.append(Entry(f"{key}::{part}", DTYPE_CODES[t.dtype], tuple(t.shape)))

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def finish(self, meta: dict[str, str]) -> None:
        rmeta = {RECORD_KEY: "1", "digests": json.dumps(self.hashes), **meta}
        with ShardWriter(self.tmp, self.entries, rmeta) as rw:
            pos = 0
            for e in self.entries:
                rw.copy_from(e.name, Span(self.scratch, e.dtype, e.shape, pos, pos + e.nbytes))
                pos += e.nbytes

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        with contextlib.suppress(FileNotFoundError):
            self.scratch.unlink()


def read_record(path: Path, inputs: Sequence[AdapterInput]) -> tuple[dict[str, dict[str, Span]], dict[str, str],
                                                                      dict[str, Any]]:
    """The record's patches as spans (each read when its tensor comes), its hashes and the merge's stamp."""
    tensors, meta = tensor_spans(path)
    if meta.get(RECORD_KEY) != "1" or METADATA_KEY not in meta:
        raise CorruptFileError(path, "not a merge record (a merge writes one when given `record`)")
    info = load_json(meta[METADATA_KEY], where=path)
    # the un-merge replays the merge's arithmetic in this precision: anything else is a damaged record
    get_field(info, "precision", str, where=path, default="float32", check=lambda v: v in ("float32", "float64"),
              expected='"float32" or "float64"')
    made = stamp_entries(meta[METADATA_KEY], where=path) or []
    same = len(made) == len(inputs) and all(
        e.weight == i.weight and (e.content == content_sha256(i.adapter) if e.content is not None
                                  else e.fingerprint == i.adapter.fingerprint.sha256) for e, i in zip(made, inputs))
    if not same:
        raise WrongBaseError(f"the record {path} was made for other adapters or weights; "
                             "give the same `adapters` and `weight` values as the merge")
    patches: dict[str, dict[str, Span]] = {}
    for k, t in tensors.items():
        key, _, part = k.rpartition("::")
        if not key or not part:
            raise CorruptFileError(path, f"its tensor {k[:80]!r} is not named <tensor>::<part>")
        patches.setdefault(key, {})[part] = t
    field = "digests" if "digests" in meta else "sha256"
    hashes = load_json(meta.get(field, "null"), where=path)
    if not isinstance(hashes, dict) or not all(isinstance(v, str) and _DIGEST_FORM.fullmatch(v)
                                               for v in hashes.values()):
        raise InvalidFieldError(path, field, hashes, "an object of tensor checksums (xxh3_128:<32 hex> or sha256 hex)")
    return patches, hashes, info


def read_patch(record: Path, key: str, spans: Mapping[str, Span], shape: Sequence[int], dtype: torch.dtype, *,
               extra: Sequence[str] = ()) -> dict[str, Tensor]:
    """The record's patch for the tensor ``key`` (``dtype``, ``shape``), read and checked part by part
    (:func:`~.patch.check_patch`): a damaged part is one :class:`CorruptFileError` naming the record, the tensor
    and the part, before anything is written. Parts named in ``extra`` (``dora_norm``) come back unchecked,
    for the caller to check."""
    parts = {part: read_tensor(s) for part, s in spans.items()}
    try:
        check_patch({p: t for p, t in parts.items() if p not in extra}, shape, dtype)
    except ValueError as e:
        raise CorruptFileError(record, f"its patch for {key} does not fit a {str(dtype).removeprefix('torch.')} "
                                       f"tensor of shape {tuple(shape)}: {e}") from None
    return parts
