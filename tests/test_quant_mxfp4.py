"""MXFP4 (gpt-oss) bases: dequantization against transformers' own, quantization against gguf's (llama.cpp's rule),
peft expert LoRA (``target_parameters``) merged plain against peft on the dequantized model, the keep-format merge's
rounding, the erase guard, exact un-merge, verify, and an attention LoRA on the same model."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import peft_merged, randomize_lora, state, within_one_bf16_ulp
from loratools import read_adapter
from loratools.errors import InvalidOptionError, LossyMergeError
from loratools.merge import merge_model, unmerge_model, verify_merge
from loratools.quant.mxfp4 import Mxfp4Format

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

FMT = Mxfp4Format()
EXPERTS = ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj")
#: as gpt-oss-20b's config.json ships it
QCONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                "model.embed_tokens", "lm_head"]}


def _quiet_load(path: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def gpt_oss_mxfp4(root: Path) -> Path:
    """A tiny gpt-oss (4 experts, hidden 64, intermediate 32: every blocked dimension a multiple of 32) saved by
    transformers in bfloat16, its expert tensors replaced by random MXFP4 parts (any codes; scales 2⁻⁷…2⁻³) in
    gpt-oss's layout, and its config given gpt-oss's ``quantization_config``."""
    cfg = transformers.GptOssConfig(hidden_size=64, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                    vocab_size=40, layer_types=["full_attention"])
    torch.manual_seed(0)
    plain = root / "plain"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.GptOssForCausalLM(cfg).to(torch.bfloat16).save_pretrained(plain)
    g = torch.Generator().manual_seed(1)
    out = {}
    for k, v in load_file(plain / "model.safetensors").items():
        if k in EXPERTS:
            n, inner, rows = v.shape
            out[k + "_blocks"] = torch.randint(0, 256, (n, rows, inner // 32, 16), dtype=torch.uint8, generator=g)
            out[k + "_scales"] = torch.randint(120, 125, (n, rows, inner // 32), dtype=torch.uint8, generator=g)
        else:
            out[k] = v
    base = root / "base"
    base.mkdir()
    save_file(out, base / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((plain / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "quantization_config": QCONFIG}, indent=2))
    return base


def peft_adapter(base: Path, out: Path, std: float, **targets) -> Path:
    """A peft 0.21 LoRA made on the base as transformers loads it (dequantized on a CPU), random factors."""
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(_quiet_load(base), LoraConfig(r=2, lora_alpha=4, **targets))
        randomize_lora(pm, seed=2, std=std)
        pm.save_pretrained(out)
    return out


def dequantized(path: Path) -> dict[str, torch.Tensor]:
    t = load_file(path / "model.safetensors")
    return {k: FMT.dequantize(t[k + "_blocks"], t[k + "_scales"]) for k in EXPERTS}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(base, an expert LoRA with q_proj, an attention-only LoRA)."""
    root = tmp_path_factory.mktemp("mxfp4")
    base = gpt_oss_mxfp4(root)
    experts = peft_adapter(base, root / "experts", 0.3, target_modules=["q_proj"],
                           target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    attention = peft_adapter(base, root / "attention", 0.05, target_modules=["q_proj", "v_proj"])
    return base, experts, attention


def test_dequantize_is_transformers_convert_moe_packed_tensors_bit_for_bit(model) -> None:
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, 256, (3, 8, 2, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(0, 255, (3, 8, 2), dtype=torch.uint8, generator=g)  # 2⁻¹²⁷ (subnormal) … 2¹²⁷
    assert torch.equal(FMT.dequantize(blocks, scales),
                       convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    loaded = state(_quiet_load(model[0]))  # the loader's own path (Mxfp4Dequantize), as a CPU takes it
    for k, v in dequantized(model[0]).items():
        assert torch.equal(loaded[k], v), k


def _gguf_bytes(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """gguf 0.19's MXFP4 quantizer (llama.cpp's rule) on the blocks of ``x`` (n, in, out), its nibbles (element j
    low, j + 16 high) repacked in gpt-oss's order (2b low, 2b + 1 high): (blocks, scales) flattened."""
    import gguf
    from gguf.quants import quantize

    rows = x.transpose(1, 2).contiguous().reshape(-1, 32).numpy()
    q = quantize(rows, gguf.GGMLQuantizationType.MXFP4).reshape(-1, 17)
    codes = np.concatenate([q[:, 1:] & 0x0F, q[:, 1:] >> 4], axis=1)
    return codes[:, 0::2] | (codes[:, 1::2] << 4), q[:, 0]


def test_quantize_gives_gguf_quantizers_bytes_ties_and_clamps_included() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 64, 8, generator=g) * 0.02
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.9])  # every midpoint, and one clamped to 6
    x[0, :32, 0] = torch.cat([ties, -ties, ties / 2, -ties / 2])
    x[1, :32, 1] = 0.0                      # an all-zero block
    x[1, :32, 2] = 4.0                      # amax exactly a power of two
    x[2, :32, 3] = -1e-3 * torch.arange(32)  # negative, -0 included
    blocks, scales = FMT.quantize(x)
    want_blocks, want_scales = _gguf_bytes(x)
    assert np.array_equal(scales.reshape(-1).numpy(), want_scales)
    assert np.array_equal(blocks.reshape(-1, 16).numpy(), want_blocks)
    assert bool(((FMT.dequantize(blocks, scales) - x).abs() <= FMT.half_step(x, scales)).all())


def test_plain_merge_of_an_expert_lora_matches_peft_within_one_bf16_ulp(model, tmp_path: Path) -> None:
    base, experts, _ = model
    ref = state(peft_merged(base, experts))
    out = tmp_path / "merged"
    merge_model(base, [read_adapter(experts)], out, dtype=torch.bfloat16, verify=True)
    got = load_file(out / "model.safetensors")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert set(got) == set(ref) and not any(k.endswith(("_blocks", "_scales")) for k in got)
    for k, v in got.items():
        assert v.dtype == torch.bfloat16 and within_one_bf16_ulp(v, ref[k]), k
    loaded = state(_quiet_load(out))
    assert all(torch.equal(loaded[k], v.float()) for k, v in got.items())
    assert verify_merge(base, [read_adapter(experts)], out).ok


def test_keep_format_merge_is_the_formats_rounding_of_the_exact_sum(model, tmp_path: Path) -> None:
    base, experts, _ = model
    out = tmp_path / "merged"
    report = merge_model(base, [read_adapter(experts)], out, verify=True)
    assert report.update is not None and report.update.kept > 0.5 and not report.allowed_lossy
    assert json.loads((out / "config.json").read_text())["quantization_config"] == QCONFIG
    b, m = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(b) == set(m)
    for k in set(b) - {p for e in EXPERTS for p in FMT.parts(e)} - {"model.layers.0.self_attn.q_proj.weight"}:
        assert torch.equal(b[k].view(torch.uint8), m[k].view(torch.uint8)), k  # untouched: byte for byte
    ref, w0, merged, loaded = state(peft_merged(base, experts)), dequantized(base), dequantized(out), \
        state(_quiet_load(out))
    for k in EXPERTS:
        exact = ref[k].double()  # peft: W0 + ΔW in float32, on the dequantized base
        assert not torch.equal(merged[k], w0[k])
        assert bool(((merged[k] - exact).abs() <= FMT.half_step(exact.float(), m[k + "_scales"]) + 1e-6).all()), k
        best = torch.linalg.norm(FMT.dequantize(*FMT.quantize(exact.float())).double() - exact)
        assert torch.linalg.norm(merged[k].double() - exact) <= best * (1 + 1e-6), k
        assert torch.equal(loaded[k], merged[k]), k  # transformers loads it, dequantized, to the same values


def test_unmerge_with_record_gives_every_byte_back(model, tmp_path: Path) -> None:
    base, experts, _ = model
    ad = read_adapter(experts)
    merge_model(base, [ad], tmp_path / "m", record=tmp_path / "m.rec.safetensors")
    unmerge_model(tmp_path / "m", [ad], tmp_path / "u", record=tmp_path / "m.rec.safetensors")
    b, u, m = (load_file(p / "model.safetensors") for p in (base, tmp_path / "u", tmp_path / "m"))
    assert set(b) == set(u)
    assert not torch.equal(b[EXPERTS[0] + "_blocks"], m[EXPERTS[0] + "_blocks"])  # the merge changed them
    for k in b:
        assert b[k].dtype == u[k].dtype and torch.equal(b[k].view(torch.uint8), u[k].view(torch.uint8)), k
    with pytest.raises(InvalidOptionError, match="stored as MXFP4.*record"):  # no exact W0 without the record
        unmerge_model(tmp_path / "m", [ad], tmp_path / "u2")
    assert not (tmp_path / "u2").exists()


def test_verify_fails_on_a_merge_of_other_weights(model, tmp_path: Path) -> None:
    base, experts, _ = model
    ad = read_adapter(experts)
    merge_model(base, [(ad, 0.5)], tmp_path / "half", allow_lossy=True)
    merge_model(base, [(ad, 0.5)], tmp_path / "half-plain", dtype=torch.bfloat16)
    for merged in ("half", "half-plain"):
        report = verify_merge(base, [ad], tmp_path / merged, allow_lossy=True)
        assert not report.ok, merged
        assert verify_merge(base, [(ad, 0.5)], tmp_path / merged, allow_lossy=True).ok, merged


def test_a_merge_that_erases_the_expert_update_is_refused_unless_allowed(model, tmp_path: Path, cli) -> None:
    base = model[0]
    tiny = peft_adapter(base, tmp_path / "tiny", 0.003, target_parameters=["mlp.experts.gate_up_proj"])
    with pytest.raises(LossyMergeError, match="keeps"):
        merge_model(base, [read_adapter(tiny)], tmp_path / "m")
    r = cli("merge", base, tiny, "-o", tmp_path / "m")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--allow-lossy" in r.stderr, r.stderr
    assert not (tmp_path / "m").exists()
    r = cli("merge", base, tiny, "-o", tmp_path / "m", "--allow-lossy")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_an_attention_lora_merges_into_the_bf16_weights_and_copies_the_experts(model, tmp_path: Path) -> None:
    base, _, attention = model
    out = tmp_path / "merged"
    report = merge_model(base, [read_adapter(attention)], out, verify=True)
    assert report.update is None  # nothing quantized was re-quantized
    ref, b, m = state(peft_merged(base, attention)), load_file(base / "model.safetensors"), \
        load_file(out / "model.safetensors")
    for k in b:
        if k.endswith(("q_proj.weight", "v_proj.weight")):
            assert m[k].dtype == torch.bfloat16 and within_one_bf16_ulp(m[k], ref[k]), k
            assert not torch.equal(m[k], b[k]), k
        else:
            assert torch.equal(b[k].view(torch.uint8), m[k].view(torch.uint8)), k


def test_sharded_with_scales_apart_merges_as_the_single_file(model, tmp_path: Path) -> None:
    """Scales in a shard of their own: keep-format writes the same bytes; a plain merge writes each expert tensor
    in its blocks' shard, names it in the index, and leaves no shard of dropped scales behind."""
    base, experts, _ = model
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((base / "config.json").read_text())
    t = load_file(base / "model.safetensors")
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in t.items() if not k.endswith("_scales")},
              "model-00002-of-00002.safetensors": {k: v for k, v in t.items() if k.endswith("_scales")}}
    for name, part in shards.items():
        save_file(part, sharded / name, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    ad = read_adapter(experts)
    for dtype, name in ((None, "keep"), (torch.bfloat16, "plain")):
        merge_model(sharded, [ad], tmp_path / name, dtype=dtype, verify=True)
        merge_model(base, [ad], tmp_path / f"{name}-one", dtype=dtype)
        one = load_file(tmp_path / f"{name}-one" / "model.safetensors")
        wmap = json.loads((tmp_path / name / "model.safetensors.index.json").read_text())["weight_map"]
        got = {k: v for shard in sorted(set(wmap.values())) for k, v in load_file(tmp_path / name / shard).items()}
        assert set(got) == set(one) == set(wmap)
        assert all(torch.equal(got[k].view(torch.uint8), one[k].view(torch.uint8)) for k in got), name
    assert all(wmap[k] == "model-00001-of-00002.safetensors" for k in EXPERTS)
    assert not (tmp_path / "plain" / "model-00002-of-00002.safetensors").exists()
