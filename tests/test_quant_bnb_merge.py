"""bitsandbytes bases (NF4/FP4 with and without double quantization, LLM.int8) in every command that reads a
quantized base: fixtures/tiny-llama loaded by transformers 5.23 with a real ``BitsAndBytesConfig`` on CPU and saved
with ``save_pretrained`` (bitsandbytes 0.50.2's own serialization), read as bitsandbytes dequantizes it, merged plain
against peft on the dequantized model, merged in the format against peft's own ``merge_and_unload`` on the 4-bit
model and loaded back by transformers, un-merged byte for byte by record, verified, refused when the re-quantization
erases ΔW or when a tensor belongs to no weight, and read dequantized by extract and inspect --base."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import (check_quantized_base_reads_as_plain, data_bytes, dequantized_view, kept_merge,
                     model_with_weights, plain_reference, state, within_one_bf16_ulp)
from loratools import read_adapter
from loratools.errors import InvalidOptionError, LossyMergeError
from loratools.io import ModelReader
from loratools.merge import merge_model, unmerge_model, verify_merge
from loratools.quant.bnb import Bnb4bit
from loratools.quant.codec import BnbCodec

F = pytest.importorskip("bitsandbytes.functional")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parent.parent
TINY, LORA = ROOT / "fixtures" / "tiny-llama", ROOT / "fixtures" / "adapters" / "lora"  # hidden 128: blocks of 64
KINDS = {"nf4-double": ("nf4", True), "nf4": ("nf4", False), "fp4-double": ("fp4", True), "fp4": ("fp4", False)}


def bnb_config(kind: str, dtype: torch.dtype = torch.float32):
    if kind == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    quant_type, nested = KINDS[kind]
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                           bnb_4bit_use_double_quant=nested, bnb_4bit_compute_dtype=dtype)


def load(path: Path, kind: str | None = None, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """``path`` loaded by transformers on CPU in ``dtype``: quantized by ``kind``, or as its config says."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extra = {"quantization_config": bnb_config(kind, dtype)} if kind else {}
        return transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=dtype, **extra)


def bnb_dequantized(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every bitsandbytes linear's weight as bitsandbytes dequantizes it (``dequantize_4bit``, or int8's
    ``int8_vectorwise_dequant``), by its state-dict key."""
    import bitsandbytes as bnb

    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            out[f"{name}.weight"] = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
        elif isinstance(mod, bnb.nn.Linear8bitLt):
            out[f"{name}.weight"] = F.int8_vectorwise_dequant(mod.weight.data, mod.weight.SCB)
    return out


def adapted() -> set[str]:
    return {f"{n}.weight" for n in read_adapter(LORA).modules}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory):
    """kind → fixtures/tiny-llama quantized by bitsandbytes through transformers and saved with save_pretrained."""
    root, made = tmp_path_factory.mktemp("bnb"), {}

    def make(kind: str) -> Path:
        if kind not in made:
            load(TINY, kind).save_pretrained(root / kind)
            made[kind] = root / kind
        return made[kind]
    return make


@pytest.fixture(scope="module", params=["nf4-double", "fp4"])
def base(request, saved) -> Path:
    return saved(request.param)


@pytest.fixture(scope="module")
def reference(base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """(the base as bitsandbytes dequantizes it, saved plain in float32; peft merge_and_unload of LORA on it)."""
    weights = state(load(base)) | bnb_dequantized(load(base))
    return plain_reference(weights, TINY, LORA, tmp_path_factory.mktemp("bnb-plain") / "plain")


@pytest.fixture(scope="module")
def kept(base: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, object]:
    """(a keep-format merge of LORA, its record, the merge's report)."""
    return kept_merge(base, LORA, tmp_path_factory.mktemp("bnb-kept"))


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_view_is_what_bitsandbytes_dequantizes(saved, kind: str) -> None:
    path = saved(kind)
    ours, theirs = dequantized_view(path), bnb_dequantized(load(path))
    plain = set(load_file(TINY / "model.safetensors"))
    assert set(ours) == plain and len(theirs) == 28  # each linear under its own name, (out, in); parts not listed
    for k, v in theirs.items():
        assert torch.equal(ours[k], v), k


def test_plain_merge_matches_peft_on_the_dequantized_model_within_one_bf16_ulp(base: Path, reference,
                                                                                tmp_path: Path) -> None:
    ref = reference[1]
    out = tmp_path / "merged"
    merge_model(base, [read_adapter(LORA)], out, dtype=torch.bfloat16, verify=True)
    got = load_file(out / "model.safetensors")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert set(got) == set(ref)  # absmax, quant maps and states dropped; each packed P.weight now (out, in)
    for k, v in got.items():
        assert v.dtype == torch.bfloat16 and within_one_bf16_ulp(v, ref[k]), k
    assert verify_merge(base, [read_adapter(LORA)], out).ok


def test_keep_format_merge_writes_peft_merge_and_unloads_bytes_on_the_4bit_model(base: Path, reference, kept) -> None:
    """peft dequantizes, adds ΔW in float32 and re-quantizes with bitsandbytes: on these inputs the sums round alike,
    so every code, absmax and nested absmax is peft's, and the quant states say the same (the JSON may differ in
    length only: it keeps the base's, see BnbCodec). Both are within the format's half step of the exact sum."""
    from peft import PeftModel

    out, _, report = kept
    assert report.update is not None and report.update.kept > 0.99 and not report.allowed_lossy
    assert json.loads((out / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    b, m = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(b) == set(m) and all(m[k].shape == b[k].shape and m[k].dtype == b[k].dtype for k in b)
    changed = {k for k in b if k.split(".weight")[0] + ".weight" in adapted()}
    assert all(torch.equal(b[k], m[k]) for k in b if k not in changed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(load(base), LORA).merge_and_unload()
    theirs, sd = bnb_dequantized(merged), merged.state_dict()
    ours, exact = dequantized_view(out), reference[1]
    codec = BnbCodec(Bnb4bit(json.loads((base / "config.json").read_text())["quantization_config"]
                             ["bnb_4bit_quant_type"]), m.__getitem__)
    stored = codec.find(ModelReader(out).shapes())
    for k in adapted():
        for part in stored[k].parts:
            if ".quant_state." in part:
                assert json.loads(bytes(m[part].tolist())) == json.loads(bytes(sd[part].tolist())), part
            else:
                assert torch.equal(m[part], sd[part].cpu()), part
        assert torch.equal(ours[k], theirs[k]), k
        assert bool(((ours[k] - exact[k]).abs() <= codec.half_step(exact[k], [m[p] for p in stored[k].parts])).all())


def test_transformers_loads_the_keep_format_merge_as_we_read_it(kept) -> None:
    out = kept[0]
    ours, theirs = dequantized_view(out), bnb_dequantized(load(out))
    assert len(theirs) == 28 and all(torch.equal(ours[k], v) for k, v in theirs.items())


def test_unmerge_with_the_record_gives_every_byte_back(base: Path, kept, tmp_path: Path) -> None:
    out, record, _ = kept
    ad = read_adapter(LORA)
    with pytest.raises(InvalidOptionError, match="stored as bitsandbytes .*record"):
        unmerge_model(out, [ad], tmp_path / "no-record")
    assert not (tmp_path / "no-record").exists()
    unmerge_model(out, [ad], tmp_path / "back", record=record)
    assert data_bytes(tmp_path / "back" / "model.safetensors") == data_bytes(base / "model.safetensors")


def test_verify_passes_on_the_merge_and_fails_on_a_merge_at_another_weight(base: Path, kept, tmp_path: Path) -> None:
    ad = read_adapter(LORA)
    assert verify_merge(base, [ad], kept[0]).ok
    merge_model(base, [(ad, -1.0)], tmp_path / "neg")
    assert not verify_merge(base, [ad], tmp_path / "neg").ok and verify_merge(base, [(ad, -1.0)], tmp_path / "neg").ok


def test_a_merge_that_rounds_the_update_away_is_refused_unless_allowed(base: Path, tmp_path: Path, cli) -> None:
    """LORA at weight 1 survives NF4/FP4 (≥ 99% of ΔW kept, above); at 1e-3 the 4-bit rounding erases it."""
    with pytest.raises(LossyMergeError, match="keeps"):
        merge_model(base, [(read_adapter(LORA), 1e-3)], tmp_path / "m")
    r = cli("merge", base, LORA, "--weight", "0.001", "-o", tmp_path / "m")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--allow-lossy" in r.stderr, r.stderr
    assert not (tmp_path / "m").exists()
    assert cli("merge", base, LORA, "--weight", "0.001", "-o", tmp_path / "m", "--allow-lossy").returncode == 0


def test_int8_merges_in_the_format_loads_back_and_unmerges_byte_for_byte(saved, tmp_path: Path) -> None:
    base = saved("int8")
    ours, theirs = dequantized_view(base), bnb_dequantized(load(base))
    assert len(theirs) == 28 and all(torch.equal(ours[k], v) for k, v in theirs.items())
    ad = read_adapter(LORA)
    report = merge_model(base, [ad], tmp_path / "m", verify=True, record=tmp_path / "m.rec")
    assert report.update is not None and report.update.kept > 0.95
    merged, back = dequantized_view(tmp_path / "m"), bnb_dequantized(load(tmp_path / "m"))
    assert all(torch.equal(merged[k], v) for k, v in back.items())
    assert sum(not torch.equal(merged[k], ours[k]) for k in adapted()) == len(adapted())
    unmerge_model(tmp_path / "m", [ad], tmp_path / "u", record=tmp_path / "m.rec")
    assert data_bytes(tmp_path / "u" / "model.safetensors") == data_bytes(base / "model.safetensors")
    merge_model(base, [ad], tmp_path / "p", dtype=torch.bfloat16, verify=True)
    assert set(load_file(tmp_path / "p" / "model.safetensors")) == set(ours)  # SCB and weight_format dropped


def test_a_tensor_no_bitsandbytes_weight_owns_is_refused_by_name(saved, tmp_path: Path) -> None:
    base = saved("nf4")
    bad = tmp_path / "bad"
    weights = load_file(base / "model.safetensors") | {"model.stray_codes": torch.zeros(8, dtype=torch.uint8)}
    model_with_weights(weights, base, bad)
    with pytest.raises(InvalidOptionError, match="model.stray_codes is stored as U8"):
        merge_model(bad, [read_adapter(LORA)], tmp_path / "m")
    wrong = {k.replace("__nf4", "__fp4"): v for k, v in load_file(base / "model.safetensors").items()}
    with pytest.raises(InvalidOptionError, match=r"\.weight\.quant_state\.bitsandbytes__fp4 holds .* is nf4"):
        BnbCodec(Bnb4bit("nf4"), wrong.__getitem__).find({k: ("U8", tuple(v.shape)) for k, v in wrong.items()})
    assert not (tmp_path / "m").exists()


def test_extract_and_inspect_base_read_a_bitsandbytes_base_dequantized(base: Path, reference, tmp_path: Path) -> None:
    """extract from the 4-bit base gives what it gives from the same weights stored plain; inspect --base of a DoRA
    adapter gives the same figures; merging that DoRA adapter into the 4-bit weights is refused by name."""
    check_quantized_base_reads_as_plain(base, reference[0], LORA, tmp_path,
                                        "stored as bitsandbytes .* and adapted by DoRA")


def _parts(x: torch.Tensor, state_json: bytes | None = None) -> list[torch.Tensor]:
    """bitsandbytes' own nested NF4 of ``x`` as BnbCodec's parts, the quant state's JSON replaced if given."""
    packed, qs = F.quantize_4bit(x, blocksize=64, compress_statistics=True, quant_type="nf4")
    d = qs.as_dict(packed=True)
    blob = d["quant_state.bitsandbytes__nf4"]
    if state_json is not None:
        blob = torch.tensor(list(state_json), dtype=torch.uint8)
    return [packed, d["absmax"], d["quant_map"], blob, d["nested_absmax"], d["nested_quant_map"]]


def test_a_requantized_quant_state_keeps_the_bases_length_and_bitsandbytes_reads_it() -> None:
    """The base's quant state fixes its byte length (every offset is planned before a tensor is computed): a new
    nested offset is written padded with spaces, or as the shortest decimal of its float32 when it would not fit;
    bitsandbytes' QuantState.from_dict reads either to the same weights; one that cannot fit is refused."""
    torch.manual_seed(7)
    codec = BnbCodec(Bnb4bit("nf4", nested=True), {}.__getitem__)
    x, y = torch.randn(64, 128) * 0.02, torch.randn(64, 128) * 0.03
    natural = bytes(_parts(y)[3].tolist())
    offset = json.loads(natural)["nested_offset"]
    short = natural.replace(json.dumps(offset).encode(), str(torch.tensor(offset).numpy()).encode())
    assert len(short) + 2 < len(natural)  # bitsandbytes writes the float64 repr of a float32: 17 digits
    for like_json in (natural + b"   ", short + b"  "):
        like = _parts(x, like_json)
        q = codec.quantize(y, like)
        assert q[3].numel() == len(like_json)
        qs = F.QuantState.from_dict({"absmax": q[1], "quant_map": q[2], "quant_state.bitsandbytes__nf4": q[3],
                                     "nested_absmax": q[4], "nested_quant_map": q[5]}, torch.device("cpu"))
        assert torch.equal(F.dequantize_4bit(q[0], qs), codec.dequantize(q))
        assert torch.equal(codec.dequantize(q), codec.dequantize(_parts(y)))  # the weights bitsandbytes writes
    tight = natural.replace(json.dumps(offset).encode(), b"0.5")
    with pytest.raises(InvalidOptionError, match="quant state needs .* bytes"):
        codec.quantize(y, _parts(x, tight))


def test_a_bfloat16_model_is_read_and_requantized_in_bfloat16_as_bitsandbytes_does(tmp_path: Path) -> None:
    """A model quantized from bfloat16: bitsandbytes dequantizes to bfloat16 (the view holds those values), and the
    merge re-quantizes the sum rounded to bfloat16, keeping the quant state's dtype. peft's merge_and_unload adds a
    float32 ΔW and quantizes the float32 sum, so its quant state says float32 and a few codes (≈0.2% here) land one
    step apart; ours is verified within the format's half step, loads back, and un-merges byte for byte."""
    from peft import PeftModel

    base = tmp_path / "bf16"
    load(TINY, "nf4-double", torch.bfloat16).save_pretrained(base)
    ours, theirs = dequantized_view(base), bnb_dequantized(load(base, dtype=torch.bfloat16))
    assert all(v.dtype == torch.bfloat16 and torch.equal(ours[k], v.float()) for k, v in theirs.items())
    ad = read_adapter(LORA)
    merge_model(base, [ad], tmp_path / "m", verify=True, record=tmp_path / "m.rec")
    merged, back = dequantized_view(tmp_path / "m"), bnb_dequantized(load(tmp_path / "m", dtype=torch.bfloat16))
    assert all(torch.equal(merged[k], v.float()) for k, v in back.items())
    m = load_file(tmp_path / "m" / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sd = PeftModel.from_pretrained(load(base, dtype=torch.bfloat16), LORA).merge_and_unload().state_dict()
    for k in adapted():
        state_key = f"{k}.quant_state.bitsandbytes__nf4"
        assert json.loads(bytes(m[state_key].tolist()))["dtype"] == "bfloat16"
        assert json.loads(bytes(sd[state_key].tolist()))["dtype"] == "float32"
        a, b = m[k].reshape(-1), sd[k].reshape(-1)
        differ = int(((a >> 4) != (b >> 4)).sum() + ((a & 15) != (b & 15)).sum())
        assert differ < 0.01 * 2 * a.numel(), (k, differ)
    unmerge_model(tmp_path / "m", [ad], tmp_path / "u", record=tmp_path / "m.rec")
    assert data_bytes(tmp_path / "u" / "model.safetensors") == data_bytes(base / "model.safetensors")
