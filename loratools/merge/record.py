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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import CorruptFileError, InvalidFieldError, WrongBaseError
from ..io import DTYPE_CODES, Entry, ShardWriter, Span, tensor_spans, write_at
from ..validate import load_json
from .kernels import bits
from .plan import METADATA_KEY, AdapterInput, content_sha256, stamp_entries

__all__ = ["make_patch", "apply_patch", "PatchBuilder", "PatchApplier", "patch_nbytes", "bits", "tensor_sha256",
           "RecordWriter", "read_record"]

RECORD_KEY = "loratools.record"


_BLOCK = 1 << 18  # elements per block: every temporary below is at most a block (a multiple of 8, for packing)
_SIGNED = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}
_TORCH_SIGNED = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
#: ulp counts are differences of keys: 16-bit keys differ by less than 2¹⁷, so int32 holds them
_WIDE = {1: np.int32, 2: np.int32, 4: np.int64, 8: np.int64}
_CANDIDATES = (0, 1, 2, 4, 8)


def _keys(t: Tensor) -> np.ndarray:
    """Bit patterns as integers of the same width ordered like the values: +x ↦ bits, −x ↦ −mag − 1 (−0.0 ↦ −1).

    With ``s`` the sign bit spread over the word, the key is ``bits ^ (s & 0x7f…f)``;
    the map is its own inverse (:func:`_from_keys`).
    """
    b = t.contiguous().view(_TORCH_SIGNED[t.element_size()]).numpy()
    shift = 8 * t.element_size() - 1
    return b ^ ((b >> shift) & ((1 << shift) - 1))


def _from_keys(k: np.ndarray, out: Tensor) -> Tensor:
    """Write the values whose keys are ``k`` into ``out`` (a contiguous 1-D tensor); returns ``out``."""
    shift = 8 * k.itemsize - 1
    o = out.view(_TORCH_SIGNED[k.itemsize]).numpy()
    np.bitwise_xor(k, (k >> shift) & ((1 << shift) - 1), out=o)
    return out


def _range(b: int) -> tuple[int, int]:
    """The ulp counts a b-bit field holds: [lo, hi]."""
    return (0, 0) if b == 0 else (-(1 << (b - 1)), (1 << (b - 1)) - 1)


class PatchBuilder:
    """:func:`make_patch` a block at a time: :meth:`add` each block of (W0, R) in order, then :meth:`patch`.

    Per element it keeps only the ulp count as one signed byte (counts beyond
    a byte are kept aside as exceptions with W0's value), and for each b the
    number of counts that fit — so the choice of b is :func:`make_patch`'s.
    """

    def __init__(self, shape: Sequence[int], dtype: torch.dtype, *, counts: Tensor | None = None) -> None:
        self.shape, self.dtype = tuple(shape), dtype
        self.n = int(np.prod(self.shape, dtype=np.int64))
        self.width = torch.empty((), dtype=dtype).element_size()
        # counts may be a reused buffer: ulp counts, one signed byte each, then packed in place
        self.d8 = (counts.numpy() if counts is not None else np.empty(self.n, np.uint8))[:self.n].view(np.int8)
        self.fits = dict.fromkeys(_CANDIDATES, 0)  # how many counts fit in b bits, for each b
        self.big_idx: list[np.ndarray] = []
        self.big_val: list[Tensor] = []
        self.pos = 0

    def add(self, original: Tensor, reconstructed: Tensor) -> None:
        """The next block (flat, in order) of W0 and of R."""
        o, r = original.reshape(-1), reconstructed.reshape(-1)
        n, pos = o.numel(), self.pos
        d = np.subtract(_keys(o), _keys(r), dtype=_WIDE[self.width])
        big = 0
        if n and (int(d.min()) < -128 or int(d.max()) > 127):
            idx = np.flatnonzero((d < -128) | (d > 127))
            self.big_idx.append(idx + pos)
            self.big_val.append(o[torch.from_numpy(idx)].clone())
            d[idx] = 0
            big = idx.size
        d8 = self.d8[pos:pos + n]
        np.copyto(d8, d, casting="unsafe")  # every count left fits a byte
        a = d8 ^ (d8 >> 7)  # d ≥ 0 ↦ d, d < 0 ↦ −d − 1: d fits b bits ⟺ a < 2^(b−1)
        self.fits[0] += n - np.count_nonzero(d8) - big
        self.fits[1] += n - np.count_nonzero(a) - big
        self.fits[2] += n - np.count_nonzero(a >> 1) - big
        self.fits[4] += n - np.count_nonzero(a >> 3) - big
        self.fits[8] += n - big
        self.pos += n

    def bits_per_count(self) -> int:
        """The b of the smallest patch (−1: W0 whole), with :func:`make_patch`'s costs."""
        n, width = self.n, self.width
        per_exception = width + (4 if n < 2**31 else 8)
        best: tuple[float, int] = (float(n * width), -1)
        for b in _CANDIDATES if width > 1 else (0,):
            cost = (n * b + 7) // 8 + 16 * (b > 0) + (n - self.fits[b]) * per_exception
            if cost < best[0]:
                best = (float(cost), b)
        return best[1]

    def patch(self, values_at: Callable[[np.ndarray], Tensor]) -> dict[str, Tensor]:
        """The patch; ``values_at(idx)`` gives W0's values at sorted flat indices (W0 whole when b = −1)."""
        if self.pos != self.n:
            raise ValueError(f"PatchBuilder: {self.pos} of {self.n} elements were added")
        if self.fits[0] == self.n:
            return {}
        b = self.bits_per_count()
        if b < 0:
            return {"full": values_at(np.arange(self.n)).reshape(self.shape).clone()}
        lo, hi = _range(b)
        small: list[np.ndarray] = []
        for start in range(0, self.n, _BLOCK):
            seg = self.d8[start:start + _BLOCK]
            if b == 0:  # indices and values only: every element that moved
                small.append(np.flatnonzero(seg) + start)
                continue
            out = np.flatnonzero((seg ^ (seg >> 7)) > hi) if b < 8 else np.empty(0, np.int64)  # d ∉ [lo, hi]
            if out.size:
                small.append(out + start)
                seg[out] = 0
            seg.view(np.uint8)[:] += np.uint8(-lo & 0xFF)  # count − lo, in [0, 2^b): bigs and exceptions give −lo
        patch: dict[str, Tensor] = {}
        if b > 0:
            patch["ulps"] = torch.from_numpy(_pack(self.d8.view(np.uint8), b))
            patch["ulps_spec"] = torch.tensor([b, lo], dtype=torch.int64)
        idx = np.concatenate(small) if small else np.empty(0, np.int64)
        val = values_at(idx) if idx.size else torch.empty(0, dtype=self.dtype)
        if self.big_idx:
            idx, val = np.concatenate([idx, *self.big_idx]), torch.cat([val, *self.big_val])
            order = np.argsort(idx, kind="stable")
            idx, val = idx[order], val[torch.from_numpy(order)]
        if idx.size:
            patch["idx"] = torch.from_numpy(idx.astype(np.int32 if self.n < 2**31 else np.int64))
            patch["val"] = val
        return patch


def make_patch(original: Tensor, reconstructed: Tensor) -> dict[str, Tensor]:
    """The smallest exact patch turning ``reconstructed`` into ``original`` (same dtype and shape).

    Keys: ``ulps`` + ``ulps_spec`` ([b, lo]) for bit-packed ulp counts, ``idx`` +
    ``val`` for exceptions, or ``full``; ``{}`` if the two already agree.
    Computed in blocks (:class:`PatchBuilder`): no temporary is larger than a block.
    """
    if original.dtype != reconstructed.dtype or original.shape != reconstructed.shape:
        raise ValueError("make_patch: original and reconstructed must share dtype and shape")
    o, r = original.contiguous().reshape(-1), reconstructed.contiguous().reshape(-1)
    builder = PatchBuilder(original.shape, original.dtype)
    for start in range(0, o.numel(), _BLOCK):
        builder.add(o[start:start + _BLOCK], r[start:start + _BLOCK])
    return builder.patch(lambda idx: o[torch.from_numpy(idx)].clone())


def _pack(v: np.ndarray, nbits: int) -> np.ndarray:
    """Values in [0, 2^nbits) packed ``8/nbits`` to a byte, lowest bits first (a block at a time)."""
    per = 8 // nbits
    out = np.empty(-(-v.size // per), np.uint8)
    for start in range(0, v.size, _BLOCK):
        chunk = v[start:start + _BLOCK]
        if chunk.size % per:
            chunk = np.concatenate([chunk, np.zeros(-chunk.size % per, np.uint8)])
        cols = chunk.reshape(-1, per)
        dst = out[start // per:start // per + cols.shape[0]]
        np.copyto(dst, cols[:, 0])
        for i in range(1, per):
            dst |= cols[:, i] << np.uint8(i * nbits)
    return out


def _unpack(packed: np.ndarray, nbits: int, start: int, n: int) -> np.ndarray:
    """Values ``start … start + n − 1`` of a :func:`_pack` ed array."""
    per, mask = 8 // nbits, np.uint8((1 << nbits) - 1)
    p = packed[start // per:-(-(start + n) // per)]
    cols = np.empty((p.size, per), np.uint8)
    for i in range(per):
        np.bitwise_and(p >> np.uint8(i * nbits), mask, out=cols[:, i])
    skip = start % per
    return cols.reshape(-1)[skip:skip + n]


class PatchApplier:
    """:func:`apply_patch` a block at a time: :meth:`apply` restores each block of R in place."""

    def __init__(self, patch: dict[str, Tensor], shape: Sequence[int], dtype: torch.dtype) -> None:
        self.full = patch.get("full")
        if self.full is not None and (tuple(self.full.shape) != tuple(shape) or self.full.dtype != dtype):
            raise ValueError("apply_patch: the patch does not fit this tensor")
        self.full = self.full.reshape(-1) if self.full is not None else None
        self.ulps = patch["ulps"].numpy() if "ulps" in patch else None
        self.b, self.lo = (int(x) for x in patch["ulps_spec"]) if "ulps_spec" in patch else (0, 0)
        idx = patch["idx"].to(torch.int64).numpy() if "idx" in patch else np.empty(0, np.int64)
        val = patch["val"].to(dtype) if "val" in patch else torch.empty(0, dtype=dtype)
        if idx.size > 1 and not bool(np.all(idx[1:] >= idx[:-1])):
            order = np.argsort(idx, kind="stable")
            idx, val = idx[order], val[torch.from_numpy(order)]
        self.idx, self.val = idx, val

    def apply(self, block: Tensor, start: int) -> Tensor:
        """Block ``start … start + len − 1`` (flat, contiguous) of R turned into W0's, in place; returns it."""
        n = block.numel()
        if self.full is not None:
            return block.copy_(self.full[start:start + n])
        if self.ulps is not None:
            k = _keys(block)
            k += _unpack(self.ulps, self.b, start, n).astype(k.dtype)
            k += k.dtype.type(self.lo)  # the true sum is a key, so wrapping intermediate values come out exact
            _from_keys(k, block)
        i, j = np.searchsorted(self.idx, [start, start + n])
        if j > i:
            block[torch.from_numpy(self.idx[i:j] - start)] = self.val[i:j]
        return block


def apply_patch(reconstructed: Tensor, patch: dict[str, Tensor]) -> Tensor:
    """A new tensor: ``reconstructed`` with ``patch`` applied (see :func:`make_patch`), a block at a time."""
    r = reconstructed.contiguous().reshape(-1).clone()
    applier = PatchApplier(patch, reconstructed.shape, reconstructed.dtype)
    for start in range(0, r.numel(), _BLOCK):
        applier.apply(r[start:start + _BLOCK], start)
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
    several threads) and copied by :meth:`finish` into ``tmp``, the record's
    temporary from :func:`~loratools.io.atomic_output` (whose lock, held for the
    whole merge, covers the scratch too: a killed merge's scratch is swept by the
    next run to the same record). Memory stays flat whatever the record's size.
    The scratch stays private (0600) and is removed on :meth:`close`.
    """

    def __init__(self, path: Path, tmp: Path) -> None:
        self.path, self.tmp = path, tmp
        self.scratch = path.parent / f".{path.name}.scratch-{os.getpid()}"
        self.entries: list[Entry] = []
        self.hashes: dict[str, str] = {}
        self._lock = threading.Lock()
        self._fd = os.open(self.scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._pos = 0

    def add(self, key: str, patch: dict[str, Tensor], sha256: str) -> None:
        with self._lock:
            self.hashes[key] = sha256
            for part, t in patch.items():
                t = t.contiguous()
                self._pos += write_at(self._fd, t, self._pos)
                self.entries.append(Entry(f"{key}::{part}", DTYPE_CODES[t.dtype], tuple(t.shape)))

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def finish(self, meta: dict[str, str]) -> None:
        rmeta = {RECORD_KEY: "1", "sha256": json.dumps(self.hashes), **meta}
        with ShardWriter(self.tmp, self.entries, rmeta) as rw:
            pos = 0
            for e in self.entries:
                rw.copy_from(e.name, Span(self.scratch, e.dtype, e.shape, pos, pos + e.nbytes))
                pos += e.nbytes

    def close(self) -> None:
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
        patches.setdefault(key, {})[part] = t
    hashes = load_json(meta.get("sha256", "null"), where=path)
    if not isinstance(hashes, dict) or not all(isinstance(v, str) for v in hashes.values()):
        raise InvalidFieldError(path, "sha256", hashes, "an object of tensor hashes")
    return patches, hashes, info
