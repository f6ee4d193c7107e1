"""Terminal output: rich tables, sparklines, progress. Only the CLI imports this, inside its commands."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # rich is imported when a table or a console is made: a quiet merge never loads it (~0.1 s)
    from rich.console import Console
    from rich.table import Table

    from ..inspection import GroupTotal, InspectReport
    from .options import Session

__all__ = ["console", "sparkline", "progress", "print_json", "inspect_summary", "inspect_table", "dora_lines",
           "totals_table", "allocation_table", "fmt_float"]


def console(*, stderr: bool) -> Console:
    """A console on ``sys.stdout`` (or ``sys.stderr``) as it is now; see ``options.Session``."""
    from rich.console import Console

    file = sys.stderr if stderr else sys.stdout
    # off a terminal (pipes, CI logs) use a wide fixed width so tables are not squeezed into 80 columns
    return Console(file=file, width=None if file.isatty() else 200)


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


def strict(data: Any) -> Any:
    """``data`` with every NaN/±inf float replaced by ``null``: JSON has no such numbers (RFC 8259 §6)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: strict(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict(v) for v in data]
    return data


def print_json(data: Any) -> None:
    """``data`` as strict JSON on stdout (never a bare ``NaN`` or ``Infinity``)."""
    sys.stdout.write(json.dumps(strict(data), indent=2, allow_nan=False) + "\n")


@contextlib.contextmanager
def progress(session: Session, total: int | None, description: str, *,
             quiet: bool = False, lines: bool = False) -> Iterator[Callable[..., None]]:
    """Yield ``advance(n=1, *, total=None)``; a job that learns its size later passes ``total`` then.

    Shows a bar on the session's stderr console only on a terminal and when neither
    ``quiet`` nor ``session.quiet``; off a terminal, with ``lines``, a plain line at every
    tenth of ``total`` (for slow jobs run under nohup or CI).
    """
    if quiet or session.quiet:
        yield lambda n=1, *, total=None: None
        return
    err = session.err
    if not err.is_terminal and not (lines and total):
        yield lambda n=1, *, total=None: None
        return
    if not err.is_terminal:
        done = [0]
        size = total or 1

        def line(n: int = 1, *, total: int | None = None) -> None:
            before, done[0] = done[0], done[0] + n
            if done[0] * 10 // size > before * 10 // size or done[0] == size:
                err.print(f"{description}: {done[0]}/{size}", highlight=False, soft_wrap=True)

        yield line
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=err, transient=True)
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1, *, total=None: bar.update(task, advance=n, **({"total": total} if total is not None else {}))


def inspect_summary(report: InspectReport) -> str:
    """``peft · lora · base fixtures/tiny-llama · fingerprint 0123456789ab``: what an inspect report is of."""
    return (f"{report.format} · {report.method} · base {report.base_model or 'unknown'} · "
            f"fingerprint {report.fingerprint[:12]}")


def inspect_table(report: InspectReport) -> Table:
    """One row per module of ``report``: shape, rank, alpha, scale and its spectrum's figures."""
    from rich.table import Table

    t = Table(title=None, show_lines=False, pad_edge=False)
    for col, just in [("module", "left"), ("shape", "right"), ("rank", "right"), ("alpha", "right"),
                      ("scale", "right"), ("‖ΔW‖F", "right"), ("σ₁", "right"), ("num", "right"),
                      ("stable", "right"), ("entropy", "right"), ("e90", "right"), ("e99", "right"),
                      ("spectrum", "left")]:
        t.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
    for layer in report.layers:
        s = layer.spectrum
        t.add_row(
            layer.name, "×".join(map(str, layer.shape)), str(layer.rank), fmt_float(layer.alpha),
            fmt_float(layer.scale), fmt_float(s.fro_norm), fmt_float(s.sigma_max), str(s.numerical_rank),
            f"{s.stable_rank:.2f}", f"{s.effective_rank:.2f}", str(s.energy_rank_90), str(s.energy_rank_99),
            sparkline(layer.singular_values),
        )
    return t


def dora_lines(report: InspectReport) -> list[str]:
    """One line per DoRA module: ‖m‖ and, when the base was read, the magnitude change and the full update."""
    lines = []
    for layer in report.layers:
        d = layer.dora
        if d is None:
            continue
        line = f"DoRA {layer.name}: ‖m‖ {d.magnitude_norm:.4g}"
        if d.update is not None:
            u = d.update
            line += (f" · magnitude change {d.magnitude_change:.3g} · update ‖W′−W0‖F {u.fro_norm:.4g}, "
                     f"σ₁ {u.sigma_max:.4g}, num rank {u.numerical_rank}, entropy {u.effective_rank:.1f}")
        lines.append(line)
    return lines


def totals_table(rows: Sequence[GroupTotal], key: str) -> Table:
    """``inspect``'s totals per block index (``key="layer"``) or per module type (``key="type"``)."""
    from rich.table import Table

    t = Table(pad_edge=False)
    for col in (key, "modules", "parameters", "Σ rank", "‖ΔW‖F"):
        t.add_column(col, justify="left" if col == key else "right", no_wrap=True)
    for r in rows:
        t.add_row(r.group, str(r.modules), f"{r.parameters:,}", str(r.rank_total), fmt_float(r.fro_norm))
    return t


def allocation_table(rank_pattern: dict[str, list[bool]]) -> Table:
    """AdaLoRA's final allocation after ``train``: each module's kept rank and which of its init_r triplets."""
    from ..inspection import natural_key

    from rich.table import Table

    t = Table(pad_edge=False)
    for col, just in (("module", "left"), ("rank", "right"), ("triplets kept", "left")):
        t.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
    for key in sorted(rank_pattern, key=natural_key):
        bits = rank_pattern[key]
        t.add_row(key.removesuffix(".lora_E"), f"{sum(bits)}/{len(bits)}", "".join("█" if b else "·" for b in bits))
    return t
