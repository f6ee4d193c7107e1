"""Linear algebra for low-rank updates: SVD from factors, rank rules, effective ranks.

Everything here is a pure function over tensors. The key trick: the SVD of
``M = B @ A`` (B: m×r, A: r×n) never needs M. With ``B = Q_b R_b`` and
``Aᵀ = Q_a R_a`` (thin QR), ``M = Q_b (R_b R_aᵀ) Q_aᵀ``; the SVD of the r×r core
``R_b R_aᵀ = U S Vᵀ`` gives ``M = (Q_b U) S (Q_a V)ᵀ`` in O((m+n)·r²). Each R comes from a
Cholesky factor of the r×r Gram matrix when the factor is well conditioned (Cholesky-QR: GEMMs,
several times faster than Householder), from Householder QR otherwise (:func:`lowrank_svd`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import InvalidOptionError

__all__ = [
    "all_finite",
    "lowrank_svd",
    "numerical_rank",
    "stable_rank",
    "entropy_effective_rank",
    "spectrum_summary",
    "randomized_svd",
    "choose_rank",
    "RankRule",
    "truncated_svd",
    "sqrt_split",
    "lowrank_svdvals",
    "gram_max_cond",
]


def _check_pair(B: Tensor, A: Tensor) -> None:
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"expected B (m×r) and A (r×n), got {tuple(B.shape)} and {tuple(A.shape)}")


def gram_max_cond(dtype: torch.dtype) -> float:
    """The largest condition number κ₂ of a factor that :func:`lowrank_svd` factors through its Gram matrix: ``ε^(−1/4)``
    (8.2e3 in float64). Cholesky-QR's ``Q = X R⁻¹`` is orthonormal only to ``~κ²ε`` (≤ ε^(1/2) ≈ 1.5e-8 here;
    measured 1e-9 at the limit, 1e-3 at κ = 1e7), so beyond it the singular vectors come from Householder QR
    (orthonormal to ~ε). The singular values are not what limits it: from the R factors they matched a dense
    float64 SVD to ~ε·σ₁ up to κ = 1e7 (tests/test_lowrank_svd.py).
    """
    return math.pow(torch.finfo(dtype).eps, -0.25)


def _r_factor(X: Tensor, max_cond: float, *, q: bool) -> tuple[Tensor, Tensor | None]:
    """``(R, Q)`` with ``X = Q R`` (X m×r, R upper triangular).

    Cholesky-QR when X is tall and ``κ₂(X) ≤ max_cond``: ``XᵀX = RᵀR`` (one GEMM and an r×r
    Cholesky) and ``Q = None``, meaning ``Q = X R⁻¹`` (never formed). κ₂(X)² = λ_max/λ_min of the
    Gram matrix (``eigvalsh``; its λ_min is accurate to ~ε·λ_max, ample to decide κ ≤ ε^(−1/4)).
    Otherwise — rank-deficient, ill-conditioned, wide — Householder QR, with ``Q`` when ``q``.
    """
    m, r = X.shape
    if m >= r:
        G = X.T @ X
        lam = torch.linalg.eigvalsh(G)
        # written so that NaN, a zero and a negative λ_min all fail the test
        if bool(lam[0] > 0) and bool(lam[-1] <= max_cond**2 * lam[0]):
            L, info = torch.linalg.cholesky_ex(G)
            if not int(info):
                return L.mH, None
    if not q:
        return torch.linalg.qr(X, mode="r").R, None
    Q, R = torch.linalg.qr(X)
    return R, Q


def _apply_q_t(X: Tensor, R: Tensor, Q: Tensor | None, W: Tensor) -> Tensor:
    """``(Q W)ᵀ`` for the ``(R, Q)`` of :func:`_r_factor`: ``(R⁻¹W)ᵀ Xᵀ`` when Q was not formed.

    Transposed because MKL multiplies a row-major m×r factor by an r×t matrix (t ≪ m) at about half the
    rate of the transposed product t×r · r×m (measured in float64, one thread: 1.8 ms against 0.9 ms for
    11008×64 by 64×16).
    """
    if Q is not None:
        return torch.matmul(W.T, Q.T)
    return torch.matmul(torch.linalg.solve_triangular(R, W, upper=True).T, X.T)


def lowrank_svd(B: Tensor, A: Tensor, *, dtype: torch.dtype = torch.float64, max_cond: float | None = None,
                top: int | Callable[[Tensor], int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``B @ A`` without forming it.

    ``B = Q_b R_b`` and ``Aᵀ = Q_a R_a`` (thin QR) give ``B A = Q_b (R_b R_aᵀ) Q_aᵀ``; the SVD of the
    small core ``R_b R_aᵀ = U_c S V_cᵀ`` yields ``U = Q_b U_c`` and ``Vᵀ = V_cᵀ Q_aᵀ``, in O((m+n)·r²).
    Each R comes from the Cholesky factor of the r×r Gram matrix (BᵀB, AAᵀ: one GEMM each, with
    ``Q = B R⁻¹`` applied, never formed), which is several times faster than Householder QR, when that
    factor's ``κ₂ ≤ max_cond`` (default :func:`gram_max_cond`); otherwise (rank-deficient, badly
    conditioned, zero, or wider than tall) from Householder QR (see :func:`_r_factor`).

    Returns ``(U, S, Vh)``: ``S`` (k,) descending, ``k = min(r, m, n)``, ``U`` m×t and ``Vh`` t×n with
    t = k, or ``top`` (a number, or a function of S returning one, like a rank rule: only those columns
    of U and rows of Vᵀ are computed), such that ``B @ A ≈ U @ diag(S) @ Vh`` up to ``dtype`` rounding.

    >>> B, A = torch.randn(6, 2), torch.randn(2, 5)
    >>> U, S, Vh = lowrank_svd(B, A)
    >>> torch.allclose(U @ torch.diag(S) @ Vh, (B @ A).double())
    True
    """
    _check_pair(B, A)
    m, r = B.shape
    n = A.shape[1]
    if r == 0:
        empty = B.new_zeros((0,), dtype=dtype)
        return B.new_zeros((m, 0), dtype=dtype), empty, A.new_zeros((0, n), dtype=dtype)
    cond = gram_max_cond(dtype) if max_cond is None else max_cond
    Bd, At = B.to(dtype), A.to(dtype).T
    Rb, Qb = _r_factor(Bd, cond, q=True)
    Ra, Qa = _r_factor(At, cond, q=True)
    Uc, S, Vch = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    t = top(S) if callable(top) else S.numel() if top is None else top
    t = min(t, S.numel())
    return _apply_q_t(Bd, Rb, Qb, Uc[:, :t]).T, S, _apply_q_t(At, Ra, Qa, Vch[:t].T)


def lowrank_svdvals(B: Tensor, A: Tensor, *, dtype: torch.dtype = torch.float64,
                    max_cond: float | None = None) -> Tensor:
    """The singular values of ``B @ A`` (descending, ``min(r, m, n)`` of them): ``svdvals(R_b R_aᵀ)`` with the
    R factors of :func:`lowrank_svd` and no singular vectors (Householder's fallback forms no Q either).

    >>> B, A = torch.randn(7, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    >>> bool(torch.allclose(lowrank_svdvals(B, A), torch.linalg.svdvals(B @ A)[:3]))
    True
    """
    _check_pair(B, A)
    if B.shape[1] == 0:
        return B.new_zeros((0,), dtype=dtype)
    cond = gram_max_cond(dtype) if max_cond is None else max_cond
    Rb = _r_factor(B.to(dtype), cond, q=False)[0]
    Ra = _r_factor(A.to(dtype).T, cond, q=False)[0]
    values: Tensor = torch.linalg.svdvals(Rb @ Ra.T)  # torch.linalg's functions are untyped (Any)
    return values


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


def spectrum_summary(s: Tensor, shape: tuple[int, int]) -> dict[str, float | int]:
    """The effective-rank figures that ``loratools inspect`` reports."""
    return {
        "numerical_rank": numerical_rank(s, shape),
        "stable_rank": stable_rank(s),
        "effective_rank": entropy_effective_rank(s),
        "energy_rank_90": choose_rank(s, energy=0.90),
        "energy_rank_99": choose_rank(s, energy=0.99),
    }


# --- truncated SVD of a dense matrix: randomized or exact, with the rank rules ----------------------------------------

def randomized_svd(M: Tensor, k: int, *, oversample: int = 10, power_iters: int = 3,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Approximate top-``k`` SVD of ``M`` (m×n) by a randomized range finder.

    Halko, Martinsson & Tropp (2011), algorithms 4.4 + 5.1: draw a Gaussian
    Ω (n×ℓ, ℓ = k + oversample), form Y = (M Mᵀ)^q M Ω re-orthonormalising by
    QR after every product (so small σ are not lost to rounding), take Q = qr(Y),
    then the exact SVD of the small ℓ×n matrix QᵀM = Û S Vᵀ and U = Q Û.
    Cost O(mnℓ(2q+2)) instead of O(mn·min(m,n)).

    Returns ``(U, S, Vh)`` truncated to ``min(k, ℓ, m, n)`` columns. ``U S Vh``
    is the orthogonal projection ``U Uᵀ M``, so ``‖M − U S Vh‖²_F = ‖M‖²_F − ΣS²``
    exactly — what :func:`truncated_svd` uses to meet an energy or error target.

    >>> M = torch.randn(60, 8, dtype=torch.float64) @ torch.randn(8, 50, dtype=torch.float64)
    >>> U, S, Vh = randomized_svd(M, 8)
    >>> bool(torch.allclose(U @ torch.diag(S) @ Vh, M))
    True
    """
    m, n = M.shape
    ell = min(k + oversample, m, n)
    omega = torch.randn(n, ell, dtype=M.dtype, device=M.device, generator=generator)
    Q = torch.linalg.qr(M @ omega).Q
    for _ in range(power_iters):
        Q = torch.linalg.qr(M.T @ Q).Q
        Q = torch.linalg.qr(M @ Q).Q
    Uh, S, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)
    kk = min(k, S.numel())
    return (Q @ Uh)[:, :kk], S[:kk], Vh[:kk]


def choose_rank(s: Tensor, *, rank: int | None = None, energy: float | None = None, error: float | None = None,
                max_rank: int | None = None, total_energy: float | None = None) -> int:
    """The rank that one rule picks from singular values ``s`` (descending).

    - ``rank=R``: ``min(R, len(s))``.
    - ``energy=F``: smallest k with ``Σ_{i≤k} σᵢ² ≥ F · T``.
    - ``error=E``: smallest k with ``√(T − Σ_{i≤k} σᵢ²) / √T ≤ E``.

    ``T`` is ``total_energy`` (‖M‖²_F, when ``s`` is only the top of the
    spectrum) or ``Σ σᵢ²``. ``max_rank`` caps the result. Returns ``len(s) + 1``
    when ``s`` is too short to meet the target (the caller must look further).

    >>> s = torch.tensor([3.0, 2.0, 1.0])
    >>> choose_rank(s, energy=0.9), choose_rank(s, error=0.3), choose_rank(s, rank=2)
    (2, 2, 2)
    """
    if sum(x is not None for x in (rank, energy, error)) != 1:
        raise ValueError("give exactly one of rank, energy, error")
    cap = s.numel() if max_rank is None else min(max_rank, s.numel())
    if rank is not None:
        return max(0, min(rank, cap))
    e = s.double() ** 2
    total = float(e.sum()) if total_energy is None else float(total_energy)
    if total <= 0.0:
        return 0
    kept = torch.cat([e.new_zeros(1), torch.cumsum(e, 0)])  # kept[k] = Σ_{i≤k} σᵢ²
    if energy is not None:
        if not 0.0 <= energy <= 1.0:
            raise ValueError(f"energy fraction must lie in [0, 1], got {energy}")
        ok = kept >= energy * total * (1 - 1e-12)
    else:
        assert error is not None
        if error < 0:
            raise ValueError(f"relative error must be ≥ 0, got {error}")
        ok = (total - kept).clamp_min(0) / total <= error**2 * (1 + 1e-12)
    hits = torch.nonzero(ok)
    if hits.numel() == 0:
        return s.numel() + 1 if max_rank is None or max_rank > s.numel() else cap
    return min(int(hits[0]), cap)


@dataclass(frozen=True)
class RankRule:
    """How to choose a rank from a spectrum: exactly one of ``rank``, ``energy``, ``error``, optionally capped.

    Validated once, on construction, so every job that keeps a rank (extract,
    resize, prune, combine, export) takes one value instead of four loose
    options and says the same thing about bad ones.

    - ``rank=R`` (≥ 1): keep ``min(R, len(s))`` values.
    - ``energy=F`` in (0, 1]: the smallest k keeping ``Σ_{i≤k} σᵢ² ≥ F·Σσᵢ²``.
    - ``error=E`` in [0, 1): the smallest k whose relative Frobenius error is ≤ E.
    - ``max_rank`` (≥ 1) caps any of them.

    >>> RankRule(energy=0.9).choose(torch.tensor([3.0, 2.0, 1.0]))
    2
    """

    rank: int | None = None
    energy: float | None = None
    error: float | None = None
    max_rank: int | None = None

    def __post_init__(self) -> None:
        given = [n for n, v in (("rank", self.rank), ("energy", self.energy), ("error", self.error)) if v is not None]
        if len(given) != 1:
            raise InvalidOptionError("give exactly one of `rank`, `energy` or `error`"
                                     + (f" (got {', '.join(f'`{g}`' for g in given)})" if given else ""))
        if self.rank is not None and not (isinstance(self.rank, int) and self.rank >= 1):
            raise InvalidOptionError(f"`rank` must be an integer ≥ 1, got {self.rank}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:  # NaN fails this test too
            raise InvalidOptionError(f"`energy` is a fraction of Σσ² in (0, 1], got {self.energy}")
        if self.error is not None and not 0.0 <= self.error < 1.0:
            raise InvalidOptionError(f"`error` is a relative Frobenius error in [0, 1), got {self.error}")
        if self.max_rank is not None and not (isinstance(self.max_rank, int) and self.max_rank >= 1):
            raise InvalidOptionError(f"`max_rank` must be an integer ≥ 1, got {self.max_rank}")

    @classmethod
    def from_options(cls, rule: "RankRule | None" = None, *, rank: int | None = None, energy: float | None = None,
                     error: float | None = None, max_rank: int | None = None) -> "RankRule":
        """``rule`` itself, or the rule that the loose keyword options make (jobs accept either).

        >>> RankRule.from_options(rank=4) == RankRule.from_options(RankRule(rank=4))
        True
        """
        if rule is None:
            return cls(rank=rank, energy=energy, error=error, max_rank=max_rank)
        if any(v is not None for v in (rank, energy, error, max_rank)):
            raise InvalidOptionError("give `rule` or `rank`/`energy`/`error`/`max_rank`, not both")
        return rule

    def choose(self, s: Tensor, *, total_energy: float | None = None) -> int:
        """The rank this rule keeps of descending singular values ``s`` (see :func:`choose_rank`)."""
        return choose_rank(s, rank=self.rank, energy=self.energy, error=self.error, max_rank=self.max_rank,
                           total_energy=total_energy)

    def describe(self) -> str:
        """``rank 8``, ``energy 0.9``, ``error 0.05`` (``, max rank 16``): for reports."""
        head = (f"rank {self.rank}" if self.rank is not None else
                f"energy {self.energy:g}" if self.energy is not None else f"error {self.error:g}")
        return head + (f", max rank {self.max_rank}" if self.max_rank is not None else "")


def truncated_svd(M: Tensor, *, rank: int | None = None, energy: float | None = None, error: float | None = None,
                  max_rank: int | None = None, oversample: int = 10, power_iters: int = 3,
                  randomized_below: float = 0.25, generator: torch.Generator | None = None,
                  ) -> tuple[Tensor, Tensor, Tensor, str]:
    """Truncated SVD ``M ≈ U diag(S) Vh`` whose rank one rule picks (see :func:`choose_rank`).

    Randomized (:func:`randomized_svd`) when the sketch ``k + oversample`` is at
    most ``randomized_below · min(m, n)``, exact ``torch.linalg.svd`` otherwise.
    For ``energy``/``error`` the rank is not known up front: the sketch starts at
    ``max(16, max_rank or 0)``… capped at ``max_rank``, and doubles until the
    top singular values it finds meet the target against the exact
    ``‖M‖²_F``; that test is exact, because the randomized factors are an
    orthogonal projection (see :func:`randomized_svd`). When the sketch would
    grow past the threshold it falls back to the exact SVD.

    Returns ``(U, S, Vh, method)`` with ``method`` ``"randomized"`` or ``"exact"``.
    """
    m, n = M.shape
    small = min(m, n)
    limit = randomized_below * small
    # ‖M‖²_F without a float64 copy of M (float32 accumulation is accurate to ~1e-7 relative)
    total = float(torch.linalg.vector_norm(M)) ** 2 if (energy is not None or error is not None) else None
    if rank is not None:
        k = min(rank if max_rank is None else min(rank, max_rank), small)
        if k + oversample <= limit:
            U, S, Vh = randomized_svd(M, k, oversample=oversample, power_iters=power_iters, generator=generator)
            return U, S, Vh, "randomized"
    else:
        k = 16 if max_rank is None else min(16, max_rank)
        while k + oversample <= limit:
            U, S, Vh = randomized_svd(M, k, oversample=oversample, power_iters=power_iters, generator=generator)
            r = choose_rank(S, energy=energy, error=error, max_rank=max_rank, total_energy=total)
            if r <= S.numel():
                return U[:, :r], S[:r], Vh[:r], "randomized"
            if max_rank is not None and k >= max_rank:
                break
            k = 2 * k if max_rank is None else min(2 * k, max_rank)
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    r = choose_rank(S, rank=rank, energy=energy, error=error, max_rank=max_rank, total_energy=total)
    r = min(r, S.numel())
    return U[:, :r], S[:r], Vh[:r], "exact"


def sqrt_split(U: Tensor, S: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
    """LoRA factors of ``U diag(S) Vh``: ``B = U √S`` (m×k), ``A = √S Vh`` (k×n), so ``B A = U S Vh``
    and both factors carry the same scale."""
    root = S.clamp_min(0).sqrt()
    return U * root, root[:, None] * Vh


def all_finite(t: Tensor) -> bool:
    """True when no element of ``t`` is NaN or ±Inf: one pass of a sum (NaN/Inf whenever an element is), element
    by element only when that sum is not finite (or overflowed) — far cheaper than ``isfinite(t).all()``."""
    if not t.is_floating_point():
        return True
    if bool(torch.isfinite(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32))):
        return True
    return bool(torch.isfinite(t).all())
