"""linalg.allocate_ranks: the least total squared error under a rank cap and a parameter budget.

Reference: brute force over every combination of ranks on small cases (exact optimum);
and never worse than the uniform-rank resize at the same budget.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratools.errors import InvalidOptionError
from loratools.compress.ranks import allocate_ranks, allocation_method, truncation_error, uniform_rank


def _error(spectra, ranks) -> float:
    return sum(truncation_error(spectra[n], k) for n, k in ranks.items())


def _brute_force(spectra, cap, budget, costs) -> float:
    names = list(spectra)
    choices = [range(min(cap, spectra[n].numel()) + 1) for n in names]
    return min(_error(spectra, dict(zip(names, ks))) for ks in itertools.product(*choices)
               if sum(k * costs[n] for n, k in zip(names, ks)) <= budget)


spectrum = st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=1, max_size=5).map(
    lambda xs: torch.tensor(sorted(xs, reverse=True), dtype=torch.float64))


@settings(max_examples=150, deadline=None)
@given(st.lists(spectrum, min_size=1, max_size=4), st.integers(1, 6), st.integers(0, 40),
       st.lists(st.integers(1, 7), min_size=4, max_size=4))
def test_allocation_is_the_brute_force_optimum(spectra_list, cap, budget, cost_list) -> None:
    spectra = {f"m{i}": s for i, s in enumerate(spectra_list)}
    costs = {n: cost_list[i] for i, n in enumerate(spectra)}
    ranks = allocate_ranks(spectra, cap=cap, budget_params=budget, params_per_rank=costs)
    assert sum(k * costs[n] for n, k in ranks.items()) <= budget
    assert all(0 <= ranks[n] <= min(cap, spectra[n].numel()) for n in spectra)
    got, best = _error(spectra, ranks), _brute_force(spectra, cap, budget, costs)
    assert got == pytest.approx(best, abs=1e-9)
    uni = uniform_rank(spectra, cap=cap, budget_params=budget, params_per_rank=costs)
    assert sum(k * costs[n] for n, k in uni.items()) <= budget
    assert got <= _error(spectra, uni) + 1e-9


def test_equal_costs_take_the_largest_singular_values() -> None:
    s = {"a": torch.tensor([5.0, 1.0]), "b": torch.tensor([4.0, 3.0, 0.5])}
    assert allocation_method({"a": 2, "b": 2}, 6) == "greedy"
    assert allocate_ranks(s, budget_params=6, params_per_rank={"a": 2, "b": 2}) == {"a": 1, "b": 2}
    assert allocate_ranks(s, cap=1, budget_params=6, params_per_rank={"a": 2, "b": 2}) == {"a": 1, "b": 1}


def test_unequal_costs_are_solved_exactly() -> None:
    # greedy by σ² would buy "a"'s 3.0 first (cost 5) and then afford nothing; the optimum buys two of "b"
    s = {"a": torch.tensor([3.0]), "b": torch.tensor([2.5, 2.5])}
    costs = {"a": 5, "b": 3}
    assert allocation_method(costs, 6) == "dp"
    assert allocate_ranks(s, budget_params=6, params_per_rank=costs) == {"a": 0, "b": 2}


def test_cap_alone_keeps_each_module_independent() -> None:
    s = {"a": torch.tensor([3.0, 2.0, 1.0]), "b": torch.tensor([1.0])}
    assert allocate_ranks(s, cap=2) == {"a": 2, "b": 1} == uniform_rank(s, cap=2)


def test_negative_budget_is_refused() -> None:
    with pytest.raises(InvalidOptionError, match="`budget`"):
        allocate_ranks({"a": torch.tensor([1.0])}, budget_params=-1, params_per_rank={"a": 1})
