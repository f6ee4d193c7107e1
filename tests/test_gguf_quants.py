"""loratools.gguf_quants without llama.cpp: round-trip error against float64, shapes, refusals.

The byte-for-byte comparison with llama.cpp's own quantizers is tests/test_gguf_quants_llama.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from loratools.gguf import quants as gq
from loratools.gguf import kquants as kq
from loratools.errors import InvalidOptionError, NonFiniteError

gguf = pytest.importorskip("gguf")

# relative RMS error ‖x̂ − x‖/‖x‖ of N(0, 1) weights, measured against the float64 originals with
# these quantizers (0.298, 0.151, 0.072, 0.036, 0.018, 0.0054 for 64×1024 draws), plus ~10 % slack
BOUNDS = {"Q2_K": 0.33, "Q3_K": 0.17, "Q4_K": 0.08, "Q5_K": 0.04, "Q6_K": 0.02, "Q8_0": 0.006}


def _rel(qtype: str, x64: np.ndarray) -> float:
    y = gq.dequantize(gq.quantize(x64.astype(np.float32), qtype), qtype, x64.shape).astype(np.float64)
    return float(np.linalg.norm(y - x64) / np.linalg.norm(x64))


def test_seqsum_accumulates_in_order() -> None:
    """The bit-exactness rests on numpy reducing axis 0 row by row, as C's `s += x[i]` loops do."""
    a = (np.random.default_rng(0).standard_normal((32, 4096)) * 10.0 ** np.arange(-8, 8, 0.5)[:, None]).astype(np.float32)
    s = a[0].copy()
    for row in a[1:]:
        s = s + row
    assert np.array_equal(kq._seqsum(a), s)
    assert not np.array_equal(np.ascontiguousarray(a.T).sum(axis=1), s)  # pairwise summation would differ


def test_nearest_int_is_round_half_to_even() -> None:
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 2.4999998, 7.5, -3.7, 4194303.0], np.float32)
    assert kq._nearest_int(v).tolist() == [0, 2, 2, 0, -2, 2, 8, -4, 4194303]


@pytest.mark.parametrize("qtype", sorted(BOUNDS))
def test_round_trip_error_against_float64(qtype: str) -> None:
    x64 = np.random.default_rng(1).standard_normal((64, 1024))
    assert _rel(qtype, x64) < BOUNDS[qtype]


def test_error_falls_with_bits_and_k_quants_beat_legacy_ones() -> None:
    x64 = np.random.default_rng(2).standard_t(3, (32, 1024)) * 0.02  # heavy tails, as real weights
    errs = {t: _rel(t, x64) for t in ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]}
    ladder = [errs[t] for t in ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]]
    assert ladder == sorted(ladder, reverse=True), errs
    # the K-quants' fitted scales and mins beat the legacy round-to-max at the same or more bits per weight
    assert errs["Q4_K"] < min(errs["Q4_0"], errs["Q4_1"]) and errs["Q5_K"] < min(errs["Q5_0"], errs["Q5_1"]), errs


@pytest.mark.parametrize("qtype", list(gq.K_QUANTS))
def test_shapes_sizes_and_special_blocks(qtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert gq.block_sizes(qtype) == tuple(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]])
    x = np.random.default_rng(3).standard_normal((3, 2, 512)).astype(np.float32)
    x[0, 0] = 0.0  # all-zero super-blocks
    x[0, 1, :256] = 0.25  # a constant one
    x_before = x.copy()
    q = gq.quantize(x, qtype)
    assert q.dtype == np.uint8 and q.shape == (3, 2, 2 * gq.K_QUANTS[qtype])
    assert np.array_equal(x, x_before)
    y = gq.dequantize(q, qtype, x.shape)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.array_equal(y[0, 0], np.zeros(512, np.float32))
    assert np.allclose(y[0, 1, :256], 0.25, rtol=2e-3)
    monkeypatch.setattr(gq, "_CHUNK", 1)  # one super-block at a time: the same bytes
    assert np.array_equal(gq.quantize(x, qtype), q)


def test_delegated_types_and_what_cannot_be_quantized() -> None:
    for t in ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", *gq.K_QUANTS]:
        assert gq.can_quantize(t) and gq.can_quantize(gguf.GGMLQuantizationType[t]), t
        x = np.random.default_rng(4).standard_normal((2, 256)).astype(np.float32)
        q = gq.quantize(x, t)
        assert q.dtype == np.uint8 and q.nbytes == 2 * 256 // gq.block_sizes(t)[0] * gq.block_sizes(t)[1]
        assert np.allclose(gq.dequantize(q, t, x.shape), x, atol=0.35 * np.abs(x).max())
    for t in ["IQ2_XXS", "IQ4_NL", "Q8_1"]:
        assert not gq.can_quantize(t)
        with pytest.raises(InvalidOptionError, match=f"cannot quantize to {t}"):
            gq.quantize(np.zeros((1, 256), np.float32), t)
    assert gq.type_name(gguf.GGMLQuantizationType.Q4_K) == gq.type_name("q4_k") == gq.type_name(12) == "Q4_K"


def test_refusals_name_the_tensor() -> None:
    x = np.ones((2, 256), np.float32)
    x[1, 7] = np.nan
    with pytest.raises(NonFiniteError, match="blk.0.attn_q.weight"):
        gq.quantize(x, "Q4_K", what="blk.0.attn_q.weight")
    with pytest.raises(InvalidOptionError, match="rows of 100 values are not a multiple of Q6_K's block of 256"):
        gq.quantize(np.ones((2, 100), np.float32), "Q6_K", what="output.weight")
    with pytest.raises(InvalidOptionError, match="overflow its float16 scales"):
        gq.quantize(np.full((1, 32), 1e6, np.float32), "Q4_0")  # d = max/8 is past float16's 65504
    with pytest.raises(InvalidOptionError, match="overflow"):
        gq.quantize(np.full((1, 256), 1e5, np.float32), "F16")
    with pytest.raises(InvalidOptionError, match="not a GGUF tensor type"):
        gq.dequantize(np.zeros(4, np.uint8), "Q9_X", (1,))
