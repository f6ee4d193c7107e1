"""The command line as a whole: help everywhere, documented in the README, the version."""

from __future__ import annotations

import re

from click.testing import CliRunner

from loratools import __version__
from loratools.cli import cli as group
from conftest import ROOT


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
