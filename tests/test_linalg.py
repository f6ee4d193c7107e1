"""The rank rules and effective-rank definitions, on spectra whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratools.config import alpha_for_scale, lora_scale, pattern_value
from loratools.linalg import choose_rank, entropy_effective_rank, lowrank_svd, numerical_rank, stable_rank


def test_effective_ranks_of_a_flat_spectrum_equal_its_length():
    s = torch.ones(5, dtype=torch.float64)
    assert stable_rank(s) == pytest.approx(5)
    assert entropy_effective_rank(s) == pytest.approx(5)
    assert choose_rank(s, energy=0.9) == 5 and choose_rank(s, energy=0.8) == 4
    assert numerical_rank(s, (10, 10)) == 5


def test_known_spectrum():
    s = torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64)
    assert stable_rank(s) == pytest.approx(10 / 9)
    p = torch.tensor([0.75, 0.25])
    assert entropy_effective_rank(s) == pytest.approx(math.exp(float(-(p * p.log()).sum())))
    assert choose_rank(s, energy=0.9) == 1 and choose_rank(s, energy=0.95) == 2
    assert choose_rank(s, error=math.sqrt(0.1)) == 1 and choose_rank(s, error=0.3) == 2 and choose_rank(s, error=0.0) == 2
    assert numerical_rank(s, (4, 4)) == 2


def test_zero_spectrum_reports_zero():
    s = torch.zeros(3, dtype=torch.float64)
    assert (stable_rank(s), entropy_effective_rank(s), choose_rank(s, energy=0.9), choose_rank(s, error=0.1)) == (0, 0, 0, 0)


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 30), n=st.integers(1, 30), r=st.integers(0, 10), seed=st.integers(0, 999))
def test_lowrank_svd_reconstructs_the_product(m, n, r, seed):
    g = torch.Generator().manual_seed(seed)
    B, A = torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(r, n, generator=g, dtype=torch.float64)
    U, S, Vh = lowrank_svd(B, A)
    torch.testing.assert_close(U @ torch.diag(S) @ Vh, B @ A, rtol=0, atol=1e-10)
    assert bool((S[:-1] >= S[1:]).all()) if S.numel() > 1 else True
    dense = torch.linalg.svdvals(B @ A)[: S.numel()] if r else S
    torch.testing.assert_close(S, dense, rtol=0, atol=1e-10)


def test_scaling_rules():
    assert lora_scale(16, 8) == 2.0
    assert lora_scale(16, 4, rslora=True) == 8.0


@settings(max_examples=50, deadline=None)
@given(scale=st.floats(1e-3, 1e3), r=st.integers(1, 512), rslora=st.booleans())
def test_alpha_for_scale_inverts_lora_scale(scale, r, rslora):
    alpha = alpha_for_scale(scale, r, rslora=rslora)
    assert lora_scale(alpha, r, rslora=rslora) == pytest.approx(scale, rel=1e-15)
    assert alpha == (scale * math.sqrt(r) if rslora else scale * r)
    # a module's own alpha is kept when it gives the scale exactly, replaced when it does not
    assert alpha_for_scale(lora_scale(3.0, r, rslora=rslora), r, rslora=rslora, keep=3.0) == 3.0
    assert alpha_for_scale(2.0, 4, keep=7.0) == 8.0


def test_pattern_lookup_is_peft_s_suffix_regex_first_match():
    patterns = {"q_proj": 4, "layers.1.self_attn.q_proj": 9}
    assert pattern_value("model.layers.1.self_attn.q_proj", patterns, 8) == 4  # first match wins
    assert pattern_value("model.layers.1.self_attn.k_proj", patterns, 8) == 8
    assert pattern_value("model.layers.0.self_attn.xq_proj", {"q_proj": 3}, 8) == 8  # not a dotted suffix
