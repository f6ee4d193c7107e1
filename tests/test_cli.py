"""The command line as a whole: help everywhere, documented in the README, the version."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from loratools import __version__
from loratools.cli import cli as group
from loratools.cli import main, with_flags
from loratools.errors import InvalidOptionError
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


# --------------------------------------------------------------------------- start-up: --help without torch

HEAVY = {"torch", "transformers", "huggingface_hub", "gguf", "numpy", "safetensors", "peft", "rich"}
LIGHT_OURS = {"loratools", "loratools.lazy", "loratools.errors", "loratools.__main__",  # and loratools.cli.*
              # train's options are made from TrainConfig's fields: pure dataclasses, no torch
              "loratools.train", "loratools.train.config", "loratools.nn", "loratools.nn.spec"}


@pytest.mark.parametrize("args", [["--help"], *([name, "--help"] for name in group.commands)],
                         ids=lambda args: " ".join(args))
def test_help_imports_neither_torch_nor_the_library(args: list[str]) -> None:
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "loratools", *args], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "Usage: loratools" in r.stdout, r.stderr[-2000:]
    # -X importtime writes "import time: self | cumulative | module" to stderr for every module imported
    modules = {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "click" in modules and "loratools.cli" in modules  # the check does see the imports
    assert not {m.split(".")[0] for m in modules} & HEAVY
    ours = {m for m in modules if m.split(".")[0] == "loratools"}
    assert {m for m in ours if not m.startswith("loratools.cli")} <= LIGHT_OURS, sorted(ours)


# --------------------------------------------------------------------------- the error boundary: parameters → flags

@click.command()
@click.argument("base")
@click.option("--rank", type=int)
@click.option("--max-rank", type=int)
@click.option("--format", "fmt")
@click.option("-o", "--output")
@click.option("--weight", "weights", multiple=True)
def _command(**kwargs: object) -> None:
    pass


@pytest.mark.parametrize("message, shown", [
    ("`rank` must be ≥ 1, got 0", "--rank must be ≥ 1, got 0"),
    ("`max_rank` or `max-rank`", "--max-rank or --max-rank"),  # the parameter name and its hyphen variant
    ("`fmt` and `format`", "--format and --format"),  # the name, and the long flag without its dashes
    ("`weights`, `weight`", "--weight, --weight"),
    ("`output` exists", "--output exists"),  # the long flag, not -o
    ("`base` has no config.json", "BASE has no config.json"),  # an argument: its metavar
    ("`energy`, `q_proj`, `a.b`, `rank ` and rank", "`energy`, `q_proj`, `a.b`, `rank ` and rank"),  # left alone
    ("no backquotes: --rank stays", "no backquotes: --rank stays"),
])
def test_with_flags(message: str, shown: str) -> None:
    assert with_flags(message, _command) == shown


def test_with_flags_without_a_command_leaves_the_message() -> None:
    assert with_flags("`rank` must be ≥ 1", None) == "`rank` must be ≥ 1"


@pytest.mark.parametrize("command, name, flag", [
    ("resize", "max_rank", "--max-rank"), ("extract", "format", "--format"), ("merge", "weights", "--weight"),
    ("prune", "budget", "--budget"), ("convert", "drop_unsupported", "--drop-unsupported"),
    ("train", "init_rank", "--init-rank"), ("merge", "do_verify", "--verify"),
])
def test_with_flags_on_the_real_commands(command: str, name: str, flag: str) -> None:
    assert with_flags(f"`{name}` is wrong", group.commands[command]) == f"{flag} is wrong"


def test_a_library_error_shows_the_running_commands_flags(monkeypatch, capsys, adapters) -> None:
    import loratools.inspect_job

    def refuse(*args: object, **kwargs: object) -> None:
        raise InvalidOptionError("`adapter` holds nothing; `json` is fine; `rank` is not inspect's")

    monkeypatch.setattr(loratools.inspect_job, "inspect_file", refuse)
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(adapters / "lora"), "--json"])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "loratools: error: ADAPTER holds nothing; --json is fine; `rank` is not inspect's\n"


# --------------------------------------------------------------------------- main() in-process

def test_main_in_process_prints_where_stdout_is_during_each_call(adapters) -> None:
    outputs = []
    for args in (["inspect", str(adapters / "lora")], ["-q", "inspect", str(adapters / "lora")]):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(args) is None
        outputs.append(buf.getvalue())
    loud, quiet = outputs
    assert "fingerprint" in loud and "modules ·" in loud  # the header and the summary line
    assert "fingerprint" not in quiet and "modules ·" not in quiet and "q_proj" in quiet  # -q: the table only


def test_main_exit_codes(capsys, adapters, tmp_path) -> None:
    assert main(["--help"]) is None and main(["inspect", "--help"]) is None
    with pytest.raises(SystemExit) as usage:
        main(["inspect", "--nope"])
    assert usage.value.code == 2 and "No such option" in capsys.readouterr().err
    (tmp_path / "exists").mkdir()
    with pytest.raises(SystemExit) as user:
        main(["resize", str(adapters / "lora"), "-o", str(tmp_path / "exists"), "--rank", "2"])
    err = capsys.readouterr().err
    assert user.value.code == 2 and err.startswith("loratools: error:") and len(err.splitlines()) == 1


def test_main_puts_torch_threads_back(adapters) -> None:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            main(["inspect", str(adapters / "lora")])  # sets one thread while it runs on the CPU
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
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
    """``[project.scripts] loratools = loratools.cli:entry``: the script pip wrote next to this interpreter."""
    script = Path(sys.executable).with_name("loratools")
    if not script.is_file():
        pytest.skip(f"no installed loratools script next to {sys.executable}")
    r = subprocess.run([str(script), "--version"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0 and __version__ in r.stdout, r.stderr
