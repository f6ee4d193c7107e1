"""`merge --qlora Q --onto original|dequantized`: a QLoRA adapter merged onto W0 or onto deq(Q(W0)), with the
figures ‖deq(Q(W0)) − W0‖/‖ΔW‖ — checked against bitsandbytes 0.50.2's own quantize_4bit/dequantize_4bit and
dense float64 (loratools.merge.onto)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from loratools.errors import InvalidOptionError
from loratools.io import load_safetensors, save_safetensors
from loratools.merge.jobs import merge_model

from conftest import ADAPTERS, TINY_LLAMA

F = pytest.importorskip("bitsandbytes.functional")
LORA = ADAPTERS / "lora"


def _bnb_deq(w0: torch.Tensor, quant: str) -> torch.Tensor:
    """deq(Q(W0)) by bitsandbytes itself (blocks of 64, as transformers' BitsAndBytesConfig)."""
    packed, qs = F.quantize_4bit(w0, blocksize=64, quant_type=quant[:3], compress_statistics=quant.endswith("-dq"))
    return F.dequantize_4bit(packed, qs)


def _deltas64() -> dict[str, torch.Tensor]:
    """ΔW = (α/r)·B·A in float64 from the adapter file's raw tensors, by base weight key."""
    cfg = json.loads((LORA / "adapter_config.json").read_text())
    raw, _ = load_safetensors(LORA / "adapter_model.safetensors")
    out = {}
    for k, a in raw.items():
        if k.endswith(".lora_A.weight"):
            module = k.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = raw[k.replace("lora_A", "lora_B")]
            out[f"{module}.weight"] = b.double() @ a.double() * (cfg["lora_alpha"] / cfg["r"])
    return out


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_safetensors(path / "model.safetensors")[0]


def _one_line_error(r) -> str:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loratools: error:") and not r.stdout, r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def onto_dequantized(tmp_path_factory: pytest.TempPathFactory):
    from conftest import run_cli

    out = tmp_path_factory.mktemp("onto") / "merged"
    r = run_cli("merge", TINY_LLAMA, LORA, "-o", out, "--onto", "dequantized", "--qlora", "nf4-dq",
                "--precision", "float64", "--verify", "--json")
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout)


def test_merge_onto_dequantized_writes_bitsandbytes_dequantized_base_plus_update(onto_dequantized):
    out, _ = onto_dequantized
    base, merged, deltas = _tensors(TINY_LLAMA), _tensors(out), _deltas64()
    assert set(merged) == set(base) and len(deltas) == 8
    for key, d in deltas.items():
        expected = (_bnb_deq(base[key], "nf4-dq").double() + d).to(torch.float32)
        assert merged[key].dtype == torch.float32 and torch.equal(merged[key], expected), key
        assert not torch.equal(merged[key], (base[key].double() + d).float())  # not the plain merge
    for key in set(base) - set(deltas):  # untouched: the same bytes
        assert merged[key].dtype == base[key].dtype
        assert torch.equal(merged[key].view(torch.uint8), base[key].view(torch.uint8)), key


def test_merge_figures_are_the_dense_float64_quantization_error_over_the_update(onto_dequantized):
    _, report = onto_dequantized
    figures, base, deltas = report["onto"], _tensors(TINY_LLAMA), _deltas64()
    assert figures["onto"] == "dequantized" and figures["quant"] == "nf4-dq"
    assert [f"{r['module']}.weight" for r in figures["rows"]] == sorted(deltas, key=list(base).index)
    errs, norms = [], []
    for row in figures["rows"]:
        key = f"{row['module']}.weight"
        err = (_bnb_deq(base[key], "nf4-dq").double() - base[key].double()).norm().item()
        delta = deltas[key].norm().item()
        assert math.isclose(row["quant_error"], err, rel_tol=1e-9)
        assert math.isclose(row["delta"], delta, rel_tol=1e-9)
        assert math.isclose(row["ratio"], err / delta, rel_tol=1e-9)
        errs.append(err), norms.append(delta)
    overall = math.sqrt(sum(e * e for e in errs)) / math.sqrt(sum(d * d for d in norms))
    assert math.isclose(figures["overall"]["ratio"], overall, rel_tol=1e-9)
    assert figures["favours"] == "original"  # docs/experiments.md: DEQUANTIZED_FROM_RATIO is None
    assert report["verify"]["ok"]  # --verify checks against deq(Q(W0)) + ΔW


def test_merge_onto_original_is_byte_identical_to_a_plain_merge_and_reports_the_figures(cli, tmp_path):
    plain = cli("merge", TINY_LLAMA, LORA, "-o", tmp_path / "plain", "--json")
    shown = cli("merge", TINY_LLAMA, LORA, "-o", tmp_path / "orig", "--qlora", "fp4", "--json")
    default = cli("merge", TINY_LLAMA, LORA, "-o", tmp_path / "dflt", "--onto", "original")
    assert plain.returncode == shown.returncode == default.returncode == 0, shown.stderr
    for name in ("orig", "dflt"):
        for f in (tmp_path / "plain").iterdir():
            assert (tmp_path / name / f.name).read_bytes() == f.read_bytes(), (name, f.name)
    assert "onto" not in json.loads(plain.stdout)
    figures = json.loads(shown.stdout)["onto"]
    assert figures["onto"] == "original" and figures["quant"] == "fp4" and len(figures["rows"]) == 8
    base = _tensors(TINY_LLAMA)
    row = figures["rows"][0]
    err = (_bnb_deq(base[f"{row['module']}.weight"], "fp4").double() - base[f"{row['module']}.weight"].double())
    assert math.isclose(row["quant_error"], err.norm().item(), rel_tol=1e-9)


def test_merge_summary_prints_the_ratio_and_the_choice_it_favours(cli, tmp_path):
    r = cli("merge", TINY_LLAMA, LORA, "-o", tmp_path / "m", "--qlora", "nf4")
    assert r.returncode == 0, r.stderr
    assert "model.layers.0.self_attn.q_proj" in r.stdout
    assert "overall ‖deq(Q(W0)) − W0‖/‖ΔW‖" in r.stdout and "favour the original weights" in r.stdout


@pytest.mark.parametrize("args, says", [
    (("--onto", "dequantized"), "--qlora"),
    (("--onto", "dequantized", "--qlora", "nf4", "--record", "{tmp}/rec.safetensors"), "--record"),
])
def test_merge_onto_dequantized_refuses_without_qlora_and_with_a_record(cli, tmp_path, args, says):
    args = tuple(a.format(tmp=tmp_path) for a in args)
    line = _one_line_error(cli("merge", TINY_LLAMA, LORA, "-o", tmp_path / "m", *args))
    assert says in line
    assert list(tmp_path.iterdir()) == []


def test_merge_onto_dequantized_refuses_a_dora_adapter_by_name(cli, tmp_path):
    from dora_models import llama_dora

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        llama_dora(TINY_LLAMA, tmp_path / "dora", targets=["q_proj", "v_proj"])
    for extra in (("--onto", "dequantized"), ()):
        line = _one_line_error(cli("merge", TINY_LLAMA, tmp_path / "dora", "-o", tmp_path / "m", "--qlora", "nf4",
                                   *extra))
        assert "DoRA" in line and "self_attn" in line
    assert not (tmp_path / "m").exists()


def test_merge_onto_dequantized_refuses_an_already_quantized_base_by_name(cli, tmp_path):
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
        transformers.AutoModelForCausalLM.from_pretrained(TINY_LLAMA, quantization_config=cfg,
                                                          device_map="cpu").save_pretrained(tmp_path / "q")
    line = _one_line_error(cli("merge", tmp_path / "q", LORA, "-o", tmp_path / "m", "--onto", "dequantized",
                               "--qlora", "nf4", "--dtype", "float32"))
    assert "already quantized" in line and "--qlora" in line
    assert not (tmp_path / "m").exists()


def test_merge_onto_dequantized_refuses_a_gguf_base_by_name(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(20))  # refused by its name before it is read
    with pytest.raises(InvalidOptionError, match="GGUF model"):
        merge_model(gguf, [], tmp_path / "m.gguf", onto="dequantized", qlora="nf4")
    assert not (tmp_path / "m.gguf").exists()


def test_unmerge_of_a_merge_onto_dequantized_says_it_gives_the_dequantized_weights(cli, onto_dequantized, tmp_path):
    out, _ = onto_dequantized
    r = cli("unmerge", out, LORA, "-o", tmp_path / "u")
    assert r.returncode == 0, r.stderr
    assert "merged onto the dequantized 4-bit weights (nf4-dq)" in r.stderr and "not the original" in r.stderr


def _restamped(merged: Path, dest: Path, edit) -> Path:
    """A copy of the merged model at ``dest`` with its loratools stamp edited (``edit`` returns None: no stamp)."""
    tensors, meta = load_safetensors(merged / "model.safetensors")
    dest.mkdir()
    for f in merged.iterdir():
        if f.name != "model.safetensors":
            (dest / f.name).write_bytes(f.read_bytes())
    stamp = edit(json.loads(meta.pop("loratools.merge")))
    save_safetensors(tensors, dest / "model.safetensors",
                     meta if stamp is None else {**meta, "loratools.merge": json.dumps(stamp)})
    return dest


def test_verify_checks_a_merge_onto_dequantized_against_the_base_its_stamp_names(cli, onto_dequantized):
    """`verify` reads the merged model's stamp: a merge onto deq(Q(W0)) passes against the original base, and the
    report says what it was checked against (before, it failed as 10⁵× the rounding tolerance)."""
    out, _ = onto_dequantized
    r = cli("verify", TINY_LLAMA, LORA, out)
    assert r.returncode == 0, r.stderr
    assert "checked against the dequantized nf4-dq base deq(Q(W0)) + ΔW" in r.stdout and "verify: ok" in r.stdout
    report = json.loads(cli("verify", TINY_LLAMA, LORA, out, "--json").stdout)
    assert report["ok"] and report["onto"] == "nf4-dq"
    plain = json.loads(cli("verify", TINY_LLAMA, LORA, out, "--json", "--weight", "0.5").stdout)
    assert not plain["ok"] and plain["onto"] == "nf4-dq"  # the stamp names the base, not the answer


def test_verify_without_the_stamp_checks_against_the_original_and_fails(cli, onto_dequantized, tmp_path):
    bare = _restamped(onto_dequantized[0], tmp_path / "bare", lambda stamp: None)
    r = cli("verify", TINY_LLAMA, LORA, bare)
    assert r.returncode == 2 and "rounding tolerance" in r.stderr and "dequantized" not in r.stdout


def test_a_stamp_naming_an_unknown_4bit_type_is_refused_as_damaged(cli, onto_dequantized, tmp_path):
    forged = _restamped(onto_dequantized[0], tmp_path / "forged", lambda stamp: {**stamp, "qlora": "nf9"})
    for args in (("verify", TINY_LLAMA, LORA, forged), ("unmerge", forged, LORA, "-o", tmp_path / "u")):
        line = _one_line_error(cli(*args))
        assert "stamp says it was merged onto dequantized 4-bit weights of type 'nf9'" in line
    assert not (tmp_path / "u").exists()
