"""llama.cpp's K-quant reference quantizers, vectorized in numpy: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.

Each follows ``quantize_row_q{2,3,4,5,6}_K_ref`` and its helper ``make_qkx2_quants``,
``make_qx_quants`` or ``make_q3_quants`` in ``ggml/src/ggml-quants.c`` (llama.cpp commit
0c1e570, ggml 0.25.3, as vendored by llama-cpp-python 0.3.36) — what ``llama-quantize``
runs when no importance matrix is given. Every float operation is done in float32 in the
C code's order, so the bytes equal llama.cpp's (checked by tests/test_gguf_quants_llama.py):

- the C loops over one sub-block become numpy operations over all sub-blocks at once, laid
  out as columns of an (n, S) array (n weights per sub-block, S sub-blocks);
- sums accumulate over axis 0 one row after another, as ``s += x[i]`` does, never pairwise;
- ``nearest_int`` keeps its magic-number rounding, iterative fits keep their order, and the
  C code's integer casts (uint8/int8 wrap) are reproduced.

Layouts of a 256-weight super-block (``QK_K``):

- Q4_K / Q5_K: 8 sub-blocks of 32, ``w ≈ d·sc_j·q − dmin·m_j`` with ``q`` of 4 / 5
  bits, 6-bit ``sc_j``, ``m_j`` and fp16 ``d``, ``dmin`` (144 / 176 bytes);
- Q2_K: 16 sub-blocks of 16, the same form with 2-bit ``q`` and 4-bit ``sc_j``, ``m_j`` (84 bytes);
- Q6_K / Q3_K: 16 sub-blocks of 16, ``w ≈ d·sc_j·(q − 32)`` / ``d·sc_j·(q − 4)`` with 6- / 3-bit
  ``q``, 8- / 6-bit signed ``sc_j`` and fp16 ``d`` (210 / 110 bytes).

Callers should go through :mod:`loratools.gguf.quants`, which checks inputs and outputs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["QK_K", "K_QUANTS", "QUANTIZERS"]

QK_K = 256
#: the K-quants implemented here: name → bytes per 256-weight super-block
K_QUANTS = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
_F32 = np.float32


# ---- shared pieces of ggml-quants.c -------------------------------------------------------------

def _seqsum(a: np.ndarray) -> np.ndarray:
    """Sum over axis 0 of a C-ordered array, accumulated one row after another as the C loops do.

    numpy reduces a non-contiguous axis row by row (``out += a[i]``), never pairwise, so this is
    exactly ``s = a[0]; s += a[1]; …`` in float32 (tests/test_gguf_quants.py checks it).
    """
    return np.add.reduce(a, axis=0)


def _nearest_int(x: np.ndarray) -> np.ndarray:
    """ggml's ``nearest_int``: add 1.5·2²³ and read the low mantissa bits.

    That is round-half-to-even for |x| < 2²², and the same wrapped garbage as the C code beyond
    (a ratio with a tiny divisor in ``make_q3_quants`` can get there before it is clamped).
    """
    bits = (np.asarray(x, _F32) + _F32(12582912)).view(np.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def _fp16(x: np.ndarray) -> np.ndarray:
    """``GGML_FP32_TO_FP16`` then back: float32 rounded to the nearest half (ties to even)."""
    return x.astype(np.float16).astype(_F32)


def _levels(V: np.ndarray, lo: int, hi: int, out: np.ndarray) -> np.ndarray:
    """``MAX(lo, MIN(hi, nearest_int(V)))`` as float32 into ``out``, in place (V is overwritten).

    The buffers and ``out=`` matter: these loops run ~20 times per block and numpy's
    temporaries and ``where`` on (n, S) arrays cost more than the arithmetic.
    """
    V += _F32(12582912)
    Vi = V.view(np.int32)
    Vi &= 0x007FFFFF
    Vi -= 0x00400000
    np.clip(Vi, lo, hi, out=Vi)
    out[...] = Vi
    return out


def _fit_error(La: np.ndarray, s: np.ndarray, m: np.ndarray, X: np.ndarray, W: np.ndarray, mad: bool,
               T: np.ndarray) -> np.ndarray:
    """``Σ_i w_i·(s·L_i + m − x_i)²`` (``mad``: ``|…|``) per column, in C's order; T is scratch."""
    np.multiply(La, s, out=T)
    T += m
    T -= X
    if mad:
        np.abs(T, out=T)
    else:
        T *= T
    T *= W
    return _seqsum(T)


def _make_qkx2(X: np.ndarray, W: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
               mad: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``make_qkx2_quants`` over columns: X, W are (n, S), one sub-block per column.

    Fits ``x ≈ scale·L − the_min`` with ``L ∈ [0, nmax]``: a first guess from the range, then
    ``nstep + 1`` trial inverse scales ``(rmin + rdelta·is + nmax)/(max − min)``, each followed by
    the weighted least-squares (scale, min) for its L (min clamped to ≤ 0), keeping the one of least
    weighted squared (``mad``: absolute) error; ``min`` is the best fit's so far, as in the C loop.
    Returns (scale, the_min, L) with L as uint8 (n, S).
    """
    mn, mx = X.min(axis=0), X.max(axis=0)
    sum_w, sum_x = _seqsum(W), _seqsum(W * X)
    mn = np.where(mn > 0, _F32(0), mn)
    flat = mx == mn  # all equal: L = 0, set apart at the end
    V, T, L, La, WL = (np.empty_like(X) for _ in range(5))
    iscale = _F32(nmax) / np.where(flat, _F32(1), mx - mn)
    scale = _F32(1) / iscale
    np.subtract(X, mn, out=V)
    V *= iscale
    _levels(V, 0, nmax, L)
    best = _fit_error(L, scale, mn, X, W, mad, T)
    for i in range(nstep + 1):
        # as in C, min (and so max − min) is the best fit's so far, not the data's
        iscale = (_F32(rmin) + _F32(rdelta) * _F32(i) + _F32(nmax)) / np.where(flat, _F32(1), mx - mn)
        np.subtract(X, mn, out=V)
        V *= iscale
        _levels(V, 0, nmax, La)
        np.multiply(W, La, out=WL)
        sum_l = _seqsum(WL)
        sum_l2 = _seqsum(np.multiply(WL, La, out=T))
        sum_xl = _seqsum(np.multiply(WL, X, out=T))
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
        this_min = np.where(pos, _F32(0), this_min)
        cur = _fit_error(La, this_scale, this_min, X, W, mad, T)
        better = (D > 0) & (cur < best)
        np.subtract(La, L, out=T)  # L += better·(La − L): exact on small integers, and no (n, S) where
        T *= better.astype(_F32)
        L += T
        best = np.where(better, cur, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    L *= ~flat
    scale = np.where(flat, _F32(0), scale)
    return scale, -mn, L.astype(np.uint8)


def _make_qx(X: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``make_qx_quants`` with ``rmse_type = 1`` (weights x²) over columns of X (n, S).

    Fits ``x ≈ scale·l`` with ``l ∈ [−nmax, nmax−1]``, the sign of the scale following the
    largest |x| so it reaches −nmax; tries inverse scales −(nmax + 0.1·is)/max for is = −9…9 and
    keeps the least-squares scale with the largest ``sumlx²/suml2``. Returns (scale, L = l + nmax
    as uint8); an all-zero column gives scale 0 and L 0.
    """
    idx = np.abs(X).argmax(axis=0)  # the first of equal maxima, as the C loop's strict '>'
    mx = np.take_along_axis(X, idx[None], axis=0)[0]
    zero = np.abs(mx) < _F32(1e-15)
    mx = np.where(zero, _F32(1), mx)
    w = X * X
    wx = w * X

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        lf = np.clip(_nearest_int(iscale * X), -nmax, nmax - 1).astype(_F32)
        return lf, _seqsum(wx * lf), _seqsum((w * lf) * lf)

    lf, sumlx, suml2 = trial(_F32(-nmax) / mx)
    scale = np.where(suml2 != 0, sumlx / suml2, _F32(0))
    best = scale * sumlx
    for i in (*range(-9, 0), *range(1, 10)):
        lt, sumlx, suml2 = trial(-(_F32(nmax) + _F32(0.1) * _F32(i)) / mx)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        lf = np.where(better, lt, lf)
        scale = np.where(better, sumlx / suml2, scale)
        best = np.where(better, scale * sumlx, best)
    L = np.where(zero, 0, lf + nmax).astype(np.uint8)
    return np.where(zero, _F32(0), scale), L


def _make_q3(X: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """``make_q3_quants`` with ``do_rmse`` over columns of X (n, S): ``l = round(−nmax·x/max)`` as a
    start, then up to 5 passes of coordinate descent, each moving one ``l_i`` to
    ``round(x_i·Σwl² / Σwxl)`` (the others fixed, weights x²) when that raises ``(Σwxl)²/Σwl²``.

    Passes after one that changed nothing change nothing, so running all 5 on every column equals
    the C loop's early exit. Returns (scale = Σwxl/Σwl², L = l + nmax as uint8).
    """
    idx = np.abs(X).argmax(axis=0)
    mx = np.take_along_axis(X, idx[None], axis=0)[0]
    zero = np.abs(mx) < _F32(1e-15)
    mx = np.where(zero, _F32(1), mx)
    w = X * X
    wx = w * X
    lf = np.clip(_nearest_int((_F32(-nmax) / mx) * X), -nmax, nmax - 1).astype(_F32)
    sumlx, suml2 = _seqsum(wx * lf), _seqsum((w * lf) * lf)
    for _ in range(5):
        for i in range(X.shape[0]):
            slx = sumlx - wx[i] * lf[i]
            sl2 = suml2 - (w[i] * lf[i]) * lf[i]
            new = np.clip(_nearest_int(np.where(slx > 0, X[i] * sl2 / slx, _F32(0))), -nmax, nmax - 1)
            new = new.astype(_F32)
            slx = slx + wx[i] * new
            sl2 = sl2 + (w[i] * new) * new
            take = ((sumlx - wx[i] * lf[i] > 0) & (new != lf[i]) & (sl2 > 0)
                    & ((slx * slx) * suml2 > (sumlx * sumlx) * sl2))
            lf[i] = np.where(take, new, lf[i])
            sumlx, suml2 = np.where(take, slx, sumlx), np.where(take, sl2, suml2)
    scale = np.where(suml2 > 0, sumlx / suml2, _F32(0))
    return np.where(zero, _F32(0), scale), np.where(zero, 0, lf + nmax).astype(np.uint8)


def _u8(v: np.ndarray) -> np.ndarray:
    """C's ``(uint8_t) int``: keep the low byte (a negative 6-bit scale wraps, then MIN(63, ·) holds it)."""
    return (v.astype(np.int64) & 0xFF).astype(np.uint8)


# ---- the block quantizers: (nb, 256) float32 → (nb, bytes) uint8 --------------------------------

def _scale_min_k(blocks: np.ndarray, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, ...]:
    """The common part of ``quantize_row_q4_K_ref`` / ``q5_K``: per 32-weight sub-block a
    ``make_qkx2_quants`` fit weighted by ``sqrt(mean x²) + |x|``, the 8 scales and mins stored as
    6-bit multiples of fp16 ``d = max scale/63`` and ``dmin = max min/63``, then the weights
    re-quantized against those stored values. Returns (d, dmin, 12 packed scale bytes, L (nb, 256)).
    """
    nb = blocks.shape[0]
    X = np.ascontiguousarray(blocks.reshape(nb * 8, 32).T)
    av_x = np.sqrt(_seqsum(X * X) / _F32(32))
    scales, mins, L = _make_qkx2(X, av_x + np.abs(X), nmax, rmin, 0.1, nstep)
    scales, mins, L = scales.reshape(nb, 8), mins.reshape(nb, 8), L.T.reshape(nb, 8, 32)
    max_scale, max_min = scales.max(axis=1), mins.max(axis=1)
    max_scale = np.where(max_scale > 0, max_scale, _F32(0))  # the C loops start from +0
    max_min = np.where(max_min > 0, max_min, _F32(0))
    inv_scale = np.where(max_scale > 0, _F32(63) / max_scale, _F32(0))[:, None]
    inv_min = np.where(max_min > 0, _F32(63) / max_min, _F32(0))[:, None]
    ls = np.minimum(_u8(_nearest_int(inv_scale * scales)), 63)
    lm = np.minimum(_u8(_nearest_int(inv_min * mins)), 63)
    packed = np.concatenate([ls[:, :4] | (ls[:, 4:] >> 4) << 6, lm[:, :4] | (lm[:, 4:] >> 4) << 6,
                             (ls[:, 4:] & 0xF) | (lm[:, 4:] & 0xF) << 4], axis=1)
    d = (max_scale / _F32(63)).astype(np.float16)
    dmin = (max_min / _F32(63)).astype(np.float16)
    dd = (d.astype(_F32)[:, None] * ls.astype(_F32))[:, :, None]
    dm = (dmin.astype(_F32)[:, None] * lm.astype(_F32))[:, :, None]
    x = blocks.reshape(nb, 8, 32)
    Lq = np.clip(_nearest_int((x + dm) / np.where(dd == 0, _F32(1), dd)), 0, nmax)
    L = np.where(dd == 0, L, Lq).astype(np.uint8).reshape(nb, 256)  # a zero scale keeps the fit's L
    return d, dmin, packed.astype(np.uint8), L


def _q4_k(blocks: np.ndarray) -> np.ndarray:
    """``block_q4_K``: d, dmin (fp16), scales[12], qs[128] (sub-blocks 2k, 2k+1 share 32 bytes, low/high nibble)."""
    d, dmin, sc, L = _scale_min_k(blocks, 15, -1.0, 20)
    Lc = L.reshape(-1, 4, 2, 32)
    qs = (Lc[:, :, 0] | Lc[:, :, 1] << 4).reshape(-1, 128)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), sc, qs], axis=1)


def _q5_k(blocks: np.ndarray) -> np.ndarray:
    """``block_q5_K``: d, dmin, scales[12], qh[32] (bit 2k/2k+1 = 5th bit of sub-block 2k/2k+1), qs[128]."""
    d, dmin, sc, L = _scale_min_k(blocks, 31, -0.5, 15)
    Lc = L.reshape(-1, 4, 2, 32)
    qs = ((Lc[:, :, 0] & 0xF) | (Lc[:, :, 1] & 0xF) << 4).reshape(-1, 128)
    hi = (L.reshape(-1, 8, 32) >> 4).astype(np.uint8)  # (nb, sub-block, 32), 0 or 1
    qh = np.zeros((L.shape[0], 32), np.uint8)
    for j in range(8):
        qh |= hi[:, j] << j
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), sc, qh, qs], axis=1)


def _q6_k(blocks: np.ndarray) -> np.ndarray:
    """``quantize_row_q6_K_ref``: per 16-weight sub-block a ``make_qx_quants`` scale, the 16 scales stored
    as int8 multiples of fp16 ``d = −max|scale|-signed/128``, the weights re-quantized to 6 bits against them.

    ``block_q6_K``: ql[128] (low nibbles), qh[64] (high 2 bits), scales[16] (int8), d (fp16).
    """
    nb = blocks.shape[0]
    X = np.ascontiguousarray(blocks.reshape(nb * 16, 16).T)
    scales, L = _make_qx(X, 32)
    scales, L = scales.reshape(nb, 16), L.T.reshape(nb, 16, 16)
    idx = np.abs(scales).argmax(axis=1)  # first of equal maxima (the C loop's strict '>')
    max_scale = np.take_along_axis(scales, idx[:, None], axis=1)[:, 0]
    empty = np.abs(max_scale) < _F32(1e-15)
    max_scale = np.where(empty, _F32(1), max_scale)
    iscale = _F32(-128) / max_scale
    d = np.where(empty, _F32(0), _F32(1) / iscale).astype(np.float16)
    sc = _u8(np.minimum(127, _nearest_int(iscale[:, None] * scales))).view(np.int8)
    dd = (d.astype(_F32)[:, None] * sc.astype(_F32))[:, :, None]
    x = blocks.reshape(nb, 16, 16)
    Lq = np.clip(_nearest_int(x / np.where(dd == 0, _F32(1), dd)), -32, 31) + 32
    L = np.where(dd == 0, L, Lq).astype(np.uint8).reshape(nb, 2, 4, 32)  # a zero scale keeps the fit's L
    L = np.where(empty[:, None, None, None], 0, L).astype(np.uint8)  # an all-zero block is all zero bytes
    sc = np.where(empty[:, None], 0, sc).astype(np.int8)
    ql = np.concatenate([L[:, :, 0] & 0xF | (L[:, :, 2] & 0xF) << 4, L[:, :, 1] & 0xF | (L[:, :, 3] & 0xF) << 4],
                        axis=2).reshape(nb, 128)
    qh = (L[:, :, 0] >> 4 | (L[:, :, 1] >> 4) << 2 | (L[:, :, 2] >> 4) << 4 | (L[:, :, 3] >> 4) << 6).reshape(nb, 64)
    return np.concatenate([ql.astype(np.uint8), qh.astype(np.uint8), sc.view(np.uint8),
                           d.view(np.uint8).reshape(-1, 2)], axis=1)


def _q2_k(blocks: np.ndarray) -> np.ndarray:
    """``quantize_row_q2_K_ref``: per 16-weight sub-block a ``make_qkx2_quants`` fit (2 bits, weights |x|,
    absolute error), scales and mins as 4-bit multiples of fp16 ``d = max scale/15``, ``dmin = max min/15``.

    ``block_q2_K``: scales[16] (scale | min << 4), qs[64] (4 sub-blocks' 2-bit values per byte), d, dmin.
    """
    nb = blocks.shape[0]
    X = np.ascontiguousarray(blocks.reshape(nb * 16, 16).T)
    scales, mins, L = _make_qkx2(X, np.abs(X), 3, -0.5, 0.1, 15, mad=True)
    scales, mins, L = scales.reshape(nb, 16), mins.reshape(nb, 16), L.T.reshape(nb, 16, 16)
    max_scale, max_min = scales.max(axis=1), mins.max(axis=1)
    has_s, has_m = (max_scale > 0)[:, None], (max_min > 0)[:, None]
    ls = _u8(_nearest_int(_F32(15) / max_scale[:, None] * scales))
    lm = _u8(_nearest_int(_F32(15) / max_min[:, None] * mins) << 4)
    sc = np.where(has_s, ls, 0).astype(np.uint8) | np.where(has_m, lm, 0).astype(np.uint8)
    d = np.where(has_s[:, 0], max_scale / _F32(15), _F32(0)).astype(np.float16)
    dmin = np.where(has_m[:, 0], max_min / _F32(15), _F32(0)).astype(np.float16)
    dd = (d.astype(_F32)[:, None] * (sc & 0xF).astype(_F32))[:, :, None]
    dm = (dmin.astype(_F32)[:, None] * (sc >> 4).astype(_F32))[:, :, None]
    x = blocks.reshape(nb, 16, 16)
    Lq = np.clip(_nearest_int((x + dm) / np.where(dd == 0, _F32(1), dd)), 0, 3)
    L = np.where(dd == 0, L, Lq).astype(np.uint8).reshape(nb, 2, 4, 32)
    qs = (L[:, :, 0] | L[:, :, 1] << 2 | L[:, :, 2] << 4 | L[:, :, 3] << 6).reshape(nb, 64)
    return np.concatenate([sc, qs.astype(np.uint8), d.view(np.uint8).reshape(-1, 2),
                           dmin.view(np.uint8).reshape(-1, 2)], axis=1)


def _q3_k(blocks: np.ndarray) -> np.ndarray:
    """``quantize_row_q3_K_ref``: per 16-weight sub-block a ``make_q3_quants`` scale (3 bits), the 16 scales
    stored as 6-bit ``l − 32`` multiples of fp16 ``d = −max|scale|-signed/32``, weights re-quantized to them.

    ``block_q3_K``: hmask[32] (bit k of byte m: the 3rd bit of weight 32k + m), qs[64] (low 2 bits),
    scales[12] (low nibbles of the 16 six-bit scales, then their high 2 bits four to a byte), d.
    """
    nb = blocks.shape[0]
    X = np.ascontiguousarray(blocks.reshape(nb * 16, 16).T)
    scales, L = _make_q3(X, 4)
    scales, L = scales.reshape(nb, 16), L.T.reshape(nb, 16, 16)
    idx = np.abs(scales).argmax(axis=1)
    max_scale = np.take_along_axis(scales, idx[:, None], axis=1)[:, 0]
    some = (max_scale != 0)[:, None]
    iscale = _F32(-32) / np.where(some[:, 0], max_scale, _F32(1))
    ls = np.clip(_u8(_nearest_int(iscale[:, None] * scales)).view(np.int8), -32, 31).astype(np.int32) + 32
    ls = np.where(some, ls, 0)  # (nb, 16) six-bit scales
    lo = (ls & 0xF).astype(np.uint8)
    hi = (ls >> 4).astype(np.uint8).reshape(nb, 4, 4)  # [j // 4, j % 4]
    packed = np.concatenate([lo[:, :8] | lo[:, 8:] << 4, hi[:, 0] | hi[:, 1] << 2 | hi[:, 2] << 4 | hi[:, 3] << 6],
                            axis=1)
    d = np.where(some[:, 0], _F32(1) / iscale, _F32(0)).astype(np.float16)
    dd = (d.astype(_F32)[:, None] * np.where(some, ls - 32, -32).astype(_F32))[:, :, None]
    x = blocks.reshape(nb, 16, 16)
    Lq = np.clip(_nearest_int(x / np.where(dd == 0, _F32(1), dd)), -4, 3) + 4
    L = np.where(dd == 0, L, Lq).astype(np.uint8).reshape(nb, 256)
    hmask = np.zeros((nb, 32), np.uint8)
    for k in range(8):
        hmask |= ((L[:, 32 * k:32 * k + 32] > 3).astype(np.uint8) << k)
    L = np.where(L > 3, L - 4, L).astype(np.uint8).reshape(nb, 2, 4, 32)
    qs = (L[:, :, 0] | L[:, :, 1] << 2 | L[:, :, 2] << 4 | L[:, :, 3] << 6).reshape(nb, 64)
    return np.concatenate([hmask, qs.astype(np.uint8), packed.astype(np.uint8), d.view(np.uint8).reshape(-1, 2)],
                          axis=1)


#: name → (nb, 256) float32 super-blocks → (nb, bytes) uint8
QUANTIZERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k,
                                                            "Q5_K": _q5_k, "Q6_K": _q6_k}
