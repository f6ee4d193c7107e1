"""Tables, summaries and progress shared by ``extract``, ``resize``, ``prune`` and ``combine`` (imported inside them).

The jobs (:mod:`loratools.compress`) return typed results; this module only renders them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

from rich.table import Table

from ..inspection import natural_key
from . import render
from .render import fmt_float

if TYPE_CHECKING:
    from ..compress.combine import CombineResult
    from ..compress.extract import LayerReport, Skipped
    from ..compress.prune import PruneLayer
    from ..compress.resize import ResizeLayer
    from ..lm.heldout import HeldOutReport
    from .options import Session

__all__ = ["extract_table", "resize_table", "prune_table", "combine_table", "combine_summary", "skipped_summary",
           "size", "heldout_line", "job_progress"]


@contextmanager
def job_progress(session: Session, description: str, *, quiet: bool = False,
                 lines: bool = False) -> Iterator[Callable[..., None]]:
    """:func:`render.progress` for a job that says its size when it starts (``progress(0, total=n)``, the
    :class:`loratools.io.Progress` protocol): the bar, or with ``lines`` the lines, opens at that first call."""
    with ExitStack() as stack:
        shown: list[Callable[..., None]] = []

        def advance(n: int = 1, *, total: int | None = None) -> None:
            if not shown:
                shown.append(stack.enter_context(render.progress(session, total, description, quiet=quiet,
                                                                 lines=lines)))
                total = None  # given to the bar as it opened
            if n or total is not None:
                shown[0](n, **({"total": total} if total is not None else {}))

        yield advance


def heldout_line(held: HeldOutReport, *, before: str = "before", after: str = "after") -> str:
    return (f"held-out loss on {held.data}: {before} {held.before:.4f} → {after} {held.after:.4f} "
            f"(base alone {held.base:.4f})")


def _ordered(layers: Sequence[Any]) -> list[Any]:
    """Rows in natural module order (``layers.2`` before ``layers.10``), as in ``inspect``."""
    return sorted(layers, key=lambda r: natural_key(r.name))


def size(n: int) -> str:
    return f"{n:,}"


def _pct(x: float) -> str:
    if x == 0:
        return "0%"
    return f"{100 * x:.2f}%" if x >= 1e-4 else f"{100 * x:.1e}%"


def extract_table(layers: Sequence[LayerReport]) -> Table:
    t = Table(pad_edge=False)
    for col, just in [("module", "left"), ("shape", "right"), ("rank", "right"), ("rel. error", "right"),
                      ("energy kept", "right"), ("lost", "right"), ("‖ΔW‖F", "right"), ("svd", "left")]:
        t.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
    for r in _ordered(layers):
        t.add_row(r.name, "×".join(map(str, r.shape)), str(r.rank), fmt_float(r.rel_error), _pct(r.energy_kept),
                  _pct(max(0.0, 1 - r.energy_kept)), fmt_float(r.norm), r.method)
    return t


def resize_table(layers: Sequence[ResizeLayer]) -> Table:
    t = Table(pad_edge=False)
    for col, just in [("module", "left"), ("rank", "right"), ("→", "right"), ("rel. error", "right"),
                      ("energy kept", "right"), ("lost", "right")]:
        t.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
    for r in _ordered(layers):
        t.add_row(r.name, str(r.rank_before), str(r.rank_after), fmt_float(r.rel_error), _pct(r.energy_kept),
                  _pct(max(0.0, 1 - r.energy_kept)))
    return t


def prune_table(layers: Sequence[PruneLayer]) -> Table:
    t = Table(pad_edge=False)
    for col, just in [("module", "left"), ("rank", "right"), ("→", "right"), ("kept triplets", "left"),
                      ("rel. error", "right"), ("importance kept", "right"), ("lost", "right")]:
        t.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
    for r in _ordered(layers):
        kept = ",".join(map(str, r.kept)) if len(r.kept) <= 12 else ",".join(map(str, r.kept[:12])) + ",…"
        t.add_row(r.name, str(r.rank_before), str(r.rank_after), kept or "-", fmt_float(r.rel_error),
                  fmt_float(r.importance_kept), fmt_float(r.importance_lost))
    return t


def skipped_summary(skipped: Sequence[Skipped]) -> str:
    """One line per reason: how many tensors were left out and a few of their names."""
    by: Counter[str] = Counter(s.why for s in skipped)
    lines = []
    for why, n in by.most_common():
        names = [s.name for s in skipped if s.why == why]
        shown = ", ".join(names[:3]) + (f" … (+{n - 3})" if n > 3 else "")
        lines.append(f"  left out {n}: {why} — {shown}")
    return "\n".join(lines)


def combine_table(res: CombineResult) -> Table:
    dense = res.method != "sum"
    t = Table(pad_edge=False)
    cols = [("module", "left"), ("input ranks", "right"), ("rank", "right"), ("rel. error", "right")]
    for col, just in cols + ([("vs Σ wᵢΔWᵢ", "right")] if dense else []):
        t.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
    for layer in res.layers:
        ranks = " + ".join("—" if r is None else str(r) for r in layer.input_ranks)
        row = [layer.name, ranks, str(layer.rank), fmt_float(layer.rel_error)]
        t.add_row(*row, *([fmt_float(layer.sum_error)] if dense else []))
    return t


def combine_summary(res: CombineResult) -> str:
    """What was combined, how exactly, and where it was written."""
    terms = ", ".join(f"{a}×{w:g}" for a, w in zip(res.inputs, res.weights))
    worst = max((layer.rel_error for layer in res.layers), default=0.0)
    tail = (f"\n{len(res.adapter.modules)} modules · {size(res.adapter.parameters)} parameters · "
            f"wrote {res.output} ({res.format})")
    if res.method == "sum" and res.exact:
        return f"exact sum of {terms} (rank Σrᵢ per module){tail}"
    rule = res.rule.describe() if res.rule else ""
    if res.method == "sum":
        return (f"sum of {terms}, truncated ({rule}): the best rank-k approximation per module, "
                f"relative error ≤ {fmt_float(worst)}{tail}")
    off = max((layer.sum_error for layer in res.layers), default=0.0)
    return (f"{res.method} (density {res.density:g}, seed {res.seed}) of {terms}, truncated ({rule}): "
            f"not an exact sum — relative error vs "
            f"Σ wᵢΔWᵢ up to {fmt_float(off)} (vs the {res.method} merge up to {fmt_float(worst)}){tail}")
