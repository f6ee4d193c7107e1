"""The command line as a whole: help everywhere, documented in the README, the version."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from loratools import __version__
from loratools.cli import cli as group
from conftest import ADAPTERS, ROOT, run_cli, run_cli_subprocess


def test_every_command_has_help_with_an_example():
    runner = CliRunner()
    for name, command in group.commands.items():
        res = runner.invoke(group, [name, "--help"])
        assert res.exit_code == 0, name
        assert "Example" in res.output, f"{name} --help has no example"


def test_every_command_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    for name in group.commands:
        assert re.search(rf"`loratools {name}\b", readme), f"README lacks `loratools {name}`"


def test_top_level_help_lists_every_command():
    res = CliRunner().invoke(group, ["--help"])
    assert res.exit_code == 0
    for name in group.commands:
        assert name in res.output


def test_version(cli):
    res = cli("--version")
    assert res.returncode == 0 and __version__ in res.stdout


def test_unknown_option_is_a_usage_error(cli):
    res = cli("inspect", "--nope")
    assert res.returncode == 2 and "Traceback" not in res.stderr


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ("inspect", ADAPTERS / "lora"),
    ("inspect", ADAPTERS / "missing"),
    ("inspect", "--nope"),
], ids=["table", "user-error", "usage-error"])
def test_the_real_entry_point_prints_what_the_in_process_runner_sees(args) -> None:
    """``python -m loratools`` (exit status, stdout, stderr) = ``run_cli`` in this process, which most tests use."""
    real, here = run_cli_subprocess(*args), run_cli(*args)
    assert (real.returncode, real.stdout, real.stderr) == (here.returncode, here.stdout, here.stderr)
    assert real.stdout or real.stderr


@pytest.mark.slow
def test_the_installed_script_runs(tmp_path) -> None:
    """``[project.scripts] loratools = loratools.cli:main``: the script pip wrote next to this interpreter."""
    script = Path(sys.executable).with_name("loratools")
    if not script.is_file():
        pytest.skip(f"no installed loratools script next to {sys.executable}")
    r = subprocess.run([str(script), "--version"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0 and __version__ in r.stdout, r.stderr
