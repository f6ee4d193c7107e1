"""The core stays pure: no CLI, terminal, or network libraries in the library modules."""

from __future__ import annotations

import ast

from conftest import ROOT

PACKAGE = ROOT / "loratools"
# the edges, which may talk to users, terminals and networks: the cli/ package and the Hub module
EDGES = {"cli", "hub.py", "__main__.py"}
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
        if rel.parts[0] in EDGES:
            continue
        bad = FORBIDDEN & set(imported_roots(path))
        if bad:
            offenders.append(f"{rel}: {sorted(bad)}")
    assert not offenders, offenders


def test_the_library_does_not_import_the_cli():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] in ("cli", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 or node.module else [a.name for a in node.names]
                # the package's own modules: `from .cli import x` (level 1 here), `from .. import cli`, loratools.cli
                if any(n == "cli" or n.startswith("cli.") or n.startswith("loratools.cli") for n in names):
                    offenders.append(str(rel))
            elif isinstance(node, ast.Import) and any(a.name.startswith("loratools.cli") for a in node.names):
                offenders.append(str(rel))
    assert not offenders, offenders


def test_nothing_unpickles():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "torch.load(" not in text and "pickle.load" not in text, path
