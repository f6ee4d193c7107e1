"""compressed-tensors integer bases (``pack-quantized``: W4A16 / W8A16 as vLLM serves them, symmetric and with zero
points; ``int-quantized``: W8A8) in every command that reads a quantized base: a tiny Llama compressed by
compressed-tensors 0.20.0's own ModelCompressor, read as its decompression reads it, merged plain against peft on the
decompressed model, merged in the format as compressed-tensors' ``quantize`` puts the exact sum on the base's grid,
un-merged byte for byte by record, refused when the re-quantization erases ΔW, and read dequantized by extract and
inspect --base."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import (check_quantized_base_reads_as_plain, ct_decompressed, data_bytes, dequantized_view, kept_merge,
                     model_with_weights, plain_reference, within_one_bf16_ulp)
from loratools import read_adapter
from loratools.errors import InvalidOptionError, LossyMergeError, UnsupportedConfigError
from loratools.merge import merge_model, unmerge_model, verify_merge
from loratools.quant.codec import IntPackCodec, quant_codec
from loratools.quant.fp8 import fp8_format
from loratools.quant.intpack import IntPackFormat, pack_int32, unpack_int32

ct = pytest.importorskip("compressed_tensors", reason="make dev installs compressed-tensors==0.20.0")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parent.parent
TINY, LORA = ROOT / "fixtures" / "tiny-llama", ROOT / "fixtures" / "adapters" / "lora"
#: the schemes built: W4A16 (group 32), its asymmetric form (zero points packed along rows), W8A16 (per channel)
SCHEMES = {
    "w4a16-group32": dict(num_bits=4, type="int", strategy="group", group_size=32, symmetric=True),
    "w4a16-group32-asym": dict(num_bits=4, type="int", strategy="group", group_size=32, symmetric=False),
    "w8a16-channel": dict(num_bits=8, type="int", strategy="channel", symmetric=True),
}


def _qparams(w: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' ``calculate_qparams`` on the min/max of each group, row or tensor (what its min-max
    observer feeds it)."""
    from compressed_tensors.quantization.utils import calculate_qparams

    if args.strategy == "group":
        g = w.unflatten(-1, (-1, args.group_size))
        lo, hi = g.amin(-1), g.amax(-1)
    elif args.strategy == "channel":
        lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    else:
        lo, hi = w.amin(), w.amax()
    return calculate_qparams(lo, hi, args)


def int_llama(path: Path, weights: dict, fmt: str = "pack-quantized", activations: dict | None = None) -> Path:
    """fixtures/tiny-llama loaded in bfloat16 and saved as llm-compressor saves an integer model, with
    compressed-tensors' own steps: ``apply_quantization_config`` (every Linear but lm_head), scales and zero points by
    ``calculate_qparams``, ``ModelCompressor.compress_model``, ``save_pretrained`` and ``update_config``."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.bfloat16)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**weights),
                                input_activations=QuantizationArgs(**activations) if activations else None)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]),
                              show_progress=False)
    for m in model.modules():
        if hasattr(m, "weight_scale"):
            s, z = _qparams(m.weight, m.quantization_scheme.weights)
            m.weight_scale.data.copy_(s.reshape(m.weight_scale.shape))
            if hasattr(m, "weight_zero_point"):
                m.weight_zero_point.data.copy_(z.reshape(m.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, fmt)
    compressor.compress_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path)
    compressor.update_config(path)
    return path


def codec_of(path: Path) -> IntPackCodec:
    codec = quant_codec(json.loads((path / "config.json").read_text()))
    assert isinstance(codec, IntPackCodec)
    return codec


def adapted() -> set[str]:
    return {f"{n}.weight" for n in read_adapter(LORA).modules}


def ct_quantize(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None,
                weights: dict) -> torch.Tensor:
    """compressed-tensors' own ``quantize`` (int8 codes) of ``x`` in the scale's dtype on the given grid."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize

    return quantize(x.to(scale.dtype), scale, zp, QuantizationArgs(**weights), dtype=torch.int8)


@pytest.fixture(scope="module", params=list(SCHEMES))
def scheme(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    return request.param, int_llama(tmp_path_factory.mktemp(request.param) / "base", SCHEMES[request.param])


@pytest.fixture(scope="module")
def reference(scheme, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """(the base decompressed by compressed-tensors, saved plain in float32; peft merge_and_unload of LORA on it)."""
    return plain_reference(ct_decompressed(scheme[1]), TINY, LORA, tmp_path_factory.mktemp("plain") / "plain")


@pytest.fixture(scope="module")
def kept(scheme, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, object]:
    return kept_merge(scheme[1], LORA, tmp_path_factory.mktemp("kept"))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("cols", [64, 40, 7])
def test_packing_is_compressed_tensors_packing_bit_for_bit(bits: int, cols: int) -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    g = torch.Generator().manual_seed(bits * cols)
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (5, cols), generator=g, dtype=torch.int8)
    ours = pack_int32(q, bits)
    assert torch.equal(ours, pack_to_int32(q, bits))
    assert torch.equal(unpack_int32(ours, bits, cols), q)
    assert torch.equal(unpack_from_int32(ours, bits, torch.Size([5, cols])), q)
    rows_packed = pack_to_int32(q.t().contiguous(), bits, packed_dim=0)  # zero points: packed along rows
    assert torch.equal(unpack_int32(rows_packed.t().contiguous(), bits, cols).t(), q.t())


def test_the_config_selects_the_int_codec_with_the_models_scheme(scheme) -> None:
    name, base = scheme
    w = SCHEMES[name]
    assert codec_of(base) == IntPackCodec(IntPackFormat(w["num_bits"], w["strategy"], w.get("group_size"),
                                                        w["symmetric"]))


def test_the_dequantized_view_is_compressed_tensors_decompression(scheme) -> None:
    name, base = scheme
    ours, theirs = dequantized_view(base), ct_decompressed(base)
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        assert torch.equal(ours[k], v), k
    raw = load_file(base / "model.safetensors")
    zp = "model.layers.0.self_attn.q_proj.weight_zero_point"
    assert (zp in raw) == (not SCHEMES[name]["symmetric"]) and raw[zp.replace("zero_point", "packed")].dtype == \
        torch.int32


def test_plain_merge_matches_peft_on_the_decompressed_model_within_one_bf16_ulp(scheme, reference,
                                                                                 tmp_path: Path) -> None:
    base, ref = scheme[1], reference[1]
    out = tmp_path / "merged"
    merge_model(base, [read_adapter(LORA)], out, dtype=torch.bfloat16, verify=True)
    got = load_file(out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert set(got) == set(ref)  # packed words, scales, shapes and zero points dropped, each weight under its name
    for k, v in got.items():
        assert v.dtype == torch.bfloat16 and within_one_bf16_ulp(v, ref[k]), k


def test_keep_format_merge_is_compressed_tensors_quantize_of_the_exact_sum_on_the_bases_grid(scheme, kept) -> None:
    name, base = scheme
    out, _, report = kept
    fmt = codec_of(base).fmt
    assert report.update is not None and report.update.kept > 0.8 and not report.allowed_lossy
    assert json.loads((out / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    b, m = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(b) == set(m)
    for k in b:  # only the adapted weights' values change: scales, zero points, shapes, the rest byte for byte
        assert m[k].dtype == b[k].dtype and m[k].shape == b[k].shape, k
        if not (k.endswith("weight_packed") and k.removesuffix("_packed") in adapted()):
            assert torch.equal(b[k].view(torch.uint8), m[k].view(torch.uint8)), k
    w0, ours, theirs = dequantized_view(base), dequantized_view(out), ct_decompressed(out)
    deltas = {f"{n}.weight": mod.delta().double() for n, mod in read_adapter(LORA).modules.items()}
    for k in adapted():
        exact = w0[k].double() + deltas[k]  # the dense float64 reference
        parts = [b[p] for p in fmt.stored_keys(k)]
        _, s, zp = fmt.grid(parts)
        scale = b[k + "_scale"]
        zero = None if fmt.symmetric else zp[:, ::fmt.group_size or 1].to(torch.int8)  # one per group or row
        want = ct_quantize(exact.float(), scale, zero, SCHEMES[name])
        got = fmt.grid([m[p] for p in fmt.stored_keys(k)])[0]
        assert torch.equal(got, want), k  # (our sum is float32, this one float64: no code of the fixture differs)
        assert not torch.equal(ours[k], w0[k]), k
        assert bool(((ours[k] - exact).abs() <= fmt.half_step(exact.float(), parts)).all()), k
        assert torch.equal(theirs[k], ours[k]), k  # compressed-tensors decompresses what we wrote to what we read


def test_unmerge_with_the_record_gives_every_byte_back(scheme, kept, tmp_path: Path) -> None:
    base = scheme[1]
    out, record, _ = kept
    ad = read_adapter(LORA)
    with pytest.raises(InvalidOptionError, match="record"):  # the erase guard: no W0 without it
        unmerge_model(out, [ad], tmp_path / "no-record")
    unmerge_model(out, [ad], tmp_path / "back", record=record)
    assert data_bytes(tmp_path / "back" / "model.safetensors") == data_bytes(base / "model.safetensors")
    assert verify_merge(base, [ad], out).ok


def test_a_merge_that_rounds_the_update_away_is_refused_unless_allowed(tmp_path: Path, cli) -> None:
    base = int_llama(tmp_path / "base", SCHEMES["w4a16-group32"])
    with pytest.raises(LossyMergeError, match="keeps"):
        merge_model(base, [(read_adapter(LORA), 1e-3)], tmp_path / "m")
    r = cli("merge", base, LORA, "--weight", "0.001", "-o", tmp_path / "m")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--allow-lossy" in r.stderr, r.stderr
    assert not (tmp_path / "m").exists()
    r = cli("merge", base, LORA, "--weight", "0.001", "-o", tmp_path / "m", "--allow-lossy")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_extract_and_inspect_base_read_an_int_base_dequantized(tmp_path: Path) -> None:
    base = int_llama(tmp_path / "base", SCHEMES["w4a16-group32-asym"])
    plain = model_with_weights(ct_decompressed(base), TINY, tmp_path / "plain")
    check_quantized_base_reads_as_plain(base, plain, LORA, tmp_path,
                                        "stored as compressed-tensors int and adapted by DoRA")


def _reads_merges_and_unmerges_as_compressed_tensors(base: Path, tmp_path: Path) -> None:
    """``base`` reads as compressed-tensors decompresses it; a verified keep-format merge of LORA decompresses to what
    our view reads; the record's un-merge gives the base's bytes back."""
    ours, theirs = dequantized_view(base), ct_decompressed(base)
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], v) for k, v in theirs.items())
    ad = read_adapter(LORA)
    merge_model(base, [ad], tmp_path / "m", verify=True, record=tmp_path / "m.rec.safetensors")
    assert all(torch.equal(v, dequantized_view(tmp_path / "m")[k]) for k, v in ct_decompressed(tmp_path / "m").items())
    unmerge_model(tmp_path / "m", [ad], tmp_path / "u", record=tmp_path / "m.rec.safetensors")
    assert data_bytes(tmp_path / "u" / "model.safetensors") == data_bytes(base / "model.safetensors")


def test_an_int_quantized_w8a8_model_reads_merges_and_unmerges_the_same_way(tmp_path: Path) -> None:
    """int-quantized (int8 ``weight`` + ``weight_scale``, dynamic per-token activations): read as its
    decompression reads it, merged in the format and un-merged byte for byte."""
    weights = dict(num_bits=8, type="int", strategy="channel", symmetric=True)
    base = int_llama(tmp_path / "base", weights, "int-quantized",
                     dict(num_bits=8, type="int", strategy="token", symmetric=True, dynamic=True))
    assert codec_of(base) == IntPackCodec(IntPackFormat(8, "channel", packed=False))
    _reads_merges_and_unmerges_as_compressed_tensors(base, tmp_path)


def _qc(**weights) -> dict:
    w = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": True, **weights}
    return {"quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                    "config_groups": {"group_0": {"targets": ["Linear"], "weights": w}}}}


@pytest.mark.parametrize(("field", "value"), [("num_bits", 3), ("type", "float"), ("dynamic", True),
                                              ("actorder", "group"), ("scale_dtype", "torch.float16"),
                                              ("strategy", "block")])
def test_other_integer_settings_are_refused_by_name(field: str, value: object) -> None:
    with pytest.raises(UnsupportedConfigError, match=field):
        quant_codec(_qc(**{field: value}))


def test_a_group_permutation_or_a_missing_zero_point_is_refused() -> None:
    codec = quant_codec(_qc(group_size=32, symmetric=False))
    assert isinstance(codec, IntPackCodec)
    shapes = {"q.weight_packed": ("I32", (4, 8)), "q.weight_scale": ("BF16", (4, 2)), "q.weight_shape": ("I64", (2,))}
    with pytest.raises(InvalidOptionError, match="no q.weight_zero_point"):
        codec.find(shapes)
    shapes["q.weight_zero_point"] = ("I32", (1, 2))
    assert codec.find(shapes)["q.weight"].shape == (4, 64)
    with pytest.raises(InvalidOptionError, match="a q.weight_g_idx"):
        codec.find({**shapes, "q.weight_g_idx": ("I32", (64,))})


def test_fp8s_refusal_names_the_integer_formats_as_read() -> None:
    with pytest.raises(UnsupportedConfigError, match="pack-quantized and int-quantized"):
        fp8_format({"quantization_config": {"quant_method": "gptq"}})


def test_a_per_tensor_asymmetric_w8_model_with_an_unpacked_zero_point_merges_and_unmerges(tmp_path: Path) -> None:
    """Per-tensor zero points are stored as they are (int8 [1]), not packed: read as the decompression reads them,
    merged in the format within the half step, un-merged byte for byte."""
    base = int_llama(tmp_path / "base", dict(num_bits=8, type="int", strategy="tensor", symmetric=False))
    raw = load_file(base / "model.safetensors")
    assert raw["model.layers.0.self_attn.q_proj.weight_zero_point"].dtype == torch.int8
    _reads_merges_and_unmerges_as_compressed_tensors(base, tmp_path)
