"""The format registry: a format is one module against formats/base.py, and conversion names none."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import loratools as lt
from conftest import ROOT
from loratools.adapter import Adapter, Module
from loratools.formats.base import FORMATS, Format, register
from loratools.formats.single import read_single, write_single

PACKAGE = ROOT / "loratools"


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(level, module, names) of every ``from … import …`` in ``path``."""
    tree = ast.parse(path.read_text())
    return [(n.level, n.module or "", [a.name for a in n.names]) for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom)]


def test_convert_is_the_module_and_convert_adapter_the_function() -> None:
    import loratools.convert as m

    assert m.ConvertResult.__module__ == "loratools.convert"
    assert lt.convert is m and lt.convert_adapter is m.convert_adapter


def test_format_modules_import_only_base_and_convert_no_format_module() -> None:
    formats = ("peft", "single", "kohya", "gguf", "mlx")
    for name in formats:
        for level, module, names in _imports(PACKAGE / "formats" / f"{name}.py"):
            if level == 1:  # from .X import … inside loratools/formats: base, or a helper of this format alone
                assert module == "base" or (module.startswith(f"{name}_") and module not in formats), \
                    (name, module, names)
    for level, module, names in _imports(PACKAGE / "convert.py"):
        assert module.split(".")[0] != "formats" or module == "formats", (module, names)
    tree = ast.parse((PACKAGE / "convert.py").read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    names = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and id(n) not in docstrings
             and isinstance(n.value, str) and n.value in FORMATS]
    assert names == []  # no branch on a format's name


def _adalora() -> Adapter:
    g = torch.Generator().manual_seed(5)
    mods = {f"model.layers.0.mlp.{p}": Module(A=torch.randn(3, 8, generator=g), B=torch.randn(6, 3, generator=g),
                                              E=torch.randn(3, 1, generator=g), alpha=4.0, scale=4.0 / 3)
            for p in ("up_proj", "down_proj")}
    mods["model.embed_tokens"] = Module(A=torch.randn(2, 10, generator=g), B=torch.randn(8, 2, generator=g),
                                        E=torch.randn(2, 1, generator=g), alpha=4.0, scale=4.0 / 3, kind="embedding")
    return Adapter(mods, lt.AdapterConfig(method="adalora", init_r=3))


def test_a_new_format_is_one_registration(tmp_path: Path) -> None:
    """A format registered from outside gets plain LoRA (by its flag) and its own limits, with no other edit."""
    toy = Format("toy", "test format", ".safetensors", lambda p: False,
                 reader=lambda path, base: read_single(path), writer=lambda a, path, base: write_single(a, path),
                 plain_lora_only=True,
                 cannot_hold=lambda a, base: {n: "no embeddings" for n, m in a.items() if m.kind == "embedding"})
    register(toy)
    try:
        src = tmp_path / "ada.safetensors"
        lt.write_adapter(_adalora(), src, format="loratools")
        with pytest.raises(lt.LoraToolsError, match="model.embed_tokens"):
            lt.convert_file(src, tmp_path / "x.safetensors", to="toy")
        res = lt.convert_file(src, tmp_path / "x.safetensors", to="toy", drop_unsupported=True)
        assert list(res.dropped) == ["model.embed_tokens"] and any("AdaLoRA" in n for n in res.notes)
        back = read_single(tmp_path / "x.safetensors")
        assert back.method == "lora" and all(m.E is None for m in back.modules.values())
        for name, m in _adalora().items():  # dense float64 reference: scale · B · diag(E) · A
            if m.kind == "embedding":
                continue
            assert m.E is not None
            want = m.scale * m.B.double() @ (m.E.double() * m.A.double())
            assert torch.allclose(back.modules[name].delta(dtype=torch.float64), want, rtol=1e-6, atol=1e-9)
    finally:
        del FORMATS["toy"]
