"""The merge/unmerge/verify CLI: bad inputs, atomic output, a merge killed half way."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import sharded_model
from loratools import Adapter, AdapterConfig, Module, write_adapter
from loratools.io import load_safetensors, save_safetensors

ROOT = Path(__file__).resolve().parent.parent


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loratools: error:"), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def _says_exact(stdout: str) -> bool:
    """The unmerge summary claims a bit-exact restore (a bare ``"exact" in stdout`` also matches "not exact")."""
    return any(line.startswith("exact:") for line in stdout.splitlines()) and "not exact" not in stdout


def _no_leftovers(d: Path) -> None:
    assert not [p for p in d.iterdir() if ".tmp-" in p.name]


def test_merge_unmerge_verify_round_trip(cli, tiny_llama: Path, adapters: Path, tmp_path: Path) -> None:
    r = cli("merge", tiny_llama, adapters / "lora", "-o", tmp_path / "m", "--record", tmp_path / "rec.safetensors",
            "--verify")
    assert r.returncode == 0, r.stderr
    assert "verify: 8 merged tensors" in r.stdout and "record" in r.stdout
    r = cli("verify", tiny_llama, adapters / "lora", tmp_path / "m")
    assert r.returncode == 0 and "verify: ok" in r.stdout
    r = cli("unmerge", tmp_path / "m", adapters / "lora", "-o", tmp_path / "u", "--record", tmp_path / "rec.safetensors")
    assert r.returncode == 0, r.stderr
    assert _says_exact(r.stdout), r.stdout
    base, _ = load_safetensors(tiny_llama / "model.safetensors")
    back, _ = load_safetensors(tmp_path / "u" / "model.safetensors")
    assert all(torch.equal(back[k], base[k]) for k in base)
    r = cli("unmerge", tmp_path / "m", adapters / "lora", "-o", tmp_path / "u2", "--json")
    assert r.returncode == 0 and '"est_max_abs_error"' in r.stdout
    r = cli("unmerge", tmp_path / "m", adapters / "lora", "-o", tmp_path / "u3")
    assert r.returncode == 0 and not _says_exact(r.stdout) and "not exact (no --record)" in r.stdout, r.stdout
    # verify against the wrong adapter fails with exit 2
    r = cli("verify", tiny_llama, adapters / "rslora", tmp_path / "m")
    assert r.returncode == 2 and "verify failed" in r.stderr


def test_merge_with_a_different_adapter_recorded_is_refused_on_unmerge(cli, tiny_llama: Path, adapters: Path,
                                                                       tmp_path: Path) -> None:
    assert cli("merge", tiny_llama, adapters / "lora", "-o", tmp_path / "m").returncode == 0
    msg = _one_line_error(cli("unmerge", tmp_path / "m", adapters / "rslora", "-o", tmp_path / "u"))
    assert "not one of them" in msg and not (tmp_path / "u").exists()


def _edited_base(tiny_llama: Path, tmp_path: Path, edit) -> Path:
    t, meta = load_safetensors(tiny_llama / "model.safetensors")
    edit(t)
    d = tmp_path / "base"
    d.mkdir()
    save_safetensors(t, d / "model.safetensors", meta)
    (d / "config.json").write_bytes((tiny_llama / "config.json").read_bytes())
    return d


def _drop(t):
    del t["model.layers.2.self_attn.v_proj.weight"]


def _reshape(t):
    t["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(128, 64)


def _nan(t):
    t["model.layers.3.self_attn.q_proj.weight"][0, 0] = float("nan")


@pytest.mark.parametrize("edit, words", [
    (_drop, "model.layers.2.self_attn.v_proj.weight is missing from the base model"),
    (_reshape, "shape mismatch in model.layers.1.self_attn.q_proj"),
    (_nan, "model.layers.3.self_attn.q_proj.weight in the base model holds NaN"),
])
def test_bad_base_gives_one_line_and_no_output(cli, edit, words: str, tiny_llama: Path, adapters: Path,
                                               tmp_path: Path) -> None:
    base = _edited_base(tiny_llama, tmp_path, edit)
    before = _digest(base)
    msg = _one_line_error(cli("merge", base, adapters / "lora", "-o", tmp_path / "out"))
    assert words in msg
    assert not (tmp_path / "out").exists() and _digest(base) == before
    _no_leftovers(tmp_path)


def test_wrong_base_is_named(cli, adapters: Path, tmp_path: Path) -> None:
    save_safetensors({"transformer.h.0.attn.c_attn.weight": torch.zeros(8, 24)}, tmp_path / "gpt.safetensors")
    msg = _one_line_error(cli("merge", tmp_path / "gpt.safetensors", adapters / "lora", "-o", tmp_path / "o.safetensors"))
    assert "not made for this base model" in msg and "model.layers.0.self_attn.q_proj.weight" in msg
    assert not (tmp_path / "o.safetensors").exists()


def test_nan_adapter_and_truncated_shard(cli, tiny_llama: Path, tmp_path: Path) -> None:
    A, B = torch.randn(2, 128), torch.randn(128, 2)
    B[1, 1] = float("inf")
    bad = Adapter({"model.layers.0.self_attn.q_proj": Module(A=A, B=B, alpha=2, scale=1.0)}, AdapterConfig())
    write_adapter(bad, tmp_path / "bad.safetensors", format="loratools")
    msg = _one_line_error(cli("merge", tiny_llama, tmp_path / "bad.safetensors", "-o", tmp_path / "o"))
    assert "NaN or Inf" in msg and "q_proj" in msg and not (tmp_path / "o").exists()

    trunc = tmp_path / "trunc"
    trunc.mkdir()
    raw = (tiny_llama / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(raw[: len(raw) - 1000])
    msg = _one_line_error(cli("merge", trunc, ROOT / "fixtures/adapters/lora", "-o", tmp_path / "o"))
    assert "truncated" in msg and not (tmp_path / "o").exists()


def test_output_equal_to_an_input_or_existing(cli, tiny_llama: Path, adapters: Path, tmp_path: Path) -> None:
    before = _digest(tiny_llama), _digest(adapters / "lora")
    msg = _one_line_error(cli("merge", tiny_llama, adapters / "lora", "-o", tiny_llama))
    assert "overlaps the input" in msg
    msg = _one_line_error(cli("merge", tiny_llama, adapters / "lora", "-o", adapters / "lora"))
    assert "overlaps" in msg
    msg = _one_line_error(cli("merge", tiny_llama, adapters / "lora", "-o", tmp_path / "m", "--record", tiny_llama))
    assert "--record" in msg and not (tmp_path / "m").exists()
    assert (_digest(tiny_llama), _digest(adapters / "lora")) == before
    (tmp_path / "exists").mkdir()
    assert "--force" in _one_line_error(cli("merge", tiny_llama, adapters / "lora", "-o", tmp_path / "exists"))
    assert cli("merge", tiny_llama, adapters / "lora", "-o", tmp_path / "exists", "--force").returncode == 0
    assert "--weight" in _one_line_error(cli("merge", tiny_llama, adapters / "lora", "-o", tmp_path / "w",
                                             "--weight", "1", "--weight", "2"))


@pytest.mark.slow
def test_killed_merge_leaves_no_output_and_inputs_unchanged(tmp_path: Path) -> None:
    """SIGKILL in the middle of writing shards: OUT never appears, the inputs are untouched; the next run to
    OUT removes the temporary the killed one left."""
    base, _ = sharded_model(tmp_path, n_shards=24)
    before = _digest(base), _digest(tmp_path / "ad.safetensors")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "loratools", "merge", str(base), str(tmp_path / "ad.safetensors"),
                             "-o", str(out), "--precision", "float64", "--device", "cpu"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    killed = False
    while time.monotonic() < deadline and proc.poll() is None:
        tmps = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
        if tmps and any(f.suffix == ".safetensors" for f in tmps[0].iterdir()):
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.002)
    proc.wait()
    assert killed, "the merge finished before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert (_digest(base), _digest(tmp_path / "ad.safetensors")) == before
    # what SIGKILL leaves (the model-sized temporary, the lock file) goes with the next run to the same OUT
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out."))
    assert left[0] == ".out.lock" and left[1].startswith(".out.tmp-"), left
    r = subprocess.run([sys.executable, "-m", "loratools", "-q", "convert", str(ROOT / "fixtures/adapters/lora"), "-o",
                        str(out), "--to", "peft"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad.safetensors", "base", "out"]


@pytest.mark.parametrize("name", ["merge", "unmerge", "verify"])
def test_command_has_help_with_an_example_and_a_readme_section(name: str) -> None:
    from click.testing import CliRunner

    from loratools.cli import cli

    r = CliRunner().invoke(cli, [name, "--help"])
    assert r.exit_code == 0 and "Example" in r.output and f"loratools {name}" in r.output
    assert f"loratools {name}" in (ROOT / "README.md").read_text()


def test_merge_to_bfloat16_is_loaded_by_transformers_as_bfloat16(cli, tiny_llama: Path, adapters: Path,
                                                                 tmp_path: Path) -> None:
    """Issue "The practitioner's workflow", 8: config.json must name the merged weights' dtype."""
    import json

    transformers = pytest.importorskip("transformers")
    res = cli("merge", tiny_llama, adapters / "lora", "-o", tmp_path / "m", "--dtype", "bfloat16")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((tiny_llama / "config.json").read_text())["dtype"] == "float32"  # input untouched
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # without --dtype the config is copied byte for byte
    res = cli("merge", tiny_llama, adapters / "lora", "-o", tmp_path / "same")
    assert (tmp_path / "same" / "config.json").read_bytes() == (tiny_llama / "config.json").read_bytes()


def test_one_merge_report_keeps_the_json_keys_of_each_kind() -> None:
    from loratools.merge import MergeReport

    common = {"output", "op", "adapted", "copied", "nbytes", "record", "record_nbytes", "exact", "adapters", "notes",
              "verify"}
    st = MergeReport(Path("m"), "merge", 3, 5, 100, record_nbytes=10)
    gguf = MergeReport(Path("m.gguf"), "merge", 3, 5, 100, files=(Path("m.gguf"),), adapted_nbytes=40)
    assert not st.is_gguf and gguf.is_gguf
    assert set(st.to_json()) == common | {"est_max_abs_error", "est_rel_error", "error_bound", "vouched",
                                          "record_fraction"}
    assert set(gguf.to_json()) == common | {"files", "quant", "adapted_nbytes", "update", "allowed_lossy"}
    assert gguf.to_json()["files"] == ["m.gguf"] and st.to_json()["record_fraction"] == 0.1
