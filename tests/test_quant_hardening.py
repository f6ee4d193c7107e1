"""Quantized bases given unusual-but-valid or damaged configs and tensors: each is read as its producer and runtime
read it (compressed-tensors 0.20.0, vLLM 0.32.0, transformers 5.23), or refused in one line with nothing written.

A config value of another JSON type than its producer writes ("false" for false, 4.0 for 4) is refused by name where
loratools would otherwise read it differently from compressed-tensors' pydantic model; a tensor whose values
contradict its config (GPTQ ``sym: true`` with zeros other than 2^(b−1)), or whose scales make the weight non-finite,
is refused by every command that reads the base."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import ct_decompressed, dequantized_view, quantized_llama
from loratools.errors import UnsupportedConfigError
from loratools.quant.codec import quant_codec
from loratools.quant.gptq import GptqFormat

ROOT = Path(__file__).resolve().parent.parent
TINY, LORA = ROOT / "fixtures" / "tiny-llama", ROOT / "fixtures" / "adapters" / "lora"
Q = "model.layers.0.self_attn.q_proj"


def ct_config(**weights) -> dict:
    """A pack-quantized ``quantization_config`` with one group of ``weights`` (4-bit channel asymmetric, changed)."""
    w = {"num_bits": 4, "type": "int", "strategy": "channel", "symmetric": False, "dynamic": False, **weights}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": w}}}


@pytest.mark.parametrize(("field", "value"), [("symmetric", "false"), ("symmetric", 0), ("symmetric", None),
                                              ("num_bits", 4.0), ("num_bits", "4"), ("num_bits", True),
                                              ("group_size", 32.0)])
def test_a_compressed_tensors_weight_setting_of_another_json_type_is_refused_by_name(field: str, value) -> None:
    from compressed_tensors.quantization import QuantizationArgs

    if field == "symmetric" and value is not None:  # pydantic reads it as false: loratools must not read it as true
        assert QuantizationArgs(symmetric=value).symmetric is False
    extra = {"strategy": "group"} if field == "group_size" else {}
    with pytest.raises(UnsupportedConfigError, match=field):
        quant_codec({"quantization_config": ct_config(**{field: value, **extra})})


def test_actorder_false_is_no_activation_ordering_as_compressed_tensors_reads_it() -> None:
    from compressed_tensors.quantization import QuantizationArgs

    assert QuantizationArgs(actorder=False).actorder is None
    assert quant_codec({"quantization_config": ct_config(actorder=False)}) == \
        quant_codec({"quantization_config": ct_config()})


@pytest.fixture(scope="module")
def ct_channel_asym(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama as compressed-tensors packs it: 4-bit, one scale and zero point per output channel."""
    from test_quant_intpack import int_llama

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return int_llama(tmp_path_factory.mktemp("ct") / "base",
                         dict(num_bits=4, type="int", strategy="channel", symmetric=False))


def test_a_channel_weight_with_zero_points_reads_as_compressed_tensors_decompresses_it(ct_channel_asym) -> None:
    want, got = ct_decompressed(ct_channel_asym), dequantized_view(ct_channel_asym)
    assert set(want) == set(got)
    assert all(torch.equal(got[k].float(), want[k].float()) for k in want)


def _with(base: Path, dest: Path, *, tensors=None, config=None) -> Path:
    """``base`` copied to ``dest`` with ``tensors`` (a function changing the state dict) and ``config`` (changing
    config.json's quantization_config) applied."""
    t = load_file(base / "model.safetensors")
    if tensors:
        tensors(t)
    dest.mkdir(parents=True)
    save_file(t, dest / "model.safetensors", metadata={"format": "pt"})
    c = json.loads((base / "config.json").read_text())
    if config:
        config(c["quantization_config"])
    (dest / "config.json").write_text(json.dumps(c))
    return dest


def _refused(cli, dest: Path, *args: object, words: str) -> None:
    r = cli(*args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("loratools: error:"), r.stderr
    assert words in r.stderr, r.stderr
    assert not dest.exists()


def test_a_compressed_tensors_symmetric_string_is_refused_by_the_cli(ct_channel_asym, tmp_path: Path, cli) -> None:
    weights = lambda qc: qc["config_groups"]["group_0"]["weights"].update(symmetric="false")  # noqa: E731
    bad = _with(ct_channel_asym, tmp_path / "bad", config=weights)
    _refused(cli, tmp_path / "m", "merge", bad, LORA, "-o", tmp_path / "m", "--dtype", "float32", words="symmetric")


def _gptq_parts(k: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """AutoGPTQ's symmetric 4-bit round-to-nearest in groups of 32, stored v1 (zeros 8, stored as 7)."""
    out, n_in = w.shape
    g = w.float().reshape(out, n_in // 32, 32)
    s = (g.abs().amax(-1) / 7.5).half()
    q = torch.clamp(torch.round(g / s.float().unsqueeze(-1) + 8), 0, 15).reshape(out, n_in).to(torch.int16)
    qweight, qzeros, scales, g_idx = GptqFormat(4, 32).pack(q, torch.full((n_in // 32, out), 8), s.t())
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales.contiguous(), "g_idx": g_idx}


@pytest.fixture(scope="module")
def gptq_sym(tmp_path_factory: pytest.TempPathFactory) -> Path:
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True, "format": "gptq"}
    return quantized_llama(tmp_path_factory.mktemp("gptq") / "base", _gptq_parts, qc)


def test_gptq_sym_as_a_string_is_refused_by_name() -> None:
    with pytest.raises(UnsupportedConfigError, match="sym"):
        quant_codec({"quantization_config": {"quant_method": "gptq", "bits": 4, "sym": "true"}})


def _zeros_not_8(t: dict[str, torch.Tensor]) -> None:
    t[f"{Q}.qzeros"][0, 0] = 0x77777775  # one zero stored 5 (v1: 6), not 8


@pytest.mark.parametrize("command", ["merge", "merge-dtype", "extract"])
def test_gptq_sym_with_zeros_other_than_the_bias_is_refused_by_every_reader(gptq_sym, tmp_path: Path, cli,
                                                                           command: str) -> None:
    """vLLM 0.32.0 serves a ``sym`` GPTQ model with zero 2^(b−1) and never reads qzeros; transformers' GPTQ kernel
    reads them: such a model has no one meaning."""
    bad = _with(gptq_sym, tmp_path / "bad", tensors=_zeros_not_8)
    out = tmp_path / "out"
    args = {"merge": ("merge", bad, LORA, "-o", out), "merge-dtype": ("merge", bad, LORA, "-o", out, "--dtype",
                                                                       "float32"),
            "extract": ("extract", bad, TINY, "-o", out, "--rank", "2")}[command]
    _refused(cli, out, *args, words="says sym")


def test_the_same_zeros_with_sym_false_read_as_stored(gptq_sym, tmp_path: Path) -> None:
    bad = _with(gptq_sym, tmp_path / "asym", tensors=_zeros_not_8, config=lambda qc: qc.update(sym=False))
    w = dequantized_view(bad)[f"{Q}.weight"]
    q, _, s = GptqFormat(4, 32).spread([load_file(bad / "model.safetensors")[f"{Q}.{p}"]
                                        for p in ("qweight", "qzeros", "scales", "g_idx")])
    assert torch.equal(w[0, :32], ((q[0, :32] - 6).double() * s[0, :32].double()).half().float())


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_extract_from_a_base_whose_scales_are_not_finite_is_refused_in_one_line(gptq_sym, tmp_path: Path, cli,
                                                                               value: float) -> None:
    bad = _with(gptq_sym, tmp_path / "bad", tensors=lambda t: t[f"{Q}.scales"].__setitem__((0, 0), value))
    _refused(cli, tmp_path / "ex", "extract", bad, TINY, "-o", tmp_path / "ex", "--rank", "2",
             words=f"{Q}.weight in")


@pytest.mark.parametrize(("qc", "legacy"), [
    ({"quant_method": "gptq", "bits": 4, "format": "gptq", "checkpoint_format": "gptq_v2"}, "checkpoint_format"),
    ({"quant_method": "awq", "bits": 4, "format": "gemm", "version": "gemv"}, "version")])
def test_a_format_and_its_legacy_field_that_disagree_are_refused(qc: dict, legacy: str) -> None:
    """transformers 5.23 reads the legacy field (v2 zeros for GPTQ: the v1 reading is one step off)."""
    from transformers import AwqConfig, GPTQConfig

    made = (GPTQConfig if qc["quant_method"] == "gptq" else AwqConfig)(**{k: v for k, v in qc.items()
                                                                          if k != "quant_method"})
    assert str(getattr(made.format, "value", made.format)) == qc[legacy]
    with pytest.raises(UnsupportedConfigError, match=legacy):
        quant_codec({"quantization_config": qc})
    same = {**qc, "format": qc[legacy]} if qc[legacy] == "gptq_v2" else {**qc, legacy: "GEMM"}
    assert quant_codec({"quantization_config": same}) is not None


def test_an_awq_config_with_the_llm_awq_backend_is_refused_whatever_its_version() -> None:
    from transformers import AwqConfig

    assert AwqConfig(bits=4, backend="llm-awq", version="gemm").format.value == "llm-awq"
    with pytest.raises(UnsupportedConfigError, match="llm-awq"):
        quant_codec({"quantization_config": {"quant_method": "awq", "bits": 4, "version": "gemm",
                                             "backend": "llm-awq"}})


def _v2_to_v1_words(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQModel's ``convert_gptq_v2_to_v1_format_module``: one subtracted from every field of each int32 word as
    one subtraction on the word (``qzeros -= 0b0001…0001``), so a zero of 0 borrows from the next field."""
    ones = sum(1 << (j * bits) for j in range(32 // bits))
    words = (qzeros.long() - ones) % (1 << 32)  # the uint32 words, in int64
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


@pytest.mark.parametrize("bits", [4, 8])
def test_a_v1_zero_of_0_reads_as_gptqmodel_converts_it_back(bits: int) -> None:
    """GPTQModel writes an asymmetric model's v1 zeros by word subtraction and reads them back by word addition
    (``convert_gptq_v1_to_v2_format_module``, which transformers' GPTQ loading calls): every zero, 0 included, reads
    as it was quantized; the v2 reading of the same zeros is the reference."""
    g = torch.Generator().manual_seed(0)
    top = (1 << bits) - 1
    q = torch.randint(0, top + 1, (16, 64), generator=g, dtype=torch.int16)
    z = torch.randint(0, top + 1, (2, 16), generator=g, dtype=torch.int16)
    z[0, :4] = 0  # zeros at the grid's edge, next to one another and to others
    z[1, 5] = top
    s = torch.rand(2, 16, generator=g) * 0.01 + 0.001
    v2 = GptqFormat(bits, 32, v1=False).pack(q, z, s)
    v1 = (v2[0], _v2_to_v1_words(v2[1], bits), *v2[2:])
    assert torch.equal(GptqFormat(bits, 32, v1=True).pack(q, z, s)[1], v1[1])
    want = ((q.double() - z.double().repeat_interleave(32, 0).t()) * s.half().double().repeat_interleave(32, 0).t())
    assert torch.equal(GptqFormat(bits, 32, v1=False).dequantize(v2).double(), want.half().double())
    assert torch.equal(GptqFormat(bits, 32, v1=True).dequantize(v1), GptqFormat(bits, 32, v1=False).dequantize(v2))


def test_a_grid_with_zero_and_negative_scales_quantizes_within_its_half_step() -> None:
    """A damaged grid still bounds its rounding: steps of |s|, and a scale of 0 (whose one value is 0) leaves |x|;
    x = 0 on it gives q = 0 (not int8 of NaN), every other value its nearest or clamped one (float64 reference)."""
    from loratools.quant.intpack import IntPackFormat

    fmt = IntPackFormat(4, "group", 8, symmetric=False, packed=False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 16, generator=g)
    x[0, :8] = 0.0
    s = torch.rand(4, 2, generator=g) + 0.1
    s[0, 0], s[1, 0], s[2, 1] = 0.0, 0.0, -0.3
    zp = torch.randint(-8, 8, (4, 2), generator=g, dtype=torch.int8)
    like = (torch.zeros(4, 16, dtype=torch.int8), s, zp)
    q = fmt.quantize(x, like)[0]
    assert torch.equal(q[0, :8], torch.zeros(8, dtype=torch.int8))
    s64, z64 = s.double().repeat_interleave(8, 1), zp.double().repeat_interleave(8, 1)
    want = torch.where(s64 == 0, z64, torch.clamp(torch.round(x.double() / s64 + z64), -8, 7))
    assert torch.equal(q.double()[s64 != 0], want[s64 != 0])
    err = (fmt.dequantize((q, s, zp)) - x).abs()
    bound = fmt.half_step(x, like)
    assert bool(torch.isfinite(bound).all()) and bool((err <= bound).all())


def test_a_keep_format_merge_onto_a_zero_scale_group_verifies_in_one_line(gptq_sym, tmp_path: Path, cli) -> None:
    bad = _with(gptq_sym, tmp_path / "bad", tensors=lambda t: t[f"{Q}.scales"][0].zero_())
    assert cli("merge", bad, LORA, "-o", tmp_path / "m").returncode == 0
    r = cli("verify", bad, LORA, tmp_path / "m")
    assert r.returncode == 0 and "verify: ok" in r.stdout + r.stderr, r.stderr


@pytest.mark.parametrize("command", ["merge", "extract"])
def test_quantized_parts_without_a_quantization_config_are_refused_by_name(gptq_sym, tmp_path: Path, cli,
                                                                           command: str) -> None:
    """An old AutoGPTQ checkpoint keeps its settings in quantize_config.json (vLLM reads it, transformers does
    not): the parts are named, not taken for a model the adapter was not made for."""
    bad = _with(gptq_sym, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    (bad / "quantize_config.json").write_text(json.dumps(config.pop("quantization_config")))
    (bad / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    args = ("merge", bad, LORA, "-o", out) if command == "merge" else ("extract", bad, TINY, "-o", out, "--rank", "2")
    _refused(cli, out, *args, words=".qweight is part of a quantized weight")
