"""DoRA → plain LoRA (convert --as-lora) against the dense float64 Eckart–Young optimum of peft's own update,
and the CLI's DoRA lines (merge, unmerge refusal, kohya without a base)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from loratools import read_adapter
from loratools.io import ModelReader

from dora_models import llama_dora

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "fixtures" / "tiny-llama"


@pytest.fixture(scope="module")
def dora(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    out = tmp_path_factory.mktemp("dora") / "ad"
    return out, llama_dora(TINY, out, targets=["q_proj", "o_proj", "down_proj"], seed=3)


@pytest.mark.parametrize("rank", [4, 16])
def test_as_lora_error_is_the_eckart_young_optimum(dora, rank: int, cli, tmp_path: Path) -> None:
    ad_dir, ref = dora
    proc = cli("convert", ad_dir, "-o", tmp_path / "lora", "--to", "peft", "--base", TINY, "--as-lora",
               "--rank", rank)
    assert proc.returncode == 0, proc.stderr
    lora = read_adapter(tmp_path / "lora")
    assert not lora.is_dora and all(m.rank == rank for m in lora.modules.values())
    with ModelReader(TINY) as base:
        for name, m in lora.items():
            w0 = base.get(f"{name}.weight").double()
            D = ref[f"{name}.weight"].double() - w0  # peft's own DoRA update
            s = torch.linalg.svdvals(D)
            optimum = float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())
            got = float(torch.linalg.vector_norm(D - m.delta(dtype=torch.float64)) / torch.linalg.vector_norm(D))
            assert optimum > 1e-3  # the update is not low-rank: there is an error to match
            assert abs(got - optimum) <= 0.01 * optimum + 1e-6, (name, got, optimum)
            assert f"{name}: DoRA update flattened to LoRA, relative error" in proc.stdout


def test_kohya_and_gguf_need_the_base_and_unmerge_needs_the_record(dora, cli, tmp_path: Path) -> None:
    ad_dir, _ = dora
    for to, out in (("kohya", "k.safetensors"), ("gguf", "a.gguf")):
        proc = cli("convert", ad_dir, "-o", tmp_path / out, "--to", to)
        assert proc.returncode == 2 and "DoRA" in proc.stderr and "--base" in proc.stderr and "--as-lora" in proc.stderr
        assert not (tmp_path / out).exists()
    proc = cli("convert", ad_dir, "-o", tmp_path / "k.safetensors", "--to", "kohya", "--base", TINY, "--as-lora",
               "--energy", "0.99")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("Traceback") == 0

    assert cli("merge", TINY, ad_dir, "-o", tmp_path / "m").returncode == 0
    proc = cli("unmerge", tmp_path / "m", ad_dir, "-o", tmp_path / "u")
    assert proc.returncode == 2 and "--record" in proc.stderr and not (tmp_path / "u").exists()


def test_inspect_reports_magnitude_change_and_the_full_update(dora, cli) -> None:
    import json

    from loratools.io import load_safetensors

    ad_dir, ref = dora
    proc = cli("inspect", ad_dir, "--base", TINY, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["dora"] is True
    raw, _ = load_safetensors(ad_dir / "adapter_model.safetensors")
    with ModelReader(TINY) as base:
        for layer in report["layers"]:
            name = layer["name"]
            w0 = base.get(f"{name}.weight").double()
            m = raw[f"base_model.model.{name}.lora_magnitude_vector"].double()
            row = torch.linalg.norm(w0, dim=1)
            assert layer["dora"]["magnitude_change"] == pytest.approx(float((m - row).norm() / row.norm()), rel=1e-9)
            D = ref[f"{name}.weight"].double() - w0
            assert layer["dora"]["update"]["fro_norm"] == pytest.approx(float(D.norm()), rel=1e-4)
            assert layer["dora"]["update"]["numerical_rank"] > layer["rank"]  # W′ − W0 is not low-rank
    proc = cli("inspect", ad_dir, "--base", TINY)
    assert proc.returncode == 0 and "magnitude change" in proc.stdout
    assert "DoRA model.layers.0.self_attn.q_proj: ‖m‖" in cli("inspect", ad_dir).stdout


@pytest.mark.parametrize("command", [["resize", "--rank", "2"], ["prune", "--budget", "4"], ["combine"]])
def test_low_rank_jobs_refuse_dora(dora, cli, tmp_path: Path, command: list[str]) -> None:
    ad_dir, _ = dora
    args = [command[0], ad_dir, *([ad_dir] if command[0] == "combine" else []), "-o", tmp_path / "o", *command[1:]]
    proc = cli(*args)
    assert proc.returncode == 2 and "DoRA" in proc.stderr and not (tmp_path / "o").exists()
