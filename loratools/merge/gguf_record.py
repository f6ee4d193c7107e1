"""The record of a GGUF merge: what an un-merge needs to give the original GGUF file back byte for byte.

Requantizing rounds twice. The merge writes ``M = Q₁(deq₀(W0) + ΔW)`` (Q₁ the output type); the un-merge
computes ``U = Q₀(deq₁(M) − ΔW)`` (Q₀ the tensor's original type, which differs from Q₁ when ``quant``
changed it). ``U`` equals ``W0``'s bytes in most quantization blocks but not all of them, and a difference
of ulps means nothing for a block of packed 4-bit codes and scales. So the patch works on what the type
stores (:class:`PatchRecorder` computes ``U`` while the merge streams, with the very function and row
blocks the un-merge uses, and compares):

- original type F32, F16 or BF16: :mod:`.record`'s ulp patch on the values (one value is a block);
- any quantized type: ``W0 ⊕ U`` over the tensor's bytes, deflated (``xor_deflate``, zlib); or ``W0``'s bytes
  whole (``raw``) when that is smaller. Where ``U`` differs from ``W0`` it is mostly in a block's scale bytes
  and in a few codes, so the XOR is mostly zero bytes: on SmolLM2-135M's Q4_1 q/v tensors with a peft
  ``init_lora_weights=False`` LoRA (ΔW 14% of W0) the deflated XOR is 20% of the tensors' bytes with the
  types kept and 9% when the merge wrote Q8_0, where a patch of whole differing quantization blocks is 74%
  and 100% (nearly every block's scale moves).

The record is :mod:`.record`'s file (patches as tensors ``"<tensor>::<part>"``, the checksum of each original
tensor's bytes, the merge's stamp). Its stamp carries under ``gguf`` what the file around the tensors needs:
each adapted tensor's original type, the original value of the model's ``loratools.merge`` key (hex of the
raw entry, or None), and the sha256 of each original file, which the un-merge checks its output against.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CorruptFileError
from ..gguf.quants import block_sizes, can_quantize, dequantize
from ..io import Span, read_tensor
from ..io.gguf_model import GGUFModelFile, GGUFTensor
from .patch import PatchApplier, PatchBuilder, values_at
from .record import Digest, RecordWriter, read_patch

__all__ = ["FLOAT_TYPES", "PatchRecorder", "PatchRestorer", "record_info"]

_LEVEL = 6  # zlib's default: on these XORs level 1 gives 10-20% larger patches

#: GGUF float types whose patch is :mod:`.record`'s ulp patch, as the torch dtype of their values
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class _XorDiff:
    """``W0 ⊕ U`` over a tensor's bytes, deflated as it streams (zlib): zero where the un-merge already gives
    ``W0`` back, so the stream is small; or ``W0``'s bytes whole once that is no larger (then nothing more is
    kept: memory stays below the tensor's own bytes)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.z: Any = zlib.compressobj(_LEVEL)
        self.out: list[bytes] = []
        self.size = 0
        self.differs = False

    def add(self, original: np.ndarray, recon: np.ndarray) -> None:
        x = np.bitwise_xor(original.reshape(-1), recon.reshape(-1))
        self.differs = self.differs or bool(x.any())
        if self.z is not None:
            self.out.append(self.z.compress(memoryview(x)))
            self.size += len(self.out[-1])
            if self.size >= self.nbytes:
                self.z, self.out = None, []

    def patch(self, whole: Callable[[], np.ndarray]) -> dict[str, torch.Tensor]:
        if not self.differs:
            return {}
        if self.z is not None:
            self.out.append(self.z.flush())
            if sum(map(len, self.out)) < self.nbytes:
                return {"xor_deflate": torch.frombuffer(bytearray(b"".join(self.out)), dtype=torch.uint8)}
        return {"raw": torch.from_numpy(np.array(whole(), np.uint8).reshape(-1))}


def _values(raw: bytes | np.ndarray, qtype: str) -> torch.Tensor:
    """A float type's bytes as a flat tensor of its values (shares the bytes when they are writable)."""
    a = np.frombuffer(raw, np.uint8) if isinstance(raw, bytes) else raw.reshape(-1)
    return torch.from_numpy(a).view(FLOAT_TYPES[qtype]) if a.flags.writeable else torch.tensor(a).view(FLOAT_TYPES[qtype])


class PatchRecorder:
    """The merge side, for one adapted tensor ``t`` of the base: :meth:`block` gets each block of rows as read
    (``raw``) and as merged (``q``, of type ``out_type``) and computes what the un-merge will,
    ``recompute(deq(q), first_row)``; :meth:`done` adds the patch and ``W0``'s checksum to ``writer``."""

    def __init__(self, model: GGUFModelFile, t: GGUFTensor, out_type: str,
                 recompute: Callable[[np.ndarray, int], np.ndarray], writer: RecordWriter) -> None:
        self.model, self.t, self.out_type, self.recompute, self.writer = model, t, out_type, recompute, writer
        self.sha = Digest()
        n = t.rows * t.shape[-1]
        self.floats = FLOAT_TYPES.get(t.qtype)
        self.diff: Any = PatchBuilder((n,), self.floats) if self.floats is not None else _XorDiff(t.nbytes)

    def prepare(self, first: int, n: int, raw: bytes, q: np.ndarray) -> np.ndarray:
        """What the un-merge will compute for these rows (on the block's own thread)."""
        return self.recompute(dequantize(q, self.out_type, (n, self.t.shape[-1])), first)

    def block(self, first: int, n: int, raw: bytes, q: np.ndarray, u: np.ndarray) -> np.ndarray:
        self.sha.update(raw)
        if self.floats is not None:
            self.diff.add(_values(raw, self.t.qtype), _values(np.ascontiguousarray(u), self.t.qtype))
        else:
            self.diff.add(np.frombuffer(raw, np.uint8), u)
        return q

    def _at(self, idx: np.ndarray) -> torch.Tensor:
        """W0's values at the sorted flat indices ``idx``, read again a block of rows at a time."""
        cols, floats = self.t.shape[-1], self.floats
        if floats is None:
            raise RuntimeError(f"{self.t.name}: a {self.t.qtype} tensor has no values to read again")
        return values_at(lambda s, n: _values(self.model.read(self.t, s, n), self.t.qtype), idx, self.t.rows, cols,
                         max(1, (1 << 20) // cols), floats)

    def done(self) -> None:
        if self.floats is not None:
            patch = self.diff.patch(self._at)
        else:
            patch = self.diff.patch(lambda: np.frombuffer(self.model.read(self.t), np.uint8))
        self.writer.add(self.t.name, patch, self.sha.value())


class PatchRestorer:
    """The un-merge side, for one tensor: :meth:`block` turns each block of rows of ``U`` (the original type's
    bytes) into ``W0``'s with the record's patch; :meth:`done` checks ``W0``'s checksum."""

    def __init__(self, t: GGUFTensor, qtype: str, patch: Mapping[str, Span], digest: str, record: Path) -> None:
        self.t, self.qtype, self.digest, self.record = t, qtype, digest, record
        self.sha = Digest(like=digest)
        block, bb = block_sizes(qtype)
        self.row_bytes = t.shape[-1] // block * bb
        self.raw: np.ndarray | None = None
        self.xor: Any = None  # a zlib decompressor of the "xor_deflate" part
        self.applier: Any = None
        if qtype in FLOAT_TYPES:
            shape = (t.rows * t.shape[-1],)
            self.applier = PatchApplier(read_patch(record, t.name, patch, shape, FLOAT_TYPES[qtype]), shape,
                                        FLOAT_TYPES[qtype])
            return
        parts = {k: read_tensor(s) for k, s in patch.items()}
        if set(parts) - {"raw", "xor_deflate"} or any(v.dtype != torch.uint8 or v.ndim != 1 for v in parts.values()):
            raise self._bad(f"parts {sorted(parts)}")
        elif "raw" in parts:
            self.raw = parts["raw"].numpy()
            if self.raw.size != t.rows * self.row_bytes:
                raise self._bad(f"{self.raw.size} bytes")
        elif "xor_deflate" in parts:
            self.xor, self.tail = zlib.decompressobj(), parts["xor_deflate"].numpy().tobytes()

    def _bad(self, why: str) -> CorruptFileError:
        return CorruptFileError(self.record, f"its patch for {self.t.name} does not fit a {self.qtype} tensor of "
                                             f"shape {self.t.shape} ({why})")

    def _xor(self, need: int) -> np.ndarray:
        """The next ``need`` bytes of the inflated XOR stream."""
        out = b""
        try:
            while len(out) < need and not self.xor.eof:
                got = self.xor.decompress(self.tail, need - len(out))
                self.tail = self.xor.unconsumed_tail
                if not got and not self.tail:  # all input taken and no byte more: a truncated (or empty) stream
                    break
                out += got
        except zlib.error as e:
            raise self._bad(f"xor_deflate: {e}") from None
        if len(out) != need:
            raise self._bad("xor_deflate ends early")
        return np.frombuffer(out, np.uint8)

    def prepare(self, first: int, n: int, raw: bytes, q: np.ndarray) -> None:
        return None

    def block(self, first: int, n: int, raw: bytes, q: np.ndarray, prepared: None = None) -> np.ndarray:
        q = q if q.flags.writeable else q.copy()
        if self.applier is not None:
            self.applier.apply(_values(q, self.qtype), first * self.t.shape[-1])
        elif self.raw is not None:
            q.reshape(-1)[:] = self.raw[first * self.row_bytes:(first + n) * self.row_bytes]
        elif self.xor is not None:
            np.bitwise_xor(q.reshape(-1), self._xor(n * self.row_bytes), out=q.reshape(-1))
        self.sha.update(np.ascontiguousarray(q).reshape(-1).data)
        return q

    def done(self) -> None:
        if self.sha.value() != self.digest:
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
    unknown = sorted({v for v in types.values() if not can_quantize(v)})
    if unknown:  # a merge records only types it wrote back: a damaged record, not a `quant` to choose
        raise CorruptFileError(record, f"its `gguf` stamp names tensor types loratools does not write: "
                                       f"{', '.join(map(repr, unknown[:4]))}")
    try:
        return types, files, (bytes.fromhex(kv) if kv is not None else None)
    except ValueError:
        raise CorruptFileError(record, "its `gguf` stamp_kv is not hex") from None
