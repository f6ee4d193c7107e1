"""`loratools convert` on the command line: outputs, detection by other commands, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import loratools as lt

gguf = pytest.importorskip("gguf")


def _one_line_error(r, *needles: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loratools: error:"), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_convert_then_inspect_each_format(tmp_path: Path, adapters: Path, cli) -> None:
    for to, name in [("kohya", "k.safetensors"), ("gguf", "g.gguf"), ("loratools", "s.safetensors"), ("peft", "p")]:
        r = cli("convert", adapters / "rslora", "-o", tmp_path / name, "--to", to, "--base", adapters.parent / "tiny-llama")
        assert r.returncode == 0, r.stderr
        assert "ΔW checked" in r.stdout
        r = cli("inspect", tmp_path / name, "--json")
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert report["format"] == to and report["modules"] == 28


def test_unknown_format(tmp_path: Path, adapters: Path, cli) -> None:
    r = cli("convert", adapters / "lora", "-o", tmp_path / "x", "--to", "onnx")
    _one_line_error(r, "'onnx'", "kohya", "gguf")
    assert _leftovers(tmp_path) == []


def _foreign_arch_gguf(path: Path, arch: str) -> None:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 8.0)
    w.add_tensor("blk.0.attn_v.weight.lora_a", torch.randn(4, 128).numpy())
    w.add_tensor("blk.0.attn_v.weight.lora_b", torch.randn(64, 4).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_for_another_architecture(tmp_path: Path, tiny_llama: Path, cli) -> None:
    src = tmp_path / "in" / "qwen.gguf"
    src.parent.mkdir()
    _foreign_arch_gguf(src, "qwen2")
    out = tmp_path / "out"
    out.mkdir()
    r = cli("convert", src, "-o", out / "p", "--to", "peft", "--base", tiny_llama)
    _one_line_error(r, "qwen2", "llama")
    assert _leftovers(out) == []
    # a llama GGUF read against a base of another architecture
    _foreign_arch_gguf(src, "llama")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    r = cli("convert", src, "-o", out / "p", "--to", "peft", "--base", tmp_path / "gpt2")
    _one_line_error(r, "GPT2LMHeadModel")
    assert _leftovers(out) == []


def test_foreign_llama_gguf_without_head_counts_needs_base(tmp_path: Path, tiny_llama: Path, cli) -> None:
    src = tmp_path / "a.gguf"
    w = gguf.GGUFWriter(str(src), "llama")
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 4.0)
    w.add_tensor("blk.1.attn_k.weight.lora_a", torch.randn(4, 128).numpy())
    w.add_tensor("blk.1.attn_k.weight.lora_b", torch.randn(64, 4).numpy())
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    r = cli("convert", src, "-o", tmp_path / "p", "--to", "peft")
    _one_line_error(r, "--base")
    r = cli("convert", src, "-o", tmp_path / "p", "--to", "peft", "--base", tiny_llama)
    assert r.returncode == 0, r.stderr
    assert list(lt.read_adapter(tmp_path / "p").modules) == ["model.layers.1.self_attn.k_proj"]


def test_unsupported_modules_stop_or_are_dropped(tmp_path: Path, tiny_llama: Path, cli) -> None:
    g = torch.Generator().manual_seed(0)
    mods = {
        "model.layers.0.self_attn.q_proj": lt.Module(A=torch.randn(2, 128, generator=g), B=torch.randn(128, 2, generator=g),
                                                     alpha=2.0, scale=1.0),
        "model.layers.0.conv": lt.Module(A=torch.randn(2, 3, 3, 3, generator=g), B=torch.randn(4, 2, 1, 1, generator=g),
                                         alpha=2.0, scale=1.0, kind="conv"),
    }
    src = tmp_path / "in" / "a.safetensors"
    src.parent.mkdir()
    lt.write_adapter(lt.Adapter(mods), src, format="loratools")
    out = tmp_path / "out"
    out.mkdir()
    r = cli("convert", src, "-o", out / "a.gguf", "--to", "gguf", "--base", tiny_llama)
    _one_line_error(r, "model.layers.0.conv", "--drop-unsupported")
    assert _leftovers(out) == []
    r = cli("convert", src, "-o", out / "a.gguf", "--to", "gguf", "--base", tiny_llama, "--drop-unsupported")
    assert r.returncode == 0, r.stderr
    assert "dropped model.layers.0.conv" in r.stderr
    assert list(lt.read_adapter(out / "a.gguf").modules) == ["model.layers.0.self_attn.q_proj"]


def test_existing_output_needs_force(tmp_path: Path, adapters: Path, cli) -> None:
    out = tmp_path / "k.safetensors"
    assert cli("convert", adapters / "lora", "-o", out, "--to", "kohya").returncode == 0
    before = out.read_bytes()
    _one_line_error(cli("convert", adapters / "rslora", "-o", out, "--to", "kohya"), "--force")
    assert out.read_bytes() == before
    assert cli("convert", adapters / "rslora", "-o", out, "--to", "kohya", "--force").returncode == 0
    assert len(lt.read_adapter(out).modules) == 28


def test_help_and_readme(cli) -> None:
    r = cli("convert", "--help")
    assert r.returncode == 0 and "--drop-unsupported" in r.stdout and "Examples" in r.stdout
    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    assert "[`loratools convert`](docs/cli.md#convert)" in readme
    assert "\n## convert\n" in (root / "docs" / "cli.md").read_text()
    for fmt in ("kohya", "gguf"):
        assert f"| `{fmt}` |" in readme
