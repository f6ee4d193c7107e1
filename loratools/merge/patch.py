"""Exact un-merge: what a cast to the output dtype loses, stored compactly (the *patch*).

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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..io import buffer
from .kernels import bits

__all__ = ["make_patch", "values_at", "apply_patch", "check_patch", "PatchBuilder", "PatchApplier", "patch_nbytes", "bits"]

_BLOCK = 1 << 18  # elements per block: every temporary below is at most a block (a multiple of 8, for packing)
_SIGNED = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}
_TORCH_SIGNED = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CANDIDATES = (0, 1, 2, 4, 8)


def _keys(t: Tensor) -> np.ndarray:
    """Bit patterns as integers of the same width ordered like the values: +x ↦ bits, −x ↦ −mag − 1 (−0.0 ↦ −1).

    With ``s`` the sign bit spread over the word, the key is ``bits ^ (s & 0x7f…f)``;
    the map is its own inverse (:func:`_from_keys`).
    """
    return _keys_of_bits(t.contiguous().view(_TORCH_SIGNED[t.element_size()]).numpy())


def _keys_of_bits(b: np.ndarray) -> np.ndarray:
    """:func:`_keys` of bit patterns already viewed as signed integers."""
    shift = 8 * b.itemsize - 1
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

    Two ways to keep what a patch needs, with the same result (:func:`make_patch`'s):

    - *sparse* (while at most n/16 elements have moved): the index, ulp count and
      W0's value of every element whose count is not 0 — everything any patch
      needs, and all a b = 0 patch is (the usual case: a LoRA update moves a few
      percent of a 16-bit tensor's elements by an ulp or two);
    - *dense* (from the block where more moved): every count as one signed byte
      in ``counts`` (counts beyond a byte kept aside with W0's value, as exceptions)
      and, for each b, how many counts fit in b bits.
    """

    def __init__(self, shape: Sequence[int], dtype: torch.dtype, *, counts: Tensor | None = None) -> None:
        self.shape, self.dtype = tuple(shape), dtype
        self.n = int(np.prod(self.shape, dtype=np.int64))
        self.width = torch.empty((), dtype=dtype).element_size()
        self.counts = counts
        self.index_dtype = np.int32 if self.n < 2**31 else np.int64
        self.sparse: tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]] | None = ([], [], [])
        self.n_moved = 0
        self.d8 = np.empty(0, np.int8)  # dense: the counts, one signed byte each
        self.fits = dict.fromkeys(_CANDIDATES, 0)  # dense: how many counts fit in b bits, for each b
        self.big_idx: list[np.ndarray] = []  # dense: counts beyond a byte, and W0's values there
        self.big_val: list[Tensor] = []
        self.pos = 0

    def add(self, original: Tensor, reconstructed: Tensor) -> None:
        """The next block (flat, in order) of W0 and of R."""
        o, r = original.reshape(-1), reconstructed.reshape(-1)
        if self.sparse is not None:
            idx, cnt, w0_bits = _moved(o, r)
            if self.n_moved + idx.size <= self.n // 16:
                self.n_moved += idx.size
                self.sparse[0].append((idx + self.pos).astype(self.index_dtype))
                self.sparse[1].append(cnt)
                self.sparse[2].append(w0_bits)
                self.pos += o.numel()
                return
            self._densify()
        self._add_dense(o, _ulp_counts(o, r))

    def _densify(self, moved: tuple[np.ndarray, np.ndarray, Tensor] | None = None) -> None:
        """Go dense: the counts so far written into ``d8`` from the sparse lists (zero where nothing moved);
        ``moved`` is :meth:`_moved`'s result when the caller has it already."""
        buf = self.counts.numpy() if self.counts is not None else np.empty(self.n, np.uint8)
        self.d8 = buf[:self.n].view(np.int8)
        self.d8[:self.pos] = 0
        idx, cnt, val = moved if moved is not None else self._moved()
        big = np.flatnonzero((cnt < -128) | (cnt > 127))
        self.big_idx.append(idx[big])
        self.big_val.append(val[torch.from_numpy(big)])
        cnt[big] = 0
        self.d8[idx] = cnt
        for b in _CANDIDATES:
            self.fits[b] = self.pos - _outside(cnt, b) - big.size
        self.sparse = None

    def _moved(self) -> tuple[np.ndarray, np.ndarray, Tensor]:
        """The sparse lists joined: (indices as int64, counts, W0's values)."""
        assert self.sparse is not None
        idx, cnt, w0_bits = self.sparse
        if not idx:
            return np.empty(0, np.int64), np.empty(0, np.int16), torch.empty(0, dtype=self.dtype)
        return (np.concatenate(idx).astype(np.int64), np.concatenate(cnt),
                torch.from_numpy(np.concatenate(w0_bits)).view(self.dtype))

    def _add_dense(self, o: Tensor, d: np.ndarray) -> None:
        n, pos, big = o.numel(), self.pos, 0
        if n:
            lo, hi = (int(x) for x in torch.aminmax(torch.from_numpy(d)))
            if lo < -128 or hi > 127:
                idx = np.flatnonzero((d < -128) | (d > 127))
                self.big_idx.append(idx + pos)
                self.big_val.append(o[torch.from_numpy(idx)].clone())
                d[idx] = 0
                big = idx.size
        d8 = self.d8[pos:pos + n]
        np.copyto(d8, d, casting="unsafe")  # every count left fits a byte
        a = d8 ^ (d8 >> 7)  # d ≥ 0 ↦ d, d < 0 ↦ −d − 1: d fits b bits ⟺ a < 2^(b−1)
        self.fits[0] += n - int(np.count_nonzero(d8)) - big
        self.fits[1] += n - int(np.count_nonzero(a)) - big
        self.fits[2] += n - int(np.count_nonzero(a >> 1)) - big
        self.fits[4] += n - int(np.count_nonzero(a >> 3)) - big
        self.fits[8] += n - big
        self.pos += n

    def bits_per_count(self, fits: dict[int, int] | None = None) -> int:
        """The b of the smallest patch (−1: W0 whole), with :func:`make_patch`'s costs, from ``fits`` (how many
        counts fit in b bits; the dense tally by default)."""
        n, width, fits = self.n, self.width, fits if fits is not None else self.fits
        per_exception = width + (4 if n < 2**31 else 8)
        best: tuple[float, int] = (float(n * width), -1)
        for b in _CANDIDATES if width > 1 else (0,):
            cost = (n * b + 7) // 8 + 16 * (b > 0) + (n - fits[b]) * per_exception
            if cost < best[0]:
                best = (float(cost), b)
        return best[1]

    def patch(self, values_at: Callable[[np.ndarray], Tensor]) -> dict[str, Tensor]:
        """The patch; ``values_at(idx)`` gives W0's values at sorted flat indices (W0 whole when b = −1)."""
        if self.pos != self.n:
            raise ValueError(f"PatchBuilder: {self.pos} of {self.n} elements were added")
        if self.sparse is not None:
            if self.n_moved == 0:
                return {}
            moved = self._moved()  # joined once: the choice of b, then the patch or the dense counts
            b = self.bits_per_count({b: self.n - _outside(moved[1], b) for b in _CANDIDATES})
            if b == 0:
                return {"idx": torch.from_numpy(moved[0].astype(self.index_dtype)), "val": moved[2]}
            if b > 0:
                self._densify(moved)
        else:
            b = self.bits_per_count()
        if b < 0:
            return {"full": values_at(np.arange(self.n)).reshape(self.shape).clone()}
        idx, val = self._exceptions(b, values_at)
        patch: dict[str, Tensor] = {}
        if b > 0:
            lo, _ = _range(b)
            u8 = self.d8.view(np.uint8)
            for start in range(0, self.n, _BLOCK):
                u8[start:start + _BLOCK] += np.uint8(-lo & 0xFF)  # count − lo, in [0, 2^b): exceptions give −lo
            patch["ulps"] = torch.from_numpy(_pack(u8, b))
            patch["ulps_spec"] = torch.tensor([b, lo], dtype=torch.int64)
        if self.big_idx:
            idx, val = np.concatenate([idx, *self.big_idx]), torch.cat([val, *self.big_val])
            order = np.argsort(idx, kind="stable")
            idx, val = idx[order], val[torch.from_numpy(order)]
        if idx.size:
            patch["idx"] = torch.from_numpy(idx.astype(self.index_dtype))
            patch["val"] = val
        return patch

    def _exceptions(self, b: int, values_at: Callable[[np.ndarray], Tensor]) -> tuple[np.ndarray, Tensor]:
        """The sorted flat indices whose (byte-sized) count does not fit b bits and W0's values there (read with
        ``values_at``); their counts in ``d8`` are set to 0."""
        _, hi = _range(b)
        found: list[np.ndarray] = []
        for start in range(0, self.n, _BLOCK):
            seg = self.d8[start:start + _BLOCK]
            if b >= 8:
                continue
            out = np.flatnonzero(seg != 0) if b == 0 else np.flatnonzero((seg ^ (seg >> 7)) > hi)
            if len(out):
                found.append(out + start)
                seg[out] = 0
        idx = np.concatenate(found) if found else np.empty(0, np.int64)
        return idx, values_at(idx) if idx.size else torch.empty(0, dtype=self.dtype)


def _outside(cnt: np.ndarray, b: int) -> int:
    """How many of the counts ``cnt`` do not fit b bits (lie outside [−2^(b−1), 2^(b−1))); all non-zero ones for b = 0."""
    if b == 0:
        return int(np.count_nonzero(cnt))
    lo, hi = _range(b)
    return int(np.count_nonzero((cnt < lo) | (cnt > hi)))


def _key_diff(ko: np.ndarray, kr: np.ndarray) -> np.ndarray:
    """``ko − kr`` in int64: exact for keys of up to 32 bits; 64-bit keys that overflow it give ±(2⁶³ − 1)
    (such a count is only ever kept as an exception, whatever its size)."""
    d = np.subtract(ko, kr, dtype=np.int64)
    if ko.dtype.itemsize == 8:
        over = np.flatnonzero(((ko ^ kr) & (ko ^ d)) < 0)  # the signs of ko and kr differ, and d's is not ko's
        d[over] = np.where(ko[over] < 0, -(2**63 - 1), 2**63 - 1)
    return d


def _moved(o: Tensor, r: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The flat indices where ``o`` and ``r`` differ bit for bit — exactly where the count is not 0 —, the
    counts there (key(o) − key(r), see :func:`_keys`) clipped to int16, and ``o``'s bit patterns there: two
    passes over the block, then arithmetic on the few that moved (numpy's gathers: 3× torch's here)."""
    signed = _TORCH_SIGNED[o.element_size()]
    bo, br = o.view(signed).numpy(), r.view(signed).numpy()
    # numpy finds the True of a bool array ~10× faster than the non-zeros of an integer array
    idx = np.flatnonzero(np.not_equal(bo, br, out=buffer("patch.mask", bo.size).view(torch.bool).numpy()))
    ob, rb = bo[idx], br[idx]
    cnt = _key_diff(_keys_of_bits(ob), _keys_of_bits(rb))
    return idx, np.clip(cnt, -(1 << 15), (1 << 15) - 1).astype(np.int16), ob


def _ulp_counts(o: Tensor, r: Tensor) -> np.ndarray:
    """key(o) − key(r) per element (see :func:`_keys`): int16 for 16-bit values, else int64.

    For 16-bit values of one sign the difference of the raw bit patterns is the
    count up to its sign and fits int16 (|Δ| < 2¹⁵): ``(Δ ^ m) − m`` with m the sign
    of o spread over the word negates it for negative values. Where the signs
    differ the count is computed in int64 and clipped to int16: a count that
    does not fit a byte is only ever kept as an exception, whatever its size.
    """
    if o.element_size() != 2:
        return _key_diff(_keys(o), _keys(r))
    bo, br = o.view(torch.int16).numpy(), r.view(torch.int16).numpy()
    # into this thread's reused scratch: a fresh temporary per block costs more in page faults than its arithmetic
    d, m = (buffer(slot, 2 * bo.size).view(torch.int16).numpy() for slot in ("patch.d", "patch.m"))
    np.subtract(bo, br, out=d)
    np.right_shift(bo, 15, out=m)
    np.bitwise_xor(d, m, out=d)
    np.subtract(d, m, out=d)
    mask = buffer("patch.mask", bo.size).view(torch.bool).numpy()
    flips = np.flatnonzero(np.less(np.bitwise_xor(bo, br, out=m), 0, out=mask))
    if flips.size:
        exact = _key_diff(_keys(o[torch.from_numpy(flips)]), _keys(r[torch.from_numpy(flips)]))
        d[flips] = np.clip(exact, -(1 << 15), (1 << 15) - 1)
    return d


def values_at(read: Callable[[int, int], Tensor], idx: np.ndarray, rows: int, cols: int, step: int,
              dtype: torch.dtype) -> Tensor:
    """W0's values at the sorted flat indices ``idx`` of a (rows, cols) tensor, read again ``step`` rows at a time
    with ``read(first, n)`` (only the blocks the indices fall in): :meth:`PatchBuilder.patch`'s ``values_at``."""
    parts: list[Tensor] = []
    bounds = np.searchsorted(idx, np.arange(0, rows * cols + step * cols, step * cols))
    for b, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        if hi > lo:
            first = b * step
            w = read(first, min(step, rows - first)).reshape(-1)
            parts.append(w[torch.from_numpy(idx[lo:hi] - first * cols)].clone())
    return torch.cat(parts) if parts else torch.empty(0, dtype=dtype)


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


#: (word, multiplier) that gathers 8/b bytes, each < 2^b, into the top byte of a word, lowest first:
#: byte i·8 is shifted to bit (8/b − 1)·8 + i·b by the term 2^((8/b−1)·8 + i·b − 8i); the other products fall
#: above the word (dropped) or sum below the top byte without a carry into it (checked for every input in the tests)
_GATHER: dict[int, tuple[np.dtype[Any], int]] = {
    1: (np.dtype("<u8"), sum(1 << (56 - 7 * i) for i in range(8))),
    2: (np.dtype("<u4"), sum(1 << (24 - 6 * i) for i in range(4))),
    4: (np.dtype("<u2"), (1 << 8) + (1 << 4))}


def _pack(v: np.ndarray, nbits: int) -> np.ndarray:
    """Values in [0, 2^nbits) packed ``8/nbits`` to a byte, lowest bits first (a block at a time)."""
    if nbits == 8:
        return v.copy()
    per = 8 // nbits
    word, mult = _GATHER[nbits]
    out = np.empty(-(-v.size // per), np.uint8)
    for start in range(0, v.size, _BLOCK):
        chunk = v[start:start + _BLOCK]
        if chunk.size % per:
            chunk = np.concatenate([chunk, np.zeros(-chunk.size % per, np.uint8)])
        w = chunk.view(word) * word.type(mult)  # little-endian words: byte i is the i-th value
        np.right_shift(w, word.type(8 * per - 8), out=w)
        np.copyto(out[start // per:start // per + w.size], w, casting="unsafe")
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


#: the parts a patch may hold (see :func:`make_patch`)
PARTS = frozenset({"full", "ulps", "ulps_spec", "idx", "val"})


def check_patch(patch: Mapping[str, Tensor], shape: Sequence[int], dtype: torch.dtype) -> None:
    """Refuse a patch that :class:`PatchApplier` could not apply to a ``dtype`` tensor of ``shape`` as
    :func:`make_patch` writes it: ``ValueError("part `P`: …")`` naming the first part that does not fit (an
    unknown part, a wrong dtype or shape, a ``ulps_spec`` b outside {1, 2, 4, 8}, an index outside the tensor).
    Every check reads at most the indices once: a damaged record never reaches the applier's arithmetic."""
    n = int(np.prod(tuple(shape), dtype=np.int64))

    def bad(part: str, why: str) -> ValueError:
        t = patch[part]
        return ValueError(f"part `{part}` ({str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}) {why}")

    unknown = sorted(set(patch) - PARTS)
    if unknown:
        raise bad(unknown[0], f"is not a part of a patch (expected {', '.join(sorted(PARTS))})")
    if "full" in patch:
        if len(patch) > 1:
            raise bad("full", "comes with other parts")
        if patch["full"].dtype != dtype or tuple(patch["full"].shape) != tuple(shape):
            raise bad("full", f"is not a {str(dtype).removeprefix('torch.')} tensor of shape {tuple(shape)}")
        return
    for one, other in (("ulps", "ulps_spec"), ("idx", "val")):
        if (one in patch) != (other in patch):
            raise bad(one if one in patch else other, f"comes without `{other if one in patch else one}`")
    if "ulps_spec" in patch:
        spec = patch["ulps_spec"]
        if spec.dtype != torch.int64 or tuple(spec.shape) != (2,):
            raise bad("ulps_spec", "is not two int64 values [b, lo]")
        b, lo = (int(x) for x in spec)
        if b not in _CANDIDATES[1:] or lo != _range(b)[0] or 8 * torch.empty((), dtype=dtype).element_size() < b:
            raise bad("ulps_spec", f"holds b = {b}, lo = {lo}: expected b in 1, 2, 4, 8 and lo = −2^(b−1)")
        ulps = patch["ulps"]
        if ulps.dtype != torch.uint8 or ulps.ndim != 1 or ulps.numel() != -(-n * b // 8):
            raise bad("ulps", f"is not {-(-n * b // 8)} bytes of {b}-bit counts for {n} elements")
    if "idx" in patch:
        idx, val = patch["idx"], patch["val"]
        if idx.dtype not in (torch.int32, torch.int64) or idx.ndim != 1:
            raise bad("idx", "is not a 1-D int32 or int64 tensor of flat indices")
        if val.dtype != dtype or val.ndim != 1 or val.numel() != idx.numel():
            raise bad("val", f"is not {idx.numel()} {str(dtype).removeprefix('torch.')} values (one per index)")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise bad("idx", f"holds indices outside the tensor's {n} elements")


class PatchApplier:
    """:func:`apply_patch` a block at a time: :meth:`apply` restores each block of R in place."""

    def __init__(self, patch: Mapping[str, Tensor], shape: Sequence[int], dtype: torch.dtype) -> None:
        check_patch(patch, shape, dtype)  # ValueError naming the part: nothing below indexes out of bounds
        self.full = patch.get("full")
        self.full = self.full.reshape(-1) if self.full is not None else None
        self.ulps = patch["ulps"].numpy() if "ulps" in patch else None
        self.b, self.lo = (int(x) for x in patch["ulps_spec"]) if "ulps_spec" in patch else (0, 0)
        idx = patch["idx"].to(torch.int64).numpy() if "idx" in patch else np.empty(0, np.int64)
        val = patch["val"].to(dtype) if "val" in patch else torch.empty(0, dtype=dtype)
        if idx.size > 1 and not bool(np.all(idx[1:] >= idx[:-1])):
            order = np.argsort(idx, kind="stable")
            idx, val = idx[order], val[torch.from_numpy(order)]
        self.idx, self.val = idx, val
        self.val_bits = val.contiguous().view(_TORCH_SIGNED[val.element_size()]).numpy()

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
        if j > i:  # as bit patterns through numpy: twice as fast as torch's index_put here
            signed = _TORCH_SIGNED[block.element_size()]
            block.view(signed).numpy()[self.idx[i:j] - start] = self.val_bits[i:j]
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
