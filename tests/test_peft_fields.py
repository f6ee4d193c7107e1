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
    ("alora_invocation_tokens", [1, 2, 3], "invocation tokens"),
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
