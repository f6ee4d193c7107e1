"""The SVD of ΔW = s·B·A from its factors (linalg.lowrank_svd / lowrank_svdvals), against a dense float64 SVD.

What is promised, for every kind of factor a LoRA file holds (random, zero columns, AdaLoRA-masked
ranks, badly scaled, exactly zero, wider than tall):

- the singular values equal the dense float64 SVD's to 1e-10 of the largest;
- U·diag(S)·Vh reconstructs ΔW and U, V have orthonormal columns;
- keeping the top k triplets leaves the Eckart–Young optimum √(Σ_{i>k}σᵢ²) as the error;
- the Gram (Cholesky-QR) route is taken only where its vectors stay orthonormal: up to κ₂ = ε^(−1/4) per
  factor; beyond that they would not (so the fallback to Householder QR is needed, not decoration).

And the jobs built on it: resize gives the same bits on one thread or several, and its error is the optimum.
"""

from __future__ import annotations

import pytest
import torch

from loratools.adapter import Adapter, Module
from loratools.device import map_in_threads
from loratools.inspection import inspect_adapter
from loratools.linalg import gram_max_cond, lowrank_svd, lowrank_svdvals
from loratools.compress.resize import resize_adapter

F64 = torch.float64


def _orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=F64)).Q


def _conditioned(m: int, r: int, cond: float, g: torch.Generator) -> torch.Tensor:
    """An m×r factor with singular values spread log-evenly over [1/cond, 1], in random directions."""
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), r, dtype=F64)
    return (_orthonormal(m, r, g) * s) @ _orthonormal(r, r, g).T


def factors(case: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B, A, scale)`` of one kind of LoRA module, float32 as files hold them unless the case needs float64."""
    g = torch.Generator().manual_seed(seed)
    m, n, r = 300, 200, 16
    B = torch.randn(m, r, generator=g) * 0.01
    A = torch.randn(r, n, generator=g) / n**0.5
    if case == "zero_columns":  # ranks a trainer never moved
        B[:, [2, 5, 11]] = 0.0
    elif case == "adalora_masked":  # A ⊙ Λ with Λ pruned to zero for half the ranks
        E = torch.rand(r, 1, generator=g) + 0.5
        E[::2] = 0.0
        A = A * E
    elif case == "badly_scaled":  # σ(ΔW) from 1e-8 to 1e3: both factors far past the Gram route's limit
        s = torch.logspace(3, -8, r, dtype=F64)
        B = _orthonormal(m, r, g) * s.sqrt()
        A = (s.sqrt()[:, None] * _orthonormal(n, r, g).T)
    elif case == "near_limit":  # κ₂ of each factor just under ε^(-1/4): the Gram route, at its accuracy limit
        B = _conditioned(m, r, 0.9 * gram_max_cond(F64), g)
        A = _conditioned(n, r, 0.9 * gram_max_cond(F64), g).T
    elif case == "zero_B":  # a freshly initialised LoRA
        B = torch.zeros(m, r)
    elif case == "zero_both":
        B, A = torch.zeros(m, r), torch.zeros(r, n)
    elif case == "wide":  # rank above min(m, n)
        B, A = torch.randn(12, 40, generator=g), torch.randn(40, 30, generator=g)
    return B, A, 2.0


CASES = ["random", "zero_columns", "adalora_masked", "badly_scaled", "near_limit", "zero_B", "zero_both", "wide"]


def dense(B: torch.Tensor, A: torch.Tensor, scale: float) -> torch.Tensor:
    return scale * (B.to(F64) @ A.to(F64))


@pytest.mark.parametrize("case", CASES)
def test_singular_values_equal_the_dense_svd_to_1e_10_of_the_largest(case):
    B, A, scale = factors(case)
    ref = torch.linalg.svdvals(dense(B, A, scale))[: min(B.shape[1], *dense(B, A, scale).shape)]
    tol = 1e-10 * float(ref[0]) if float(ref[0]) > 0 else 0.0
    for S in (lowrank_svd(B, A * scale)[1], lowrank_svdvals(B, A * scale)):
        assert S.dtype == F64 and S.shape == ref.shape
        assert bool((S[:-1] >= S[1:]).all())
        assert float((S - ref).abs().max()) <= tol


@pytest.mark.parametrize("case", CASES)
def test_singular_vectors_reconstruct_delta_and_are_orthonormal(case):
    B, A, scale = factors(case)
    D = dense(B, A, scale)
    U, S, Vh = lowrank_svd(B, A * scale)
    assert float(((U * S) @ Vh - D).norm()) <= 1e-12 * max(float(D.norm()), 1e-300)
    # vectors of (numerically) zero singular values are arbitrary; the others are unit and orthogonal
    keep = S > 1e-9 * float(S[0]) if S.numel() and float(S[0]) > 0 else torch.zeros_like(S, dtype=torch.bool)
    Uk, Vk = U[:, keep], Vh[keep]
    eye = torch.eye(int(keep.sum()), dtype=F64)
    # Cholesky-QR's vectors are orthogonal to ~κ²ε ≤ ε^(1/2) ≈ 1.5e-8 (linalg.gram_max_cond); Householder's to ~ε
    torch.testing.assert_close(Uk.T @ Uk, eye, rtol=0, atol=1e-7)
    torch.testing.assert_close(Vk @ Vk.T, eye, rtol=0, atol=1e-7)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("k", [1, 4, 9])
def test_truncation_error_is_the_eckart_young_optimum(case, k):
    B, A, scale = factors(case)
    D = dense(B, A, scale)
    ref = torch.linalg.svdvals(D)
    optimum = float(ref[k:].pow(2).sum().sqrt())
    U, S, Vh = lowrank_svd(B, A * scale, top=k)
    assert U.shape[1] == Vh.shape[0] == min(k, S.numel())
    error = float((D - (U * S[: U.shape[1]]) @ Vh).norm())
    # relative to the optimum (κ²ε of the Gram route), with a floor at the rounding of ΔW itself
    assert abs(error - optimum) <= 1e-6 * optimum + 1e-12 * float(D.norm())


def test_the_gram_route_is_taken_up_to_its_limit_and_beyond_it_would_lose_orthogonality():
    """Past κ₂ = ε^(-1/4) the Gram route's singular values stay good, but its vectors' orthogonality decays as κ²ε:
    at κ = 1e7 by ~1e-3. So the default falls back to Householder QR there (orthogonal to ~ε)."""
    g = torch.Generator().manual_seed(1)
    limit = gram_max_cond(F64)
    assert 8e3 < limit < 8.5e3  # ε^(-1/4) in float64
    for cond, gram_ok in ((limit, True), (1e7, False)):
        B = _conditioned(400, 24, cond, g)
        A = _conditioned(300, 24, cond, g).T
        ref = torch.linalg.svdvals(B @ A)[:24]
        eye = torch.eye(24, dtype=F64)
        for max_cond in (None, float("inf")):  # inf: the Gram route whatever the conditioning
            U, S, Vh = lowrank_svd(B, A, max_cond=max_cond)
            assert float((S - ref).abs().max()) <= 1e-10 * float(ref[0])
            orthogonal = float((U.T @ U - eye).abs().max()) <= 1e-7 and float((Vh @ Vh.T - eye).abs().max()) <= 1e-7
            assert orthogonal == (max_cond is None or gram_ok)


def test_resize_gives_the_same_bits_on_one_thread_or_several_and_the_optimal_error():
    g = torch.Generator().manual_seed(2)
    mods = {}
    for i, case in enumerate(CASES[:5]):
        B, A, scale = factors(case, seed=i)
        mods[f"layers.{i}.q_proj"] = Module(A=A.float(), B=B.float(), alpha=2 * B.shape[1], scale=scale)
    mods["layers.9.v_proj"] = Module(A=torch.randn(8, 64, generator=g), B=torch.randn(96, 8, generator=g), alpha=8,
                                     scale=1.0)
    ad = Adapter(mods)
    one = resize_adapter(ad, rank=3, workers=1)
    many = resize_adapter(ad, rank=3, workers=3)
    assert one.layers == many.layers
    for name, m in one.adapter.items():
        other = many.adapter.modules[name]
        assert torch.equal(m.A, other.A) and torch.equal(m.B, other.B)
        D = ad.modules[name].delta(dtype=F64)
        optimum = float(torch.linalg.svdvals(D)[3:].pow(2).sum().sqrt())
        # the output is stored in float32: its rounding (~6e-8 of ‖ΔW‖) is the floor
        assert abs(float((D - m.delta(dtype=F64)).norm()) - optimum) <= 1e-6 * optimum + 3e-7 * float(D.norm())


def test_map_in_threads_keeps_order_and_raises_what_fn_raises():
    assert list(map_in_threads(lambda x: x * x, range(50), workers=4)) == [x * x for x in range(50)]

    def boom(x: int) -> int:
        if x == 7:
            raise ValueError("seven")
        return x

    with pytest.raises(ValueError, match="seven"):
        list(map_in_threads(boom, range(20), workers=3))


def test_inspect_report_is_the_same_with_threads():
    g = torch.Generator().manual_seed(3)
    ad = Adapter({f"layers.{i}.o_proj": Module(A=torch.randn(4, 32, generator=g), B=torch.randn(48, 4, generator=g),
                                                alpha=8, scale=2.0) for i in range(6)})
    assert inspect_adapter(ad) == inspect_adapter(ad, mapper=lambda f, xs: map_in_threads(f, xs, workers=3))
