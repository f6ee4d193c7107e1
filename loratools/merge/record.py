"""Exact un-merge: what a cast to the output dtype loses, stored compactly, and the file that holds it.

Merging rounds: ``M = cast(W0 + ΔW)``; un-merging rounds again:
``R = cast(M − ΔW)``. Usually ``R == W0`` bit for bit, but not everywhere
(in bfloat16 a large share of elements differ by an ulp). A *patch* stores,
for one tensor, exactly what is needed to turn ``R`` back into ``W0``.

Scheme: the smallest exact patch, chosen per tensor (w = element width, n elements):

- count, for every element, how many ulps ``W0`` lies from ``R`` on an ordering
  of the bit patterns that keeps −0.0 and +0.0 apart (usually −1, 0 or +1);
- store the counts that fit in b bits (b ∈ {1, 2, 4, 8}, range [−2^(b−1), 2^(b−1)))
  bit-packed (``ulps``, n·b/8 bytes), and the elements whose count does not fit
  as flat indices + ``W0``'s values there (``idx`` int32/int64, ``val``: (4 + w)
  bytes each); b = 0 means indices + values only (pure sparse);
- or ``W0`` itself (``full``, n·w bytes) if that is smaller.

b is the one that minimises the bytes. Tiny updates give pure sparse (few
elements change); updates as large as the weights (in bfloat16 a third of the
elements may move by an ulp) give 2-bit counts plus a few exceptions.

>>> w0 = torch.tensor([1.0, 2.0, 3.0]); r = torch.tensor([1.0, 2.5, 3.0])
>>> apply_patch(r, make_patch(w0, r)).equal(w0)
True

The *record* of a merge is a safetensors file: tensor ``"<key>::<part>"`` for
each part of each tensor's patch, and in its metadata ``loratools.record = "1"``,
the sha256 of every base tensor it restores (``sha256``, JSON) and the merge's
stamp (which adapters and weights). :class:`RecordWriter` writes it while the
merge streams; :func:`read_record` opens it for an un-merge.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import CorruptFileError, WrongBaseError
from ..io import DTYPE_CODES, Entry, ShardWriter, Span, atomic_output, tensor_spans
from .kernels import bits
from .plan import METADATA_KEY, AdapterInput

__all__ = ["make_patch", "apply_patch", "patch_nbytes", "bits", "tensor_sha256", "RecordWriter", "read_record"]

RECORD_KEY = "loratools.record"


def make_patch(original: Tensor, reconstructed: Tensor) -> dict[str, Tensor]:
    """The smallest exact patch turning ``reconstructed`` into ``original`` (same dtype and shape).

    Keys: ``ulps`` + ``ulps_spec`` ([b, lo]) for bit-packed ulp counts, ``idx`` +
    ``val`` for exceptions, or ``full``; ``{}`` if the two already agree.
    """
    if original.dtype != reconstructed.dtype or original.shape != reconstructed.shape:
        raise ValueError("make_patch: original and reconstructed must share dtype and shape")
    o, r = original.reshape(-1), reconstructed.reshape(-1)
    n, width = o.numel(), o.element_size()
    d = _order(o) - _order(r)
    if not bool((d != 0).any()):
        return {}
    idx_dtype = torch.int32 if n < 2**31 else torch.int64
    per_exception = width + (4 if idx_dtype == torch.int32 else 8)
    # one histogram of the counts (clamped to ±129) gives every candidate's number of exceptions
    hist = torch.bincount((d.clamp(-129, 129) + 129).to(torch.int64), minlength=259)
    best: tuple[float, int] = (float(n * width), -1)  # (bytes, b); b = −1 means full
    for b in (0, 1, 2, 4, 8) if width > 1 else (0,):
        lo, hi = (0, 0) if b == 0 else (-(1 << (b - 1)), (1 << (b - 1)) - 1)
        exceptions = n - int(hist[lo + 129:hi + 130].sum())
        cost = (n * b + 7) // 8 + 16 * (b > 0) + exceptions * per_exception
        if cost < best[0]:
            best = (float(cost), b)
    b = best[1]
    if b < 0:
        return {"full": original.contiguous().clone()}
    lo, hi = (0, 0) if b == 0 else (-(1 << (b - 1)), (1 << (b - 1)) - 1)
    out = (d < lo) | (d > hi)
    patch: dict[str, Tensor] = {}
    if b > 0:
        patch["ulps"] = _pack(torch.where(out, torch.zeros_like(d), d) - lo, b)
        patch["ulps_spec"] = torch.tensor([b, lo], dtype=torch.int64)
    if bool(out.any()):
        idx = out.nonzero().reshape(-1)
        patch["idx"], patch["val"] = idx.to(idx_dtype), o[idx].clone()
    return patch


def _order(t: Tensor) -> Tensor:
    """Bit patterns as int64 keys ordered like the values: +x ↦ mag, −x ↦ −mag − 1 (so −0.0 ↦ −1)."""
    b = bits(t).to(torch.int64)
    width = t.element_size() * 8
    mag = b & ((1 << (width - 1)) - 1)
    return torch.where(b < 0, -mag - 1, mag)


def _unorder(key: Tensor, like: Tensor) -> Tensor:
    width = like.element_size() * 8
    b = torch.where(key < 0, (-key - 1) - (1 << (width - 1)), key)  # the negative int of the same bit pattern
    return b.to(bits(like).dtype).view(like.dtype)


def _pack(v: Tensor, nbits: int) -> Tensor:
    """Values in [0, 2^nbits) packed ``8/nbits`` to a byte, lowest bits first."""
    per = 8 // nbits
    v = v.to(torch.uint8)
    v = torch.cat([v, v.new_zeros(-v.numel() % per)]).reshape(-1, per)
    packed = torch.zeros(v.shape[0], dtype=torch.uint8)
    for i in range(per):
        packed |= v[:, i] << (i * nbits)
    return packed


def _unpack(packed: Tensor, nbits: int, n: int) -> Tensor:
    per, mask = 8 // nbits, (1 << nbits) - 1
    p = packed.to(torch.int64)
    return torch.stack([(p >> (i * nbits)) & mask for i in range(per)], dim=1).reshape(-1)[:n]


def apply_patch(reconstructed: Tensor, patch: dict[str, Tensor]) -> Tensor:
    """A new tensor: ``reconstructed`` with ``patch`` applied (see :func:`make_patch`)."""
    if "full" in patch:
        full = patch["full"]
        if full.shape != reconstructed.shape or full.dtype != reconstructed.dtype:
            raise ValueError("apply_patch: the patch does not fit this tensor")
        return full.clone()
    r = reconstructed.contiguous().reshape(-1)
    if "ulps" in patch:
        b, lo = (int(x) for x in patch["ulps_spec"])
        r = _unorder(_order(r) + _unpack(patch["ulps"], b, r.numel()) + lo, r)
    else:
        r = r.clone()
    if "idx" in patch:
        r[patch["idx"].to(torch.int64)] = patch["val"].to(r.dtype)
    return r.reshape(reconstructed.shape)


def patch_nbytes(patch: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in patch.values())


def tensor_sha256(t: Tensor) -> str:
    """sha256 of a tensor's raw bytes (C order): a check that a restore is bit-exact."""
    t = t.detach().to("cpu").contiguous()
    return hashlib.sha256(memoryview(t.reshape(-1).view(torch.uint8).numpy())).hexdigest()


class RecordWriter:
    """Collects each tensor's patch as the merge streams, then writes the record (atomically) at the end.

    Patches are appended to a scratch file beside the record as they come (from
    several threads) and copied into the record by :meth:`finish`, so memory
    stays flat whatever the record's size. The scratch is removed on :meth:`close`.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.scratch = path.parent / f".{path.name}.scratch-{os.getpid()}"
        self.entries: list[Entry] = []
        self.hashes: dict[str, str] = {}
        self._lock = threading.Lock()
        self.scratch.write_bytes(b"")

    def add(self, key: str, patch: dict[str, Tensor], sha256: str) -> None:
        with self._lock, self.scratch.open("ab") as f:
            self.hashes[key] = sha256
            for part, t in patch.items():
                t = t.contiguous()
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                self.entries.append(Entry(f"{key}::{part}", DTYPE_CODES[t.dtype], tuple(t.shape)))

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def finish(self, meta: dict[str, str], *, force: bool, inputs: Sequence[str | os.PathLike[str]]) -> None:
        rmeta = {RECORD_KEY: "1", "sha256": json.dumps(self.hashes), **meta}
        with atomic_output(self.path, force=force, inputs=tuple(inputs)) as rtmp:
            with ShardWriter(rtmp, self.entries, rmeta) as rw:
                pos = 0
                for e in self.entries:
                    rw.copy_from(e.name, Span(self.scratch, e.dtype, e.shape, pos, pos + e.nbytes))
                    pos += e.nbytes

    def close(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.scratch.unlink()


def read_record(path: Path, inputs: Sequence[AdapterInput]) -> tuple[dict[str, dict[str, Span]], dict[str, str],
                                                                      dict[str, Any]]:
    """The record's patches as spans (each read when its tensor comes), its hashes and the merge's stamp."""
    tensors, meta = tensor_spans(path)
    if meta.get(RECORD_KEY) != "1" or METADATA_KEY not in meta:
        raise CorruptFileError(path, "not a merge record (a merge writes one when given `record`)")
    info = json.loads(meta[METADATA_KEY])
    made = [(a["fingerprint"], float(a["weight"])) for a in info["adapters"]]
    given = [(i.adapter.fingerprint.sha256, i.weight) for i in inputs]
    if made != given:
        raise WrongBaseError(f"the record {path} was made for other adapters or weights; "
                             "give the same `adapters` and `weight` values as the merge")
    patches: dict[str, dict[str, Span]] = {}
    for k, t in tensors.items():
        key, _, part = k.rpartition("::")
        patches.setdefault(key, {})[part] = t
    return patches, json.loads(meta["sha256"]), info
