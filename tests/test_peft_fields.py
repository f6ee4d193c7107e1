"""Every field of the installed peft's LoRA/AdaLoRA config is classified, and refusals are one line."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from loratools import read_adapter
from loratools.errors import UnsupportedConfigError
from loratools.formats.peft_fields import FIELDS, check_fields

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("cls", [peft.LoraConfig, peft.AdaLoraConfig], ids=lambda c: c.__name__)
def test_every_field_of_the_installed_peft_is_classified(cls):
    missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in FIELDS)
    assert not missing, f"peft {peft.__version__} has config fields loratools has not classified: {missing}"


def test_defaults_of_the_installed_peft_pass():
    # a config written by peft with every field at its default is accepted as it is
    for cls in (peft.LoraConfig, peft.AdaLoraConfig):
        raw = cls(target_modules=["q_proj"], total_step=10).to_dict() if cls is peft.AdaLoraConfig else \
            cls(target_modules=["q_proj"]).to_dict()
        check_fields(json.loads(json.dumps(raw, default=str)), where="cfg")


@pytest.mark.parametrize("field, value, words", [
    ("init_lora_weights", "pissa", "path_initial_model_for_weight_conversion"),
    ("init_lora_weights", "pissa_niter_4", "rewrote the base"),
    ("init_lora_weights", "olora", "rewrote the base"),
    ("init_lora_weights", "corda", "rewrote the base"),
    ("init_lora_weights", "lora_ga", "rewrote the base"),
    ("init_lora_weights", "loftq", "rewrote the base"),
    ("layer_replication", [[0, 2], [1, 3]], "replicated"),
    ("use_qalora", True, "variant"),
    ("use_bdlora", {"x": 1}, "variant"),
    ("kasa_config", {"x": 1}, "variant"),
    ("a_field_from_peft_9", 3, "does not know"),
])
def test_fields_that_change_the_meaning_are_refused_by_name(field, value, words):
    with pytest.raises(UnsupportedConfigError) as e:
        check_fields({"peft_type": "LORA", field: value}, where="adapter_config.json")
    msg = str(e.value)
    assert field in msg and words in msg and "\n" not in msg


@pytest.mark.parametrize("value", [True, False, "gaussian", "eva", "orthogonal", "mica"])
def test_initialisations_that_keep_the_base_are_accepted(value):
    check_fields({"init_lora_weights": value}, where="cfg")


def test_unknown_fields_that_are_unset_pass():
    check_fields({"some_future_field": None, "another": False, "third": {}}, where="cfg")


def test_the_cli_refuses_a_pissa_adapter_with_one_line_and_writes_nothing(adapters, tmp_path, cli):
    src = tmp_path / "pissa"
    shutil.copytree(adapters / "lora", src)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = "pissa"
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedConfigError):
        read_adapter(src)
    r = cli("merge", "fixtures/tiny-llama", src, "-o", tmp_path / "out")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "init_lora_weights" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_alora_is_kept_by_peft_and_loratools_formats_and_refused_where_it_would_be_wrong(tmp_path, cli):
    """peft 0.21.2 makes the aLoRA; it keeps its meaning in peft/loratools files, and merge, kohya and GGUF
    (which hold one fixed ΔW) refuse it with one line, writing nothing."""
    from helpers import peft_adapter, tiny_llama_model

    base = tiny_llama_model(tmp_path / "base")
    ad = peft_adapter(base, tmp_path / "ad", peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                             alora_invocation_tokens=[3, 4]))
    for to in ("peft", "loratools"):
        r = cli("convert", ad, "-o", tmp_path / f"out-{to}", "--to", to)
        assert r.returncode == 0, r.stderr
    back = json.loads((tmp_path / "out-peft" / "adapter_config.json").read_text())
    assert back["alora_invocation_tokens"] == [3, 4]
    assert read_adapter(tmp_path / "out-loratools").config.extra["alora_invocation_tokens"] == [3, 4]
    for args in (("merge", base, ad, "-o", tmp_path / "m"),
                 ("merge", base, tmp_path / "out-loratools", "-o", tmp_path / "m"),
                 ("convert", ad, "-o", tmp_path / "k.safetensors", "--to", "kohya"),
                 ("convert", ad, "-o", tmp_path / "g.gguf", "--to", "gguf", "--base", base)):
        r = cli(*args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "alora_invocation_tokens" in r.stderr, r.stderr
        assert not (tmp_path / "m").exists() and not (tmp_path / "k.safetensors").exists()
        assert not (tmp_path / "g.gguf").exists()


@pytest.mark.parametrize("lora, field", [
    ({"init_lora_weights": "pissa"}, "init_lora_weights"),
    ({"init_lora_weights": "pissa_niter_2"}, "init_lora_weights"),
    ({"init_lora_weights": "olora"}, "init_lora_weights"),
    ({"layer_replication": [[0, 1], [0, 1]]}, "layer_replication"),
], ids=["pissa", "pissa_niter", "olora", "layer_replication"])  # use_dora: implemented since the DoRA merge
def test_adapters_peft_makes_that_loratools_cannot_compute_are_refused(lora, field, tmp_path, cli):
    from helpers import peft_adapter, tiny_llama_model

    base = tiny_llama_model(tmp_path / "base")
    ad = peft_adapter(base, tmp_path / "ad", peft.LoraConfig(r=2, target_modules=["q_proj"], **lora))
    for args in (("merge", base, ad, "-o", tmp_path / "out"), ("convert", ad, "-o", tmp_path / "out", "--to", "peft"),
                 ("inspect", ad)):
        r = cli(*args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and field in r.stderr, r.stderr
        assert not (tmp_path / "out").exists()
