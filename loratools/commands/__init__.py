"""One module per command; each exposes a click command. The order here is the order in --help."""

from __future__ import annotations

import click

from .inspect import inspect
from .train import train

COMMANDS: list[click.Command] = [inspect, train]
