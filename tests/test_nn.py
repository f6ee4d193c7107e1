"""loratools.nn: LoRA/AdaLoRA layers, the rank allocator, inject/export — against float64 references."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from torch import nn

from loratools.errors import InvalidOptionError, MissingModuleError
from loratools.nn.layers import AdaLoRALinear, LoRALinear
from loratools.nn.inject import (LayerSpec, adapter_state, expected_parameters, inject, load_adapter,
                                 trainable_parameters)
from loratools.adalora import RankAllocator, budget_schedule, orthogonal_penalty, orthogonal_regularizer


def _conv1d(nx: int, nf: int) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(nf, nx)
    nn.init.normal_(layer.weight)
    nn.init.normal_(layer.bias)
    return layer


def _randomise(layer: nn.Module) -> None:
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B):
            p.normal_()
        if hasattr(layer, "lora_E"):
            layer.lora_E.normal_()


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_lora_forward_equals_dense_float64(kind: str, rslora: bool) -> None:
    torch.manual_seed(0)
    base = nn.Linear(24, 10) if kind == "linear" else _conv1d(24, 10)
    layer = LoRALinear(base, rank=4, alpha=6, rslora=rslora)
    _randomise(layer)
    x = torch.randn(3, 5, 24)
    W0 = base.weight.detach().double()
    W0 = W0.T if kind == "conv1d" else W0  # Conv1D stores in×out
    s = 6 / math.sqrt(4) if rslora else 6 / 4
    dense = W0 + s * layer.lora_B.detach().double() @ layer.lora_A.detach().double()
    want = x.double() @ dense.T + base.bias.detach().double()
    assert torch.allclose(layer(x).double(), want, atol=1e-5, rtol=1e-5)
    assert layer.scaling == pytest.approx(s)


def test_lora_init_is_peft_init() -> None:
    torch.manual_seed(3)
    layer = LoRALinear(nn.Linear(64, 32), rank=8, alpha=16)
    assert torch.equal(layer.lora_B, torch.zeros(32, 8))
    bound = 1 / math.sqrt(64)  # kaiming_uniform_(a=√5) on fan_in 64 gives U(−1/√64, 1/√64)
    assert float(layer.lora_A.detach().abs().max()) <= bound
    assert float(layer.lora_A.detach().abs().max()) > 0.8 * bound


@pytest.mark.parametrize("cls", [LoRALinear, AdaLoRALinear])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_exported_adapter_merged_explicitly_gives_the_layer_forward(cls: type, kind: str) -> None:
    """Layers never merge themselves: the adapter they export, merged by an explicit call, is their forward."""
    torch.manual_seed(1)
    base = nn.Linear(16, 12) if kind == "linear" else _conv1d(16, 12)
    net = nn.Sequential(base)
    spec = (LayerSpec(rank=4, alpha=8) if cls is LoRALinear
            else LayerSpec(method="adalora", init_rank=4, target_rank=2, alpha=8))
    (layer,) = inject(net, ["0"], spec).values()
    assert isinstance(layer, cls)
    _randomise(layer)
    w_before = base.weight.detach().clone()
    x = torch.randn(7, 16)
    y = net(x)
    module = adapter_state(net).modules["0"]
    merged = base.weight.detach() + module.delta()
    with torch.no_grad():
        base.weight.copy_(merged)
    assert torch.allclose(base(x), y, atol=1e-5)  # the base alone, with W0 + ΔW, is the adapted layer
    assert not torch.allclose(merged, w_before)
    assert not hasattr(layer, "merge") and not hasattr(layer, "merged")  # no hidden in-place merge state


def test_adalora_forward_equals_dense_float64() -> None:
    torch.manual_seed(2)
    base = nn.Linear(20, 9)
    layer = AdaLoRALinear(base, rank=6, alpha=12)
    _randomise(layer)
    with torch.no_grad():
        layer.mask[[1, 4]] = False
    layer.apply_mask()
    P, L, Q = (t.detach().double() for t in (layer.lora_B, layer.lora_E, layer.lora_A))
    assert torch.equal(L[[1, 4]], torch.zeros(2, 1, dtype=torch.float64))
    dense = base.weight.detach().double() + 12 / (6 + 1e-5) * P @ torch.diag(L.reshape(-1)) @ Q
    x = torch.randn(4, 20)
    want = x.double() @ dense.T + base.bias.detach().double()
    assert torch.allclose(layer(x).double(), want, atol=1e-5)


def test_orthogonal_regulariser() -> None:
    torch.manual_seed(0)
    P, _ = torch.linalg.qr(torch.randn(30, 5, dtype=torch.float64))  # orthonormal columns
    Qt, _ = torch.linalg.qr(torch.randn(40, 5, dtype=torch.float64))
    Q = Qt.T  # orthonormal rows
    for form in ("paper", "peft"):
        assert float(orthogonal_regularizer(P, Q, form=form)) == pytest.approx(0.0, abs=1e-10)
    P2, Q2 = torch.randn(30, 5, dtype=torch.float64), torch.randn(5, 40, dtype=torch.float64)
    dp, dq = P2.T @ P2 - torch.eye(5, dtype=torch.float64), Q2 @ Q2.T - torch.eye(5, dtype=torch.float64)
    paper = float((dp**2).sum() + (dq**2).sum())
    peft = float((torch.linalg.norm(dp) + torch.linalg.norm(dq)) / 2)
    assert float(orthogonal_regularizer(P2, Q2, form="paper")) == pytest.approx(paper, rel=1e-12)
    assert float(orthogonal_regularizer(P2, Q2, form="peft")) == pytest.approx(peft, rel=1e-12)
    with pytest.raises(InvalidOptionError):
        orthogonal_regularizer(P2, Q2, form="other")  # type: ignore[arg-type]


def test_orthogonal_penalty_matches_peft_formula() -> None:
    """PEFT: orth_reg_weight × mean over every lora_A and lora_B of ‖·‖_F (compute it here by hand)."""
    torch.manual_seed(0)
    layers = [AdaLoRALinear(nn.Linear(8, 6), rank=3, alpha=3), AdaLoRALinear(nn.Linear(8, 4), rank=3, alpha=3)]
    norms = []
    for m in layers:
        A, B = m.lora_A.detach(), m.lora_B.detach()
        norms += [torch.linalg.norm(A @ A.T - torch.eye(3)), torch.linalg.norm(B.T @ B - torch.eye(3))]
    assert float(orthogonal_penalty(layers, form="peft").detach()) == pytest.approx(float(sum(norms) / len(norms)), rel=1e-6)


def _paper_budget(t: int, b0: int, bT: int, T: int, ti: int, tf: int) -> int:
    """The paper's b(t), evaluated in exact rationals and floored (PEFT floors with int())."""
    if t <= ti:
        return b0
    if t > T - tf:
        return bT
    return bT + math.floor((b0 - bT) * (1 - Fraction(t - ti, T - ti - tf)) ** 3)


@pytest.mark.parametrize("b0,bT,T,ti,tf", [(96, 32, 100, 10, 30), (48, 8, 37, 0, 5), (12, 4, 10, 2, 2)])
def test_budget_schedule_matches_paper_at_every_step(b0: int, bT: int, T: int, ti: int, tf: int) -> None:
    got = [budget_schedule(t, initial=b0, target=bT, total=T, tinit=ti, tfinal=tf) for t in range(T + 1)]
    assert got == [_paper_budget(t, b0, bT, T, ti, tf) for t in range(T + 1)]
    assert all(a >= b for a, b in zip(got, got[1:]))  # never grows


def _ada_model(seed: int = 0) -> tuple[nn.Module, dict[str, AdaLoRALinear]]:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8))
    layers = inject(net, ["0", "2"], LayerSpec(method="adalora", init_rank=6, target_rank=2, alpha=6))
    return net, layers  # type: ignore[return-value]


def test_allocator_masks_stay_until_reallocated() -> None:
    net, layers = _ada_model()
    T, ti, tf, dt = 30, 3, 6, 4
    alloc = RankAllocator(layers, target_rank=2, total_step=T, tinit=ti, tfinal=tf, delta_t=dt)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(64, 12), torch.randn(64, 8)
    prev_masks = None
    for t in range(1, T + 1):
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        budget = alloc.step(t)
        opt.zero_grad()
        masks = {n: m.mask.clone() for n, m in layers.items()}
        kept = sum(int(m.sum()) for m in masks.values())
        reallocated = (t > ti and t % dt == 0) or t == T - tf
        if t <= ti:
            assert kept == 12
        elif reallocated:
            assert kept == budget_schedule(t, initial=12, target=4, total=T, tinit=ti, tfinal=tf)
        else:
            assert all(torch.equal(masks[n], prev_masks[n]) for n in masks), f"mask changed at step {t}"
        for n, m in layers.items():  # masked singular values are exactly zero after every step
            assert torch.all(m.lora_E[~m.mask] == 0)
            assert budget == alloc.budget(t)
        prev_masks = masks
    assert sum(sum(v) for v in alloc.rank_pattern().values()) == 4
    assert set(alloc.rank_pattern()) == {"0.lora_E", "2.lora_E"}


def test_allocator_scores_follow_the_paper() -> None:
    """One update from zero EMAs: Ī = (1−β1) I, Ū = (1−β2)|I − Ī|, S = s(λ) + mean s(P col) + mean s(Q row)."""
    net, layers = _ada_model(1)
    with torch.no_grad():
        for m in layers.values():
            m.lora_E.normal_()
    alloc = RankAllocator(layers, target_rank=2, total_step=10, beta1=0.7, beta2=0.6)
    ((net(torch.randn(8, 12)) ** 2).sum()).backward()
    alloc.update_importance()
    scores = alloc.triplet_scores()
    for name, m in layers.items():
        def s(p: torch.Tensor) -> torch.Tensor:
            ipt = (p.detach().double() * p.grad.double()).abs()
            bar = 0.3 * ipt
            return bar * (0.4 * (ipt - bar).abs())
        want = s(m.lora_E).reshape(-1) + s(m.lora_B).mean(0) + s(m.lora_A).mean(1)
        assert torch.allclose(scores[name].double(), want, rtol=1e-5, atol=1e-12)


def test_allocator_rejects_bad_schedule() -> None:
    _, layers = _ada_model()
    with pytest.raises(InvalidOptionError):
        RankAllocator(layers, target_rank=2, total_step=10, tinit=5, tfinal=5)


def test_inject_freezes_and_counts(tiny_llama) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    spec = LayerSpec(rank=4, alpha=8)
    layers = inject(model, ["q_proj", "v_proj"], spec)
    assert len(layers) == 8
    # hidden 128: q is 128→128, v is 128→64 (GQA)
    assert trainable_parameters(model) == 4 * 4 * ((128 + 128) + (128 + 64))
    assert trainable_parameters(model) == expected_parameters([(m.in_features, m.out_features) for m in layers.values()], spec)
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())


def test_inject_adalora_counts(tiny_llama) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    spec = LayerSpec(method="adalora", init_rank=6, target_rank=2, alpha=6)
    inject(model, ["o_proj", "down_proj"], spec)
    assert trainable_parameters(model) == 4 * 6 * ((128 + 128 + 1) + (256 + 128 + 1))


def test_inject_unknown_target_is_an_error() -> None:
    with pytest.raises(MissingModuleError):
        inject(nn.Sequential(nn.Linear(2, 2)), ["q_proj"], LayerSpec())


def test_adapter_state_round_trip_truncates_adalora() -> None:
    net, layers = _ada_model()
    for m in layers.values():
        _randomise(m)
    with torch.no_grad():
        layers["0"].mask[[0, 2, 5]] = False
        layers["2"].mask[:] = False  # rank 0
    for m in layers.values():
        m.apply_mask()
    x = torch.randn(5, 12)
    y = net(x)
    ad = adapter_state(net, targets=["0", "2"], target_rank=2)
    assert ad.modules["0"].rank == 3 and ad.modules["2"].rank == 0
    assert ad.config.extra["rank_pattern"]["0.lora_E"] == [False, True, False, True, True, False]
    assert ad.modules["0"].scale == pytest.approx(6 / (6 + 1e-5))
    torch.manual_seed(9)
    fresh = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 8))
    fresh.load_state_dict({k.replace(".base", ""): v for k, v in net.state_dict().items()
                           if "lora_" not in k and "mask" not in k})
    load_adapter(fresh, ad)
    assert torch.allclose(fresh(x), y, atol=1e-6)


def test_gpt2_conv1d_adapter_matches_peft(tmp_path) -> None:
    """GPT-2's Conv1D (weight in×out): our fan_in_fan_out export gives peft the same logits."""
    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    from loratools.formats import write_adapter

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)).save_pretrained(tmp_path / "gpt2")
    ours = GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2")
    layers = inject(ours, ["c_attn"], LayerSpec(rank=3, alpha=5))
    assert all(m.fan_in_fan_out for m in layers.values())
    for m in layers.values():
        _randomise(m)
    ad = adapter_state(ours, targets=["c_attn"])
    assert ad.config.fan_in_fan_out and ad.modules["transformer.h.0.attn.c_attn"].weight_shape == (32, 96)
    write_adapter(ad, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"), str(tmp_path / "adapter"))
    ids = torch.randint(0, 50, (2, 10))
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        assert (ours(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max() <= 1e-5
