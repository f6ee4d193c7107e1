"""`loratools train --dora` against real peft 0.21.2: the layer's forward and gradients, the saved adapter's
logits in PeftModel, and the trained adapter's merge against merge_and_unload."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from loratools.dora import magnitude_change, merged_weight
from loratools.formats import read_adapter
from loratools.io import ModelReader
from loratools.nn.inject import LayerSpec, adapter_state, expected_parameters, inject, load_adapter
from loratools.nn.layers import DoRALinear
from loratools.train.loop import train_adapter
from loratools.train.config import TrainConfig

from conftest import ROOT, TINY_LLAMA

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

CORPUS = ROOT / "fixtures" / "corpus.txt"
TARGETS = ("q_proj", "v_proj", "o_proj")


def _peft_twin(net: nn.Module, ours: nn.Module, targets: list[str], dropout: float) -> nn.Module:
    """``net`` wrapped by peft's DoRA with the factors and magnitudes of ``ours``."""
    pm = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                 use_dora=True, lora_dropout=dropout))
    sd = {}
    for n, m in adapter_state(ours).items():
        for key, t in (("lora_A", m.A), ("lora_B", m.B), ("lora_magnitude_vector", m.magnitude)):
            sd[f"base_model.model.{n}.{key}.default.weight"] = t
    assert not pm.load_state_dict(sd, strict=False).unexpected_keys
    return pm


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_layer_forward_and_gradients_equal_peft(dropout: float) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5, bias=False))
    ours = copy.deepcopy(net)
    layers = inject(ours, ["0", "2"], LayerSpec(rank=4, alpha=8, dora=True, dropout=dropout))
    for layer in layers.values():
        assert isinstance(layer, DoRALinear)
        # m starts at ‖W0‖_row (peft's update_layer with B = 0)
        assert torch.allclose(layer.lora_magnitude_vector, layer.base.weight.norm(dim=1))
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.1)
            layer.lora_magnitude_vector.mul_(1.2)
    pm = _peft_twin(net, ours, ["0", "2"], dropout)
    ours.train(), pm.train()
    x = torch.randn(7, 16)
    torch.manual_seed(5)
    y_ours = ours(x)
    torch.manual_seed(5)
    y_peft = pm(x)
    assert (y_ours - y_peft).abs().max() <= 1e-6
    y_ours.pow(2).sum().backward()
    y_peft.pow(2).sum().backward()
    for name, layer in layers.items():
        theirs = pm.base_model.model.get_submodule(name)
        for mine, ref in ((layer.lora_A, theirs.lora_A.default.weight), (layer.lora_B, theirs.lora_B.default.weight),
                          (layer.lora_magnitude_vector, theirs.lora_magnitude_vector.default.weight)):
            assert mine.grad is not None and ref.grad is not None
            # the norm is a constant in both (peft: weight_norm.detach()); a graph through it changes these
            assert torch.allclose(mine.grad, ref.grad, rtol=1e-5, atol=1e-6)


def test_layer_merged_explicitly_gives_its_forward() -> None:
    """The DoRA layer's adapter merged by :func:`loratools.dora.merged_weight` is the layer's eval forward."""
    torch.manual_seed(1)
    base = nn.Linear(10, 6)
    layer = DoRALinear(base, rank=3, alpha=3)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.2)
        layer.lora_magnitude_vector.mul_(0.8)
    w0, x = base.weight.clone(), torch.randn(4, 10)
    layer.eval()
    y = layer(x)
    merged = merged_weight(base.weight.detach(), layer.module(detach=True))
    assert not torch.equal(merged, w0)
    assert (nn.functional.linear(x, merged, base.bias) - y).abs().max() <= 1e-6
    assert torch.equal(base.weight, w0)  # the layer's own weight is never changed


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DoRA adapter trained by the CLI for a few steps, with dropout on."""
    from conftest import run_cli

    out = tmp_path_factory.mktemp("dora-train") / "dora"
    r = run_cli("train", TINY_LLAMA, CORPUS, "-o", out, "--dora", "--rank", "4", "--alpha", "8", "--targets",
                ",".join(TARGETS), "--steps", "8", "--lr", "5e-3", "--seq-len", "32", "--batch-size", "4",
                "--eval-split", "0.03", "--dropout", "0.1", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    return out


def test_trained_adapter_is_peft_dora_and_moved_magnitudes(trained: Path) -> None:
    cfg = json.loads((trained / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] is True
    tensors = load_file(trained / "adapter_model.safetensors")
    mags = [k for k in tensors if k.endswith(".lora_magnitude_vector")]
    assert len(mags) == 4 * len(TARGETS)
    ad = read_adapter(trained)
    with ModelReader(TINY_LLAMA) as r:
        moved = [magnitude_change(r.get(f"{n}.weight"), m) for n, m in ad.items()]
    assert all(c > 1e-4 for c in moved)  # training moved every m away from ‖W0‖_row
    record = json.loads((trained / "training_config.json").read_text())
    shapes = [(m.matrix_shape[1], m.matrix_shape[0]) for m in ad.modules.values()]
    plain = expected_parameters(shapes, LayerSpec(rank=4, alpha=8))
    assert record["trainable_parameters"] == record["expected_parameters"] == plain + sum(o for _, o in shapes)


def test_peft_loads_trained_dora_with_same_logits(trained: Path) -> None:
    ids = torch.tensor([list(range(40, 80)), list(range(90, 130))])
    theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(TINY_LLAMA), str(trained))
    ours = transformers.AutoModelForCausalLM.from_pretrained(TINY_LLAMA)
    layers = load_adapter(ours, read_adapter(trained))
    assert all(isinstance(m, DoRALinear) for m in layers.values())
    plain = transformers.AutoModelForCausalLM.from_pretrained(TINY_LLAMA)
    for m in (theirs, ours, plain):
        m.eval()
    with torch.no_grad():
        a, b, c = theirs(input_ids=ids).logits, ours(input_ids=ids).logits, plain(input_ids=ids).logits
    assert (a - c).abs().max() > 1e-3  # the adapter does change the output
    assert (a - b).abs().max() <= 1e-5


def test_trained_dora_merges_like_peft(trained: Path, tmp_path: Path, cli) -> None:
    r = cli("merge", TINY_LLAMA, trained, "-o", tmp_path / "m", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    model = transformers.AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float32)
    ref = peft.PeftModel.from_pretrained(model, str(trained)).merge_and_unload(safe_merge=True).state_dict()
    with ModelReader(tmp_path / "m") as rd:
        ours = {k: rd.get(k) for k in rd.keys()}
    adapted = [f"{n}.weight" for n in read_adapter(trained).modules]
    assert all(k in ours for k in adapted)
    assert max(float((ours[k].double() - ref[k].double()).abs().max()) for k in ours) < 1e-6


def test_dora_with_adalora_is_refused_in_one_line(tmp_path: Path, cli) -> None:
    r = cli("train", TINY_LLAMA, CORPUS, "-o", tmp_path / "o", "--dora", "--method", "adalora", "--steps", "1")
    assert r.returncode == 2 and "--dora" in r.stderr and "--method" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
    with pytest.raises(Exception, match="`save_as`"):
        TrainConfig(dora=True, save_as="lora")


def test_dora_resume_is_bit_for_bit(tmp_path: Path) -> None:
    cfg = TrainConfig(dora=True, steps=4, rank=2, alpha=4, save_every=2, dropout=0.1, seq_len=32, batch_size=2,
                      lr=5e-3, eval_split=0.03, device="cpu")
    train_adapter(TINY_LLAMA, CORPUS, tmp_path / "full", cfg)
    ckpt = tmp_path / "full.checkpoints" / "step-2"
    assert any(k.endswith("lora_magnitude_vector") for k in load_file(ckpt / "trainable.safetensors"))
    train_adapter(TINY_LLAMA, CORPUS, tmp_path / "resumed", cfg, resume=ckpt, checkpoint_dir=tmp_path / "ck2")
    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert any(k.endswith("lora_magnitude_vector") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
