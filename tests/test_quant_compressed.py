"""compressed-tensors ``float-quantized`` FP8 bases (vLLM / llm-compressor; one e4m3 scale per tensor or per row):
built with compressed-tensors 0.20.0's own API, dequantized bit for bit as its decompressor does, merged against
peft, the keep-format merge's rounding, the exact un-merge by record, and what stays refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratools import read_adapter
from loratools.errors import InvalidOptionError, LossyMergeError, ShapeMismatchError, UnsupportedConfigError
from loratools.merge import merge_model, unmerge_model, verify_merge
from loratools.quant.fp8 import CompressedFp8Format, fp8_format

from helpers import model_with_weights, peft_merged, state

ct = pytest.importorskip("compressed_tensors", reason="make dev installs compressed-tensors==0.20.0")

ROOT = Path(__file__).resolve().parent.parent
TINY, LORA = ROOT / "fixtures" / "tiny-llama", ROOT / "fixtures" / "adapters" / "lora"
#: (strategy, scale dtype): a float32 model's per-tensor scales, a bfloat16 model's per-channel ones
CASES = [("tensor", torch.float32), ("channel", torch.bfloat16)]


def scheme(strategy: str) -> Any:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    return QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy=strategy, dynamic=False),
        input_activations=QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True))


def qconfig(strategy: str) -> dict:
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig(config_groups={"group_0": scheme(strategy)}, format="float-quantized",
                            ignore=["lm_head"], quantization_status="compressed")
    return json.loads(json.dumps(qc.model_dump(), default=str))


def ct_scale(w: torch.Tensor, strategy: str) -> torch.Tensor:
    """compressed-tensors' ``calculate_qparams`` on the tensor's (or each row's) min and max."""
    from compressed_tensors.quantization.utils import calculate_qparams

    lo, hi = (w.amin(), w.amax()) if strategy == "tensor" else (w.amin(1, keepdim=True), w.amax(1, keepdim=True))
    return calculate_qparams(lo, hi, scheme(strategy).weights)[0]


def ct_compress(w: torch.Tensor, scale: torch.Tensor, strategy: str) -> torch.Tensor:
    from compressed_tensors.compressors import BaseCompressor

    comp = BaseCompressor.get_value_from_registry("float-quantized")
    return comp.compress({"weight": w, "weight_scale": scale}, scheme(strategy))["weight"]


def ct_decompress(w: torch.Tensor, scale: torch.Tensor, strategy: str) -> torch.Tensor:
    from compressed_tensors.compressors import BaseCompressor

    comp = BaseCompressor.get_value_from_registry("float-quantized")
    return comp.decompress({"weight": w, "weight_scale": scale}, scheme(strategy))["weight"]


def compressed_llama(path: Path, strategy: str, dtype: torch.dtype) -> Path:
    """fixtures/tiny-llama (in ``dtype``, as a model of that dtype is compressed) with every decoder linear weight
    quantized by compressed-tensors: scales by ``calculate_qparams``, weights by its float-quantized compressor."""
    out = {}
    for k, t in load_file(TINY / "model.safetensors").items():
        if ".layers." in k and k.endswith("proj.weight"):
            x = t.to(dtype)
            scale = ct_scale(x, strategy)
            out[k], out[k + "_scale"] = ct_compress(x, scale, strategy), scale
        else:
            out[k] = t
    model_with_weights(out, TINY, path)
    config = json.loads((TINY / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": qconfig(strategy)}, indent=2))
    return path


def dequantized(path: Path, strategy: str) -> dict[str, torch.Tensor]:
    fmt, t = CompressedFp8Format(strategy), load_file(path / "model.safetensors")
    return {k: (fmt.dequantize(v, t[k + "_scale"]) if v.dtype == torch.float8_e4m3fn else v)
            for k, v in t.items() if not k.endswith("_scale")}


def plain_copy(base: Path, strategy: str, dest: Path) -> Path:
    return model_with_weights(dequantized(base, strategy), TINY, dest)


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{str(c[1]).removeprefix('torch.')}")
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    strategy, dtype = request.param
    return compressed_llama(tmp_path_factory.mktemp("ct") / "base", strategy, dtype), strategy


def test_config_is_read(case: tuple[Path, str]) -> None:
    base, strategy = case
    assert fp8_format(json.loads((base / "config.json").read_text())) == CompressedFp8Format(strategy)


def test_dequantize_is_the_decompressors_bit_for_bit(case: tuple[Path, str]) -> None:
    base, strategy = case
    t, ours = load_file(base / "model.safetensors"), dequantized(base, strategy)
    quantized = [k for k, v in t.items() if v.dtype == torch.float8_e4m3fn]
    assert len(quantized) == 7 * len({k.split(".")[2] for k in quantized})  # every decoder linear
    for k in quantized:
        theirs = ct_decompress(t[k], t[k + "_scale"], strategy)
        assert theirs.dtype == t[k + "_scale"].dtype
        assert torch.equal(ours[k], theirs.float()), k


@pytest.mark.parametrize("strategy", ["tensor", "channel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_is_the_producers_rule(strategy: str, dtype: torch.dtype) -> None:
    """Our scale is ``calculate_qparams``'s on the tensor in the scale's dtype; our values are the compressor's on
    the float32 tensor with that scale."""
    fmt = CompressedFp8Format(strategy)
    t = load_file(TINY / "model.safetensors")
    for key in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        x = t[key].to(dtype).float()
        like = ct_scale(x.to(dtype), strategy)
        w, s = fmt.quantize(x, like=like)
        assert s.dtype == dtype and torch.equal(s, like)
        assert torch.equal(w.view(torch.uint8), ct_compress(x, like, strategy).view(torch.uint8))
    zero = fmt.quantize(torch.zeros(4, 3), like=torch.ones((), dtype=dtype) if strategy == "tensor" else None)
    assert not bool(zero[0].float().any()) and bool((zero[1] == torch.finfo(zero[1].dtype).eps).all())


def test_plain_merge_matches_peft(case: tuple[Path, str], tmp_path: Path) -> None:
    base, strategy = case
    ref = state(peft_merged(plain_copy(base, strategy, tmp_path / "plain"), LORA))
    out = tmp_path / "merged"
    merge_model(base, [read_adapter(LORA)], out, dtype=torch.float32, verify=True)
    got = load_file(out / "model.safetensors")
    assert not any(k.endswith("_scale") for k in got)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    for k, v in got.items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, ref[k], rtol=0, atol=2e-6)  # float32 summation order only
    assert verify_merge(base, [read_adapter(LORA)], out).ok


def test_keep_format_merge_rounds_as_the_format(case: tuple[Path, str], tmp_path: Path) -> None:
    base, strategy = case
    ad = read_adapter(LORA)
    out = tmp_path / "merged"
    report = merge_model(base, [ad], out, verify=True)
    assert report.update is not None and report.update.kept > 0.9 and not report.allowed_lossy
    assert json.loads((out / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    b, m = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(b) == set(m)
    adapted = {f"{n}.weight" for n in ad.modules}
    for k in b:
        if k in adapted or k.removesuffix("_scale") in adapted:
            assert m[k].dtype == b[k].dtype and m[k].shape == b[k].shape
            continue
        assert torch.equal(b[k].view(torch.uint8), m[k].view(torch.uint8)), k  # untouched: byte for byte
    w0, merged = dequantized(base, strategy), dequantized(out, strategy)
    ref = state(peft_merged(plain_copy(base, strategy, tmp_path / "plain"), LORA))
    fmt = CompressedFp8Format(strategy)
    for k in adapted:
        exact = ref[k].double()
        best = (fmt.dequantize(*fmt.quantize(exact.float(), like=b[k + "_scale"])).double() - exact).abs().max()
        assert (merged[k].double() - exact).abs().max() <= best * 1.01 + 1e-6, k
        assert not torch.equal(merged[k], w0[k]), k


def test_tiny_adapter_is_refused_unless_allowed(case: tuple[Path, str], tmp_path: Path) -> None:
    base, _ = case
    ad = read_adapter(LORA)
    with pytest.raises(LossyMergeError, match="keeps"):  # ΔW·1e-4 is far below half an e4m3 step
        merge_model(base, [(ad, 1e-4)], tmp_path / "lossy")
    assert not (tmp_path / "lossy").exists()


def data_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw[8 + int.from_bytes(raw[:8], "little"):]


def test_record_round_trip_is_byte_identical(case: tuple[Path, str], tmp_path: Path) -> None:
    base, _ = case
    ad = read_adapter(LORA)
    out, rec, back = tmp_path / "m", tmp_path / "r.safetensors", tmp_path / "u"
    report = merge_model(base, [ad], out, record=rec)
    with pytest.raises(InvalidOptionError, match="stored as FP8"):  # the erase guard: no record, no un-merge
        unmerge_model(out, [ad], tmp_path / "no-record")
    unmerge_model(out, [ad], back, record=rec)
    assert data_bytes(back / "model.safetensors") == data_bytes(base / "model.safetensors")
    assert 0 < report.record_nbytes


@pytest.mark.parametrize(("where", "value", "field"), [
    (("weights", "strategy"), "token", "strategy"),
    (("weights", "strategy"), "tensor_group", "strategy"),
    (("weights", "dynamic"), True, "dynamic"),
    (("weights", "num_bits"), 4, "num_bits"),
    (("weights", "type"), "int", "type"),
    (("weights", "symmetric"), False, "symmetric"),
    ((None, "format"), "pack-quantized", "format"),
])
def test_other_settings_are_refused_by_name(where: tuple[str | None, str], value: object, field: str) -> None:
    qc = qconfig("channel")
    if where[0] is None:
        qc[where[1]] = value
    else:
        qc["config_groups"]["group_0"][where[0]][where[1]] = value
    with pytest.raises(UnsupportedConfigError, match=field) as err:
        fp8_format({"quantization_config": qc})
    assert repr(value) in str(err.value)


def test_scales_that_do_not_match_the_declared_strategy_are_refused(case: tuple[Path, str], tmp_path: Path) -> None:
    """A config that says group (64) over a per-tensor or per-row model: its scales have the wrong shape."""
    base, _ = case
    other = tmp_path / "group"
    shutil.copytree(base, other)
    config = json.loads((other / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"].update(strategy="group", group_size=64)
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ShapeMismatchError, match=r"weight_scale: expected \(\d+, 2\)"):
        merge_model(other, [read_adapter(LORA)], tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_scale_of_the_wrong_shape_is_refused() -> None:
    w = torch.zeros(4, 3, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="weight_scale"):
        CompressedFp8Format("channel").dequantize(w, torch.ones(1))
    with pytest.raises(ValueError, match="weight_scale"):
        CompressedFp8Format("tensor").dequantize(w, torch.ones(4, 1))


def test_static_input_scales_are_kept_or_dropped_with_the_format(case: tuple[Path, str], tmp_path: Path) -> None:
    """A static-activation model (an ``input_scale`` beside each quantized weight): a merge in the format copies
    them byte for byte (the first test), a plain merge drops them with the weight scales."""
    base, _ = case
    static = tmp_path / "static"
    shutil.copytree(base, static)
    t = load_file(static / "model.safetensors")
    scales = {k.removesuffix("weight") + "input_scale": torch.tensor([0.01 * (i + 1)])
              for i, k in enumerate(sorted(t)) if t[k].dtype == torch.float8_e4m3fn}
    save_file({**t, **scales}, static / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((static / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["input_activations"].update(strategy="tensor",
                                                                                          dynamic=False)
    (static / "config.json").write_text(json.dumps(config))
    ad = read_adapter(LORA)
    merge_model(static, [ad], tmp_path / "kept", verify=True)
    kept = load_file(tmp_path / "kept" / "model.safetensors")
    assert all(torch.equal(kept[k], v) for k, v in scales.items())
    merge_model(static, [ad], tmp_path / "plain", dtype=torch.bfloat16, verify=True)
    plain = load_file(tmp_path / "plain" / "model.safetensors")
    assert not any(k.endswith(("_scale", "input_scale")) for k in plain) and len(plain) == len(t) - len(scales)
    assert verify_merge(static, [ad], tmp_path / "plain").ok
