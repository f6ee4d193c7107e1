"""``loratools inspect``."""

from __future__ import annotations

import click

from .. import render
from ..formats import detect_format, read_adapter
from ..inspection import inspect_adapter
from ._common import ADAPTER, quiet


@click.command()
@click.argument("adapter", type=ADAPTER)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.pass_obj
def inspect(obj: object, adapter: str, as_json: bool) -> None:
    """Show an adapter's layers: rank, scale, spectrum and effective rank.

    Every figure comes from the singular values of each module's scaled ΔW,
    computed from the low-rank factors without forming ΔW. Columns: ‖ΔW‖F and σ₁;
    num = numerical rank (σ > max(m,n)·ε·σ₁, ε of float32); stable = Σσ²/σ₁²;
    entropy = exp(−Σ pᵢ log pᵢ), pᵢ = σᵢ/Σσ; e90/e99 = smallest rank holding
    90%/99% of Σσ².

    \b
    Examples:
      loratools inspect fixtures/adapters/lora
      loratools inspect adapter.safetensors --json | jq '.layers[0].stable_rank'
    """
    fmt = detect_format(adapter)
    report = inspect_adapter(read_adapter(adapter, format=fmt), format=fmt)
    if as_json:
        render.print_json(report)
        return
    if not quiet(obj):
        render.out.print(f"[bold]{adapter}[/]  {fmt} · {report['method']} · base {report['base_model'] or 'unknown'}"
                         f" · fingerprint {report['fingerprint'][:12]}")
    render.out.print(render.inspect_table(report))
    if not quiet(obj):
        render.out.print(f"{report['modules']} modules · {report['parameters']:,} parameters · rank "
                         f"{report['rank_min']}–{report['rank_max']} (total {report['rank_total']})"
                         + (f" · {len(report['saved_tensors'])} full tensors saved" if report["saved_tensors"] else ""))
