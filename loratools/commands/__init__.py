"""One module per command; each exposes a click command. The order here is the order in --help."""

from __future__ import annotations

import click

from .inspect import inspect
from .merge import merge, unmerge, verify

COMMANDS: list[click.Command] = [inspect, merge, unmerge, verify]
