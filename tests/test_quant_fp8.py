"""FP8 (DeepSeek-style block-wise e4m3) bases: dequantization against transformers' own loader, merges against
peft, the keep-format merge's rounding, the erase guard, and what stays refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratools import read_adapter
from loratools.errors import InvalidOptionError, LossyMergeError, UnsupportedConfigError
from loratools.merge import merge_model, unmerge_model, verify_merge
from loratools.quant.fp8 import Fp8Format

from helpers import (check_quantized_base_reads_as_plain, data_bytes, fp8_dequantized, fp8_llama_with,
                     model_with_weights, peft_merged, state, transformers_state)

ROOT = Path(__file__).resolve().parent.parent
TINY, LORA = ROOT / "fixtures" / "tiny-llama", ROOT / "fixtures" / "adapters" / "lora"
BLOCK = 128
QCONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [BLOCK, BLOCK]}


def producer_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers 5.23's own quantizer (``integrations/finegrained_fp8.py`` ``Fp8Quantize._quantize_one``:
    s = 448/amax, scale_inv = 1/s, w = e4m3(clamp(x·s))). It skips shapes the block does not divide, so a
    64-row tensor, one partial 128-row block, is quantized as one 64-row block: the same block."""
    from types import SimpleNamespace

    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    block = [min(BLOCK, x.shape[0]), min(BLOCK, x.shape[1])]
    op = Fp8Quantize(SimpleNamespace(quantization_config=SimpleNamespace(weight_block_size=block, scale_fmt=None)))
    out = op._quantize_one("w.weight", x)
    return out["w.weight"], out["w.weight_scale_inv"]


def fp8_llama(path: Path) -> Path:
    """fixtures/tiny-llama with every decoder linear weight quantized (k/v: 64 rows, one partial block)."""
    return fp8_llama_with(path, producer_quantize, QCONFIG)


def dequantized(path: Path) -> dict[str, torch.Tensor]:
    return fp8_dequantized(path, Fp8Format((BLOCK, BLOCK)))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fp8_llama(tmp_path_factory.mktemp("fp8") / "base")


def test_quantize_is_the_producers_rule(base: Path) -> None:
    t, fmt = load_file(TINY / "model.safetensors"), Fp8Format((BLOCK, BLOCK))
    for key in ("model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        w, inv = fmt.quantize(t[key])
        rw, rinv = producer_quantize(t[key])
        assert torch.equal(w.view(torch.uint8), rw.view(torch.uint8)) and torch.equal(inv, rinv)


def test_dequantize_matches_transformers_loading(base: Path) -> None:
    ours, theirs = dequantized(base), transformers_state(base)
    assert set(ours) - {"lm_head.weight"} <= set(theirs)
    for k, v in ours.items():
        assert theirs[k].dtype == torch.float32 and torch.equal(v, theirs[k]), k


def test_plain_merge_matches_peft(base: Path, tmp_path: Path) -> None:
    ref = state(peft_merged(model_with_weights(dequantized(base), TINY, tmp_path / "plain"), LORA))
    out = tmp_path / "merged"
    merge_model(base, [read_adapter(LORA)], out, dtype=torch.float32, verify=True)
    got = load_file(out / "model.safetensors")
    assert not any(k.endswith("_scale_inv") for k in got)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    for k, v in got.items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, ref[k], rtol=0, atol=2e-6)  # float32 summation order only
    assert verify_merge(base, [read_adapter(LORA)], out).ok


def test_keep_format_merge_rounds_as_the_format(base: Path, tmp_path: Path) -> None:
    ad = read_adapter(LORA)
    out = tmp_path / "merged"
    report = merge_model(base, [ad], out, verify=True)
    assert report.update is not None and report.update.kept > 0.9 and not report.allowed_lossy
    assert json.loads((out / "config.json").read_text())["quantization_config"] == QCONFIG
    b, m = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(b) == set(m)
    adapted = {f"{n}.weight" for n in ad.modules}
    for k in b:
        if k in adapted or k.removesuffix("_scale_inv") in adapted:
            assert m[k].dtype == b[k].dtype
            continue
        assert torch.equal(b[k].view(torch.uint8), m[k].view(torch.uint8)), k  # untouched: byte for byte
    w0, merged, loaded = dequantized(base), dequantized(out), transformers_state(out)
    ref_delta = {k: v - w0[k] for k, v in state(peft_merged_dequantized(base, tmp_path)).items() if k in adapted}
    for k in adapted:
        exact = w0[k].double() + ref_delta[k].double()
        again = Fp8Format((BLOCK, BLOCK))
        best = (again.dequantize(*again.quantize(exact.float())).double() - exact).abs().max()
        assert (merged[k].double() - exact).abs().max() <= best * 1.01 + 1e-6, k
        assert torch.equal(loaded[k], merged[k]), k


def peft_merged_dequantized(base: Path, tmp: Path) -> torch.nn.Module:
    return peft_merged(model_with_weights(dequantized(base), TINY, tmp / "plain-ref"), LORA)


def test_tiny_adapter_is_refused_unless_allowed(base: Path, tmp_path: Path) -> None:
    ad = read_adapter(LORA)
    with pytest.raises(LossyMergeError, match="keeps"):  # ΔW·1e-4 is far below half an e4m3 step
        merge_model(base, [(ad, 1e-4)], tmp_path / "lossy")
    assert not (tmp_path / "lossy").exists()
    report = merge_model(base, [(ad, 1e-4)], tmp_path / "allowed", allow_lossy=True)
    assert report.update is not None and report.update.lossy and report.allowed_lossy
    checked = verify_merge(base, [(ad, 1e-4)], tmp_path / "allowed")
    assert checked.lossy and not checked.ok and checked.update is not None
    assert checked.update.kept == pytest.approx(report.update.kept, abs=1e-3)
    assert verify_merge(base, [(ad, 1e-4)], tmp_path / "allowed", allow_lossy=True).ok


def test_record_round_trip_is_byte_identical(base: Path, tmp_path: Path) -> None:
    ad = read_adapter(LORA)
    out, rec, back = tmp_path / "m", tmp_path / "r.safetensors", tmp_path / "u"
    report = merge_model(base, [ad], out, record=rec)
    with pytest.raises(InvalidOptionError, match="stored as FP8"):
        unmerge_model(out, [ad], tmp_path / "no-record")
    unmerge_model(out, [ad], back, record=rec)
    assert data_bytes(back / "model.safetensors") == data_bytes(base / "model.safetensors")  # the stamp differs
    b, u = load_file(base / "model.safetensors"), load_file(back / "model.safetensors")
    assert all(torch.equal(b[k].view(torch.uint8), u[k].view(torch.uint8)) for k in b)
    assert 0 < report.record_nbytes < sum(t.numel() * t.element_size() for t in b.values())


def test_record_of_another_merge_is_refused(base: Path, tmp_path: Path) -> None:
    ad = read_adapter(LORA)
    merge_model(base, [ad], tmp_path / "a", record=tmp_path / "ra.safetensors")
    merge_model(base, [(ad, 0.5)], tmp_path / "b", record=tmp_path / "rb.safetensors")
    with pytest.raises(Exception, match="record"):
        unmerge_model(tmp_path / "a", [(ad, 0.5)], tmp_path / "u", record=tmp_path / "rb.safetensors",
                      ignore_stamp=True)
    assert not (tmp_path / "u").exists()


def test_other_quant_methods_are_refused_by_name(base: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(base, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "hqq"}}))
    with pytest.raises(UnsupportedConfigError, match="hqq"):
        merge_model(other, [read_adapter(LORA)], tmp_path / "m")


def test_scales_in_another_shard(base: Path, tmp_path: Path) -> None:
    """A sharded FP8 model whose scales all live in the second shard: read, re-quantized and written in place."""
    sharded = tmp_path / "sharded"
    shutil.copytree(base, sharded)
    t = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in t.items() if not k.endswith("_scale_inv")},
              "model-00002-of-00002.safetensors": {k: v for k, v in t.items() if k.endswith("_scale_inv")}}
    for name, part in shards.items():
        save_file(part, sharded / name, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    ad = read_adapter(LORA)
    merge_model(sharded, [ad], tmp_path / "m", verify=True)
    merge_model(base, [ad], tmp_path / "one")
    one, m = load_file(tmp_path / "one" / "model.safetensors"), {}
    for name in shards:
        m.update(load_file(tmp_path / "m" / name))
    assert set(m) == set(one) and all(torch.equal(m[k].view(torch.uint8), one[k].view(torch.uint8)) for k in m)
    plain = tmp_path / "plain"
    merge_model(sharded, [ad], plain, dtype=torch.bfloat16)
    weight_map = json.loads((plain / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(k.endswith("_scale_inv") for k in weight_map)
    assert not (plain / "model-00002-of-00002.safetensors").exists()  # it held only scales: no empty shard left
    assert set(weight_map.values()) == {"model-00001-of-00002.safetensors"}
    assert verify_merge(sharded, [ad], plain).ok


@pytest.mark.parametrize("block", [[128], [128, 0], ["128", 128], [True, True], [128.0, 128]])
def test_a_block_size_that_is_not_two_positive_integers_is_refused(block: list) -> None:
    from loratools.errors import UnsupportedConfigError
    from loratools.quant.fp8 import fp8_format

    with pytest.raises(UnsupportedConfigError, match="weight_block_size"):
        fp8_format({"quantization_config": {"quant_method": "fp8", "weight_block_size": block}})


def test_extract_and_inspect_base_read_an_fp8_base_dequantized(base: Path, tmp_path: Path) -> None:
    """extract from the FP8 base gives the adapter extract gives from the same weights stored plain (float32);
    inspect --base of a DoRA adapter gives the same figures; merging that DoRA adapter into FP8 is refused by name."""
    plain = model_with_weights(dequantized(base), TINY, tmp_path / "plain")
    check_quantized_base_reads_as_plain(base, plain, LORA, tmp_path, "stored as FP8 and adapted by DoRA")
