"""One module per command; each exposes a click command. The order here is the order in --help."""

from __future__ import annotations

import click

from .convert import convert
from .inspect import inspect

COMMANDS: list[click.Command] = [inspect, convert]
