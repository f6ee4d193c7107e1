"""``eval --html``: one self-contained page (inline SVG, no script, no network) with the report's figures.

Two plots: per example, max |Δ log-prob| against the reference for every stack (log scale); per stack, the
share of the adapter's effect kept (``kept``) beside the cosine, with the ``effect lost`` threshold drawn.
"""

from __future__ import annotations

import html
import math

from ..deltas import MIN_KEPT
from .report import EvalReport, StackResult

__all__ = ["render_html"]

_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
_W, _H, _PAD = 720, 300, 48


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.4g}"


def _per_example_svg(stacks: list[StackResult]) -> str:
    """Max |Δ log-prob| per example, one polyline per stack, on a log axis from 1e-8 up."""
    series = [(s, s.comparison.per_example) for s in stacks if s.comparison and s.comparison.per_example]
    if not series:
        return "<p>No stack to compare.</p>"
    n = max(len(v) for _, v in series)
    top = math.ceil(math.log10(max(max(v) for _, v in series) or 1e-8) + 1e-9)
    lo = min(top - 1, -8)

    def xy(i: int, v: float) -> tuple[float, float]:
        x = _PAD + (_W - 2 * _PAD) * (i / max(n - 1, 1))
        y = _H - _PAD - (_H - 2 * _PAD) * (math.log10(max(v, 10.0 ** lo)) - lo) / (top - lo)
        return x, y

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" role="img">',
             f'<rect width="{_W}" height="{_H}" fill="#fff"/>']
    for e in range(lo, top + 1):
        _, y = xy(0, 10.0 ** e)
        parts.append(f'<line x1="{_PAD}" x2="{_W - _PAD}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                     f'<text x="4" y="{y + 4:.1f}" font-size="11">1e{e}</text>')
    for k, (s, values) in enumerate(series):
        colour = _COLOURS[k % len(_COLOURS)]
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(i, v) for i, v in enumerate(values)))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>'
                  for x, y in (xy(i, v) for i, v in enumerate(values))]
        parts.append(f'<text x="{_PAD + 8}" y="{16 + 14 * k}" font-size="12" fill="{colour}">'
                     f'{html.escape(s.name)}</text>')
    parts.append(f'<text x="{_W / 2}" y="{_H - 12}" font-size="12" text-anchor="middle">example</text></svg>')
    return "".join(parts)


def _kept_svg(stacks: list[StackResult]) -> str:
    """Bars of ``kept`` (and cosine, lighter) per stack, 0 to max(1.2, largest); the MIN_KEPT line dashed."""
    rows = [s for s in stacks if s.effect is not None and s.role != "reference"]
    if not rows:
        return "<p>No stack carries the adapter besides the reference.</p>"
    vals = [v for s in rows if s.effect for v in (s.effect.kept, s.effect.cosine) if not math.isnan(v)]
    top = max([1.2, *vals])
    bottom = min([0.0, *vals])
    h = 40 + 36 * len(rows)

    def x(v: float) -> float:
        return 200 + (_W - 240) * (v - bottom) / (top - bottom)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{h}" role="img">',
             f'<rect width="{_W}" height="{h}" fill="#fff"/>']
    for i, s in enumerate(rows):
        assert s.effect is not None
        y = 20 + 36 * i
        for v, colour, dy in ((s.effect.kept, "#1f77b4", 0), (s.effect.cosine, "#9ecae1", 16)):
            v = 0.0 if math.isnan(v) else v
            parts.append(f'<rect x="{min(x(0), x(v)):.1f}" y="{y + dy}" width="{abs(x(v) - x(0)):.1f}" height="14" '
                         f'fill="{colour}"/>')
        parts.append(f'<text x="4" y="{y + 18}" font-size="12">{html.escape(s.name[:30])}</text>'
                     f'<text x="{x(max(s.effect.kept, 0) if not math.isnan(s.effect.kept) else 0) + 4:.1f}" '
                     f'y="{y + 12}" font-size="11">{100 * s.effect.kept:.3g}%</text>')
    for v, dash in ((0.0, ""), (1.0, ""), (MIN_KEPT, ' stroke-dasharray="4 3"')):
        parts.append(f'<line x1="{x(v):.1f}" x2="{x(v):.1f}" y1="10" y2="{h - 10}" stroke="#555"{dash}/>')
    return "".join(parts) + "</svg>"


def _table(report: EvalReport) -> str:
    head = ("stack", "role", "NLL", "label acc.", "greedy =", "max |Δ log-p|", "KL", "top-1 =", "kept", "cosine",
            "norm ratio", "flags")
    rows = []
    for s in report.stacks:
        c, e = s.comparison, s.effect
        cells = (s.name, s.role, _fmt(s.nll), _fmt(s.label_accuracy), _fmt(s.greedy_agreement),
                 _fmt(c.max_abs_dlogprob if c else None), _fmt(c.kl if c else None), _fmt(c.top1 if c else None),
                 _fmt(e.kept if e else None), _fmt(e.cosine if e else None), _fmt(e.norm_ratio if e else None),
                 ", ".join(s.flags))
        style = ' style="background:#fdd"' if s.flags else ""
        rows.append(f"<tr{style}>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in cells) + "</tr>")
    return ("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>")


def render_html(report: EvalReport) -> str:
    """The whole page, as text (the caller writes it atomically)."""
    verdict = "every stack agrees" if report.ok else "flagged: " + "; ".join(
        f"{s.name} ({', '.join(s.flags)})" for s in report.stacks if s.flags)
    stacks = list(report.stacks)
    notes = "".join(f"<li>{html.escape(n)}</li>" for s in stacks for n in (f"{s.name}: {x}" for x in s.notes))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>loratools eval: {html.escape(report.data)}</title>
<style>body{{font-family:sans-serif;margin:24px;color:#222}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right}}td:first-child{{text-align:left}}</style>
</head><body>
<h1>loratools eval</h1>
<p>{html.escape(report.data)}: {report.examples} examples, {report.positions} scored positions; reference
<b>{html.escape(report.reference)}</b>; {html.escape(verdict)}.</p>
{_table(report)}
<h2>Max |Δ log-prob| against the reference, per example</h2>
{_per_example_svg([s for s in stacks if s.comparison])}
<h2>The adapter's effect kept, per stack</h2>
<p>Dark: kept = ⟨Δ_S, Δ_R⟩/‖Δ_R‖²; light: cosine. Dashed: {100 * MIN_KEPT:g}%, below which the effect is lost.</p>
{_kept_svg(stacks)}
<ul>{notes}</ul>
</body></html>
"""
