"""The public API: ``import loratools as lt`` names every job and value type, lazily and typed.

- every name in ``loratools.__all__`` resolves, to the object defined in the module ``_HOMES`` names;
- the ``if TYPE_CHECKING:`` imports, which are what mypy reads, re-export exactly those names from those modules;
- ``import loratools`` imports no torch; no public name shadows a submodule;
- tests/typing/user_script.py, written as a user would, passes ``mypy --strict`` and runs.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import loratools
from conftest import ROOT

PUBLIC = [n for n in loratools.__all__ if n != "__version__"]
USER_SCRIPT = ROOT / "tests" / "typing" / "user_script.py"


def _type_checking_imports() -> dict[str, str]:
    """``{name: module}`` of the ``from .module import name as name`` lines under ``if TYPE_CHECKING:``."""
    tree = ast.parse((ROOT / "loratools" / "__init__.py").read_text(encoding="utf-8"))
    blocks = [node for node in tree.body if isinstance(node, ast.If) and isinstance(node.test, ast.Name)
              and node.test.id == "TYPE_CHECKING"]
    assert len(blocks) == 1
    found: dict[str, str] = {}
    for node in ast.walk(blocks[0]):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 1 and node.module, ast.unparse(node)
            for alias in node.names:
                # `import x as x` is what makes mypy take the name as re-exported (also under --strict)
                assert alias.asname == alias.name, f"write `{alias.name} as {alias.name}` in {ast.unparse(node)}"
                assert alias.name not in found, f"{alias.name} imported twice"
                found[alias.name] = node.module
    return found


@pytest.mark.parametrize("name", PUBLIC)
def test_name_resolves_to_its_home(name: str) -> None:
    value = getattr(loratools, name)
    home = importlib.import_module(f"loratools.{loratools._HOMES[name]}")
    assert getattr(home, name) is value
    if inspect.isclass(value) or inspect.isfunction(value):
        assert value.__module__ == home.__name__, f"{name} is defined in {value.__module__}, not {home.__name__}"


def test_type_checkers_see_the_same_names() -> None:
    assert _type_checking_imports() == loratools._HOMES


def test_all_lists_each_name_once() -> None:
    assert len(set(loratools.__all__)) == len(loratools.__all__)
    assert set(loratools.__all__) <= set(dir(loratools))


def test_no_public_name_shadows_a_module() -> None:
    submodules = {m.name for m in pkgutil.iter_modules(loratools.__path__)}
    assert {"adapter", "compress", "merge", "train"} <= submodules
    assert not submodules & set(loratools.__all__)
    assert [n for n in PUBLIC if importlib.util.find_spec(f"loratools.{n}") is not None] == []


def test_import_is_light() -> None:
    """``import loratools`` (and the light names: errors, the version, submodule access) loads no torch."""
    code = ("import sys, types, loratools as lt\n"
            "assert issubclass(lt.InputNotFoundError, (lt.LoraToolsError, FileNotFoundError))\n"
            "assert lt.__version__ and dir(lt)\n"
            "assert isinstance(lt.validate, types.ModuleType)  # a submodule not imported yet, as an eager package\n"
            "try:\n"
            "    lt.no_such_name\n"
            "except AttributeError:\n"
            "    pass\n"
            "else:\n"
            "    raise AssertionError('lt.no_such_name resolved')\n"
            "heavy = sorted(m for m in ('torch', 'numpy', 'huggingface_hub', 'safetensors') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_user_script_passes_mypy_strict(tmp_path: Path) -> None:
    """The user's view: ``mypy --strict`` on a script using ``lt.*``, our own config left out and errors inside
    loratools not reported (as for any installed package: ``--follow-imports=silent``). A misspelt name
    must be an error (type checkers never see the lazy ``__getattr__``)."""
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (pip install -e '.[dev]')")
    typo = tmp_path / "typo.py"
    typo.write_text("import loratools as lt\n\nlt.read_adaptor('x')\nn: int = lt.read_adapter('x')\n")
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--config-file=",
                        "--cache-dir", str(ROOT / ".mypy_cache" / "user-script"), "--no-error-summary",
                        str(USER_SCRIPT.relative_to(ROOT)), str(typo)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    # (by file name, not path: errors replayed from mypy's cache keep the path of the run that found them)
    errors = [line for line in r.stdout.splitlines() if ": error:" in line]
    typos = [e for e in errors if "typo.py:" in e]
    assert [e for e in errors if e not in typos] == [], r.stdout + r.stderr
    assert len(typos) == 2, r.stdout + r.stderr
    assert 'has no attribute "read_adaptor"' in typos[0]
    assert 'expression has type "Adapter", variable has type "int"' in typos[1]


@pytest.mark.slow
def test_user_script_runs(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(USER_SCRIPT), str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "merged").is_dir() and (tmp_path / "lora-kohya.safetensors").is_file()
