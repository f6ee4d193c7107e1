"""One module per command; each exposes a click command. The order here is the order in --help."""

from __future__ import annotations

import click

from .convert import convert
from .extract import extract
from .hub import pull, push
from .inspect import inspect
from .merge import merge, unmerge, verify
from .prune import prune
from .resize import resize
from .serve import check, export
from .train import train

COMMANDS: list[click.Command] = [inspect, merge, unmerge, verify, extract, resize, prune, convert, check, export, train,
                                  pull, push]
