"""Linear algebra for low-rank updates: SVD from factors, rank rules, effective ranks.

Everything here is a pure function over tensors. The key trick: the SVD of
``M = B @ A`` (B: m×r, A: r×n) never needs M. With ``B = Q_b R_b`` and
``Aᵀ = Q_a R_a`` (thin QR), ``M = Q_b (R_b R_aᵀ) Q_aᵀ``; the SVD of the r×r core
``R_b R_aᵀ = U S Vᵀ`` gives ``M = (Q_b U) S (Q_a V)ᵀ`` in O((m+n)·r²).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "lowrank_svd",
    "numerical_rank",
    "stable_rank",
    "entropy_effective_rank",
    "energy_rank",
    "error_rank",
    "spectrum_summary",
]


def lowrank_svd(B: Tensor, A: Tensor, *, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``B @ A`` without forming it.

    Returns ``(U, S, Vh)`` with ``U`` m×k, ``S`` (k,) descending, ``Vh`` k×n and
    ``k = min(r, m, n)``, such that ``B @ A ≈ U @ diag(S) @ Vh`` up to ``dtype``
    rounding. Computation is in ``dtype`` (float64 by default: it is cheap here).

    >>> B, A = torch.randn(6, 2), torch.randn(2, 5)
    >>> U, S, Vh = lowrank_svd(B, A)
    >>> torch.allclose(U @ torch.diag(S) @ Vh, (B @ A).double())
    True
    """
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"expected B (m×r) and A (r×n), got {tuple(B.shape)} and {tuple(A.shape)}")
    m, r = B.shape
    n = A.shape[1]
    if r == 0:
        empty = B.new_zeros((0,), dtype=dtype)
        return B.new_zeros((m, 0), dtype=dtype), empty, A.new_zeros((0, n), dtype=dtype)
    Qb, Rb = torch.linalg.qr(B.to(dtype))
    Qa, Ra = torch.linalg.qr(A.to(dtype).T)
    Uc, S, Vch = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    return Qb @ Uc, S, Vch @ Qa.T


def numerical_rank(s: Tensor, shape: tuple[int, int], *, eps: float | None = None) -> int:
    """Number of singular values above ``max(m, n) · eps · σ₁`` (eps of float32 by
    default, the precision ΔW is computed in)."""
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    eps = torch.finfo(torch.float32).eps if eps is None else eps
    return int((s > max(shape) * eps * s[0]).sum())


def stable_rank(s: Tensor) -> float:
    """``Σσ² / σ₁²`` (0 for a zero matrix)."""
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0.0
    s = s.double()
    return float((s**2).sum() / s[0] ** 2)


def entropy_effective_rank(s: Tensor) -> float:
    """Roy & Vetterli (2007): ``exp(−Σ pᵢ log pᵢ)`` with ``pᵢ = σᵢ / Σσ`` (0 for a zero matrix)."""
    s = s.double()
    total = float(s.sum()) if s.numel() else 0.0
    if total == 0.0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def energy_rank(s: Tensor, fraction: float) -> int:
    """Smallest k with ``Σ_{i≤k} σᵢ² ≥ fraction · Σ σᵢ²`` (0 for a zero matrix)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"energy fraction must lie in [0, 1], got {fraction}")
    e = s.double() ** 2
    total = float(e.sum()) if e.numel() else 0.0
    if total == 0.0:
        return 0
    cum = torch.cumsum(e, 0)
    # a relative slack so that fraction=1.0 is met despite rounding in cumsum
    need = fraction * total * (1 - 1e-12)
    return min(int((cum < need).sum()) + 1, s.numel())


def error_rank(s: Tensor, rel_error: float) -> int:
    """Smallest k whose truncation error ``√(Σ_{i>k} σᵢ²) / ‖σ‖`` is ≤ ``rel_error``."""
    if rel_error < 0:
        raise ValueError(f"relative error must be ≥ 0, got {rel_error}")
    e = s.double() ** 2
    total = float(e.sum()) if e.numel() else 0.0
    if total == 0.0:
        return 0
    # tail[k] = Σ_{i≥k} σᵢ² ; error of keeping k values is sqrt(tail[k] / total)
    tail = torch.flip(torch.cumsum(torch.flip(e, [0]), 0), [0])
    tail = torch.cat([tail, tail.new_zeros(1)])
    ok = (tail / total).sqrt() <= rel_error
    return int(torch.nonzero(ok)[0])


def spectrum_summary(s: Tensor, shape: tuple[int, int]) -> dict[str, float | int]:
    """The effective-rank figures that ``loratools inspect`` reports."""
    return {
        "numerical_rank": numerical_rank(s, shape),
        "stable_rank": stable_rank(s),
        "effective_rank": entropy_effective_rank(s),
        "energy_rank_90": energy_rank(s, 0.90),
        "energy_rank_99": energy_rank(s, 0.99),
    }
