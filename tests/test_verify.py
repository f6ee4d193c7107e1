"""``verify`` accepts every correct merge (peft's own, loratools' weighted ones) and rejects a ΔW off by 1 %;
``merge --verify`` leaves nothing behind when it fails; ``unmerge``'s error bound holds on peft's merges."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from loratools import read_adapter
from loratools.errors import VerificationError
from loratools.io import ModelReader
from loratools.merge.jobs import merge_model, unmerge_model, verify_merge

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def peft_merge(base: Path, adapter: Path, out: Path, dtype: torch.dtype) -> Path:
    """peft's merge_and_unload with the base loaded in ``dtype``, saved as a model directory."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def patterns(tmp_path_factory) -> Path:
    """A peft LoRA with rank_pattern and alpha_pattern on the tiny Llama fixture."""
    from peft import LoraConfig

    from helpers import peft_adapter

    out = tmp_path_factory.mktemp("patterns") / "ad"
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3})
    return peft_adapter(Path("fixtures/tiny-llama"), out, cfg, seed=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["lora", "rslora", "adalora", "patterns"])
def test_peft_merges_pass_and_the_unmerge_bound_holds(name, dtype, tiny_llama, adapters, patterns, tmp_path):
    src = patterns if name == "patterns" else adapters / name
    merged = peft_merge(tiny_llama, src, tmp_path / "m", dtype)
    ad = read_adapter(src)
    v = verify_merge(tiny_llama, [ad], merged, device="cpu")
    assert v.ok and v.modules, v.to_json()

    u = unmerge_model(merged, [ad], tmp_path / "u", device="cpu")
    base, back = ModelReader(tiny_llama), ModelReader(tmp_path / "u")
    true_max = max(float((back.get(k).double() - base.get(k).double()).abs().max()) for k in base.spans)
    assert 0 < true_max <= u.error_bound


@pytest.mark.parametrize("name", ["lora", "rslora", "adalora"])
def test_a_delta_off_by_one_percent_fails_in_float32(name, tiny_llama, adapters, tmp_path):
    ad = read_adapter(adapters / name)
    merge_model(tiny_llama, [(ad, 1.01)], tmp_path / "m", device="cpu")
    v = verify_merge(tiny_llama, [(ad, 1.0)], tmp_path / "m", device="cpu")
    assert not v.ok and v.worst.ratio > 10
    with pytest.raises(VerificationError):
        v.check()


def test_weighted_sums_pass(tiny_llama, adapters, tmp_path, cli):
    for dtype in ("auto", "bfloat16", "float16"):
        r = cli("merge", tiny_llama, adapters / "lora", adapters / "rslora", "--weight", "0.7", "--weight", "0.3",
                "-o", tmp_path / dtype, "--dtype", dtype, "--verify")
        assert r.returncode == 0 and "verify:" in r.stdout, r.stderr
        r = cli("verify", tiny_llama, adapters / "lora", adapters / "rslora", tmp_path / dtype,
                "--weight", "0.7", "--weight", "0.3")
        assert r.returncode == 0, r.stdout + r.stderr


def test_a_failed_merge_verify_leaves_nothing(tiny_llama, adapters, tmp_path, cli, monkeypatch):
    import loratools.merge.stream as stream

    real = stream.factors_of

    def off_by_two_percent(parts, **options):  # a broken merge kernel: the check must catch it
        return real([(m, 1.02 * w) for m, w in parts], **options)

    monkeypatch.setattr(stream, "factors_of", off_by_two_percent)
    r = cli("merge", tiny_llama, adapters / "lora", "-o", tmp_path / "m", "--verify",
            "--record", tmp_path / "rec.safetensors")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "tolerance" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_module_whose_ratio_is_nan_fails_naming_it() -> None:
    """A NaN ratio (a NaN tolerance or deviation) is no pass, and the failure names that module (it used to look
    for an untouched tensor to blame and raise IndexError)."""
    from loratools.merge.report import ModuleCheck, VerifyReport

    v = VerifyReport([ModuleCheck("a.weight", 0.1, 0.5), ModuleCheck("b.weight", float("nan"), float("nan")),
                      ModuleCheck("c.weight", 0.2, 0.9)], [], "float32")
    assert not v.ok and v.worst is not None and v.worst.key == "b.weight"
    with pytest.raises(VerificationError, match="b.weight deviates by nan"):
        v.check()
