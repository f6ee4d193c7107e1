"""Tables and the held-out report shared by ``extract``, ``resize``, ``prune`` and ``combine`` (imported inside them)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from rich.table import Table

from ..inspection import natural_key
from .render import fmt_float

__all__ = ["extract_table", "resize_table", "prune_table", "skipped_summary", "size", "heldout_report", "heldout_line"]


def heldout_report(base: str | None, data: str | None, before: Any, after: Any, *, tuned: str | None = None,
                   max_examples: int | None = None, device: str = "auto") -> dict[str, Any] | None:
    """With ``--base`` and ``--data``: the held-out loss of the base alone, with the input adapter (``before``;
    None: the base alone, as for ``combine``; ``tuned``: that fine-tuned model itself, as for ``extract``) and
    with the output adapter (``after``), from :mod:`loratools.lm.heldout`; None without them."""
    if base is None or data is None:
        return None
    import torch

    from ..lm.heldout import HeldOut

    held = HeldOut(base, data, max_examples=max_examples, device=device)
    with torch.no_grad():
        alone, loss_after = held.loss(None), held.loss(after)
        loss_before = held.model_loss(tuned) if tuned is not None else alone if before is None else held.loss(before)
    return {"data": str(data), "base": alone, "before": loss_before, "after": loss_after}


def heldout_line(held: dict[str, Any], *, before: str = "before", after: str = "after") -> str:
    return (f"held-out loss on {held['data']}: {before} {held['before']:.4f} → {after} {held['after']:.4f} "
            f"(base alone {held['base']:.4f})")


def _ordered(layers: Sequence[Any]) -> list[Any]:
    """Rows in natural module order (``layers.2`` before ``layers.10``), as in ``inspect``."""
    return sorted(layers, key=lambda r: natural_key(r.name))


def size(n: int) -> str:
    return f"{n:,}"


def _pct(x: float) -> str:
    if x == 0:
        return "0%"
    return f"{100 * x:.2f}%" if x >= 1e-4 else f"{100 * x:.1e}%"


def extract_table(layers: Sequence[Any]) -> Table:
    t = Table(pad_edge=False)
    for col, just in [("module", "left"), ("shape", "right"), ("rank", "right"), ("rel. error", "right"),
                      ("energy kept", "right"), ("lost", "right"), ("‖ΔW‖F", "right"), ("svd", "left")]:
        t.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
    for r in _ordered(layers):
        t.add_row(r.name, "×".join(map(str, r.shape)), str(r.rank), fmt_float(r.rel_error), _pct(r.energy_kept),
                  _pct(max(0.0, 1 - r.energy_kept)), fmt_float(r.norm), r.method)
    return t


def resize_table(layers: Sequence[Any]) -> Table:
    t = Table(pad_edge=False)
    for col, just in [("module", "left"), ("rank", "right"), ("→", "right"), ("rel. error", "right"),
                      ("energy kept", "right"), ("lost", "right")]:
        t.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
    for r in _ordered(layers):
        t.add_row(r.name, str(r.rank_before), str(r.rank_after), fmt_float(r.rel_error), _pct(r.energy_kept),
                  _pct(max(0.0, 1 - r.energy_kept)))
    return t


def prune_table(layers: Sequence[Any]) -> Table:
    t = Table(pad_edge=False)
    for col, just in [("module", "left"), ("rank", "right"), ("→", "right"), ("kept triplets", "left"),
                      ("rel. error", "right"), ("importance kept", "right"), ("lost", "right")]:
        t.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
    for r in _ordered(layers):
        kept = ",".join(map(str, r.kept)) if len(r.kept) <= 12 else ",".join(map(str, r.kept[:12])) + ",…"
        t.add_row(r.name, str(r.rank_before), str(r.rank_after), kept or "-", fmt_float(r.rel_error),
                  fmt_float(r.importance_kept), fmt_float(r.importance_lost))
    return t


def skipped_summary(skipped: Sequence[Any]) -> str:
    """One line per reason: how many tensors were left out and a few of their names."""
    by: Counter[str] = Counter(s.why for s in skipped)
    lines = []
    for why, n in by.most_common():
        names = [s.name for s in skipped if s.why == why]
        shown = ", ".join(names[:3]) + (f" … (+{n - 3})" if n > 3 else "")
        lines.append(f"  left out {n}: {why} — {shown}")
    return "\n".join(lines)
