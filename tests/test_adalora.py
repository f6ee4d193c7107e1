"""loratools.adalora: the one AdaLoRA importance/allocation, against peft 0.21.2's own RankAllocator."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from loratools.adalora import (RankAllocator, allocate, check_betas, mask_key, module_mask, narrow_mask,
                               rank_pattern_masks)
from loratools.adapter import Adapter, Module
from loratools.config import AdapterConfig
from loratools.errors import InvalidOptionError
from loratools.nn.inject import LayerSpec, inject
from loratools.compress.prune import calibration_scores, prune_adapter


def _peft_and_ours(beta1: float, beta2: float):
    from peft import AdaLoraConfig, get_peft_model

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8))
    cfg = AdaLoraConfig(init_r=6, target_r=2, lora_alpha=6, tinit=0, tfinal=0, total_step=10, deltaT=1,
                        beta1=beta1, beta2=beta2, target_modules=["0", "2"])
    theirs = get_peft_model(copy.deepcopy(net), cfg)
    ours = copy.deepcopy(net)
    layers = inject(ours, ["0", "2"], LayerSpec(method="adalora", init_rank=6, target_rank=2, alpha=6))
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, layer in layers.items():
            for part in ("lora_A", "lora_E", "lora_B"):
                p = params[f"base_model.model.{name}.{part}.default"]
                p.normal_()  # peft starts Λ at zero: give every triplet a value
                getattr(layer, part).copy_(p)
    return theirs, layers, params


def test_allocator_equals_peft_rank_allocator() -> None:
    """Same parameters and gradients: our EMAs equal peft's bit for bit, and our allocation keeps the
    triplets peft's mask_to_budget keeps."""
    theirs, layers, params = _peft_and_ours(0.7, 0.6)
    peft_alloc = theirs.base_model.rankallocator
    ours = RankAllocator(layers, target_rank=2, total_step=10, beta1=0.7, beta2=0.6)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # three EMA updates with fresh gradients, the same on both sides
        for name, layer in layers.items():
            for part in ("lora_A", "lora_E", "lora_B"):
                p = params[f"base_model.model.{name}.{part}.default"]
                p.grad = torch.randn(p.shape, generator=g)
                getattr(layer, part).grad = p.grad.clone()
        peft_alloc.update_ipt(theirs)
        ours.update_importance()
    for name in layers:
        for part in ("lora_A", "lora_E", "lora_B"):
            key = f"base_model.model.{name}.{part}.default"
            assert torch.equal(ours.sensitivity[f"{name}.{part}"].ipt, peft_alloc.exp_avg_ipt[key])
            assert torch.equal(ours.sensitivity[f"{name}.{part}"].unc, peft_alloc.exp_avg_unc[key])
    budget = 5
    peft_pattern = peft_alloc.mask_to_budget(theirs, budget)
    ours.allocate(budget)
    for name, layer in layers.items():
        assert layer.mask.reshape(-1).tolist() == peft_pattern[f"base_model.model.{name}.lora_E.default"]
    assert sum(int(layer.mask.sum()) for layer in layers.values()) == budget


@pytest.mark.parametrize("beta", [0.0, 1.0, -0.1, float("nan")])
def test_betas_follow_peft_open_interval(beta: float) -> None:
    """peft 0.21.2 asserts 0 < β < 1; training and pruning now refuse the same values."""
    with pytest.raises(InvalidOptionError, match="`beta1`"):
        check_betas(beta, 0.5)
    layers = inject(nn.Sequential(nn.Linear(4, 4)), ["0"], LayerSpec(method="adalora", init_rank=2, target_rank=1))
    with pytest.raises(InvalidOptionError):
        RankAllocator(layers, target_rank=1, total_step=10, beta1=0.5, beta2=beta)  # type: ignore[arg-type]
    adapter = Adapter({"q": Module(A=torch.randn(2, 4), B=torch.randn(3, 2), alpha=2, scale=1.0)})
    with pytest.raises(InvalidOptionError):
        calibration_scores(adapter, nn.Linear(1, 1), None, [], beta1=beta)


def test_allocate_compares_in_float64() -> None:
    """Two float64 scores that round to the same float32 are still told apart (no narrowing)."""
    a = torch.tensor([1.0 + 2**-40], dtype=torch.float64)
    b = torch.tensor([1.0], dtype=torch.float64)
    keep = allocate({"b": b, "a": a}, 1)  # in float32 both are 1.0 and the tie would go to "b"
    assert keep["a"].tolist() == [True] and keep["b"].tolist() == [False]


def test_rank_pattern_codec() -> None:
    masks = {"m.q": torch.tensor([[True], [False], [True]]), "m.v": torch.tensor([[True], [True], [True]])}
    assert rank_pattern_masks(masks) == {"m.q.lora_E": [True, False, True]}  # a whole module is left out
    assert rank_pattern_masks(masks, only_pruned=False)["m.v.lora_E"] == [True, True, True]
    pattern = {mask_key("m.q"): [False, True, True, False]}
    assert module_mask(pattern, "m.q", rank=2, init_r=4) == [False, True, True, False]
    # an entry that does not fit the tensors (wrong count or length) is not trusted: the first `rank` positions
    assert module_mask(pattern, "m.q", rank=3, init_r=4) == [True, True, True, False]
    assert module_mask(None, "m.k", rank=1, init_r=3) == [True, False, False]
    assert narrow_mask([False, True, True, False], [1]) == [False, False, True, False]


def test_pruning_a_pruned_adalora_adapter_narrows_its_masks() -> None:
    """prune keeps positions of the original init_r-long mask: a second prune only turns bits off."""
    torch.manual_seed(0)
    r, init_r = 3, 5
    m = Module(A=torch.randn(r, 6), B=torch.randn(4, r), E=torch.tensor([[3.0], [1.0], [2.0]]), alpha=5.0,
               scale=5.0 / (init_r + 1e-5))
    cfg = AdapterConfig(method="adalora", init_r=init_r, extra={"rank_pattern": {"q.lora_E": [False, True, True,
                                                                                            False, True]}})
    res = prune_adapter(Adapter({"q": m}, cfg), budget=2)
    assert res.adapter.config.extra["rank_pattern"] == {"q.lora_E": [False, True, False, False, True]}
    assert torch.equal(res.adapter.modules["q"].E, torch.tensor([[3.0], [2.0]]))
