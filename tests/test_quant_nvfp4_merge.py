"""NVFP4 bases (compressed-tensors ``nvfp4-pack-quantized``, llm-compressor's NVFP4 scheme) in every command that
reads a quantized base: a tiny Llama compressed by compressed-tensors 0.20.0's own ModelCompressor (fused q/k/v and
gate/up global scales shared, as llm-compressor sets them), read as its decompression reads it, merged plain against
peft on the decompressed model, merged in the format within its half step and no worse than quantizing the exact
sum, un-merged byte for byte by record, verified, refused when the re-quantization erases ΔW, and read dequantized by
extract and inspect --base."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import (check_quantized_base_reads_as_plain, ct_decompressed, data_bytes, dequantized_view, kept_merge,
                     plain_reference, within_one_bf16_ulp)
from loratools import read_adapter
from loratools.errors import InvalidOptionError, LossyMergeError, UnsupportedConfigError
from loratools.merge import merge_model, unmerge_model, verify_merge
from loratools.quant.codec import Nvfp4Codec, quant_codec
from loratools.quant.nvfp4 import Nvfp4Format

ct = pytest.importorskip("compressed_tensors", reason="make dev installs compressed-tensors==0.20.0")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parent.parent
TINY, LORA = ROOT / "fixtures" / "tiny-llama", ROOT / "fixtures" / "adapters" / "lora"
FMT = Nvfp4Format()
#: llm-compressor's fused groups: one global scale each (``update_fused_layer_weight_global_scales``)
FUSED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


def nvfp4_llama(path: Path, preset: str = "NVFP4") -> Path:
    """fixtures/tiny-llama loaded in bfloat16 and saved as llm-compressor saves an NVFP4 model, with compressed-tensors'
    own steps: ``apply_quantization_config`` (every Linear but lm_head), the weight global scales by
    ``generate_gparam`` lowered to the least of each fused group, the group scales by ``compute_dynamic_scales_and_zp``,
    an input global scale (calibration's stand-in), ``ModelCompressor.compress_model``, ``save_pretrained`` and
    ``update_config`` (the realistic quantization_config)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp, generate_gparam

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.bfloat16)
    qc = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])}, ignore=["lm_head"])
    apply_quantization_config(model, qc, show_progress=False)
    linears = [m for m in model.modules() if hasattr(m, "weight_global_scale")]
    for i, m in enumerate(linears):
        m.weight_global_scale.data.copy_(generate_gparam(m.weight.amin(), m.weight.amax()))
        if hasattr(m, "input_global_scale"):
            m.input_global_scale.data.fill_(100.0 + i)
    for layer in model.model.layers:
        for group in FUSED:
            mods = [layer.get_submodule(n) for n in group]
            least = torch.cat([m.weight_global_scale.data for m in mods]).min()
            for m in mods:
                m.weight_global_scale.data.fill_(least)
    for m in linears:
        m.weight_scale.data.copy_(compute_dynamic_scales_and_zp(m.weight, m.quantization_scheme.weights, module=m,
                                                                global_scale=m.weight_global_scale)[0])
    compressor = ModelCompressor.from_pretrained_model(model, "nvfp4-pack-quantized")
    compressor.compress_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path)
    compressor.update_config(path)
    return path


def adapted() -> set[str]:
    return {f"{n}.weight" for n in read_adapter(LORA).modules}


def parts(key: str) -> tuple[str, str, str]:
    return FMT.stored_keys(key)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return nvfp4_llama(tmp_path_factory.mktemp("nvfp4") / "base")


@pytest.fixture(scope="module")
def reference(base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """(the base decompressed by compressed-tensors, saved plain in float32; peft merge_and_unload of LORA on it)."""
    return plain_reference(ct_decompressed(base), TINY, LORA, tmp_path_factory.mktemp("nvfp4-plain") / "plain")


@pytest.fixture(scope="module")
def kept(base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, object]:
    """(a keep-format merge of LORA, its record, the merge's report)."""
    return kept_merge(base, LORA, tmp_path_factory.mktemp("nvfp4-kept"))


def test_the_config_selects_the_nvfp4_codec_in_the_models_dtype(base: Path) -> None:
    config = json.loads((base / "config.json").read_text())
    assert config["quantization_config"]["format"] == "nvfp4-pack-quantized" and config["dtype"] == "bfloat16"
    assert quant_codec(config) == Nvfp4Codec(FMT, torch.bfloat16)
    legacy = {k: v for k, v in config.items() if k != "dtype"} | {"torch_dtype": "float16"}
    assert quant_codec(legacy) == Nvfp4Codec(FMT, torch.float16)
    mixed = json.loads(json.dumps(config))
    mixed["quantization_config"]["config_groups"]["group_0"]["format"] = "float-quantized"
    with pytest.raises(UnsupportedConfigError, match="group_0.format"):
        quant_codec(mixed)


def test_a_packed_weight_without_its_global_scale_is_refused() -> None:
    shapes = {"q.weight_packed": ("U8", (4, 8)), "q.weight_scale": ("F8_E4M3", (4, 1))}
    with pytest.raises(InvalidOptionError, match="no q.weight_global_scale"):
        Nvfp4Codec().find(shapes)


def test_the_dequantized_view_is_compressed_tensors_decompression(base: Path) -> None:
    ours, theirs = dequantized_view(base), ct_decompressed(base)
    extras = {k for k in ours if k.endswith("input_global_scale")}
    assert len(extras) == 28 and set(ours) - extras == set(theirs)  # 4 layers × 7 linears, named as transformers
    for k, v in theirs.items():
        assert torch.equal(ours[k], v), k
    raw = load_file(base / "model.safetensors")
    for layer in range(4):
        for group in FUSED:
            scales = [raw[f"model.layers.{layer}.{n}.weight_global_scale"] for n in group]
            assert all(torch.equal(s, scales[0]) for s in scales)  # the base shares them, as vLLM requires


def test_plain_merge_matches_peft_on_the_decompressed_model_within_one_bf16_ulp(base: Path, reference,
                                                                                 tmp_path: Path) -> None:
    ref = reference[1]
    out = tmp_path / "merged"
    merge_model(base, [read_adapter(LORA)], out, dtype=torch.bfloat16, verify=True)
    got = load_file(out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert set(got) == set(ref)  # packed codes, scales and input global scales dropped, each weight under its name
    for k, v in got.items():
        assert v.dtype == torch.bfloat16 and within_one_bf16_ulp(v, ref[k]), k
    assert verify_merge(base, [read_adapter(LORA)], out).ok


def test_keep_format_merge_rounds_as_the_format_and_keeps_the_global_scales(base: Path, reference, kept) -> None:
    out, _, report = kept
    assert report.update is not None and report.update.kept > 0.9 and not report.allowed_lossy
    assert json.loads((out / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    b, m = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(b) == set(m)
    changed = {p for k in adapted() for p in parts(k)[:2]}
    for k in b:
        assert m[k].dtype == b[k].dtype and m[k].shape == b[k].shape, k
        if k not in changed:  # global scales, input global scales, k/o/mlp parts, norms, lm_head: byte for byte
            assert torch.equal(b[k].view(torch.uint8), m[k].view(torch.uint8)), k
    ref, w0, ours, theirs = reference[1], dequantized_view(base), dequantized_view(out), ct_decompressed(out)
    for k in adapted():
        packed, scale, gs = (m[p] for p in parts(k))
        exact = ref[k].double()  # peft: W0 + ΔW in float32 on the decompressed base
        assert not torch.equal(ours[k], w0[k]), k
        assert bool(((ours[k] - exact).abs() <= FMT.half_step(exact.float(), scale, gs) + 1e-7).all()), k
        best = FMT.dequantize(*FMT.quantize(exact.float(), global_scale=b[parts(k)[2]], dtype=torch.bfloat16))
        assert torch.linalg.norm(ours[k].double() - exact) <= torch.linalg.norm(best.double() - exact) * (1 + 1e-6)
        assert torch.equal(theirs[k], ours[k]), k  # compressed-tensors decompresses what we wrote to what we read


def test_unmerge_with_the_record_gives_every_byte_back(base: Path, kept, tmp_path: Path) -> None:
    out, record, _ = kept
    ad = read_adapter(LORA)
    with pytest.raises(InvalidOptionError, match="stored as NVFP4.*record"):  # the erase guard: no W0 without it
        unmerge_model(out, [ad], tmp_path / "no-record")
    assert not (tmp_path / "no-record").exists()
    unmerge_model(out, [ad], tmp_path / "back", record=record)
    assert data_bytes(tmp_path / "back" / "model.safetensors") == data_bytes(base / "model.safetensors")


def test_verify_passes_on_the_merge_and_fails_on_a_merge_at_another_weight(base: Path, kept, tmp_path: Path) -> None:
    ad = read_adapter(LORA)
    assert verify_merge(base, [ad], kept[0]).ok
    merge_model(base, [(ad, 0.5)], tmp_path / "half", allow_lossy=True)
    merge_model(base, [(ad, 0.5)], tmp_path / "half-plain", dtype=torch.bfloat16)
    for merged in ("half", "half-plain"):
        assert not verify_merge(base, [ad], tmp_path / merged, allow_lossy=True).ok, merged
        assert verify_merge(base, [(ad, 0.5)], tmp_path / merged).ok, merged


def test_a_merge_that_rounds_the_update_away_is_refused_unless_allowed(base: Path, tmp_path: Path, cli) -> None:
    with pytest.raises(LossyMergeError, match="keeps"):
        merge_model(base, [(read_adapter(LORA), 1e-3)], tmp_path / "m")
    r = cli("merge", base, LORA, "--weight", "0.001", "-o", tmp_path / "m")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--allow-lossy" in r.stderr, r.stderr
    assert not (tmp_path / "m").exists()
    r = cli("merge", base, LORA, "--weight", "0.001", "-o", tmp_path / "m", "--allow-lossy")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m" / "model.safetensors").is_file()
    tiny = [(read_adapter(LORA), 1e-3)]
    report = verify_merge(base, tiny, tmp_path / "m")  # within the tolerance, but ΔW is gone: verify says so too
    assert not report.ok and report.lossy and verify_merge(base, tiny, tmp_path / "m", allow_lossy=True).ok


def test_extract_and_inspect_base_read_an_nvfp4_base_dequantized(base: Path, reference, tmp_path: Path) -> None:
    """extract from the NVFP4 base gives what it gives from the same weights stored plain; inspect --base of a DoRA
    adapter gives the same figures; merging that DoRA adapter into the NVFP4 weights is refused by name."""
    check_quantized_base_reads_as_plain(base, reference[0], LORA, tmp_path, "stored as NVFP4 and adapted by DoRA")


def test_a_weight_only_nvfp4a16_model_merges_and_unmerges_the_same_way(tmp_path: Path) -> None:
    """NVFP4A16 (no input global scales): read as its decompression reads it, merged in the format within the half
    step, un-merged byte for byte, and merged plain with only the weights' parts dropped."""
    base = nvfp4_llama(tmp_path / "base", "NVFP4A16")
    assert quant_codec(json.loads((base / "config.json").read_text())) == Nvfp4Codec(FMT, torch.bfloat16)
    ours, theirs = dequantized_view(base), ct_decompressed(base)
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], v) for k, v in theirs.items())
    ad = read_adapter(LORA)
    merge_model(base, [ad], tmp_path / "m", verify=True, record=tmp_path / "m.rec.safetensors")
    unmerge_model(tmp_path / "m", [ad], tmp_path / "u", record=tmp_path / "m.rec.safetensors")
    assert data_bytes(tmp_path / "u" / "model.safetensors") == data_bytes(base / "model.safetensors")
    merge_model(base, [ad], tmp_path / "p", dtype=torch.bfloat16, verify=True)
    assert set(load_file(tmp_path / "p" / "model.safetensors")) == set(theirs)
