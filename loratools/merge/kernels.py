"""The arithmetic of merging, on tensors only: no files, no threads.

Merging adds each adapter's low-rank update to the weight it adapts::

    W = cast(W0 + Σᵢ wᵢ·ΔWᵢ)        un-merging:   W0 ≈ cast(W − Σᵢ wᵢ·ΔWᵢ)

with every ΔWᵢ formed and summed in float32 (or float64) and a single cast to
the output dtype at the end. A DoRA module (alone on its tensor, see
:mod:`loratools.dora`) rescales each row of V = W0 + ΔW (as DoRA's matrix) by
``m/‖V‖_row`` before that cast; its un-merge divides by the same factor first::

    W = cast(f ⊙ (W0 + ΔW))                   W0 ≈ cast(W ⊘ f − ΔW),   f = m / ‖W0 + ΔW‖_row
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..adapter import Module
from ..dora import dora_factor, norms_along_rows
from ..errors import NonFiniteError
from ..linalg import all_finite

__all__ = ["dora_of", "dora_norms", "dora_scale", "bits", "check_finite", "delta_sum", "low_rank", "factors_of",
           "row_step", "merge_rows", "merged_tensor", "unmerged_tensor", "tolerance", "abs_delta", "jitter", "ulp"]

_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_BLOCK_ELEMS = 1 << 18  # elements per block, so one float32 block (≈ 1 MB) stays in cache while it is updated


def bits(t: Tensor) -> Tensor:
    """``t`` reinterpreted as integers of the same width (so -0.0 ≠ 0.0 and NaN == NaN bitwise)."""
    return t.contiguous().view(_INT_OF_WIDTH[t.element_size()])


def check_finite(key: str, t: Tensor, where: str) -> None:
    """Raise :class:`NonFiniteError` naming ``key`` and ``where`` if ``t`` holds NaN or Inf."""
    if not all_finite(t):
        raise NonFiniteError(key, where)


def delta_sum(parts: Sequence[tuple[Module, float]], *, precision: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> Tensor:
    """Σᵢ wᵢ·ΔWᵢ in ``precision`` on ``device``, in the base weight's layout.

    >>> m = Module(A=torch.ones(1, 2), B=torch.ones(3, 1), alpha=1, scale=1.0)
    >>> delta_sum([(m, 2.0), (m, -0.5)]).tolist()
    [[1.5, 1.5], [1.5, 1.5], [1.5, 1.5]]
    """
    total: Tensor | None = None
    for module, weight in parts:
        d = module.delta(dtype=precision, device=device)
        if weight != 1.0:
            d = d * weight
        total = d if total is None else total + d
    if total is None:
        raise ValueError("delta_sum needs at least one module")
    return total


def low_rank(module: Module, coeff: float = 1.0, *, precision: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """``(L, R)`` with ``coeff·ΔW = L @ R`` as a matrix of the base weight's own rows.

    For weights stored (out, in) (linear, conv flattened) that is ``(B', coeff·A')``;
    for (in, out) layouts (``fan_in_fan_out``, embeddings) ``(A'ᵀ, coeff·B'ᵀ)``.
    Row blocks of W are then updated by row blocks of L, never forming ΔW whole.
    """
    B, A = module.factors(dtype=precision, device=device)
    if module.kind == "embedding" or module.fan_in_fan_out:
        B, A = A.T.contiguous(), B.T.contiguous()
    return B, (A * coeff if coeff != 1.0 else A)


def row_step(rows: int, cols: int, device: torch.device) -> int:
    """Rows per block: ≈ 2¹⁸ elements (one float32 block stays in cache) on the CPU, all of them on a GPU.

    The blocks are part of the result's definition: un-merging a record's
    tensors recomputes the same blocks, so a merge and its un-merge agree bit for bit.
    """
    return rows if device.type != "cpu" else max(1, _BLOCK_ELEMS // max(1, cols))


def factors_of(parts: Sequence[tuple[Module, float]], *, sign: float = 1.0, precision: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> list[tuple[Tensor, Tensor]]:
    """``[(L, R)]`` with ``sign·wᵢ·ΔWᵢ = L @ R`` for each part (see :func:`low_rank`)."""
    return [_factors(m, sign * wt, precision, device) for m, wt in parts]


def _factors(module: Module, coeff: float, precision: torch.dtype,
             device: torch.device | str | None) -> tuple[Tensor, Tensor]:
    """:func:`low_rank`, and for an ``experts`` module one product over the base weight's (n·d, cols) view:
    expert e owns rows ``e·d … (e+1)·d``, so ``L`` is block diagonal (Lₑ at rows e·d, columns e·r) and
    ``R`` stacks the Rₑ — each row's sum holds its own expert's r products and exact zeros."""
    if module.kind != "experts":
        return low_rank(module, coeff, precision=precision, device=device)
    pairs = [low_rank(module.expert(e), coeff, precision=precision, device=device) for e in range(module.experts)]
    d, r = pairs[0][0].shape
    L = pairs[0][0].new_zeros(len(pairs) * d, len(pairs) * r)
    for e, (Le, _) in enumerate(pairs):
        L[e * d:(e + 1) * d, e * r:(e + 1) * r] = Le
    return L, torch.cat([R for _, R in pairs])


def dora_of(parts: Sequence[tuple[Module, float]]) -> Module | None:
    """The DoRA module among a tensor's parts, or None (the plan allows one only, alone, with weight 1)."""
    return next((m for m, _ in parts if m.is_dora), None)


def dora_norms(blocks: Iterable[tuple[int, Tensor]], factors: Sequence[tuple[Tensor, Tensor]], module: Module, *,
               precision: torch.dtype = torch.float32, acc: Callable[[int], Tensor | None] | None = None) -> Tensor:
    """‖V‖_row (``precision``, length ``out``) for V = W0 + ΔW, from W0's blocks of stored rows ``(first, block)``.

    Along stored rows (linear, conv) each block gives its rows' norms; along stored
    columns (``fan_in_fan_out``, embeddings) the squares are summed over all blocks
    in float64. One pass over W0, a block in memory at a time; ``acc(n)`` may give a reused
    (n, cols) ``precision`` buffer for a block of n rows (a fresh block each time otherwise).
    """
    along_rows = norms_along_rows(module)
    parts: list[Tensor] = []
    ss: Tensor | None = None
    for first, w in blocks:
        v = merge_rows(w, factors, first, dtype=precision, precision=precision,
                       acc=acc(w.shape[0]) if acc is not None else None)
        if along_rows:
            parts.append(torch.linalg.vector_norm(v, dim=1, dtype=torch.float64))
        else:
            sq = v.to(torch.float64).square().sum(0)
            ss = sq if ss is None else ss + sq
    norms = torch.cat(parts) if along_rows else ss.sqrt()  # type: ignore[union-attr]
    return norms.to(precision)


def dora_scale(module: Module, norms: Tensor) -> Tensor:
    """``f = m/‖V‖_row`` shaped to broadcast over the stored weight as (rows, cols): (rows, 1) or (1, cols)."""
    f = dora_factor(module, norms)
    return f.reshape(-1, 1) if norms_along_rows(module) else f.reshape(1, -1)


def _scale_rows(f: Tensor, first: int, n: int) -> Tensor:
    return f[first:first + n] if f.shape[1] == 1 else f


def merge_rows(w: Tensor, factors: Sequence[tuple[Tensor, Tensor]], first: int, *, dtype: torch.dtype,
               precision: torch.dtype = torch.float32, acc: Tensor | None = None, out: Tensor | None = None,
               pre_div: Tensor | None = None, post_mul: Tensor | None = None, check: bool = True) -> Tensor:
    """``cast(W[rows] + Σ L[rows] @ R)`` for the block ``w`` of a weight's rows ``first …``, on the factors' device.

    ``acc`` (``precision``) and ``out`` (``dtype``) may be given to reuse memory
    (CPU only); the result is ``out``, or ``acc`` itself when no cast is needed.
    DoRA (:func:`dora_scale`): ``post_mul`` multiplies the sum before the cast
    (merge), ``pre_div`` divides W before the products are added (un-merge).
    Raises :class:`NonFiniteError` if the block's sum holds NaN/Inf or overflows ``dtype``, unless not
    ``check``: an exact un-merge's blocks are patched and then checksummed, which catches anything they hold.
    """
    n = w.shape[0]
    dev = factors[0][0].device if factors else w.device
    if acc is None or dev.type != "cpu":
        acc = w.to(device=dev, dtype=precision, copy=True)
    else:
        acc.copy_(w)
    if pre_div is not None:
        acc.div_(_scale_rows(pre_div, first, n))
    for L, R in factors:
        acc.addmm_(L[first:first + n], R)
    if post_mul is not None:
        acc.mul_(_scale_rows(post_mul, first, n))
    limit = torch.finfo(dtype).max if dtype.is_floating_point else math.inf
    narrow = limit < 1e30  # float16 output (max 65504): a finite sum can still overflow the cast
    # NaN/Inf (from W0 or the sum) make the block's sum non-finite; only then (or for float16) look closer
    if check and acc.numel() and (narrow or not bool(torch.isfinite(acc.sum()))):
        lo, hi = torch.aminmax(acc)
        if not bool((-lo <= limit) & (hi <= limit)):
            raise NonFiniteError("the merged tensor", f"rows {first}–{first + n}")
    if out is not None and dev.type == "cpu":
        return out.copy_(acc)
    return acc if dtype == precision else acc.to(dtype)


def merged_tensor(w0: Tensor, parts: Sequence[tuple[Module, float]], *, sign: float = 1.0,
                  dtype: torch.dtype | None = None, precision: torch.dtype = torch.float32,
                  device: torch.device | str | None = None, norms: Tensor | None = None) -> Tensor:
    """``cast(W0 + sign·Σᵢ wᵢ·ΔWᵢ)`` on ``device``: summed in ``precision``, cast once to ``dtype`` (W0's by default).

    On the CPU the rows are processed in cache-sized blocks (:func:`row_step`):
    convert, add each low-rank product (``addmm``), cast — one pass over memory
    instead of five (:func:`merge_rows`). A DoRA part: merging (``sign`` > 0)
    computes ‖V‖_row first (:func:`dora_norms`, or ``norms`` when given) and
    rescales; un-merging needs the merge's ``norms`` (from its record).

    >>> m = Module(A=torch.ones(1, 2), B=torch.ones(3, 1), alpha=1, scale=1.0)
    >>> merged_tensor(torch.zeros(3, 2, dtype=torch.bfloat16), [(m, 0.5)]).tolist()
    [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]
    """
    dev = torch.device(device) if device is not None else w0.device
    factors = factors_of(parts, sign=sign, precision=precision, device=dev)
    rows = factors[0][0].shape[0] if factors else (w0.shape[0] if w0.ndim else 1)
    w = w0.reshape(rows, -1)
    out = torch.empty(w.shape, dtype=dtype or w0.dtype, device=dev)
    step = row_step(rows, w.shape[1], dev)
    dora, pre, post = dora_of(parts), None, None
    if dora is not None:
        if norms is None:
            if sign < 0:
                raise ValueError("un-merging DoRA needs the merge's row norms (`norms`)")
            norms = dora_norms(((i, w[i:i + step]) for i in range(0, rows, step)), factors, dora, precision=precision)
        f = dora_scale(dora, norms.to(device=dev, dtype=precision))
        pre, post = (f, None) if sign < 0 else (None, f)
    for i in range(0, rows, step):
        out[i:i + step] = merge_rows(w[i:i + step], factors, i, dtype=out.dtype, precision=precision,
                                     pre_div=pre, post_mul=post)
    return out.reshape(w0.shape)


def unmerged_tensor(w: Tensor, parts: Sequence[tuple[Module, float]], **options: Any) -> Tensor:
    """``cast(W − Σᵢ wᵢ·ΔWᵢ)``, computed exactly like :func:`merged_tensor` (same blocks, same order)."""
    return merged_tensor(w, parts, sign=-1.0, **options)


def abs_delta(module: Module, *, precision: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> Tensor:
    """``|s|·(|B| |A|)`` (Λ folded into A as ``|A|·|E|``) in the base weight's layout: what bounds the rounding
    inside the rank-r product ``s·B A`` element by element (each term of the sum is at most its share of it)."""
    pos = module.with_factors(A=module.A.abs(), B=module.B.abs(), scale=abs(module.scale),
                              E=module.E.abs() if module.E is not None else None)
    return pos.delta(dtype=precision, device=device)


def tolerance(exact: Tensor, w0: Tensor, parts: Sequence[tuple[Module, float]], dtype: torch.dtype, *,
              precision: torch.dtype = torch.float32) -> Tensor:
    """Allowed |merged − exact| per element for ``W0 + Σᵢ wᵢ·ΔWᵢ`` stored in ``dtype``, where ``exact`` is that
    sum formed in ``precision``, as any correct merger (loratools, peft's ``merge_and_unload``) may round it::

        ε_d·(|exact| + Σᵢ |wᵢ ΔWᵢ| [+ |W0|])              the cast to ``dtype``, and a tool that casts each ΔWᵢ to
                                                           ``dtype`` before adding (peft in 16-bit models) [or W0,
                                                           when ``w0`` is stored in another dtype than ``dtype``]
      + c·(|W0| + Σᵢ |wᵢ|·|sᵢ|·(|Bᵢ| |Aᵢ|))               with c = (R + n + 3)·ε_p: ``precision``'s rounding inside
                                                           each rank-rᵢ product, the scale, the weight and the sum of
                                                           n adapters (R = Σ rᵢ), in both the merger and this check
                                                           (γ_k ≤ k·ε_p/2 each); + 2·ε_d when ``dtype`` is narrower
                                                           (a tool that rounds the factors to it first)
      + the smallest normal number of ``dtype``

    with ε the machine epsilon. A ΔW off by 1 % stays far outside it in float32.
    """
    eps_d, eps_p = torch.finfo(dtype).eps, torch.finfo(precision).eps
    dev = exact.device
    coeff = (len(parts) + 3 + sum(m.rank for m, _ in parts)) * eps_p + (2 * eps_d if eps_d > eps_p else 0.0)
    products = w0.to(device=dev, dtype=precision).abs()
    cast = exact.abs() + (products if w0.dtype != dtype else 0)
    for m, wt in parts:
        cast = cast + abs(wt) * m.delta(dtype=precision, device=dev).abs().reshape(exact.shape)
        products = products + abs(wt) * abs_delta(m, precision=precision, device=dev).reshape(exact.shape)
    return eps_d * cast + coeff * products + torch.finfo(dtype).smallest_normal


def jitter(t: Tensor, *, seed: int = 0, ulps: int = 2) -> Tensor:
    """``t`` with each element moved by a random whole number of ulps in [−ulps, ulps] (sign kept).

    Un-merging gives W0' with cast(W0' + ΔW) = W, a fixed point of the
    merge→unmerge round trip, so re-running the round trip on W0' itself would
    always report no error. The true W0 has generic low bits; so has this.
    """
    b = bits(t).to(torch.int64)
    width = t.element_size() * 8
    sign = torch.tensor(1 << (width - 1), dtype=torch.int64)
    mag = torch.where(b < 0, b + (1 << width), b)  # unsigned bit pattern
    neg = mag >= sign
    mag = mag - neg.to(torch.int64) * sign
    g = torch.Generator().manual_seed(seed)
    step = torch.randint(-ulps, ulps + 1, t.shape, generator=g, dtype=torch.int64)
    finite = torch.isfinite(t)
    mag = torch.where(finite & (mag > ulps), mag + step, mag)
    out = mag + neg.to(torch.int64) * sign
    out = torch.where(out >= sign, out - (1 << width), out)
    return out.to(bits(t).dtype).view(t.dtype)


def ulp(t: Tensor) -> Tensor:
    """The spacing of ``t``'s dtype at each element, in float64."""
    a = t.abs()
    return (torch.nextafter(a, torch.full_like(a, math.inf)) - a).to(torch.float64)
