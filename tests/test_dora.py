"""DoRA read/write, merge and exact un-merge against real peft 0.21.2 (merge_and_unload) on the same inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loratools import read_adapter
from loratools.errors import DoraError, InvalidOptionError
from loratools.formats import write_adapter
from loratools.io import ModelReader, load_safetensors, save_safetensors
from loratools.merge.jobs import merge_model, unmerge_model, verify_merge
from loratools.merge.kernels import ulp

from dora_models import gpt2_dora, llama_dora, small_dora

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with ModelReader(path) as r:
        return {k: r.get(k) for k in r.keys()}


def _max_diff(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    return max(float((ours[k].double() - ref[k].double()).abs().max()) for k in ours)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    tmp = tmp_path_factory.mktemp("dora")
    base = Path(__file__).resolve().parent.parent / "fixtures" / "tiny-llama"
    return base, tmp / "ad", llama_dora(base, tmp / "ad", targets=TARGETS)


def test_reads_magnitudes_and_writes_them_back_for_peft(llama, tmp_path: Path) -> None:
    base, ad_dir, ref = llama
    ad = read_adapter(ad_dir)
    assert ad.is_dora and len(ad.modules) == 4 * len(TARGETS)
    m = ad.modules["model.layers.0.self_attn.q_proj"]
    raw, _ = load_safetensors(ad_dir / "adapter_model.safetensors")
    assert torch.equal(m.magnitude, raw["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"])
    for fmt, out in (("peft", tmp_path / "p"), ("loratools", tmp_path / "s.safetensors")):
        write_adapter(ad, out, format=fmt)
        back = read_adapter(out)
        assert all(torch.equal(back.modules[n].magnitude, x.magnitude) for n, x in ad.items())
    # peft itself loads what we wrote and merges it to the same weights
    from peft import PeftModel

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, tmp_path / "p").merge_and_unload()
    assert _max_diff({k: v for k, v in merged.state_dict().items() if k in ref}, ref) == 0.0


def test_merge_equals_peft_in_float32_and_verifies(llama, tmp_path: Path) -> None:
    base, ad_dir, ref = llama
    ad = read_adapter(ad_dir)
    report = merge_model(base, [ad], tmp_path / "m", device="cpu")
    ours, w0 = _tensors(tmp_path / "m"), _tensors(base)
    assert report.adapted == len(ad.modules)
    assert all(not torch.equal(ours[f"{n}.weight"], w0[f"{n}.weight"]) for n in ad.modules)
    assert _max_diff(ours, ref) < 1e-6
    assert verify_merge(base, [ad], tmp_path / "m", device="cpu").ok
    # a merge that skipped the rescaling (plain LoRA) is caught by verify
    lora = ad.with_modules({n: m.with_factors(magnitude=None) for n, m in ad.items()})
    merge_model(base, [lora], tmp_path / "plain", device="cpu")
    assert not verify_merge(base, [ad], tmp_path / "plain", device="cpu").ok


@pytest.mark.parametrize("build", [gpt2_dora, small_dora], ids=["gpt2-conv1d-fan_in_fan_out", "conv2d+embedding"])
def test_other_layer_kinds_equal_peft(build, tmp_path: Path) -> None:
    base, ad_dir, ref = build(tmp_path)
    ad = read_adapter(ad_dir)
    kinds = {(m.kind, m.fan_in_fan_out) for m in ad.modules.values()}
    assert kinds == ({("linear", True)} if build is gpt2_dora else {("conv", False), ("embedding", False)})
    merge_model(base, [ad], tmp_path / "m", device="cpu", record=tmp_path / "rec.safetensors")
    ours = _tensors(tmp_path / "m")
    assert _max_diff(ours, {k: ref[k] for k in ours}) < 1e-6
    assert verify_merge(base, [ad], tmp_path / "m", device="cpu").ok
    unmerge_model(tmp_path / "m", [ad], tmp_path / "u", device="cpu", record=tmp_path / "rec.safetensors")
    w0 = _tensors(base)
    assert all(torch.equal(v, w0[k]) for k, v in _tensors(tmp_path / "u").items())


def test_bfloat16_merge_within_an_ulp_and_record_round_trip_is_bit_exact(llama, tmp_path: Path) -> None:
    base, ad_dir, _ = llama
    ad = read_adapter(ad_dir)
    w0, meta = load_safetensors(base / "model.safetensors")
    save_safetensors({k: v.to(torch.bfloat16) for k, v in w0.items()}, tmp_path / "b.safetensors", meta)
    bf = load_safetensors(tmp_path / "b.safetensors")[0]
    # peft's merge in float32 of exactly these bfloat16 weights, rounded once: what a bfloat16 merge should give
    (tmp_path / "b").mkdir()
    save_safetensors({k: v.float() for k, v in bf.items()}, tmp_path / "b" / "model.safetensors", meta)
    for f in ("config.json", "generation_config.json"):
        if (base / f).exists():
            (tmp_path / "b" / f).write_bytes((base / f).read_bytes())
    from peft import PeftModel

    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b", dtype=torch.float32)
    ref = {k: v.detach().to(torch.bfloat16) for k, v in
           PeftModel.from_pretrained(model, ad_dir).merge_and_unload().state_dict().items()}
    rec = tmp_path / "rec.safetensors"
    merge_model(tmp_path / "b.safetensors", [ad], tmp_path / "m.safetensors", device="cpu", record=rec)
    ours = load_safetensors(tmp_path / "m.safetensors")[0]
    for k, v in ours.items():
        assert v.dtype == torch.bfloat16
        assert bool(((v.double() - ref[k].double()).abs() <= ulp(ref[k])).all()), k
    assert verify_merge(tmp_path / "b.safetensors", [ad], tmp_path / "m.safetensors", device="cpu").ok
    assert any(k.endswith("::dora_norm") for k in load_safetensors(rec)[0])

    unmerge_model(tmp_path / "m.safetensors", [ad], tmp_path / "u.safetensors", device="cpu", record=rec)
    back = load_safetensors(tmp_path / "u.safetensors")[0]
    assert all(torch.equal(back[k].view(torch.int16), bf[k].view(torch.int16)) for k in bf)

    with pytest.raises(InvalidOptionError, match="row norms .* un-merge with the record"):
        unmerge_model(tmp_path / "m.safetensors", [ad], tmp_path / "u2.safetensors", device="cpu")
    assert not (tmp_path / "u2.safetensors").exists()


def test_dora_is_not_a_sum(llama, adapters: Path, tmp_path: Path) -> None:
    base, ad_dir, ref = llama
    ad = read_adapter(ad_dir)
    lora = read_adapter(adapters / "lora")  # q_proj and v_proj: the same tensors as the DoRA adapter
    with pytest.raises(InvalidOptionError, match="not a sum"):
        merge_model(base, [ad, lora], tmp_path / "m", device="cpu")
    with pytest.raises(InvalidOptionError, match="weight"):
        merge_model(base, [(ad, 0.5)], tmp_path / "m", device="cpu")
    assert not (tmp_path / "m").exists()
    # on disjoint tensors both rules apply, each to its own tensors
    only_mlp = ad.with_modules({n: m for n, m in ad.items() if "mlp" in n})
    merge_model(base, [only_mlp, lora], tmp_path / "m", device="cpu")
    ours, w0 = _tensors(tmp_path / "m"), _tensors(base)
    for n, m in lora.items():
        k = f"{n}.weight"
        assert torch.allclose(ours[k], w0[k] + m.delta(), atol=1e-6)
    assert _max_diff({k: v for k, v in ours.items() if ".mlp." in k}, ref) < 1e-6
    for to in ("kohya", "gguf"):
        from loratools.convert import convert_adapter

        with pytest.raises(DoraError, match="`base` and `as_lora`"):
            convert_adapter(ad, to=to)


@pytest.mark.parametrize("damage", ["short", "nan"])
def test_a_record_whose_dora_norms_are_damaged_is_refused(llama, tmp_path: Path, damage: str) -> None:
    from loratools.errors import CorruptFileError

    base, ad_dir, _ = llama
    ad = read_adapter(ad_dir)
    rec = tmp_path / "rec.safetensors"
    merge_model(base, [ad], tmp_path / "m", device="cpu", record=rec)
    tensors, meta = load_safetensors(rec)
    key = next(k for k in tensors if k.endswith("::dora_norm"))
    tensors[key] = tensors[key][:-1] if damage == "short" else tensors[key] * float("nan")
    save_safetensors(tensors, rec, meta)
    with pytest.raises(CorruptFileError, match="DoRA row norms"):
        unmerge_model(tmp_path / "m", [ad], tmp_path / "back", device="cpu", record=rec)
    assert not (tmp_path / "back").exists()
