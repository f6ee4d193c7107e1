"""Shared fixtures: paths to the bundled fixtures and a runner for the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``loratools ARGS`` in a fresh interpreter, as a user would."""
    return subprocess.run([sys.executable, "-m", "loratools", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=600)


@pytest.fixture
def cli():
    return run_cli
