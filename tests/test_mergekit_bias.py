"""``lora_B.bias`` on only some modules, as mergekit 0.1.5 extracts Qwen2 (q/k/v biases; o_proj and the MLP none).

peft's ``lora_bias`` is one flag for every module: a file that says ``lora_bias: true`` gives every ``lora_B`` a bias,
and peft 0.21.2's ``merge_and_unload`` raises where the base layer has none. So a peft file of such an adapter is
written only where it merges (a zero bias on a module whose base layer has one, shown by ``--base``), or refused by
name; ``loratools merge`` of the adapter itself stays W0 + s·BA and bias0 + s·b (dense float64 reference). The
adapter is built here in mergekit's layout (peft keys, ``lora_B.bias`` where Qwen2 has biases).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file, save_file

pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import PeftModel  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from loratools.formats import read_adapter  # noqa: E402
from loratools.formats.peft import CONFIG_NAME, WEIGHTS_NAME, peft_config, peft_tensors  # noqa: E402

R, ALPHA = 2, 4.0
S = ALPHA / R
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer Qwen2: biases on q/k/v only, as every Qwen2."""
    path = tmp_path_factory.mktemp("qwen2")
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, vocab_size=50, tie_word_embeddings=False)).save_pretrained(path)
    return path


def _adapter(base: Path, out: Path, *, targets: tuple[str, ...] = ALL, biased: tuple[str, ...] | None = None) -> Path:
    """A peft-layout adapter on ``targets`` with ``lora_B.bias`` on ``biased`` (default: where the base has a bias)."""
    w = load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    t = {}
    for key in sorted(w):
        m = key[: -len(".weight")]
        if not key.endswith(".weight") or m.rsplit(".", 1)[-1] not in targets:
            continue
        n_out, n_in = w[key].shape
        t[f"base_model.model.{m}.lora_A.weight"] = torch.randn(R, n_in, generator=g) * 0.1
        t[f"base_model.model.{m}.lora_B.weight"] = torch.randn(n_out, R, generator=g) * 0.1
        if (f"{m}.bias" in w) if biased is None else m.rsplit(".", 1)[-1] in biased:
            t[f"base_model.model.{m}.lora_B.bias"] = torch.randn(n_out, generator=g) * 0.1
    out.mkdir()
    save_file(t, str(out / WEIGHTS_NAME))
    (out / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": R,
                                               "lora_alpha": ALPHA, "target_modules": list(targets)}))
    return out


def _dense(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The base's tensors plus s·BA on each weight and s·b on each bias, in float64."""
    w = {k: v.double() for k, v in load_file(str(base / "model.safetensors")).items()}
    for k, v in load_file(str(adapter / WEIGHTS_NAME)).items():
        m = k.removeprefix("base_model.model.").split(".lora_")[0]
        if k.endswith("lora_B.weight"):
            A = load_file(str(adapter / WEIGHTS_NAME))[k.replace("lora_B", "lora_A")].double()
            w[f"{m}.weight"] = w[f"{m}.weight"] + S * v.double() @ A
        elif k.endswith("lora_B.bias"):
            w[f"{m}.bias"] = w[f"{m}.bias"] + S * v.double()
    return w


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    model = PeftModel.from_pretrained(Qwen2ForCausalLM.from_pretrained(base, dtype=torch.float64), adapter)
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


def test_peft_cannot_merge_zero_biases_where_the_base_layer_has_none(qwen2: Path, tmp_path: Path) -> None:
    """Why the rule exists: the file loratools used to write (``lora_bias: true``, zero biases on o_proj/MLP)."""
    adapter = read_adapter(_adapter(qwen2, tmp_path / "mk"))
    old = tmp_path / "old"
    old.mkdir()
    save_file(peft_tensors(adapter), str(old / WEIGHTS_NAME))
    (old / CONFIG_NAME).write_text(json.dumps(peft_config(adapter)))
    with pytest.raises(RuntimeError, match="Impossible to merge LoRA with `lora_bias=True`"):
        _peft_merged(qwen2, old)


@pytest.mark.parametrize("with_base", [False, True])
def test_convert_to_peft_refuses_biases_on_only_some_modules_by_name(qwen2: Path, tmp_path: Path,
                                                                     with_base: bool) -> None:
    src = _adapter(qwen2, tmp_path / "mk")
    out = tmp_path / "out"
    r = run_cli("convert", src, "-o", out, "--to", "peft", *(("--base", qwen2) if with_base else ()))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "lora_B.bias on only some modules (mergekit)" in r.stderr and "loratools merge" in r.stderr
    assert "model.layers.0.mlp.down_proj" in r.stderr and "--drop-unsupported" in r.stderr
    assert not out.exists()


def test_drop_unsupported_keeps_the_biased_modules_and_peft_merges_them_exactly(qwen2: Path, tmp_path: Path) -> None:
    src = _adapter(qwen2, tmp_path / "mk")
    out = tmp_path / "out"
    r = run_cli("convert", src, "-o", out, "--to", "peft", "--drop-unsupported")
    assert r.returncode == 0, r.stderr
    kept = {k.removeprefix("base_model.model.").split(".lora_")[0] for k in load_file(str(out / WEIGHTS_NAME))}
    assert {m.rsplit(".", 1)[-1] for m in kept} == {"q_proj", "k_proj", "v_proj"}
    merged, dense = _peft_merged(qwen2, out), _dense(qwen2, out)
    changed = {k for k in dense if not torch.equal(dense[k], load_file(str(qwen2 / "model.safetensors"))[k].double())}
    assert changed == {f"{m}.{p}" for m in kept for p in ("weight", "bias")}
    for k, v in dense.items():
        assert torch.allclose(merged[k], v, rtol=1e-12, atol=1e-12), k


def test_zero_biases_are_written_where_base_shows_every_layer_has_a_bias(qwen2: Path, tmp_path: Path) -> None:
    """q/k/v all have base biases; only q_proj's lora_B has one: zeros on k/v are exact and peft merges them as
    loratools merges the source."""
    src = _adapter(qwen2, tmp_path / "mk", targets=("q_proj", "k_proj", "v_proj"), biased=("q_proj",))
    refused = run_cli("convert", src, "-o", tmp_path / "nobase", "--to", "peft")
    assert refused.returncode == 2 and "lora_B.bias on only some modules" in refused.stderr
    out = tmp_path / "out"
    r = run_cli("convert", src, "-o", out, "--to", "peft", "--base", qwen2)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / CONFIG_NAME).read_text())["lora_bias"] is True
    ours = run_cli("merge", qwen2, src, "-o", tmp_path / "merged", "--precision", "float64")
    assert ours.returncode == 0, ours.stderr
    peft_m, dense = _peft_merged(qwen2, out), _dense(qwen2, src)
    got = load_file(str(tmp_path / "merged" / "model.safetensors"))
    for k, v in dense.items():
        assert torch.allclose(peft_m[k], v, rtol=1e-12, atol=1e-12), k
        assert torch.allclose(got[k].double(), v, rtol=2**-23, atol=1e-9), k


def test_loratools_merge_of_a_mergekit_adapter_adds_s_ba_and_s_b(qwen2: Path, tmp_path: Path) -> None:
    src = _adapter(qwen2, tmp_path / "mk")
    r = run_cli("merge", qwen2, src, "-o", tmp_path / "merged", "--precision", "float64")
    assert r.returncode == 0, r.stderr
    base = load_file(str(qwen2 / "model.safetensors"))
    got, dense = load_file(str(tmp_path / "merged" / "model.safetensors")), _dense(qwen2, src)
    assert {k for k in base if not torch.equal(base[k], got[k])} == {
        f"model.layers.0.{p}.{t}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        for t in ("weight", "bias")} | {f"model.layers.0.{p}.weight" for p in
                                         ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    for k, v in dense.items():
        assert torch.allclose(got[k].double(), v, rtol=2**-23, atol=1e-9), k


def test_embeddings_beside_lora_bias_are_named_since_peft_gives_them_none(qwen2: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    from loratools.formats.peft import peft_unsupported

    adapter = read_adapter(_adapter(qwen2, tmp_path / "mk", targets=("q_proj",)))
    q = next(iter(adapter.modules.values()))
    emb = replace(q, A=torch.zeros(R, 50), B=torch.zeros(32, R), kind="embedding", bias=None)
    both = adapter.with_modules({**adapter.modules, "model.embed_tokens": emb})
    assert "embeddings" in peft_unsupported(both)["model.embed_tokens"]
    assert peft_unsupported(adapter) == {}


def test_biases_peft_would_drop_are_applied_and_said_so(qwen2: Path, tmp_path: Path) -> None:
    """mergekit's config has no lora_bias: peft 0.21.2 builds lora_B without a bias and drops the file's biases
    when it loads it (checked here), so a loratools merge, which adds s·b as the file says, tells the user."""
    adapter = _adapter(qwen2, tmp_path / "a")
    model = PeftModel.from_pretrained(Qwen2ForCausalLM.from_pretrained(qwen2), adapter)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].bias is None  # dropped
    done = run_cli("merge", qwen2, adapter, "-o", tmp_path / "merged")
    assert done.returncode == 0, done.stderr
    said = " ".join(done.stderr.split())
    assert "3 module(s) hold lora_B.bias but adapter_config.json does not set lora_bias" in said
    assert "peft 0.21.2 drops them" in said
    shown = run_cli("convert", adapter, "-o", tmp_path / "k", "--to", "peft", "--drop-unsupported")
    assert "does not set lora_bias" in " ".join((shown.stdout + shown.stderr).split())
