"""Adapters made by the real peft 0.21.2 with the features people use, merged by loratools and compared
with peft's own ``merge_and_unload`` (float32, 1e-6): tied embeddings, embedding LoRA with its saved
base layer, older key spellings, Conv1d/Conv3d, ``bias`` and ``lora_bias``."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import peft_merged, state, tiny_llama_model
from loratools import read_adapter
from loratools.io import ModelReader
from loratools.merge.jobs import merge_model, unmerge_model, verify_merge

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOL = 1e-6
IDS = torch.tensor([[1, 7, 3, 49, 0, 12, 5]])


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {"tied": tiny_llama_model(root / "tied", tie_word_embeddings=True),
            "untied": tiny_llama_model(root / "untied", seed=1),
            "biased": tiny_llama_model(root / "biased", seed=2, attention_bias=True)}


def make_adapter(base: Path, out: Path, seed: int = 0, **lora) -> Path:
    """A peft adapter on ``base`` with every trainable tensor (factors, modules_to_save copies, biases) random."""
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, **lora))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in pm.named_parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        pm.save_pretrained(out)
    return out


def load_merged(path: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def assert_same_model(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    a, b = state(ours), state(ref)
    assert set(a) == set(b)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < TOL
    assert ours.config.tie_word_embeddings == ref.config.tie_word_embeddings
    with torch.no_grad():
        assert float((ours(IDS).logits - ref(IDS).logits).abs().max()) < 1e-5


@pytest.mark.parametrize("saved", ["embed_tokens", "lm_head"])
def test_modules_to_save_on_tied_embeddings_unties_them_as_peft_does(saved, bases, tmp_path, cli):
    ad = make_adapter(bases["tied"], tmp_path / "ad", target_modules=["q_proj"], modules_to_save=[saved])
    ref = peft_merged(bases["tied"], ad)
    assert ref.config.tie_word_embeddings is False  # what peft does: the pair is untied
    r = cli("merge", bases["tied"], ad, "-o", tmp_path / "m", "--verify")
    assert r.returncode == 0, r.stderr
    assert "untied" in r.stderr and "tie_word_embeddings: false" in r.stderr
    assert json.loads((tmp_path / "m" / "config.json").read_text())["tie_word_embeddings"] is False
    assert "lm_head.weight" in ModelReader(tmp_path / "m").spans
    assert_same_model(load_merged(tmp_path / "m"), ref)


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_lora_on_a_tied_embedding_changes_both_as_peft_does(target, bases, tmp_path, cli):
    ad = make_adapter(bases["tied"], tmp_path / "ad", target_modules=[target])
    keys = load_file(ad / "adapter_model.safetensors")
    assert any(k.endswith(".base_layer.weight") for k in keys)  # peft's default save_embedding_layers="auto"
    ref = peft_merged(bases["tied"], ad)
    r = cli("merge", bases["tied"], ad, "-o", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    assert "output head too" in r.stderr
    assert "lm_head.weight" not in ModelReader(tmp_path / "m").spans
    assert_same_model(load_merged(tmp_path / "m"), ref)
    assert verify_merge(bases["tied"], [read_adapter(ad)], tmp_path / "m", device="cpu").ok


def test_embedding_lora_with_its_saved_base_layer_merges_weighted_and_unmerges_exactly(bases, tmp_path):
    base = bases["untied"]
    ad_dir = make_adapter(base, tmp_path / "ad", target_modules=["embed_tokens", "q_proj"])
    ref = state(peft_merged(base, ad_dir))
    w0 = state(load_merged(base))
    ad = read_adapter(ad_dir)
    merge_model(base, [(ad, 0.5)], tmp_path / "m", device="cpu")  # the saved copy is the base's own: weight is free
    ours = state(load_merged(tmp_path / "m"))
    for k in ours:
        assert float((ours[k] - (w0[k] + 0.5 * (ref[k] - w0[k]))).abs().max()) < TOL, k
    merge_model(base, [(ad, 1.0)], tmp_path / "m1", device="cpu")
    unmerge_model(tmp_path / "m1", [(ad, 1.0)], tmp_path / "u", device="cpu")
    back = ModelReader(tmp_path / "u")
    assert torch.equal(back.get("model.embed_tokens.weight"), w0["model.embed_tokens.weight"])  # the saved copy


def test_a_saved_base_layer_that_differs_replaces_the_base_as_peft_loads_it(bases, tmp_path):
    base = bases["untied"]
    ad = make_adapter(base, tmp_path / "ad", target_modules=["embed_tokens"])
    f = ad / "adapter_model.safetensors"
    tensors = load_file(f)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    tensors[key] = tensors[key] + 0.25
    save_file(tensors, f)
    ref = peft_merged(base, ad)
    merge_model(base, [read_adapter(ad)], tmp_path / "m", device="cpu")
    assert_same_model(load_merged(tmp_path / "m"), ref)
    with pytest.raises(Exception, match="cannot be weighted"):
        merge_model(base, [(read_adapter(ad), 0.5)], tmp_path / "m2", device="cpu")
    assert not (tmp_path / "m2").exists()


def test_older_key_spellings_with_the_adapter_name(bases, tmp_path):
    base = bases["untied"]
    ad = make_adapter(base, tmp_path / "ad", target_modules=["q_proj", "embed_tokens"])
    f = ad / "adapter_model.safetensors"
    renamed = {}
    for k, t in load_file(f).items():
        for part in (".lora_A.weight", ".lora_B.weight"):
            k = k.replace(part, part.replace(".weight", ".default.weight"))
        if k.endswith(("lora_embedding_A", "lora_embedding_B")):
            k += ".default"
        renamed[k] = t
    assert any(".default" in k for k in renamed)
    save_file(renamed, f)
    ref = peft_merged(base, ad)  # peft still loads these keys
    merge_model(base, [read_adapter(ad)], tmp_path / "m", device="cpu")
    assert_same_model(load_merged(tmp_path / "m"), ref)


@pytest.mark.parametrize("lora", [{"bias": "all"}, {"bias": "lora_only"}, {"lora_bias": True}],
                         ids=["bias-all", "bias-lora_only", "lora_bias"])
def test_trained_biases_and_lora_bias(lora, bases, tmp_path, cli):
    base = bases["biased"]
    ad = make_adapter(base, tmp_path / "ad", target_modules=["q_proj", "v_proj"], **lora)
    ref = peft_merged(base, ad)
    merge_model(base, [read_adapter(ad)], tmp_path / "m", device="cpu")
    ours = load_merged(tmp_path / "m")
    assert not torch.equal(state(ours)["model.layers.0.self_attn.q_proj.bias"],
                           state(load_merged(base))["model.layers.0.self_attn.q_proj.bias"])
    assert_same_model(ours, ref)
    assert verify_merge(base, [read_adapter(ad)], tmp_path / "m", device="cpu").ok
    r = cli("convert", ad, "-o", tmp_path / "k.safetensors", "--to", "kohya")
    assert r.returncode == 2 and "q_proj" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "k.safetensors").exists()


def test_lora_bias_round_trips_through_peft_and_loratools_formats(bases, tmp_path, cli):
    ad = make_adapter(bases["biased"], tmp_path / "ad", target_modules=["q_proj"], lora_bias=True)
    for to in ("peft", "loratools"):
        out = tmp_path / f"out-{to}"
        assert cli("convert", ad, "-o", out, "--to", to).returncode == 0
    merge_model(bases["biased"], [read_adapter(tmp_path / "out-peft")], tmp_path / "m", device="cpu")
    assert_same_model(load_merged(tmp_path / "m"), peft_merged(bases["biased"], ad))
    back = read_adapter(tmp_path / "out-loratools")
    name = "model.layers.0.self_attn.q_proj"
    assert torch.equal(back.modules[name].bias, read_adapter(ad).modules[name].bias)


class Convs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv1d(4, 6, 3)
        self.c2 = torch.nn.Conv2d(3, 5, (2, 3))
        self.c3 = torch.nn.Conv3d(2, 5, (2, 3, 2))


@pytest.mark.parametrize("lora_bias", [False, True])
def test_conv1d_conv2d_conv3d(lora_bias, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = Convs()
    w0 = state(model)
    save_file(w0, tmp_path / "base.safetensors")
    pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=3, target_modules=["c1", "c2", "c3"], lora_bias=lora_bias))
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    pm.save_pretrained(tmp_path / "ad")
    ref = state(pm.merge_and_unload())
    ad = read_adapter(tmp_path / "ad")
    assert {m.A.ndim for m in ad.modules.values()} == {3, 4, 5}
    merge_model(tmp_path / "base.safetensors", [ad], tmp_path / "m.safetensors", device="cpu")
    ours = ModelReader(tmp_path / "m.safetensors")
    assert max(float((ours.get(k) - ref[k]).abs().max()) for k in ref) < TOL
    assert verify_merge(tmp_path / "base.safetensors", [ad], tmp_path / "m.safetensors", device="cpu").ok
    unmerge_model(tmp_path / "m.safetensors", [ad], tmp_path / "u.safetensors", device="cpu")
    back = ModelReader(tmp_path / "u.safetensors")
    assert max(float((back.get(k) - v).abs().max()) for k, v in w0.items()) < TOL
    if not lora_bias:  # kohya holds convolutions of every dimension (checked ΔW by ΔW on the way)
        assert read_adapter(tmp_path / "ad").modules["c3"].A.ndim == 5
        from loratools.convert import convert_file

        convert_file(tmp_path / "ad", tmp_path / "k.safetensors", to="kohya")
        merge_model(tmp_path / "base.safetensors", [read_adapter(tmp_path / "k.safetensors")], tmp_path / "mk.safetensors",
                    device="cpu")
        mk = ModelReader(tmp_path / "mk.safetensors")
        assert max(float((mk.get(k) - ref[k]).abs().max()) for k in ref) < TOL


@pytest.mark.parametrize("base_name, lora", [
    ("untied", {"target_modules": ["q_proj"], "trainable_token_indices": [1, 7, 3]}),
    ("tied", {"target_modules": ["q_proj"], "trainable_token_indices": {"embed_tokens": [4, 2]}}),
    ("untied", {"target_modules": ["embed_tokens"], "trainable_token_indices": {"lm_head": [0, 9]}}),
], ids=["list", "tied-dict", "lm_head-beside-embedding-lora"])
def test_trainable_tokens(base_name, lora, bases, tmp_path, cli):
    base = bases[base_name]
    ad = make_adapter(base, tmp_path / "ad", **lora)
    assert any(k.endswith("trainable_tokens_delta") for k in load_file(ad / "adapter_model.safetensors"))
    ref = peft_merged(base, ad)
    rec = tmp_path / "rec.safetensors"
    r = cli("merge", base, ad, "-o", tmp_path / "m", "--record", rec, "--verify")
    assert r.returncode == 0, r.stderr
    assert_same_model(load_merged(tmp_path / "m"), ref)

    r = cli("merge", base, ad, "-o", tmp_path / "w", "--weight", "0.5")
    assert r.returncode == 2 and "trainable_token_indices" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = cli("unmerge", tmp_path / "m", ad, "-o", tmp_path / "u")
    assert r.returncode == 2 and "record" in r.stderr, r.stderr
    assert not (tmp_path / "w").exists() and not (tmp_path / "u").exists()
    assert cli("unmerge", tmp_path / "m", ad, "-o", tmp_path / "u", "--record", rec).returncode == 0
    w0, back = ModelReader(base), ModelReader(tmp_path / "u")
    assert all(torch.equal(back.get(k), w0.get(k)) for k in w0.spans)
    r = cli("convert", ad, "-o", tmp_path / "k.safetensors", "--to", "kohya")
    assert r.returncode == 2 and "trainable tokens" in r.stderr, r.stderr


def test_trainable_token_rows_that_do_not_match_the_indices_are_refused(bases, tmp_path, cli):
    ad = make_adapter(bases["untied"], tmp_path / "ad", target_modules=["q_proj"], trainable_token_indices=[1, 2])
    cfg = json.loads((ad / "adapter_config.json").read_text())
    (ad / "adapter_config.json").write_text(json.dumps({**cfg, "trainable_token_indices": [1, 2, 3]}))
    r = cli("merge", bases["untied"], ad, "-o", tmp_path / "m")
    assert r.returncode == 2 and "trainable_token_indices" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "m").exists()
