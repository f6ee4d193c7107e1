"""The record of a GGUF merge: what an un-merge needs to give the original GGUF file back byte for byte.

Requantizing rounds twice. The merge writes ``M = Q₁(deq₀(W0) + ΔW)`` (Q₁ the output type); the un-merge
computes ``U = Q₀(deq₁(M) − ΔW)`` (Q₀ the tensor's original type, which differs from Q₁ when ``quant``
changed it). ``U`` equals ``W0``'s bytes in most quantization blocks but not all of them, and a difference
of ulps means nothing for a block of packed 4-bit codes and scales. So the patch works on what the type
stores (:class:`PatchRecorder` computes ``U`` while the merge streams, with the very function and row
blocks the un-merge uses, and compares):

- original type F32, F16 or BF16: :mod:`.record`'s ulp patch on the values (one value is a block);
- any quantized type: the indices of the blocks of ``U`` that differ from ``W0``'s (``blocks``, int32, flat
  over the tensor) and ``W0``'s bytes there (``bytes``, uint8 (k, block bytes)); or ``W0``'s bytes whole
  (``raw``) when that is smaller (a quantization block of 256 values is 144 bytes for Q4_K, 210 for Q6_K;
  32 values are 34 bytes for Q8_0, 18 for Q4_0: llama.cpp ``ggml/src/ggml-common.h``).

The record is :mod:`.record`'s file (patches as tensors ``"<tensor>::<part>"``, the sha256 of each original
tensor's bytes, the merge's stamp). Its stamp carries under ``gguf`` what the file around the tensors needs:
each adapted tensor's original type, the original value of the model's ``loratools.merge`` key (hex of the
raw entry, or None), and the sha256 of each original file, which the un-merge checks its output against.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CorruptFileError
from ..gguf_quants import block_sizes, dequantize
from ..io import Span, read_tensor
from ..io.gguf_model import GGUFModelFile, GGUFTensor
from .record import PatchApplier, PatchBuilder, RecordWriter

__all__ = ["FLOAT_TYPES", "PatchRecorder", "PatchRestorer", "record_info"]

#: GGUF float types whose patch is :mod:`.record`'s ulp patch, as the torch dtype of their values
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class _BlockDiff:
    """The quantization blocks where ``U`` differs from ``W0``: indices and ``W0``'s bytes, or ``W0`` whole
    once that is no larger (then nothing more is kept: memory stays below the tensor's own bytes)."""

    def __init__(self, nbytes: int, block_bytes: int) -> None:
        self.nbytes, self.bb = nbytes, block_bytes
        self.idx: list[np.ndarray] = []
        self.val: list[np.ndarray] = []
        self.count = 0
        self.full = False
        self.pos = 0  # blocks seen

    def add(self, original: np.ndarray, recon: np.ndarray) -> None:
        o, r = original.reshape(-1, self.bb), recon.reshape(-1, self.bb)
        if not self.full:
            d = np.flatnonzero((o != r).any(axis=1))
            self.count += d.size
            if self.count * (self.bb + 4) >= self.nbytes:
                self.full, self.idx, self.val = True, [], []
            elif d.size:
                self.idx.append(d + self.pos)
                self.val.append(o[d].copy())
        self.pos += o.shape[0]

    def patch(self, whole: Callable[[], np.ndarray]) -> dict[str, torch.Tensor]:
        if self.full:
            return {"raw": torch.from_numpy(np.array(whole(), np.uint8).reshape(-1))}
        if not self.count:
            return {}
        return {"blocks": torch.from_numpy(np.concatenate(self.idx).astype(np.int32)),
                "bytes": torch.from_numpy(np.concatenate(self.val))}


def _values(raw: bytes | np.ndarray, qtype: str) -> torch.Tensor:
    """A float type's bytes as a flat tensor of its values (shares the bytes when they are writable)."""
    a = np.frombuffer(raw, np.uint8) if isinstance(raw, bytes) else raw.reshape(-1)
    return torch.from_numpy(a).view(FLOAT_TYPES[qtype]) if a.flags.writeable else torch.tensor(a).view(FLOAT_TYPES[qtype])


class PatchRecorder:
    """The merge side, for one adapted tensor ``t`` of the base: :meth:`block` gets each block of rows as read
    (``raw``) and as merged (``q``, of type ``out_type``) and computes what the un-merge will,
    ``recompute(deq(q), first_row)``; :meth:`done` adds the patch and ``W0``'s sha256 to ``writer``."""

    def __init__(self, model: GGUFModelFile, t: GGUFTensor, out_type: str,
                 recompute: Callable[[np.ndarray, int], np.ndarray], writer: RecordWriter) -> None:
        self.model, self.t, self.out_type, self.recompute, self.writer = model, t, out_type, recompute, writer
        self.sha = hashlib.sha256()
        n = t.rows * t.shape[-1]
        self.floats = FLOAT_TYPES.get(t.qtype)
        self.diff: Any = (PatchBuilder((n,), self.floats) if self.floats is not None
                          else _BlockDiff(t.nbytes, block_sizes(t.qtype)[1]))

    def block(self, first: int, n: int, raw: bytes, q: np.ndarray) -> np.ndarray:
        u = self.recompute(dequantize(q, self.out_type, (n, self.t.shape[-1])), first)
        self.sha.update(raw)
        if self.floats is not None:
            self.diff.add(_values(raw, self.t.qtype), _values(np.ascontiguousarray(u), self.t.qtype))
        else:
            self.diff.add(np.frombuffer(raw, np.uint8), u)
        return q

    def _at(self, idx: np.ndarray) -> torch.Tensor:
        """W0's values at the sorted flat indices ``idx``, read again a block of rows at a time."""
        cols, parts = self.t.shape[-1], []
        step = max(1, (1 << 20) // cols)
        for s in range(0, self.t.rows, step):
            lo, hi = np.searchsorted(idx, [s * cols, (s + step) * cols])
            if hi > lo:
                v = _values(self.model.read(self.t, s, min(step, self.t.rows - s)), self.t.qtype)
                parts.append(v[torch.from_numpy(idx[lo:hi] - s * cols)].clone())
        return torch.cat(parts) if parts else torch.empty(0, dtype=self.floats)

    def done(self) -> None:
        if self.floats is not None:
            patch = self.diff.patch(self._at)
        else:
            patch = self.diff.patch(lambda: np.frombuffer(self.model.read(self.t), np.uint8))
        self.writer.add(self.t.name, patch, self.sha.hexdigest())


class PatchRestorer:
    """The un-merge side, for one tensor: :meth:`block` turns each block of rows of ``U`` (the original type's
    bytes) into ``W0``'s with the record's patch; :meth:`done` checks ``W0``'s sha256."""

    def __init__(self, t: GGUFTensor, qtype: str, patch: Mapping[str, Span], sha256: str, record: Path) -> None:
        self.t, self.qtype, self.sha256, self.record = t, qtype, sha256, record
        self.sha = hashlib.sha256()
        parts = {k: read_tensor(s) for k, s in patch.items()}
        n = t.rows * t.shape[-1]
        block, bb = block_sizes(qtype)
        self.row_bytes = t.shape[-1] // block * bb
        self.bb, self.per_row = bb, t.shape[-1] // block
        try:
            if qtype in FLOAT_TYPES:
                self.applier: Any = PatchApplier(parts, (n,), FLOAT_TYPES[qtype])
            else:
                self.raw, self.idx, self.bytes = self._blocks(parts, t.rows * self.per_row)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise CorruptFileError(record, f"its patch for {t.name} does not fit a {qtype} tensor of shape "
                                           f"{t.shape} ({e})") from None

    def _blocks(self, parts: dict[str, torch.Tensor], nblocks: int) -> tuple[Any, np.ndarray, np.ndarray]:
        if "raw" in parts:
            raw = parts["raw"].numpy()
            if raw.dtype != np.uint8 or raw.size != nblocks * self.bb:
                raise ValueError("raw is not the tensor's bytes")
            return raw, np.empty(0, np.int64), np.empty((0, self.bb), np.uint8)
        idx = parts["blocks"].numpy().astype(np.int64) if parts else np.empty(0, np.int64)
        val = parts["bytes"].numpy() if parts else np.empty((0, self.bb), np.uint8)
        if (val.dtype != np.uint8 or val.shape != (idx.size, self.bb) or (idx.size and (
                idx.min() < 0 or idx.max() >= nblocks or bool(np.any(idx[1:] <= idx[:-1]))))):
            raise ValueError("block indices or bytes out of place")
        return None, idx, val

    def block(self, first: int, n: int, raw: bytes, q: np.ndarray) -> np.ndarray:
        q = q if q.flags.writeable else q.copy()
        if self.qtype in FLOAT_TYPES:
            self.applier.apply(_values(q, self.qtype), first * self.t.shape[-1])
        elif self.raw is not None:
            q.reshape(-1)[:] = self.raw[first * self.row_bytes:(first + n) * self.row_bytes]
        else:
            lo, hi = np.searchsorted(self.idx, [first * self.per_row, (first + n) * self.per_row])
            q.reshape(-1, self.bb)[self.idx[lo:hi] - first * self.per_row] = self.bytes[lo:hi]
        self.sha.update(np.ascontiguousarray(q).reshape(-1))
        return q

    def done(self) -> None:
        if self.sha.hexdigest() != self.sha256:
            raise CorruptFileError(self.record, f"restoring {self.t.name} did not give the base's bytes back; "
                                                "un-merge on the same kind of machine as the merge (or the merged "
                                                "model was changed)")


def record_info(info: Mapping[str, Any], record: Path) -> tuple[dict[str, str], list[str], bytes | None]:
    """The ``gguf`` part of a record's stamp, checked: (original type per tensor, file sha256s, stamp entry)."""
    g = info.get("gguf")
    if not isinstance(g, dict):
        raise CorruptFileError(record, "it is the record of a safetensors merge, not of a GGUF one")
    types, files, kv = g.get("types"), g.get("files"), g.get("stamp_kv")
    if (not isinstance(types, dict) or not all(isinstance(v, str) for v in types.values())
            or not isinstance(files, list) or not all(isinstance(v, str) for v in files)
            or not (kv is None or isinstance(kv, str))):
        raise CorruptFileError(record, "its `gguf` stamp is not {types, files, stamp_kv}")
    try:
        return types, files, (bytes.fromhex(kv) if kv is not None else None)
    except ValueError:
        raise CorruptFileError(record, "its `gguf` stamp_kv is not hex") from None
