"""GPTQ bases (checkpoint formats v1 "gptq" and "gptq_v2", symmetric and with zero points, act-order g_idx) in every
command that reads a quantized base. The tensors and their dequantized reference are made by vLLM's own utilities
(tests/gptq_vllm_ref.py, run once in .venv-vllm: about 10 s); the tests skip, with the reason, without it.

Read as vLLM dequantizes them (bit for bit), merged plain against peft on vLLM's dequantized model, merged in the
format on the base's grid (checked in float64), un-merged byte for byte by record, verified, and refused by name where
the config or the tensors are not a GPTQ model loratools reads."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import (VLLM_PY, check_int_keep_format_merge, check_plain_merge_matches_peft, dequantized_view,
                     model_with_weights, quantized_llama, vllm_skip_reason)
from loratools.errors import UnsupportedConfigError
from loratools.quant.codec import GptqCodec, quant_codec
from loratools.quant.gptq import GptqFormat

pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parent.parent
TINY, LORA = ROOT / "fixtures" / "tiny-llama", ROOT / "fixtures" / "adapters" / "lora"
#: unit cases on a random (in 256, out 64) weight: bits, group size, symmetric, act-order
CASES = {"w4-g32-sym": (4, 32, True, False), "w4-g32-asym-act": (4, 32, False, True),
         "w8-channel-asym": (8, -1, False, False), "w8-g64-sym-act": (8, 64, True, True)}
#: the tiny Llama's every linear but lm_head, quantized 4-bit in groups of 32: (symmetric, act-order, format)
MODELS = {"sym-v1": (True, False, "gptq"), "asym-act-v2": (False, True, "gptq_v2")}


def _act_order(n: int, seed: int) -> torch.Tensor:
    """An input order as GPTQ's desc_act makes one: by decreasing Hessian diagonal (here a random one)."""
    return torch.argsort(torch.rand(n, generator=torch.Generator().manual_seed(seed)), descending=True)


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """Every unit case and model variant quantized, packed and dequantized by vLLM (one subprocess)."""
    reason = vllm_skip_reason()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("gptq-ref")
    g = torch.Generator().manual_seed(0)
    src, jobs = {}, {}
    for i, (name, (bits, size, sym, act)) in enumerate(CASES.items()):
        src[name] = (torch.randn(256, 64, generator=g) * 0.05).half()
        if act:
            src[name + ".perm"] = _act_order(256, i)
        jobs[name] = {"bits": bits, "group_size": size, "sym": sym}
    tiny = load_file(TINY / "model.safetensors")
    for variant, (sym, act, _) in MODELS.items():
        for j, key in enumerate(k for k in tiny if k.endswith("_proj.weight")):
            src[f"{variant}/{key}"] = tiny[key].t().contiguous().half()  # vLLM's (in, out)
            if act:
                src[f"{variant}/{key}.perm"] = _act_order(tiny[key].shape[1], 100 + j)
            jobs[f"{variant}/{key}"] = {"bits": 4, "group_size": 32, "sym": sym}
    save_file(src, tmp / "src.safetensors")
    r = subprocess.run([str(VLLM_PY), str(ROOT / "tests" / "gptq_vllm_ref.py"), str(tmp / "src.safetensors"),
                        json.dumps(jobs), str(tmp / "ref.safetensors")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return load_file(tmp / "ref.safetensors")


def gptq_config(sym: bool, act: bool, fmt: str, bits: int = 4, group_size: int = 32) -> dict:
    """config.json's quantization_config as transformers 5.23's ``GPTQConfig.to_dict`` writes it (both the format
    and its legacy name)."""
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act, "sym": sym,
            "format": fmt, "checkpoint_format": fmt, "damp_percent": 0.1, "true_sequential": True}


def gptq_llama(ref: dict[str, torch.Tensor], variant: str, dest: Path) -> Path:
    """The tiny Llama as a GPTQ checkpoint (float16 elsewhere) from vLLM's tensors of ``variant``."""
    sym, act, fmt = MODELS[variant]
    names = {"qweight": "qweight", "qzeros": f"qzeros.{fmt[5:] or 'v1'}", "scales": "scales", "g_idx": "g_idx"}
    return quantized_llama(dest, lambda k, _: {n: ref[f"{variant}/{k}.{r}"] for n, r in names.items()},
                           gptq_config(sym, act, fmt))


def vllm_plain(ref: dict[str, torch.Tensor], variant: str, dest: Path) -> Path:
    """The same model with vLLM's dequantized weights, stored as plain float16 tensors."""
    tiny = load_file(TINY / "model.safetensors")
    weights = {k: (ref[f"{variant}/{k}.w_ref"] if k.endswith("_proj.weight") else v.half()) for k, v in tiny.items()}
    return model_with_weights(weights, TINY, dest)


@pytest.fixture(scope="module", params=list(MODELS))
def model(request: pytest.FixtureRequest, ref, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    return request.param, gptq_llama(ref, request.param, tmp_path_factory.mktemp(request.param) / "base")


@pytest.mark.parametrize("fmt", ["v1", "v2"])
@pytest.mark.parametrize("case", list(CASES))
def test_dequantize_is_vllms_reference_and_the_float64_sum_bit_for_bit(ref, case: str, fmt: str) -> None:
    bits, size, _, act = CASES[case]
    if f"{case}.qzeros.{fmt}" not in ref:
        pytest.skip("a zero of 0 has no v1 encoding")
    parts = [ref[f"{case}.{p}"] for p in ("qweight", f"qzeros.{fmt}", "scales", "g_idx")]
    ours = GptqFormat(bits, size, v1=fmt == "v1").dequantize(parts)
    assert ours.dtype == torch.float32 and torch.equal(ours, ref[f"{case}.w_ref"].float())
    q, z, s, g = ref[f"{case}.q"].double(), ref[f"{case}.z"].double(), ref[f"{case}.scales"].double(), parts[3].long()
    dense = ((q - z[g]) * s[g]).t()  # W[o, i] = (q[i, o] − z[g(i), o]) · s[g(i), o], exact in float64
    assert torch.equal(ours, dense.half().float())
    assert act == bool((g.diff() < 0).any())  # act-order: g_idx is not monotone
    if not act:  # without g_idx: contiguous groups of group_size
        assert torch.equal(GptqFormat(bits, size, v1=fmt == "v1").dequantize(parts[:3]), ours)


@pytest.mark.parametrize("groups", ["contiguous", "act-order", "uneven"])
@pytest.mark.parametrize("bits", [4, 8])
def test_every_group_layout_reads_as_the_float64_sum_and_requantizes_to_the_same_bytes(bits: int, groups: str) -> None:
    """Contiguous groups, a permutation of equal groups (the act-order fast path) and groups of unequal sizes (one
    scale and zero point per element) give the same arithmetic; re-quantizing the dequantized weight on its own grid
    gives every part back (|q − z|·s rounded to float16 moves q by far less than ½); the half step bounds what
    re-quantizing moves any weight."""
    gen = torch.Generator().manual_seed(bits)
    fmt, n_out, n_in, size = GptqFormat(bits, 16, v1=False), 16, 64, 16
    q = torch.randint(0, 1 << bits, (n_out, n_in), generator=gen, dtype=torch.int16)
    z = torch.randint(0, 1 << bits, (n_in // size, n_out), generator=gen, dtype=torch.int16)
    s = torch.rand(n_in // size, n_out, generator=gen) * 0.01 + 1e-3
    parts = list(fmt.pack(q, z, s))
    if groups == "act-order":
        parts[3] = parts[3][torch.randperm(n_in, generator=gen)]
    elif groups == "uneven":
        parts[3] = torch.randint(0, n_in // size, (n_in,), generator=gen, dtype=torch.int32)
    g = parts[3].long()
    dense = ((q.double() - z.double()[g].t()) * parts[2].double()[g].t()).half().float()
    w = fmt.dequantize(parts)
    assert torch.equal(w, dense)
    again = fmt.quantize(w, parts)
    assert all(torch.equal(a, b) for a, b in zip(again, parts))
    x = w + (torch.rand(w.shape, generator=gen) - 0.5) * 4 * parts[2].float()[g].t()  # off the grid, some beyond it
    assert bool(((fmt.dequantize(fmt.quantize(x, parts)) - x).abs() <= fmt.half_step(x, parts)).all())


def test_the_config_selects_the_gptq_codec_with_its_format() -> None:
    codec = quant_codec({"quantization_config": gptq_config(True, False, "gptq")})
    assert codec == GptqCodec(GptqFormat(4, 32, v1=True))
    assert quant_codec({"quantization_config": gptq_config(False, True, "gptq_v2", 8, -1)}) == \
        GptqCodec(GptqFormat(8, -1, v1=False))
    legacy = {"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "gptq_v2"}
    assert quant_codec({"quantization_config": legacy}) == GptqCodec(GptqFormat(4, 128, v1=False))
    assert quant_codec({"quantization_config": {"quant_method": "gptq", "bits": 4}}) == \
        GptqCodec(GptqFormat(4, 128, v1=True))


@pytest.mark.parametrize(("field", "value"), [("bits", 3), ("bits", 2), ("checkpoint_format", "marlin"),
                                              ("pack_dtype", "int64"), ("dynamic", {"-:.*mlp.*": {}}),
                                              ("group_size", 0), ("bits", 4.0), ("bits", "4")])
def test_other_gptq_settings_are_refused_by_name(field: str, value: object) -> None:
    qc = {**gptq_config(True, False, "gptq"), field: value}
    if field == "checkpoint_format":
        qc["format"] = value
    with pytest.raises(UnsupportedConfigError, match=field):
        quant_codec({"quantization_config": qc})


def test_the_dequantized_view_is_vllms_dequantized_model(ref, model) -> None:
    variant, base = model
    view = dequantized_view(base)
    tiny = load_file(TINY / "model.safetensors")
    assert set(view) == set(tiny)
    for k, v in tiny.items():
        want = ref[f"{variant}/{k}.w_ref"].float() if k.endswith("_proj.weight") else v.half()
        assert torch.equal(view[k], want), k


def test_plain_merge_matches_peft_on_vllms_dequantized_model(ref, model, tmp_path: Path) -> None:
    variant, base = model
    check_plain_merge_matches_peft(base, vllm_plain(ref, variant, tmp_path / "plain"), LORA, tmp_path)


def test_keep_format_merge_rounds_the_exact_sum_on_the_bases_grid_and_unmerges_byte_for_byte(model,
                                                                                             tmp_path: Path) -> None:
    check_int_keep_format_merge(model[1], LORA, tmp_path)


def _damaged(base: Path, dest: Path, change) -> Path:
    t = load_file(base / "model.safetensors")
    change(t)
    dest.mkdir()
    save_file(t, dest / "model.safetensors", metadata={"format": "pt"})
    (dest / "config.json").write_text((base / "config.json").read_text())
    return dest


Q = "model.layers.0.self_attn.q_proj"
DAMAGE = {"qweight shape": (lambda t: t.update({f"{Q}.qweight": t[f"{Q}.qweight"][:-1]}), f"{Q}.g_idx: expected"),
          "missing qzeros": (lambda t: t.pop(f"{Q}.qzeros"), f"no {Q}.qzeros"),
          "g_idx out of range": (lambda t: t[f"{Q}.g_idx"].__setitem__(0, 99), "g_idx")}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("dtype", [None, "float16"])
def test_a_damaged_gptq_base_is_refused_in_one_line_and_nothing_is_written(ref, tmp_path: Path, cli, damage: str,
                                                                           dtype: str | None) -> None:
    change, words = DAMAGE[damage]
    base = _damaged(gptq_llama(ref, "asym-act-v2", tmp_path / "good"), tmp_path / "bad", change)
    r = cli("merge", base, LORA, "-o", tmp_path / "m", *(["--dtype", dtype] if dtype else []))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and words in r.stderr, r.stderr
    assert not (tmp_path / "m").exists()
