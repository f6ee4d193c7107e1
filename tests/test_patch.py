"""The exact-unmerge patch (loratools.merge.patch) against a whole-tensor reference written from its definition.

The reference below works on the whole tensor in int64 and follows the module
docstring word for word: ulp counts on the sign-magnitude ordering of the bit
patterns, the byte cost of every b, the first of the cheapest, exceptions as
indices + W0's values, counts − lo packed lowest bits first. The streaming
builder (blocks, a sparse phase that may turn dense mid-tensor, int16 shortcuts
for 16-bit values) must give exactly the same tensors.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratools.merge.patch import _BLOCK, _pack, apply_patch, bits, make_patch

WIDTH_INT = {2: torch.int16, 4: torch.int32}


def _ref_keys(t: torch.Tensor) -> np.ndarray:
    width = t.element_size() * 8
    u = bits(t).numpy().astype(np.int64) & ((1 << width) - 1)  # unsigned bit pattern
    mag, neg = u & ((1 << (width - 1)) - 1), u >> (width - 1)
    return np.where(neg == 1, -mag - 1, mag)


def reference_patch(w0: torch.Tensor, r: torch.Tensor) -> dict[str, torch.Tensor]:
    d = _ref_keys(w0.reshape(-1)) - _ref_keys(r.reshape(-1))
    n, width = d.size, w0.element_size()
    if not d.any():
        return {}
    per_exception = width + (4 if n < 2**31 else 8)
    best, choice = n * width, -1
    for b in (0, 1, 2, 4, 8):
        lo, hi = (0, 0) if b == 0 else (-(2 ** (b - 1)), 2 ** (b - 1) - 1)
        cost = -(-n * b // 8) + 16 * (b > 0) + int(((d < lo) | (d > hi)).sum()) * per_exception
        if cost < best:
            best, choice = cost, b
    if choice < 0:
        return {"full": w0.clone()}
    b = choice
    lo, hi = (0, 0) if b == 0 else (-(2 ** (b - 1)), 2 ** (b - 1) - 1)
    outside = (d < lo) | (d > hi)
    patch: dict[str, torch.Tensor] = {}
    if b > 0:
        v = np.where(outside, 0, d) - lo
        per = 8 // b
        v = np.concatenate([v, np.zeros(-v.size % per, np.int64)]).reshape(-1, per)
        packed = sum(v[:, i] << (i * b) for i in range(per)).astype(np.uint8)
        patch["ulps"] = torch.from_numpy(packed)
        patch["ulps_spec"] = torch.tensor([b, lo])
    idx = np.flatnonzero(outside)
    if idx.size:
        patch["idx"] = torch.from_numpy(idx.astype(np.int32))
        patch["val"] = w0.reshape(-1)[torch.from_numpy(idx)]
    return patch


def _moved(w0: torch.Tensor, ulps: np.ndarray) -> torch.Tensor:
    """``w0`` with each element moved by ``ulps`` steps of its bit pattern (magnitude for positives)."""
    b = bits(w0).to(torch.int64) + torch.from_numpy(ulps)
    width = w0.element_size() * 8
    return b.clamp(-(2 ** (width - 1)), 2 ** (width - 1) - 1).to(WIDTH_INT[w0.element_size()]).view(w0.dtype)


def _case(kind: str, n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    w0 = torch.from_numpy(rng.standard_normal(n).astype(np.float32) * 0.02).to(dtype)
    if kind == "few":  # a LoRA merge in bf16: a few percent move by ±1
        ulps = rng.integers(-1, 2, n) * (rng.random(n) < 0.03)
    elif kind == "many":  # a large update: most move, by a few
        ulps = rng.integers(-3, 4, n)
    elif kind == "late":  # nothing moves in the first blocks, then most do: the builder turns dense midway
        ulps = rng.integers(-2, 2, n) * (np.arange(n) >= n // 2)
    elif kind == "outliers":  # few moved, some by more than a byte holds
        ulps = rng.integers(-1, 2, n) * (rng.random(n) < 0.01) + rng.integers(-900, 900, n) * (rng.random(n) < 0.002)
    elif kind == "down":  # 5 % move one ulp down: few enough to keep sparse, yet 1-bit counts are smaller
        ulps = -(rng.random(n) < 0.05).astype(np.int64)
    elif kind == "flips":  # most move a little, and some cross zero by an ulp or two, or far
        ulps = rng.integers(-2, 3, n)
    else:
        ulps = np.zeros(n, np.int64)
    r = _moved(w0, ulps)
    if kind == "flips":
        w0, r = w0.clone(), r.clone()
        tiny = torch.tensor([1], dtype=WIDTH_INT[w0.element_size()]).view(w0.dtype)  # the smallest subnormal
        w0[2::83], r[2::83] = 0.0, -0.0  # one ulp apart on the ordering
        w0[5::61], r[5::61] = tiny, -0.0  # two
        w0[6::59], r[6::59] = 0.0, -tiny  # two
        w0[7::53], r[7::53] = -tiny, tiny  # three
        r[::97] = -w0[::97] * 3  # far
        r[3::79] = float("nan")
    return w0, r


KINDS = ["same", "few", "down", "many", "late", "outliers", "flips"]
SIZES = [1, 9, _BLOCK - 1, 2 * _BLOCK + 37]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", SIZES)
def test_the_streaming_patch_is_the_reference_patch(dtype: torch.dtype, kind: str, n: int) -> None:
    w0, r = _case(kind, n, dtype, seed=n)
    got, want = make_patch(w0, r), reference_patch(w0, r)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k].view(-1).view(torch.uint8),
                                                             want[k].reshape(-1).view(torch.uint8)), k
    assert torch.equal(bits(apply_patch(r, got)), bits(w0))


def test_the_usual_bf16_merge_gives_an_index_patch_and_a_large_update_a_packed_one() -> None:
    w0, r = _case("few", 2 * _BLOCK + 37, torch.bfloat16, seed=1)
    assert set(make_patch(w0, r)) == {"idx", "val"}
    w0, r = _case("many", 2 * _BLOCK + 37, torch.bfloat16, seed=1)
    p = make_patch(w0, r)
    assert "ulps" in p and int(p["ulps_spec"][0]) in (2, 4)


@pytest.mark.parametrize("nbits", [1, 2, 4, 8])
def test_packing_gathers_every_combination_of_values(nbits: int) -> None:
    per = 8 // nbits
    combos = np.array(list(itertools.product(range(1 << nbits), repeat=per)), np.uint8)[:4096]
    want = np.zeros(len(combos), np.uint8)
    for i in range(per):
        want |= (combos[:, i].astype(np.int64) << (i * nbits)).astype(np.uint8)
    assert np.array_equal(_pack(combos.reshape(-1), nbits), want)
    odd = combos.reshape(-1)[:-1] if per > 1 else combos.reshape(-1)  # a last byte only partly filled
    assert np.array_equal(_pack(odd, nbits)[:-1], want[:-1])


@settings(max_examples=25, deadline=None)
@given(dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), n=st.integers(1, 3000),
       moved=st.floats(0.0, 1.0), spread=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_any_pattern_of_moves_gives_the_reference_patch(dtype: torch.dtype, n: int, moved: float, spread: int,
                                                        seed: int) -> None:
    rng = np.random.default_rng(seed)
    w0 = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(dtype)
    r = _moved(w0, rng.integers(-spread, spread + 1, n) * (rng.random(n) < moved))
    got, want = make_patch(w0, r), reference_patch(w0, r)
    assert got.keys() == want.keys() and all(torch.equal(got[k].reshape(-1).view(torch.uint8),
                                                         want[k].reshape(-1).view(torch.uint8)) for k in want)


def test_float64_counts_that_overflow_int64_round_trip() -> None:
    """64-bit keys of opposite signs can differ by more than int64 holds (±max, NaNs with full payloads)."""
    w0 = torch.tensor([1.7e308, -0.0, 5.0, 0.0, 2.0]).to(torch.float64)
    r = torch.tensor([-1.7e308, 0.0, 5.0, 0.0, 2.0]).to(torch.float64)
    w0.view(torch.int64)[3], r.view(torch.int64)[3] = 2**63 - 1, -1  # +NaN and −NaN, every payload bit set
    p = make_patch(w0, r)
    assert set(p) == {"idx", "val"} and p["idx"].tolist() == [0, 1, 3]
    assert torch.equal(bits(apply_patch(r, p)), bits(w0))
