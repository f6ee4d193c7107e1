"""mlx-lm's adapter directory: read and written against mlx-lm 0.32.2 itself, when its venv is present.

The producer tests run mlx (``.venv-mlx``: ``python3 -m venv .venv-mlx && .venv-mlx/bin/pip install
mlx==0.32.4 mlx-cpu==0.32.4 mlx-lm==0.32.2``) in a subprocess (``tests/mlx_producer.py``); the others pin
the rules of ``mlx_lm/tuner/lora.py`` and ``dora.py`` on generated adapters.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loratools as lt
from conftest import ROOT, run_cli
from loratools.adapter import Adapter, Module
from loratools.dora import merged_weight
from loratools.formats import detect_format, read_adapter, write_adapter

MLX_PYTHON = ROOT / ".venv-mlx" / "bin" / "python"
# the marker `make mlx` writes once the install succeeded (a half-made venv must skip, not fail)
needs_mlx = pytest.mark.skipif(not (ROOT / ".venv-mlx" / ".installed").is_file(),
                               reason="no .venv-mlx (mlx + mlx-lm 0.32.2; `make mlx`) to run the producer")


def _mlx(*args: object) -> None:
    subprocess.run([str(MLX_PYTHON), str(ROOT / "tests" / "mlx_producer.py"), *map(str, args)], check=True,
                   timeout=300, capture_output=True)


def _fused_deltas_match(adapter: Adapter, base: dict[str, torch.Tensor], fused: dict[str, torch.Tensor]) -> None:
    adapted = {f"{n}.weight" for n in adapter.modules}
    for name, m in adapter.items():
        w0 = base[f"{name}.weight"]
        want = merged_weight(w0, m) if m.is_dora else w0 + m.delta()
        torch.testing.assert_close(fused[f"{name}.weight"], want, rtol=1e-5, atol=1e-6)
    for key, w in base.items():  # what the adapter does not hold, mlx-lm's fuse leaves alone
        if key not in adapted:
            assert torch.equal(fused[key], w), key


@needs_mlx
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_reads_what_mlx_lm_writes_with_mlx_lm_fused_weight(tmp_path: Path, kind: str) -> None:
    _mlx("produce", tmp_path, kind)
    assert detect_format(tmp_path / "adapter") == "mlx"
    adapter = read_adapter(tmp_path / "adapter")
    assert adapter.is_dora == (kind == "dora") and {m.rank for m in adapter.modules.values()} == {4}
    assert sorted(adapter.modules)[0] == "model.layers.1.mlp.down_proj" and len(adapter.modules) == 6
    assert all(m.scale == 10.0 for m in adapter.modules.values())  # the config's scale as is, not scale/rank
    _fused_deltas_match(adapter, load_file(tmp_path / "base.safetensors"), load_file(tmp_path / "fused.safetensors"))


@needs_mlx
@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_mlx_lm_loads_what_loratools_writes_after_a_trip_through_peft(tmp_path: Path, kind: str) -> None:
    _mlx("produce", tmp_path, kind)
    lt.convert_file(tmp_path / "adapter", tmp_path / "peft", to="peft")
    assert detect_format(tmp_path / "peft") == "peft"
    res = lt.convert_file(tmp_path / "peft", tmp_path / "back", to="mlx")
    assert res.max_error < 1e-6 and res.format == "mlx"
    _mlx("load", tmp_path, tmp_path / "back")
    fused, loaded = load_file(tmp_path / "fused.safetensors"), load_file(tmp_path / "loaded.safetensors")
    assert fused.keys() == loaded.keys()
    for key in fused:
        torch.testing.assert_close(loaded[key], fused[key], rtol=1e-5, atol=1e-6)


def _mixed(dora: bool = False) -> Adapter:
    """Two ranks and two scales (mlx holds one of each) in llama names."""
    g = torch.Generator().manual_seed(3)
    mods = {}
    for i, (p, r, s) in enumerate([("self_attn.q_proj", 2, 2.0), ("self_attn.v_proj", 4, 0.5), ("mlp.down_proj", 4, 2.0)]):
        out, inn = (8, 12) if p == "mlp.down_proj" else (8, 8)
        mag = torch.rand(out, generator=g) + 0.5 if dora else None
        mods[f"model.layers.{i}.{p}"] = Module(A=torch.randn(r, inn, generator=g), B=torch.randn(out, r, generator=g),
                                               alpha=s * r, scale=s, magnitude=mag)
    return Adapter(mods, lt.AdapterConfig(extra={"lora_dropout": 0.1}))


def test_round_trip_folds_scales_and_pads_ranks_with_the_same_delta(tmp_path: Path) -> None:
    src = _mixed()
    write_adapter(src, tmp_path / "a", format="mlx")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg == {"fine_tune_type": "lora", "num_layers": -1,
                   "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.1,
                                       "keys": ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"]}}
    tensors = load_file(tmp_path / "a" / "adapters.safetensors")
    assert tensors["model.layers.0.self_attn.q_proj.lora_a"].shape == (8, 4)  # (in, r), rank padded
    assert tensors["model.layers.2.mlp.down_proj.lora_b"].shape == (4, 8)  # (r, out)
    back = read_adapter(tmp_path / "a")
    for name, m in src.items():
        torch.testing.assert_close(back.delta(name), m.delta(), rtol=1e-6, atol=1e-6)
    # the same ΔW through convert's own check, both ways
    write_adapter(src, tmp_path / "p", format="peft")
    assert lt.convert_file(tmp_path / "p", tmp_path / "m", to="mlx").max_error < 1e-6
    assert lt.convert_file(tmp_path / "m", tmp_path / "p2", to="peft").max_error < 1e-6


def test_num_layers_reaches_the_lowest_layer_when_the_base_is_known(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps({"num_hidden_layers": 16}))
    write_adapter(_mixed(), tmp_path / "a", format="mlx", base=lt.formats.load_base(tmp_path / "base"))
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["num_layers"] == 16


def test_dora_magnitude_is_kept(tmp_path: Path) -> None:
    src = _mixed(dora=True)
    write_adapter(src, tmp_path / "a", format="mlx")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["fine_tune_type"] == "dora"
    back = read_adapter(tmp_path / "a")
    w0 = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    for name, m in src.items():
        assert back.modules[name].magnitude is not None
        assert torch.equal(back.modules[name].magnitude, m.magnitude)
        if m.weight_shape == (8, 8):
            torch.testing.assert_close(merged_weight(w0, back.modules[name]), merged_weight(w0, m))
    write_adapter(src, tmp_path / "p", format="peft")
    assert lt.convert_file(tmp_path / "p", tmp_path / "m", to="mlx").max_error < 1e-6
    assert read_adapter(tmp_path / "m").is_dora


def _damage(d: Path, change) -> None:
    cfg = json.loads((d / "adapter_config.json").read_text())
    change(cfg)
    (d / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(("change", "named"), [
    (lambda c: c["lora_parameters"].pop("scale"), "scale missing"),
    (lambda c: c["lora_parameters"].update(scale="big"), "scale = 'big'"),
    (lambda c: c["lora_parameters"].update(rank=0), "rank = 0"),
    (lambda c: c["lora_parameters"].update(rank=3), "shape mismatch"),
    (lambda c: c["lora_parameters"].update(dropout=1.5), "dropout = 1.5"),
    (lambda c: c.pop("num_layers"), "num_layers missing"),
    (lambda c: c.update(fine_tune_type="full"), "full fine-tune"),
    (lambda c: c.update(fine_tune_type="dora"), "model.layers.0.self_attn.q_proj.m is missing"),
    (lambda c: c["lora_parameters"].update(keys=["self_attn.q_proj"]), "not in lora_parameters.keys"),
    (lambda c: c.update(lora_parameters=[4]), "lora_parameters = [4]"),
])
def test_damaged_config_is_one_line_exit_2_and_nothing_written(tmp_path: Path, change, named: str) -> None:
    write_adapter(_mixed(), tmp_path / "a", format="mlx")
    _damage(tmp_path / "a", change)
    res = run_cli("convert", tmp_path / "a", "-o", tmp_path / "out", "--to", "peft")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and named in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


def test_what_mlx_cannot_hold_is_named(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    emb = Module(A=torch.randn(2, 10, generator=g), B=torch.randn(8, 2, generator=g), alpha=2, scale=1.0,
                 kind="embedding")
    src = Adapter({**_mixed().modules, "model.embed_tokens": emb}, lt.AdapterConfig())
    write_adapter(src, tmp_path / "p", format="peft")
    res = run_cli("convert", tmp_path / "p", "-o", tmp_path / "out", "--to", "mlx")
    assert res.returncode == 2 and "mlx cannot hold model.embed_tokens" in res.stderr
    assert res.stderr.count("\n") == 1 and not (tmp_path / "out").exists()
    res = lt.convert_file(tmp_path / "p", tmp_path / "out", to="mlx", drop_unsupported=True)
    assert list(res.dropped) == ["model.embed_tokens"]


def test_alora_is_refused_not_written_as_plain_lora(tmp_path: Path) -> None:
    src = _mixed()
    alora = Adapter(dict(src.modules), lt.AdapterConfig(extra={"alora_invocation_tokens": [5, 6]}))
    with pytest.raises(lt.LoraToolsError, match="activated LoRA"):
        write_adapter(alora, tmp_path / "a", format="mlx")
    assert not (tmp_path / "a").exists()
