"""The documentation says what the code does: the README's example runs, docs/cli.md is each command's
``--help``, every command has help with examples and a line in the README, and every ``loratools.``
name the docstrings and the Markdown cite exists."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import re
import tempfile
from pathlib import Path
from types import ModuleType

import pytest
from click.testing import CliRunner

from loratools.cli import cli as group
from conftest import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"


def _cli_docs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cli_docs", ROOT / "scripts" / "cli_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- the README

def test_readme_python_example_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The README's Python block is a doctest, run from the repository root (it reads fixtures/); what it
    writes goes to ``tempfile.mkdtemp()``, here under pytest's own temporary directory."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    failed, attempted = doctest.testfile(str(README), module_relative=False, encoding="utf-8",
                                         optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert attempted > 5 and failed == 0, f"{failed} of {attempted} README examples failed (see the output above)"


def test_readme_is_a_front_door() -> None:
    assert len(README.read_bytes()) <= 12_000, "README.md is over 12 KB: move the details to docs/"
    readme = README.read_text()
    assert "make demo" in readme and "make test" in readme


def test_every_command_is_a_row_of_the_readme_table() -> None:
    readme = README.read_text()
    for name in group.commands:
        assert re.search(rf"^\| \[`loratools {name}`\]\(docs/cli\.md#{name}\) \|", readme, re.M), \
            f"README's command table lacks `loratools {name}` linking to docs/cli.md#{name}"


def _anchors(md: Path) -> set[str]:
    """The anchors GitHub gives ``md``'s headings: lower case, punctuation dropped, spaces → ``-``."""
    text = re.sub(r"^```.*?^```", "", md.read_text(), flags=re.M | re.S)  # a "# comment" in a code block is no heading
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", text, re.M)}


def test_readme_and_docs_links_point_at_what_exists() -> None:
    for md in [README, *DOCS.glob("*.md")]:
        for target, anchor in re.findall(r"\]\(([^)#:\s]*)(?:#([^)]*))?\)", md.read_text()):
            path = (md.parent / target) if target else md
            assert path.exists(), f"{md.relative_to(ROOT)} links to a missing {target}"
            if anchor and path.suffix == ".md":
                assert anchor in _anchors(path), f"{md.relative_to(ROOT)} links to a missing {target}#{anchor}"


# --------------------------------------------------------------------------- docs/cli.md and --help

@pytest.mark.parametrize("name", sorted(group.commands))
def test_every_command_has_help_with_examples(name: str) -> None:
    res = CliRunner().invoke(group, [name, "--help"], prog_name="loratools")
    assert res.exit_code == 0 and f"Usage: loratools {name}" in res.output
    assert "Examples:" in res.output and f"    loratools {name}" in res.output, f"{name} --help has no examples"


def test_cli_reference_is_the_help_of_every_command() -> None:
    cli_docs = _cli_docs()
    text = cli_docs.render()
    for name in group.commands:
        assert f"\n## {name}\n" in text
    assert (DOCS / "cli.md").read_text() == text, "docs/cli.md is stale: run `python scripts/cli_docs.py`"


def test_cli_reference_does_not_depend_on_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    cli_docs = _cli_docs()
    monkeypatch.setenv("COLUMNS", "200")
    wide = cli_docs.help_text(["merge"])
    monkeypatch.setenv("COLUMNS", "40")
    assert cli_docs.help_text(["merge"]) == wide


# --------------------------------------------------------------------------- references resolve

_ROLE = re.compile(r":(?:func|meth|class|mod|data|attr|exc|obj):`~?(loratools(?:\.\w+)+)(?:\(\))?`")
_SPAN = re.compile(r"`(loratools|lt)((?:\.[A-Za-z_]\w*)+)")  # a Markdown code span that starts with a dotted name


def resolve(name: str) -> object:
    """The object ``name`` (``loratools.merge.kernels.tolerance``) names: the longest module prefix, then attributes."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj: object = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is not None and module_name.startswith(e.name) and e.name.startswith("loratools"):
                continue  # not a module: an attribute of a shorter prefix
            raise
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(name)


def _docstring_refs() -> set[tuple[str, str]]:
    refs = set()
    for path in sorted((ROOT / "loratools").rglob("*.py")):
        for name in _ROLE.findall(path.read_text(encoding="utf-8")):
            refs.add((str(path.relative_to(ROOT)), name))
    return refs


def _markdown_refs() -> set[tuple[str, str]]:
    refs = set()
    for md in [README, *sorted(DOCS.glob("*.md"))]:
        for head, tail in _SPAN.findall(md.read_text(encoding="utf-8")):
            refs.add((str(md.relative_to(ROOT)), "loratools" + tail))
    return refs


def _unresolved(refs: set[tuple[str, str]]) -> list[str]:
    bad = []
    for where, name in sorted(refs):
        try:
            resolve(name)
        except (ImportError, AttributeError) as e:
            bad.append(f"{where}: {name} ({type(e).__name__}: {e})")
    return bad


def test_docstring_references_resolve() -> None:
    """Every :func:/:class:/:mod:… role with a full ``loratools.`` name in the package's docstrings."""
    refs = _docstring_refs()
    assert len(refs) > 50  # the scan does see them
    assert not _unresolved(refs), "\n".join(_unresolved(refs))


def test_markdown_references_resolve() -> None:
    """Every code span in README.md and docs/*.md that starts with ``loratools.x`` or ``lt.x``."""
    refs = _markdown_refs()
    assert len(refs) > 10
    assert not _unresolved(refs), "\n".join(_unresolved(refs))
