"""Terminal output: rich tables, sparklines, progress. Only the CLI imports this."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

__all__ = ["out", "err", "sparkline", "progress", "print_json", "inspect_table", "fmt_float"]

_consoles: dict[bool, tuple[TextIO, Console]] = {}


def _console(stderr: bool) -> Console:
    """The console for the current sys.stdout (or sys.stderr), made when first used with that stream.

    Made at use, not at import: the stream may have been replaced since (output captured by a
    caller or a test), and width and colours follow it. Off a terminal (pipes, CI logs) a wide
    fixed width, so tables are not squeezed into 80 columns.
    """
    stream = sys.stderr if stderr else sys.stdout
    made = _consoles.get(stderr)
    if made is None or made[0] is not stream:
        made = _consoles[stderr] = (stream, Console(file=stream, width=None if stream.isatty() else 200))
    return made[1]


def __getattr__(name: str) -> Console:  # render.out, render.err
    if name in ("out", "err"):
        return _console(stderr=name == "err")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

_BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float], *, width: int = 16) -> str:
    """One character per value (at most ``width``), heights relative to the largest."""
    vals = list(values)[:width]
    top = max(vals) if vals else 0.0
    if top <= 0:
        return "·" * len(vals)
    return "".join(_BARS[min(len(_BARS) - 1, int(v / top * (len(_BARS) - 1) + 0.5))] for v in vals)


def fmt_float(x: float) -> str:
    return f"{x:.3g}" if x and (abs(x) < 1e-2 or abs(x) >= 1e4) else f"{x:.3f}".rstrip("0").rstrip(".") or "0"


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def progress(total: int, description: str, *, quiet: bool = False) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``; shows a bar only on a terminal and when not quiet."""
    err = _console(stderr=True)
    if quiet or not err.is_terminal:
        yield lambda n=1: None
        return
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True)
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


def inspect_table(report: dict[str, Any]) -> Table:
    t = Table(title=None, show_lines=False, pad_edge=False)
    for col, just in [("module", "left"), ("shape", "right"), ("rank", "right"), ("alpha", "right"),
                      ("scale", "right"), ("‖ΔW‖F", "right"), ("σ₁", "right"), ("num", "right"),
                      ("stable", "right"), ("entropy", "right"), ("e90", "right"), ("e99", "right"),
                      ("spectrum", "left")]:
        t.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
    for layer in report["layers"]:
        t.add_row(
            layer["name"], "×".join(map(str, layer["shape"])), str(layer["rank"]), fmt_float(layer["alpha"]),
            fmt_float(layer["scale"]), fmt_float(layer["fro_norm"]), fmt_float(layer["sigma_max"]),
            str(layer["numerical_rank"]), f"{layer['stable_rank']:.2f}", f"{layer['effective_rank']:.2f}",
            str(layer["energy_rank_90"]), str(layer["energy_rank_99"]), sparkline(layer["singular_values"]),
        )
    return t
