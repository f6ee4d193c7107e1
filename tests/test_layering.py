"""The layers hold: the core talks to no user, terminal or network, and the pure core does no file IO.

Modules are named by dotted names. The *edges* (the CLI, its rendering, the Hub client,
``python -m loratools``) are every module under one of :data:`EDGES`; every other module
is *core*. A core module imports no edge library (:data:`EDGE_LIBRARIES`) and no edge
module, whether absolutely, relatively (``from .render import out``, ``from .. import hub``)
or lazily inside a function. The *pure core* (:data:`PURE_CORE`) is values and maths over
tensors: on top of that it opens no file, imports no file-system module and no loratools
module outside the pure core. Names in these lists that do not exist (yet) are skipped.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "loratools"

# the edges, which may talk to users, terminals and networks (a name covers its submodules)
EDGES = ("loratools.cli", "loratools.hub.client", "loratools.__main__")
EDGE_LIBRARIES = frozenset({"click", "rich", "huggingface_hub", "requests", "httpx", "pickle"})
# core → edge imports that are part of the design, each with its reason
ALLOWED = {
    ("loratools", "loratools.hub.client"): "the public API re-exports pull/push, importing hub on first use "
                                           "(__getattr__)",
}

# values and maths over tensors: no files, no terminals, no network (device.py asks the machine about
# CUDA and its cores, and merge/record.py holds the record's file format beside its maths: neither is listed)
PURE_CORE = (
    "loratools.errors", "loratools.config", "loratools.linalg", "loratools.adapter", "loratools.inspection",
    "loratools.hub.card", "loratools.nn", "loratools.adalora", "loratools.dora", "loratools.dtypes",
    "loratools.merge.kernels", "loratools.merge.plan", "loratools.merge.layout", "loratools.merge.experts",
    "loratools.merge.report", "loratools.validate", "loratools.compress.ranks", "loratools.serve.runtimes",
    "loratools.deltas", "loratools.lazy", "loratools.quant",
)
# modules through which files are reached, and the calls that read or write them
FILE_MODULES = frozenset({"os", "shutil", "pathlib", "tempfile", "io", "mmap", "glob", "fcntl", "safetensors",
                          "gguf", "numpy.lib.format"})
FILE_CALLS = frozenset({"open", "read_text", "read_bytes", "write_text", "write_bytes", "mkdir", "rmdir", "unlink",
                        "touch", "iterdir", "glob", "rglob", "save", "load", "tofile", "fromfile", "memmap"})


# ---- the checker -----------------------------------------------------------------------------

def module_name(path: Path, package: Path = PACKAGE) -> str:
    """``loratools/merge/__init__.py`` → ``loratools.merge``; ``loratools/io/model.py`` → ``loratools.io.model``."""
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from {'.' * level}{target} import ...`` written in ``module``."""
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 >= len(base):
        raise ValueError(f"{module}: relative import beyond the top-level package")
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_targets(node: ast.Import | ast.ImportFrom, module: str, *, is_package: bool = False) -> list[tuple[str, ...]]:
    """Each name an import statement binds, as the dotted names it may be, relative imports resolved.

    ``from X import y`` binds ``X.y`` (a submodule) or an attribute of ``X``: it gives
    ``("X.y", "X")``, so ``from . import render`` inside ``loratools.linalg`` gives
    ``("loratools.render", "loratools")``.
    """
    if isinstance(node, ast.Import):
        return [(a.name,) for a in node.names]
    base = _resolve(module, is_package, node.level, node.module)
    return [(f"{base}.{a.name}", base) if a.name != "*" else (base,) for a in node.names]


def _imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[str, ...]]:
    """The targets of every import in ``tree``: at the top, inside functions (lazy), anywhere."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield from import_targets(node, module, is_package=is_package)


def imported_names(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """Every dotted name ``module`` may import (both readings of ``from X import y``)."""
    return {name for target in _imports(ast.parse(source), module, is_package) for name in target}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def is_edge(module: str) -> bool:
    return any(_under(module, e) for e in EDGES)


def layering_violations(source: str, module: str, *, is_package: bool = False) -> list[str]:
    """What a core ``module`` imports that it must not: edge libraries and edge modules."""
    if is_edge(module):
        return []
    bad = set()
    for target in _imports(ast.parse(source), module, is_package):
        if (lib := target[-1].split(".")[0]) in EDGE_LIBRARIES:
            bad.add(lib)
        edges = {e for name in target for e in EDGES if _under(name, e)}
        if edges and not all((module, e) in ALLOWED for e in edges):
            bad.add(target[0])
    return sorted(bad)


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:`` (imports there are for annotations, never run)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _impure_import(target: tuple[str, ...], pure: tuple[str, ...]) -> bool:
    if any(_under(name, m) for name in target for m in FILE_MODULES):
        return True
    # a loratools module outside the pure core may do IO on the importer's behalf
    return all(_under(name, "loratools") for name in target) and not any(
        _under(name, p) for name in target for p in pure)


def file_io_violations(source: str, module: str, *, is_package: bool = False,
                       pure: tuple[str, ...] = PURE_CORE) -> list[str]:
    """What a pure-core ``module`` does that touches files: file-system modules, file calls
    (``open``, ``Path.read_text``, ``torch.save`` ...), and loratools modules outside the pure core."""
    tree = ast.parse(source)
    skip = _type_checking_only(tree)
    bad: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            bad.update(f"import {t[0]}" for t in import_targets(node, module, is_package=is_package)
                       if _impure_import(t, pure))
        elif isinstance(node, ast.Call):
            f = node.func
            called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if called in FILE_CALLS:
                bad.add(f"{ast.unparse(f)}(...) line {node.lineno}")
    return sorted(bad)


def package_modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield module_name(path), path


def _check(path: Path, checker) -> list[str]:
    return checker(path.read_text(), module_name(path), is_package=path.name == "__init__.py")


def _path_of(module: str) -> Path | None:
    rel = Path(*module.split(".")[1:])
    for p in (PACKAGE / rel / "__init__.py", PACKAGE / rel.with_suffix(".py")):
        if p.is_file():
            return p
    return None


# ---- the checker finds what it must (planted sources) ---------------------------------------

@pytest.mark.parametrize("module, is_package, source", [
    ("loratools.linalg", False, "from .cli.render import out"),
    ("loratools.linalg", False, "from . import cli"),
    ("loratools.linalg", False, "def f():\n    from .hub.client import pull\n    return pull"),
    ("loratools.merge.kernels", False, "from ..cli.render import out"),
    ("loratools.merge.kernels", False, "from ..hub import client"),
    ("loratools.formats", True, "from ..cli import main"),
    ("loratools.io.model", False, "from ..cli.options import Session"),
    ("loratools.io.model", False, "import loratools.cli.render"),
    ("loratools.io.model", False, "from loratools import cli"),
    ("loratools.adapter", False, "import rich.console"),
    ("loratools.adapter", False, "from click import echo"),
    ("loratools.adapter", False, "import pickle"),
    ("loratools", True, "from . import cli"),
])
def test_checker_finds_planted_edge_imports(module: str, is_package: bool, source: str) -> None:
    assert layering_violations(source, module, is_package=is_package), source


@pytest.mark.parametrize("module, is_package, source", [
    ("loratools.linalg", False, "from .errors import InvalidOptionError"),
    ("loratools.merge", True, "from .kernels import merged_tensor"),
    ("loratools.merge.kernels", False, "from ..adapter import Module"),
    ("loratools.cli.render", False, "from rich.console import Console\nfrom ..hub.client import pull"),
    ("loratools.cli.merge", False, "from . import render"),
    ("loratools.formats.peft", False, "from ..errors import CorruptFileError  # render, hub"),
    ("loratools", True, "def __getattr__(n):\n    from .hub import client\n    return client"),
])
def test_checker_accepts_clean_imports(module: str, is_package: bool, source: str) -> None:
    assert layering_violations(source, module, is_package=is_package) == []


def test_relative_imports_resolve() -> None:
    assert imported_names("from .render import out", "loratools.linalg") >= {"loratools.render", "loratools.render.out"}
    assert "loratools.merge.kernels" in imported_names("from .kernels import x", "loratools.merge", is_package=True)
    assert "loratools.kernels" in imported_names("from .kernels import x", "loratools.merge")
    assert "loratools.hub" in imported_names("from ... import hub", "loratools.cli.commands.pull")
    with pytest.raises(ValueError, match="beyond"):
        imported_names("from ... import x", "loratools.linalg")


@pytest.mark.parametrize("source", [
    "def f(p):\n    with open(p) as fh:\n        return fh.read()",
    "from pathlib import Path\ndef f(p):\n    return Path(p).read_text()",
    "def f(p, s):\n    p.write_bytes(s)",
    "import os\ndef f(a, b):\n    os.replace(a, b)",
    "def f(a):\n    import shutil\n    shutil.rmtree(a)",
    "import torch\ndef f(t, p):\n    torch.save(t, p)",
    "from safetensors.torch import load_file",
    "from .io import load_safetensors",
    "from ..io.safetensors import read_header",
    "from . import formats",
])
def test_checker_finds_planted_file_io(source: str) -> None:
    assert file_io_violations(source, "loratools.merge.kernels"), source


@pytest.mark.parametrize("source", [
    "import json, math\nimport torch\ndef f(x):\n    return json.dumps({'a': float(torch.tensor(x).sum())})",
    "from ..adapter import Module\nfrom ..linalg import RankRule\nfrom . import plan",
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pathlib import Path",
    "def f(s):\n    return s.replace('a', 'b').split('.')",
])
def test_checker_accepts_pure_code(source: str) -> None:
    assert file_io_violations(source, "loratools.merge.kernels") == []


# ---- the package holds --------------------------------------------------------------------------

def test_core_modules_import_no_edge_library_or_edge_module() -> None:
    offenders = [f"{name}: {bad}" for name, path in package_modules() if (bad := _check(path, layering_violations))]
    assert not offenders, offenders


@pytest.mark.parametrize("module", PURE_CORE)
def test_pure_core_does_no_file_io(module: str) -> None:
    path = _path_of(module)
    if path is None:
        pytest.skip(f"{module} does not exist (yet)")
    assert not is_edge(module)
    assert _check(path, file_io_violations) == []


def test_the_lists_name_real_modules() -> None:
    """Most of the pure core and the edges exist, so the tests above are not vacuous."""
    assert sum(_path_of(m) is not None for m in PURE_CORE) >= 6
    assert sum(_path_of(m) is not None for m in EDGES) >= 3


def test_nothing_unpickles() -> None:
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "torch.load(" not in text and "pickle.load" not in text, path


# the jobs: each is a library entry point the CLI calls; shared pieces live in the core, not in another job
JOBS = ("loratools.merge", "loratools.compress.combine", "loratools.compress.extract", "loratools.compress.resize",
        "loratools.compress.prune", "loratools.convert", "loratools.train", "loratools.serve",
        "loratools.hub.client", "loratools.eval")


@pytest.mark.parametrize("job", JOBS)
def test_jobs_do_not_import_each_other(job: str) -> None:
    """No module of a job (a package counts with its modules) imports another job."""
    modules = [(name, path) for name, path in package_modules() if _under(name, job)]
    if not modules:
        pytest.skip(f"{job} does not exist")
    offenders = []
    for name, path in modules:
        names = imported_names(path.read_text(), name, is_package=path.name == "__init__.py")
        offenders += [f"{name} imports {o}" for o in JOBS
                      if o != job and not _under(o, job) and not _under(job, o) and any(_under(n, o) for n in names)]
    assert offenders == []


# ---- no import cycles ---------------------------------------------------------------------------

def import_graph() -> dict[str, set[str]]:
    """module → the loratools modules it imports (at the top or lazily; not under ``TYPE_CHECKING``).

    ``from X import y`` counts as an import of the module ``X.y`` when there is one, else of ``X``. An import
    of a module's own parent package is left out: Python runs a package's ``__init__`` before its modules, and
    a package face that imports its own modules is the normal shape, not a cycle.
    """
    known = {name for name, _ in package_modules()}
    graph: dict[str, set[str]] = {}
    for name, path in package_modules():
        tree = ast.parse(path.read_text())
        skip = _type_checking_only(tree)
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for target in import_targets(node, name, is_package=path.name == "__init__.py"):
                hit = next((t for t in target if t in known), None)
                if hit and hit != name and not _under(name, hit):
                    targets.add(hit)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted.

    >>> cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}})
    [['a', 'b']]
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_planted_cycle() -> None:
    assert cycles({"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": {"x"}}) == [["x", "y", "z"]]
    assert cycles({"x": {"y"}, "y": set()}) == []


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """A function's lines without its docstring (a command's docstring is its ``--help``, long by design)."""
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and len(body) > 1:
        return node.end_lineno - body[1].lineno + 2  # the def line(s) count as one
    return node.end_lineno - node.lineno + 1


def test_modules_and_functions_stay_small() -> None:
    """No module over 600 lines (files split by idea, not by size), no function over 60 lines of code, unless
    a comment at its top says why (``# long: …``)."""
    long_modules, long_functions = [], []
    for name, path in package_modules():
        text = path.read_text()
        if text.count("\n") > 600:
            long_modules.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _code_lines(node) > 60:
                first = text.splitlines()[node.body[0].lineno - 1] if node.body else ""
                if "# long:" not in text.splitlines()[node.lineno] and "# long:" not in first:
                    long_functions.append(f"{name}.{node.name}: {_code_lines(node)} lines")
    assert not long_modules and not long_functions, (long_modules, long_functions)
