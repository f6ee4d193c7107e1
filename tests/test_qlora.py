"""QLoRA: the 4-bit base layer (loratools.nn.quantized), training on it, and the merge-choice figures
(loratools.quant.qlora, `inspect --qlora`), against bitsandbytes 0.50.2 and peft."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from loratools.formats import read_adapter
from loratools.io.model import ModelReader
from loratools.nn.inject import load_adapter
from loratools.nn.quantized import QuantLinear, quantize_linears
from loratools.quant.bnb import Bnb4bit, BnbInt8
from loratools.quant.qlora import qlora_codec
from loratools.train import train_adapter
from loratools.train.config import TrainConfig

from conftest import ADAPTERS, ROOT, TINY_LLAMA

F = pytest.importorskip("bitsandbytes.functional")
CORPUS = ROOT / "fixtures" / "corpus.txt"


@pytest.mark.parametrize("quant", ["nf4", "nf4-dq", "fp4"])
def test_quantized_linear_computes_with_the_weights_bitsandbytes_dequantizes(quant):
    torch.manual_seed(0)
    linear = nn.Linear(128, 48)
    layer = QuantLinear.from_linear(linear, qlora_codec(quant))
    packed, qs = F.quantize_4bit(linear.weight.detach(), blocksize=64, quant_type=quant[:3],
                                 compress_statistics=quant.endswith("-dq"))
    w = F.dequantize_4bit(packed, qs)
    x = torch.randn(3, 5, 128, requires_grad=True)
    y = layer(x)
    assert torch.equal(y, nn.functional.linear(x, w, linear.bias))
    (g,) = torch.autograd.grad(y.square().sum(), x)
    x2 = x.detach().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(nn.functional.linear(x2, w, linear.bias).square().sum(), x2)
    assert torch.allclose(g, g_ref, rtol=1e-6, atol=1e-7)
    assert not any(p.requires_grad for p in layer.parameters())
    assert layer.codes.numel() == 128 * 48 // 2  # 4 bits a weight


def train_tiny(tmp_path_factory: pytest.TempPathFactory, quantize: str, steps: int = 4) -> Path:
    """A rank-4 q,v adapter trained on the tiny Llama held as ``quantize`` (a few seconds)."""
    out = tmp_path_factory.mktemp(quantize) / "adapter"
    train_adapter(TINY_LLAMA, CORPUS, out, TrainConfig(steps=steps, rank=4, alpha=8, seq_len=32, batch_size=4, lr=5e-3,
                                                        eval_split=0.03, device="cpu", quantize=quantize))
    return out


@pytest.fixture(scope="module")
def qlora_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny(tmp_path_factory, "nf4-dq")


def _bnb_model(dequantized: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, quantization_config=cfg, device_map="cpu")
        return model.dequantize() if dequantized else model


def test_qlora_training_writes_an_adapter_peft_runs_on_the_bitsandbytes_model_with_our_logits(qlora_adapter):
    """Our forward (4-bit codes dequantized in pure torch) is peft's on transformers' dequantized bitsandbytes
    model to float32 rounding; on the 4-bit model itself bitsandbytes' CPU matmul rounds through bfloat16."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert json.loads((qlora_adapter / "training_config.json").read_text())["quantize"] == "nf4-dq"
    ours = AutoModelForCausalLM.from_pretrained(TINY_LLAMA)
    quantize_linears(ours, qlora_codec("nf4-dq"), skip=ours.get_output_embeddings())
    load_adapter(ours, read_adapter(qlora_adapter))
    ids = torch.tensor([list(range(40, 80)), list(range(90, 130))])
    with torch.no_grad():
        mine = ours.eval()(input_ids=ids).logits
        exact = PeftModel.from_pretrained(_bnb_model(True), str(qlora_adapter)).eval()(input_ids=ids).logits
        on_4bit = PeftModel.from_pretrained(_bnb_model(False), str(qlora_adapter)).eval()
        bf16ish = on_4bit(input_ids=ids).logits
        with on_4bit.disable_adapter():
            base_only = on_4bit(input_ids=ids).logits
    assert (mine - exact).abs().max() <= 1e-5
    assert (mine - bf16ish).abs().max() <= 2e-2 * mine.abs().max()
    assert (bf16ish - base_only).abs().max() > 0.1  # the adapter changed the output more than bf16 rounding


@pytest.mark.parametrize("kind", ["dora", "adalora"])
def test_dora_and_adalora_train_on_a_4bit_base_and_peft_runs_them_on_its_dequantized_model(
        tmp_path: Path, kind: str) -> None:
    """The QLoRA base holds for DoRA (its magnitude normalises deq(Q(W0)) + ΔW) and AdaLoRA too: peft 0.21.2 on
    transformers' dequantized NF4 model gives loratools' logits to float32 rounding."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    extra = {"dora": True} if kind == "dora" else {"method": "adalora", "init_rank": 6, "target_rank": 3,
                                                    "lr": 2e-2}
    out = tmp_path / kind
    train_adapter(TINY_LLAMA, CORPUS, out, TrainConfig(**{"steps": 6, "rank": 4, "alpha": 8, "seq_len": 32,
                                                          "batch_size": 4, "lr": 5e-3, "eval_split": 0.03,
                                                          "device": "cpu", "quantize": "nf4", **extra}))
    ours = AutoModelForCausalLM.from_pretrained(TINY_LLAMA)
    quantize_linears(ours, qlora_codec("nf4"), skip=ours.get_output_embeddings())
    load_adapter(ours, read_adapter(out))
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        deq = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, quantization_config=cfg, device_map="cpu").dequantize()
        theirs = PeftModel.from_pretrained(deq, str(out)).eval()
    ids = torch.tensor([list(range(40, 80)), list(range(90, 130))])
    with torch.no_grad():
        mine, ref = ours.eval()(input_ids=ids).logits, theirs(input_ids=ids).logits
        with theirs.disable_adapter():
            base_only = theirs(input_ids=ids).logits
    assert (mine - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (ref - base_only).abs().max() > 1e-3  # the adapter does something the comparison can see


def test_training_on_nf4_holds_every_linear_but_the_head_in_4_bits():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA)
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    names = quantize_linears(model, qlora_codec("nf4"), skip=model.get_output_embeddings())
    assert len(names) == 4 * 7 and "lm_head" not in names
    after = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    linear = sum(128 * o for o in (128, 64, 64, 128)) * 4 + 3 * 128 * 256 * 4  # float32 bytes in 4 layers
    assert before - after >= 0.8 * linear  # 4.5 bits instead of 32


def test_qlora_figures_are_the_dense_quantization_error_over_the_update(cli):
    res = cli("inspect", ADAPTERS / "lora", "--base", TINY_LLAMA, "--qlora", "nf4-dq", "--json")
    report = json.loads(res.stdout)
    adapter = read_adapter(ADAPTERS / "lora")
    reader = ModelReader(TINY_LLAMA)
    errs, deltas = [], []
    for row in report["rows"]:
        w0 = reader.get(f"{row['module']}.weight")
        packed, qs = F.quantize_4bit(w0, blocksize=64, quant_type="nf4", compress_statistics=True)
        err = (F.dequantize_4bit(packed, qs).double() - w0.double()).norm().item()
        delta = adapter.modules[row["module"]].delta().double().norm().item()
        assert math.isclose(row["quant_error"], err, rel_tol=1e-9) and math.isclose(row["delta"], delta, rel_tol=1e-9)
        assert math.isclose(row["ratio"], err / delta, rel_tol=1e-9)
        errs.append(err), deltas.append(delta)
    assert len(report["rows"]) == len(adapter.modules)
    overall = math.sqrt(sum(e * e for e in errs)) / math.sqrt(sum(d * d for d in deltas))
    assert math.isclose(report["overall"]["ratio"], overall, rel_tol=1e-9)
    assert report["favours"] in ("original", "dequantized")


def test_qlora_figures_without_a_base_are_refused_in_one_line(cli):
    res = cli("inspect", ADAPTERS / "lora", "--qlora", "nf4")
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "--base" in res.stderr and not res.stdout


def test_quant_choice_is_checked():
    with pytest.raises(ValueError):
        TrainConfig(quantize="nf3")  # type: ignore[arg-type]
    assert qlora_codec("fp4-dq") == Bnb4bit("fp4", 64, nested=True)
    assert qlora_codec("int8") == BnbInt8() and TrainConfig(quantize="int8").quantize == "int8"
