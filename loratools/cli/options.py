"""What the commands share: the run's session (-q and its consoles), options and argument types.

Only click is imported here: every command module imports this at start-up, so
``loratools --help`` must not pay for rich, torch or the library.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from rich.console import Console

#: a command function being decorated (the decorators here return it with one more parameter)
F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["Session", "pass_session", "AdapterPath", "ADAPTER", "output_option", "force_option", "device_option",
           "dtype_option", "rank_rule_options", "format_option", "json_option", "base_option", "data_option"]


class Session:
    """What every command gets from the group: ``-q`` and consoles bound to this run's stdout/stderr.

    The consoles are made on first use, from ``sys.stdout``/``sys.stderr`` as they are then,
    so each in-process ``main([...])`` (under pytest's capture, say) prints where that run prints.
    """

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    @functools.cached_property
    def out(self) -> Console:
        from .render import console

        return console(stderr=False)

    @functools.cached_property
    def err(self) -> Console:
        from .render import console

        return console(stderr=True)


# a command run without the group (click's CliRunner on one command) gets a default session
pass_session = click.make_pass_decorator(Session, ensure=True)


class AdapterPath(click.ParamType):
    """A local adapter path, or ``hf://REPO_ID[@REV]`` which is pulled to the local cache first."""

    name = "adapter"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        if text.startswith("hf://"):
            from ..hub import client as hub  # imported only when used: huggingface_hub is slow to load

            repo_id, revision = hub.parse_hf_uri(text)
            return str(hub.pull(repo_id, revision=revision))
        return text


ADAPTER = AdapterPath()

output_option = click.option("-o", "--output", "output", required=True, type=click.Path(),
                             help="Where to write the result (written under a temporary name, renamed when complete).")
force_option = click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
device_option = click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda",
                             help="Where to compute: auto picks CUDA when present, else CPU.")
dtype_option = click.option("--dtype", default="auto", show_default=True,
                            type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
                            help="Output dtype; auto keeps the input's.")


def rank_rule_options(f: F) -> F:
    """--rank / --energy / --error / --max-rank (exactly one of the first three)."""
    for opt in reversed([
        click.option("--rank", type=int, default=None, help="Keep this rank in every layer."),
        click.option("--energy", type=float, default=None, metavar="F",
                     help="Per layer, the smallest rank k with Σ_{i≤k} σᵢ² ≥ F·Σσᵢ² (0 < F ≤ 1)."),
        click.option("--error", type=float, default=None, metavar="E",
                     help="Per layer, the smallest rank k with ‖ΔW − ΔW_k‖_F ≤ E·‖ΔW‖_F (0 ≤ E < 1)."),
        click.option("--max-rank", type=int, default=None, help="Cap the rank that --energy/--error pick."),
    ]):
        f = opt(f)
    return f


format_option = click.option("--format", "fmt", default="peft", show_default=True,
                             help="Output format (any format loratools writes, e.g. peft, loratools).")

json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print the result as one JSON object (for scripts) instead of tables.")


def base_option(purpose: str, *, required: bool = False) -> Callable[[F], F]:
    """The one ``--base`` option: the base model a command reads, with what this command reads it for."""
    return click.option("--base", type=click.Path(), default=None, required=required,
                        help=f"Base model (a directory or .safetensors file, or a .gguf): {purpose}.")


def data_option(purpose: str) -> Callable[[F], F]:
    """The one ``--data`` option: a text, JSONL or chat file, with what this command uses it for."""
    return click.option("--data", type=click.Path(), default=None,
                        help=f"Data (plain text, .jsonl rows or chat): {purpose}.")
