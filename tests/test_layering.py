"""The core stays pure: no CLI, terminal, or network libraries in the library modules."""

from __future__ import annotations

import ast

from conftest import ROOT

PACKAGE = ROOT / "loratools"
# the edges, which may talk to users, terminals and networks
EDGES = {"cli.py", "render.py", "hub.py", "__main__.py"}
FORBIDDEN = {"click", "rich", "huggingface_hub", "requests", "pickle"}


def imported_roots(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


def test_core_modules_do_not_import_edge_libraries():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "commands" or str(rel) in EDGES:
            continue
        bad = FORBIDDEN & set(imported_roots(path))
        if bad:
            offenders.append(f"{rel}: {sorted(bad)}")
    assert not offenders, offenders


def test_nothing_unpickles():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "torch.load(" not in text and "pickle.load" not in text, path
