"""Shared fixtures: paths to the bundled fixtures and a runner for the CLI."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from subprocess import CompletedProcess

import pytest

# The suite's tensors are tiny: one OpenMP thread per process (this one, and the CLI subprocesses,
# which inherit it) spares every small op a barrier wait for a thread another process holds — on
# 2 shared cores a 3-step training run took 5.3-6.9 s with 2 threads and 0.7 s with 1. Set before
# torch is first imported; OMP_NUM_THREADS=N in the environment runs the suite with N instead.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
TINY_LLAMA = FIXTURES / "tiny-llama"
ADAPTERS = FIXTURES / "adapters"


@pytest.fixture
def tiny_llama() -> Path:
    return TINY_LLAMA


@pytest.fixture
def adapters() -> Path:
    return ADAPTERS


def run_cli_subprocess(*args: object, cwd: Path | None = None,
                       env: dict[str, str] | None = None) -> CompletedProcess[str]:
    """Run ``python -m loratools ARGS`` in a fresh interpreter, exactly as a user would.

    For what only a real process shows: its exit status, signals, environment read at
    import time (``HF_ENDPOINT``), torchrun.
    """
    return subprocess.run([sys.executable, "-m", "loratools", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=600)


class _Stream(io.StringIO):
    """A captured stdout/stderr: text, with the ``.buffer`` of bytes that a real one has."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = io.BytesIO()

    def text(self) -> str:
        self.flush()
        return self.getvalue() + self.buffer.getvalue().decode()


@contextlib.contextmanager
def _environment(env: dict[str, str] | None, cwd: Path) -> Iterator[None]:
    """``os.environ`` replaced by ``env`` (as ``subprocess.run(env=)`` does) and ``cwd`` entered, both restored."""
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    try:
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        os.chdir(cwd)
        yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)


def _interpreter_warning_filters() -> None:
    """The filters of a fresh ``python`` (no pytest ones), so a warning the CLI prints reaches its stderr."""
    warnings.resetwarnings()
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")


def run_cli(*args: object, cwd: Path | None = None, env: dict[str, str] | None = None,
            subprocess: bool = False) -> CompletedProcess[str]:
    """Run ``loratools ARGS`` and return its exit code, stdout and stderr.

    By default in this interpreter (seconds faster than a fresh one): ``loratools.cli.main``
    with sys.stdout/sys.stderr captured, ``SystemExit`` read as the exit code, ``env``
    replacing ``os.environ`` and ``cwd`` entered for the call, and the warnings a fresh
    interpreter would print appended to stderr. An exception that ``main`` lets through is
    a bug and propagates (a fresh process would print its traceback and exit 1).
    ``subprocess=True`` runs a real process instead (:func:`run_cli_subprocess`).
    """
    if subprocess:
        return run_cli_subprocess(*args, cwd=cwd, env=env)
    from loratools.cli import main

    argv = [str(a) for a in args]
    out, err = _Stream(), _Stream()
    code: int | str | None = 0
    with _environment(env, cwd or ROOT), warnings.catch_warnings(record=True) as caught, \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        _interpreter_warning_filters()
        try:
            main(argv)
        except SystemExit as e:
            code = e.code
    stderr = err.text() + "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line)
                                  for w in caught)
    if isinstance(code, str):  # sys.exit("message") prints the message and exits 1
        code, stderr = 1, stderr + code + "\n"
    return CompletedProcess(["loratools", *argv], code or 0, out.text(), stderr)


@pytest.fixture
def cli():
    """:func:`run_cli`: ``cli("inspect", path, "--json")``; ``subprocess=True`` for a real process."""
    return run_cli


# tests/mlx_producer.py runs inside .venv-mlx (it imports mlx), never in pytest's interpreter: not a test module,
# and --doctest-modules must not import it
collect_ignore = ["mlx_producer.py"]
