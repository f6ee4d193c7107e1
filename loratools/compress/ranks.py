"""One rank per module, chosen together: the least total squared error under a cap and a parameter budget.

Truncating module i to rank kᵢ loses Σ_{j>kᵢ} σᵢⱼ² of ‖ΔWᵢ‖²_F (Eckart–Young), and keeps
kᵢ·(mᵢ + nᵢ) parameters. Over a whole adapter the best choice under a per-module cap and a total
parameter budget is a knapsack over the σ²: with equal costs per rank the greedy pick of the
largest σᵢⱼ² is optimal; with unequal costs an exact dynamic programme over the budget (in units
of the costs' gcd) is solved, and only beyond :data:`DP_LIMIT` table entries the greedy pick by
σ² per parameter is used. ``export --for RUNTIME`` and ``resize`` use it; the spectra come from
the factors (:func:`loratools.linalg.lowrank_svd`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ..adapter import Module, module_from_svd
from ..errors import InvalidOptionError

__all__ = ["allocate_ranks", "allocation_method", "uniform_rank", "truncation_error", "DP_LIMIT", "Allocation",
           "resize_together"]

#: the dynamic programme's table (modules × budget units) stays below this many entries; larger problems use the
#: greedy pick by σ² per parameter (see :func:`allocation_method`)
DP_LIMIT = 50_000_000


def _caps(spectra: Mapping[str, Tensor], cap: int | Mapping[str, int] | None) -> dict[str, int]:
    out = {}
    for name, s in spectra.items():
        c = cap.get(name) if isinstance(cap, Mapping) else cap
        out[name] = int(s.numel()) if c is None else max(0, min(int(c), int(s.numel())))
    return out


def truncation_error(s: Tensor, k: int) -> float:
    """``Σ_{j>k} σⱼ²``: the squared Frobenius error of keeping the top ``k`` of the singular values ``s``
    (Eckart–Young)."""
    return float((s.double()[k:] ** 2).sum())


def allocation_method(params_per_rank: Mapping[str, int], budget_params: int | None,
                      caps: Mapping[str, int] | None = None) -> str:
    """How :func:`allocate_ranks` solves a problem: ``"cap"`` (no budget: modules are independent), ``"greedy"``
    (equal costs per rank: the greedy pick is optimal), ``"dp"`` (exact dynamic programme) or ``"ratio"``
    (the greedy pick by σ² per parameter, when the programme's table would exceed :data:`DP_LIMIT` entries)."""
    if budget_params is None:
        return "cap"
    costs = {int(p) for p in params_per_rank.values()}
    if len(costs) <= 1:
        return "greedy"
    g = math.gcd(*costs)
    units = budget_params // g
    return "dp" if len(params_per_rank) * (units + 1) <= DP_LIMIT else "ratio"


def allocate_ranks(spectra: Mapping[str, Tensor], *, cap: int | Mapping[str, int] | None = None,
                   budget_params: int | None = None, params_per_rank: Mapping[str, int] | None = None,
                   ) -> dict[str, int]:
    """One rank ``kᵢ`` per module, chosen together to minimise the total squared error.

    ``spectra[i]`` are module i's singular values (descending); keeping its top
    ``kᵢ`` triplets costs ``kᵢ · pᵢ`` parameters (``pᵢ = params_per_rank[i]``,
    ``m + n`` for an m×n ΔW) and leaves ``Σ_{j>kᵢ} σᵢⱼ²`` of squared error. This
    returns the ``kᵢ`` minimising ``Σᵢ Σ_{j>kᵢ} σᵢⱼ²`` (the adapter's
    ‖ΔW − ΔW′‖²_F) subject to ``kᵢ ≤ min(cap, len(σᵢ))`` and
    ``Σᵢ kᵢ pᵢ ≤ budget_params``.

    Equivalently it maximises the kept energy ``Σᵢ Eᵢ(kᵢ)``, ``Eᵢ(k) = Σ_{j≤k} σᵢⱼ²``,
    which is concave in k. Without a budget nothing couples the modules and
    each keeps its cap. With equal costs the optimum is the greedy pick of the
    largest σ² over all modules; with unequal costs it is a knapsack, solved
    exactly by dynamic programming over the budget in units of ``g = gcd(pᵢ)``
    (``dp[b] = maxₖ dp′[b − k·pᵢ/g] + Eᵢ(k)``), or, when that table would be too
    large, by the greedy pick by σ²/pᵢ (:func:`allocation_method` says which).
    Zero singular values are never bought. :func:`loratools.adalora.allocate` is the count-only
    form of the same greedy pick, over importance scores.

    >>> s = {"a": torch.tensor([3.0, 2.0]), "b": torch.tensor([2.5, 0.5])}
    >>> allocate_ranks(s, budget_params=20, params_per_rank={"a": 10, "b": 10})
    {'a': 1, 'b': 1}
    """
    caps = _caps(spectra, cap)
    method = allocation_method(params_per_rank or {n: 1 for n in spectra}, budget_params, caps)
    if method == "cap":
        return caps
    assert budget_params is not None
    if budget_params < 0:
        raise InvalidOptionError(f"`budget` must be ≥ 0 parameters, got {budget_params}")
    costs = {n: int((params_per_rank or {}).get(n, 1)) for n in spectra}
    if any(c <= 0 for c in costs.values()):
        raise InvalidOptionError("every module's parameters per rank must be positive")
    gains = {n: (spectra[n].double()[: caps[n]] ** 2) for n in spectra}
    if method == "dp":
        return _allocate_dp(gains, costs, budget_params)
    return _allocate_greedy(gains, costs, budget_params)


def _allocate_greedy(gains: Mapping[str, Tensor], costs: Mapping[str, int], budget: int) -> dict[str, int]:
    # σ² per parameter, descending; within a module it descends too, so what is taken is a prefix of each module
    items = sorted(((float(g) / costs[n], n) for n, gs in gains.items() for g in gs if float(g) > 0),
                   key=lambda t: -t[0])
    ranks = {n: 0 for n in gains}
    left = budget
    for _, n in items:
        if costs[n] <= left:
            ranks[n] += 1
            left -= costs[n]
    return ranks


def _allocate_dp(gains: Mapping[str, Tensor], costs: Mapping[str, int], budget: int) -> dict[str, int]:
    g = math.gcd(*costs.values())
    units = budget // g
    names = list(gains)
    best = torch.zeros(units + 1, dtype=torch.float64)  # best[b]: most energy kept within b units
    choices = []
    for n in names:
        c = costs[n] // g
        kept = torch.cumsum(gains[n], 0)
        new, pick = best.clone(), torch.zeros(units + 1, dtype=torch.int16)
        for k in range(1, int(kept.numel()) + 1):
            shift = k * c
            if shift > units or float(gains[n][k - 1]) <= 0:
                break
            cand = best[: units + 1 - shift] + kept[k - 1]
            better = cand > new[shift:]
            new[shift:] = torch.where(better, cand, new[shift:])
            pick[shift:] = torch.where(better, torch.tensor(k, dtype=torch.int16), pick[shift:])
        best = new
        choices.append(pick)
    ranks, b = {}, units
    for n, pick in zip(reversed(names), reversed(choices)):
        k = int(pick[b])
        ranks[n] = k
        b -= k * (costs[n] // g)
    return {n: ranks[n] for n in names}


def uniform_rank(spectra: Mapping[str, Tensor], *, cap: int | Mapping[str, int] | None = None,
                 budget_params: int | None = None, params_per_rank: Mapping[str, int] | None = None) -> dict[str, int]:
    """What a uniform-rank resize keeps at the same budget: the largest k with ``Σᵢ min(k, capᵢ) pᵢ ≤ budget_params``,
    each module keeping ``min(k, capᵢ)`` (its cap without a budget): the baseline :func:`allocate_ranks` is
    measured against."""
    caps = _caps(spectra, cap)
    if budget_params is None:
        return caps
    costs = {n: int((params_per_rank or {}).get(n, 1)) for n in spectra}
    k = 0
    while k < max(caps.values(), default=0) and sum(min(k + 1, caps[n]) * costs[n] for n in caps) <= budget_params:
        k += 1
    return {n: min(k, caps[n]) for n in caps}


@dataclass(frozen=True)
class Allocation:
    """The rank choice under a cap and/or a parameter budget, against a uniform-rank resize at the same budget.
    Errors are relative over the whole adapter: √(Σᵢ‖ΔWᵢ − ΔWᵢ′‖²_F / Σᵢ‖ΔWᵢ‖²_F)."""

    method: str
    cap: int | None
    budget: int | None
    parameters_before: int
    parameters: int
    error: float
    uniform_rank: int
    uniform_parameters: int
    uniform_error: float


def resize_together(modules: Mapping[str, Module], *, cap: int | None = None, budget: int | None = None,
                    ) -> tuple[dict[str, Module], dict[str, float], Allocation | None]:
    """Every module truncated to the rank :func:`loratools.compress.ranks.allocate_ranks` gives it — the ranks chosen
    together for the least ``Σᵢ‖ΔWᵢ − ΔWᵢ′‖²_F`` under ``cap`` and a ``budget`` of parameters — with each
    module's relative error (exact, from its spectrum) and the comparison with a uniform rank. Modules given
    rank 0 are left out; modules not cut keep their factors. Nothing to do without ``cap`` and ``budget``."""
    if cap is None and budget is None:
        return dict(modules), {}, None
    spectra = {n: m.singular_values() for n, m in modules.items()}
    cost = {n: sum(m.matrix_shape) for n, m in modules.items()}
    ranks = allocate_ranks(spectra, cap=cap, budget_params=budget, params_per_rank=cost)
    uni = uniform_rank(spectra, cap=cap, budget_params=budget, params_per_rank=cost)
    total = sum(float((s.double() ** 2).sum()) for s in spectra.values())

    def rel(picks: Mapping[str, int]) -> float:
        lost = sum(truncation_error(spectra[n], k) for n, k in picks.items())
        return math.sqrt(lost / total) if total > 0 else 0.0

    out: dict[str, Module] = {}
    errors: dict[str, float] = {}
    for n, m in modules.items():
        k = ranks[n]
        e = float((spectra[n].double() ** 2).sum())
        errors[n] = math.sqrt(truncation_error(spectra[n], k) / e) if e > 0 else 0.0
        if k >= m.rank:
            out[n] = m
        elif k > 0:  # the top k triplets of ΔW from the factors (Eckart–Young)
            U, S, Vh = m.svd()
            out[n] = module_from_svd(m, U[:, :k], S[:k], Vh[:k], dtype=m.A.dtype)
    report = Allocation(allocation_method(cost, budget), cap, budget, sum(m.rank * cost[n] for n, m in modules.items()),
                        sum(min(ranks[n], modules[n].rank) * cost[n] for n in modules), rel(ranks),
                        max(uni.values(), default=0), sum(uni[n] * cost[n] for n in modules), rel(uni))
    return out, errors, report
