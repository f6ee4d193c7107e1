"""QLoRA on a bitsandbytes LLM.int8 base (loratools.nn.quantized.Int8Linear), the record of the base a QLoRA
adapter carries (peft's model-card block), and what a merge does with that record — against bitsandbytes 0.50.2,
transformers 5.23 and peft 0.21.2 running on CPU."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from loratools.errors import InvalidOptionError
from loratools.formats import read_adapter
from loratools.merge.onto import choose_onto, recorded_base
from loratools.nn.inject import load_adapter
from loratools.nn.quantized import Int8Linear, quantize_linears
from loratools.quant.qlora import CARD_PREFIX, QLORA_QUANTS, qlora_card, qlora_codec, qlora_row, quants_of_card

from conftest import ADAPTERS, TINY_LLAMA
from test_qlora import train_tiny

bnb = pytest.importorskip("bitsandbytes")


def _bnb_int8(linear: nn.Linear) -> nn.Module:
    """bitsandbytes' own Linear8bitLt holding ``linear``'s weight as Int8Params quantizes it (on CPU)."""
    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=0.0)
    layer.weight = bnb.nn.Int8Params(linear.weight.detach().clone(), requires_grad=False,
                                     has_fp16_weights=False).to("cpu")
    layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer


def test_int8_layer_holds_the_codes_and_row_absmax_of_bitsandbytes_int8params():
    torch.manual_seed(0)
    linear = nn.Linear(128, 48)
    with torch.no_grad():
        linear.weight[3] = 0  # an all-zero row: bitsandbytes' 0·(127/0) is written as zeros
    ours, ref = Int8Linear.from_linear(linear), _bnb_int8(linear)
    assert ref.weight.dtype == torch.int8 and torch.equal(ours.codes, ref.weight.data)
    assert torch.equal(ours.scb, ref.weight.SCB)
    assert not any(p.requires_grad for p in ours.parameters())


def test_int8_layer_computes_what_bitsandbytes_computes_when_training_on_cpu():
    """Train mode: bitsandbytes' MatMul8bitFp (dequantized weight, no int8 activations), to the bit."""
    torch.manual_seed(1)
    linear = nn.Linear(64, 32)
    ours, ref = Int8Linear.from_linear(linear), _bnb_int8(linear).train()
    x = torch.randn(2, 5, 64, requires_grad=True)
    y = ours(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = ref(x_ref)
    assert torch.equal(y, y_ref)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    (g_ref,) = torch.autograd.grad(y_ref.square().sum(), x_ref)
    assert torch.allclose(g, g_ref, rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def int8_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny(tmp_path_factory, "int8", steps=3)


def test_training_on_int8_holds_every_linear_but_the_head_in_8_bits(int8_adapter):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA)
    names = quantize_linears(model, qlora_codec("int8"), skip=model.get_output_embeddings())
    assert len(names) == 4 * 7 and "lm_head" not in names
    assert all(isinstance(model.get_submodule(n), Int8Linear) for n in names)
    assert json.loads((int8_adapter / "training_config.json").read_text())["quantize"] == "int8"


def test_int8_qlora_adapter_gives_our_logits_in_peft_on_the_transformers_int8_model(int8_adapter):
    """peft on transformers' load_in_8bit model, in train mode (bitsandbytes' CPU training matmul, dropout 0):
    the same logits as our forward to float32 rounding. In eval mode bitsandbytes also rounds the activations to
    int8 (MatMul8bitLt), which no dequantized weight reproduces: bounded at 2 % of the largest logit."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    ours = AutoModelForCausalLM.from_pretrained(TINY_LLAMA)
    quantize_linears(ours, qlora_codec("int8"), skip=ours.get_output_embeddings())
    load_adapter(ours, read_adapter(int8_adapter))
    ids = torch.tensor([list(range(40, 80)), list(range(90, 130))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, quantization_config=BitsAndBytesConfig(
            load_in_8bit=True), device_map="cpu")
        peft_model = PeftModel.from_pretrained(base, str(int8_adapter))
    with torch.no_grad():
        mine = ours.eval()(input_ids=ids).logits
        theirs = peft_model.train()(input_ids=ids).logits
        served = peft_model.eval()(input_ids=ids).logits
        with peft_model.disable_adapter():
            base_only = peft_model(input_ids=ids).logits
    assert (mine - theirs).abs().max() <= 1e-5 * mine.abs().max()
    assert (mine - served).abs().max() <= 2e-2 * mine.abs().max()  # measured: 0.99 % of max |logit|
    assert (theirs - base_only).abs().max() > 0.1 * mine.abs().max()  # the adapter's effect: ~29 % here


def test_qlora_adapter_records_its_base_in_a_card_peft_reads_without_complaint(int8_adapter):
    from peft import PeftConfig

    card = (int8_adapter / "README.md").read_text()
    assert CARD_PREFIX in card and quants_of_card(card) == ("int8",)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unknown adapter_config.json key would warn
        config = PeftConfig.from_pretrained(str(int8_adapter))
    assert config.r == 4
    assert recorded_base(str(int8_adapter)).quant == "int8"


@pytest.mark.parametrize("quant", ["nf4-dq", "fp4", "int8"])
def test_card_block_read_as_peft_writes_it(tmp_path, monkeypatch, quant):
    """peft's own card code (create_or_update_model_card), made to reach its bitsandbytes block: 0.21.2 tests
    ``hasattr`` on the config turned into a dict, so it never writes it unaided (the first save below)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.tuners_utils import BaseTuner
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    four = quant != "int8"
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant[:3], bnb_4bit_use_double_quant=quant.endswith(
        "-dq")) if four else BitsAndBytesConfig(load_in_8bit=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, quantization_config=qc, device_map="cpu")
        model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"]))
        model.save_pretrained(tmp_path / "unaided")
        assert quants_of_card((tmp_path / "unaided" / "README.md").read_text()) == ()

        class Config(dict):  # what the check looks for: an attribute, on the dict peft makes of the config
            quantization_config = True

        real = BaseTuner.get_model_config
        monkeypatch.setattr(BaseTuner, "get_model_config", staticmethod(lambda m: Config(real(m))))
        model.save_pretrained(tmp_path / "card")
    assert quants_of_card((tmp_path / "card" / "README.md").read_text()) == (quant,)


def test_card_names_each_base_once_and_skips_blocks_of_no_base():
    text = "\n".join([qlora_card("nf4"), qlora_card("nf4"), CARD_PREFIX, "- load_in_4bit: False", "",
                      qlora_card("fp4-dq")])
    assert quants_of_card(text) == ("nf4", "fp4-dq")
    assert all(quants_of_card(qlora_card(q)) == (q,) for q in QLORA_QUANTS)


def _with_record(tmp_path: Path, name: str, card: str | None = None, training: str | None = None) -> str:
    folder = tmp_path / name
    folder.mkdir()
    for f in (ADAPTERS / "lora").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    if card is not None:
        (folder / "README.md").write_text(qlora_card(card))
    if training is not None:
        (folder / "training_config.json").write_text(json.dumps({"quantize": training}))
    return str(folder)


def test_merge_choice_takes_the_recorded_base_and_refuses_one_that_contradicts_it(tmp_path):
    dq = _with_record(tmp_path, "dq", card="nf4-dq")
    inputs = [dq]
    onto, notes = choose_onto("original", None, inputs)
    assert onto.quant is None and "nf4-dq base (README.md)" in notes[0] and "`qlora` nf4-dq" in notes[0]
    onto, notes = choose_onto("dequantized", None, inputs)
    assert onto.dequantized and onto.quant == "nf4-dq" and "README.md" in notes[0]
    assert choose_onto("original", "nf4-dq", inputs) == (onto.__class__("original", "nf4-dq"), ())
    with pytest.raises(InvalidOptionError, match=r"`qlora` fp4 contradicts .*dq, whose README.md records a "
                                                  r"bitsandbytes nf4-dq base; pass `qlora` nf4-dq"):
        choose_onto("original", "fp4", inputs)
    plain = [str(ADAPTERS / "lora")]
    assert choose_onto("original", None, plain) == (onto.__class__("original", None), ())
    other = _with_record(tmp_path, "i8", training="int8")
    both = [*inputs, other]
    with pytest.raises(InvalidOptionError, match=r"different bases \(int8, nf4-dq\)"):
        choose_onto("dequantized", None, both)


def test_a_record_that_names_two_bases_is_refused(tmp_path):
    folder = _with_record(tmp_path, "both", card="nf4", training="fp4")
    with pytest.raises(InvalidOptionError, match=r"several bases .*fp4 \(training_config.json\), nf4 \(README.md\)"):
        recorded_base(folder)


def test_int8_figures_are_the_float16_int8_rounding_over_the_update():
    """Int8Params rounds the float16 weight: ‖E‖ is that of bitsandbytes' own codes dequantized."""
    torch.manual_seed(2)
    w0 = torch.randn(32, 64) * 0.02
    held = bnb.nn.Int8Params(w0.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    deq = bnb.functional.int8_vectorwise_dequant(held.data, held.SCB)
    row = qlora_row("m", w0, torch.full((32, 64), 1e-4), "int8")
    assert abs(row.quant_error - float((deq - w0).double().norm())) <= 1e-6 * row.quant_error


def test_inspect_names_the_recorded_base_and_refuses_another_qlora(cli, int8_adapter):
    res = cli("inspect", int8_adapter)
    assert res.returncode == 0 and "trained on a bitsandbytes int8 base (training_config.json)" in res.stdout
    assert "--qlora int8" in res.stdout
    res = cli("inspect", int8_adapter, "--base", TINY_LLAMA, "--qlora", "nf4")
    assert res.returncode == 2 and "--qlora nf4 contradicts" in res.stderr and "pass --qlora int8" in res.stderr
    assert res.stderr.strip().count("\n") == 0 and not res.stdout
    res = cli("inspect", int8_adapter, "--base", TINY_LLAMA, "--qlora", "int8", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["quant"] == "int8"


def test_merge_cli_reads_the_recorded_base_names_it_and_refuses_a_contradiction(tmp_path):
    """`loratools merge` of an adapter whose card records its QLoRA base: a note says how to see which base to merge
    onto; `--onto dequantized` takes the recorded type and writes what `--qlora nf4-dq` writes; `--qlora fp4` is
    refused in one line, nothing written."""
    from conftest import run_cli

    dq = _with_record(tmp_path, "dq", card="nf4-dq")
    plain = run_cli("merge", TINY_LLAMA, dq, "-o", tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr
    said = " ".join(plain.stderr.split())  # notes are wrapped to the terminal's width
    assert "pass --qlora nf4-dq" in said and "`qlora`" not in said
    taken = run_cli("merge", TINY_LLAMA, dq, "-o", tmp_path / "taken", "--onto", "dequantized")
    named = run_cli("merge", TINY_LLAMA, dq, "-o", tmp_path / "named", "--onto", "dequantized", "--qlora", "nf4-dq")
    assert taken.returncode == 0 and named.returncode == 0, taken.stderr + named.stderr
    assert "--qlora nf4-dq, taken from" in " ".join(taken.stderr.split())
    for f in (tmp_path / "named").iterdir():
        if f.suffix == ".safetensors":
            assert f.read_bytes() == (tmp_path / "taken" / f.name).read_bytes()
    refused = run_cli("merge", TINY_LLAMA, dq, "-o", tmp_path / "refused", "--qlora", "fp4")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "contradicts" in refused.stderr and not (tmp_path / "refused").exists()


def test_a_recorded_quantize_loratools_does_not_know_is_a_damaged_record(tmp_path):
    from loratools.errors import CorruptFileError

    assert recorded_base(_with_record(tmp_path, "plain", training="none")) is None
    with pytest.raises(CorruptFileError, match=r"training_config.json .*quantize is 'nf5'"):
        recorded_base(_with_record(tmp_path, "odd", training="nf5"))
