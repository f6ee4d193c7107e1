"""The ``loratools`` command line: parse, call one library function, render.

This module is the single boundary where errors become messages: a
:class:`~loratools.errors.LoraToolsError` prints as one line on stderr and
exits with code 2; anything else is a bug and keeps its traceback. Set
``LORATOOLS_DEBUG=1`` to see tracebacks for user errors too.
"""

from __future__ import annotations

import os
import sys

import click

from . import __version__
from .errors import LoraToolsError

__all__ = ["main", "cli"]

_DEBUG = os.environ.get("LORATOOLS_DEBUG", "") not in ("", "0")


class Context:
    """What every command gets from the group's options."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="loratools")
@click.option("-q", "--quiet", is_flag=True, help="Print only results and errors: no progress, no summaries.")
@click.pass_context
def cli(ctx: click.Context, quiet: bool) -> None:
    """Inspect, merge, unmerge, compress, convert, train and share LoRA/AdaLoRA adapters.

    An ADAPTER is a PEFT directory (adapter_config.json + adapter_model.safetensors),
    a loratools single .safetensors file, or any other format `loratools convert`
    lists; the format is detected from the content. A BASE model is a Hugging Face
    model directory (single or sharded safetensors) or one .safetensors file.

    \b
    Examples:
      loratools inspect fixtures/adapters/lora
      loratools inspect adapter.safetensors --json
    """
    ctx.obj = Context(quiet=quiet)


def _load_commands() -> None:
    from .commands import COMMANDS

    for command in COMMANDS:
        cli.add_command(command)


_load_commands()


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning user errors into one line and exit code 2."""
    try:
        cli.main(args=argv, prog_name="loratools", standalone_mode=False)
    except LoraToolsError as e:
        if _DEBUG:
            raise
        click.echo(f"loratools: error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("loratools: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("loratools: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(1)


if __name__ == "__main__":
    main()
