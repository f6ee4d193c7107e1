"""Options and argument types shared by the commands."""

from __future__ import annotations

from typing import Any

import click


__all__ = ["AdapterPath", "ADAPTER", "output_option", "force_option", "device_option", "dtype_option", "quiet"]


class AdapterPath(click.ParamType):
    """A local adapter path, or ``hf://REPO_ID[@REV]`` which is pulled to the local cache first."""

    name = "adapter"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        value = str(value)
        if value.startswith("hf://"):
            from .. import hub  # imported only when used: huggingface_hub is slow to load

            repo_id, revision = hub.parse_hf_uri(value)
            return str(hub.pull(repo_id, revision=revision))
        return value


ADAPTER = AdapterPath()

output_option = click.option("-o", "--output", "output", required=True, type=click.Path(),
                             help="Where to write the result (written under a temporary name, renamed when complete).")
force_option = click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
device_option = click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda",
                             help="Where to compute: auto picks CUDA when present, else CPU.")
dtype_option = click.option("--dtype", default="auto", show_default=True,
                            type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
                            help="Output dtype; auto keeps the input's.")


def quiet(obj: object) -> bool:
    return bool(getattr(obj, "quiet", False))
