"""AutoAWQ GEMM bases (4-bit, with zero points and without) in every command that reads a quantized base. The
reference is the vLLM project's AutoAWQ converter in compressed-tensors 0.20.0 (``AutoAWQConverter`` through
``convert_checkpoint``), whose output transformers decompresses with compressed-tensors: our dequantized view must
equal it bit for bit; merges, records, verify, extract and inspect --base then work on it as on every quantized
base."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import (check_int_keep_format_merge, check_plain_merge_matches_peft, check_quantized_base_reads_as_plain,
                     ct_decompressed, dequantized_view, model_with_weights, quantized_llama)
from loratools.errors import UnsupportedConfigError
from loratools.quant.codec import GptqCodec, quant_codec
from loratools.quant.gptq import AwqFormat

pytest.importorskip("compressed_tensors", reason="make dev installs compressed-tensors==0.20.0")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parent.parent
TINY, LORA = ROOT / "fixtures" / "tiny-llama", ROOT / "fixtures" / "adapters" / "lora"
#: AutoAWQ's order of the eight 4-bit columns of a word (``WQLinear_GEMM.from_linear``'s ``order_map``)
ORDER = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])
GROUP = 32


def _packed(values: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit values (rows, cols) → AutoAWQ GEMM words: column 8w + ORDER[j] at bit 4j of word w, packed
    by compressed-tensors' ``pack_to_int32`` (which stores value + 8 of a signed value at bit 4j)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    idx = (torch.arange(values.shape[1]) // 8) * 8 + ORDER.repeat(values.shape[1] // 8)
    return pack_to_int32((values[:, idx] - 8).to(torch.int8), 4)


def _quantized(w: torch.Tensor, zero_point: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AutoAWQ's ``pseudo_quantize_tensor`` (awq/quantize/quantizer.py) on groups of GROUP inputs, in float32 with
    float16 scales: unsigned q (out, in), zeros z and scales s (out, G); without zero points z = 8."""
    g = w.float().unflatten(1, (-1, GROUP))
    if zero_point:
        s = ((g.amax(-1) - g.amin(-1)).clamp(min=1e-5) / 15).half()
        z = (-torch.round(g.amin(-1) / s.float())).clamp(0, 15)
    else:
        s = (g.abs().amax(-1).clamp(min=1e-5) / 7).half()
        z = torch.full(s.shape, 8.0)
    q = (torch.round(g / s.float()[..., None]) + z[..., None]).clamp(0, 15).flatten(1)
    return q.to(torch.int16), z.to(torch.int16), s


def awq_llama(dest: Path, zero_point: bool = True) -> Path:
    """fixtures/tiny-llama as AutoAWQ saves a GEMM model: every linear but lm_head as qweight/qzeros/scales, the
    rest float16, config.json's quantization_config as transformers 5.23's ``AwqConfig.to_dict`` writes it."""
    def parts(_: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        q, z, s = _quantized(w, zero_point)
        return {"qweight": _packed(q.t()), "scales": s.t().contiguous(), **({"qzeros": _packed(z.t())}
                                                                            if zero_point else {})}

    return quantized_llama(dest, parts, {"quant_method": "awq", "bits": 4, "group_size": GROUP,
                                         "zero_point": zero_point, "version": "gemm", "modules_to_not_convert": None})


def converted(base: Path, dest: Path) -> dict[str, torch.Tensor]:
    """``base`` converted by ``AutoAWQConverter`` and loaded by transformers decompressed (compressed-tensors)."""
    from compressed_tensors.entrypoints.convert import convert_checkpoint
    from compressed_tensors.entrypoints.convert.converters import AutoAWQConverter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_checkpoint(base, dest, AutoAWQConverter.from_pretrained(str(base)), max_workers=1, device="cpu")
    return ct_decompressed(dest)


@pytest.fixture(scope="module", params=[True, False], ids=["zero-point", "symmetric"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("awq")
    base = awq_llama(root / "base", request.param)
    return base, converted(base, root / "ct")


def test_the_config_selects_the_awq_codec() -> None:
    qc = {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": False, "version": "gemm"}
    assert quant_codec({"quantization_config": qc}) == GptqCodec(AwqFormat(64, zero_point=False))
    vllm_style = {"quant_method": "awq", "w_bit": 4, "q_group_size": 128, "zero_point": True}
    assert quant_codec({"quantization_config": vllm_style}) == GptqCodec(AwqFormat(128))
    assert quant_codec({"quantization_config": {"quant_method": "awq", "format": "gemm"}}) == GptqCodec(AwqFormat(128))


@pytest.mark.parametrize(("field", "value"), [("version", "gemv"), ("version", "gemv_fast"), ("format", "llm-awq"),
                                              ("bits", 8), ("bits", 4.0), ("group_size", "128"),
                                              ("zero_point", "false")])
def test_other_awq_layouts_are_refused_by_name(field: str, value: object) -> None:
    with pytest.raises(UnsupportedConfigError, match="version" if field == "format" else field):
        quant_codec({"quantization_config": {"quant_method": "awq", "bits": 4, "zero_point": True, field: value}})


def test_the_dequantized_view_is_the_converters_decompressed_model_bit_for_bit(model) -> None:
    base, theirs = model
    ours = dequantized_view(base)
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        assert torch.equal(ours[k], v), k


def test_plain_merge_matches_peft_on_the_decompressed_model(model, tmp_path: Path) -> None:
    base, theirs = model
    check_plain_merge_matches_peft(base, model_with_weights(theirs, TINY, tmp_path / "plain"), LORA, tmp_path)


def test_keep_format_merge_stays_on_the_grid_verifies_and_unmerges_byte_for_byte(model, tmp_path: Path) -> None:
    merged = check_int_keep_format_merge(model[0], LORA, tmp_path)
    theirs = converted(merged, tmp_path / "ct")  # the converter reads what we wrote as we read it
    ours = dequantized_view(merged)
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], v) for k, v in theirs.items())


def test_extract_and_inspect_base_read_an_awq_base_dequantized(model, tmp_path: Path) -> None:
    base, theirs = model
    plain = model_with_weights(theirs, TINY, tmp_path / "plain")
    check_quantized_base_reads_as_plain(base, plain, LORA, tmp_path, "stored as AWQ and adapted by DoRA")


Q = "model.layers.1.self_attn.v_proj"


@pytest.mark.parametrize(("change", "words"), [
    (lambda t: t.pop(f"{Q}.qzeros"), f"no {Q}.qzeros"),
    (lambda t: t.update({f"{Q}.scales": t[f"{Q}.scales"][:, :-8].contiguous()}), f"{Q}.scales: expected float"),
    (lambda t: t.update({f"{Q}.qweight": t[f"{Q}.qweight"].float()}), f"{Q}.qweight: expected a 2-D I32")],
    ids=["missing qzeros", "scales shape", "float qweight"])
def test_a_damaged_awq_base_is_refused_in_one_line_and_nothing_is_written(tmp_path: Path, cli, change,
                                                                          words: str) -> None:
    base = awq_llama(tmp_path / "base")
    t = load_file(base / "model.safetensors")
    change(t)
    save_file(t, base / "model.safetensors", metadata={"format": "pt"})
    r = cli("merge", base, LORA, "-o", tmp_path / "m")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and words in r.stderr, r.stderr
    assert not (tmp_path / "m").exists()
