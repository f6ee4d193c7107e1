"""``loratools inspect``."""

from __future__ import annotations

import click

from .options import ADAPTER, Session, base_option, json_option, pass_session


@click.command()
@click.argument("adapter", type=ADAPTER)
@json_option
@base_option("for DoRA, each layer's magnitude change and the spectrum of its full update")
@pass_session
def inspect(session: Session, adapter: str, as_json: bool, base: str | None) -> None:
    """Show an adapter's layers: rank, scale, spectrum and effective rank.

    Every figure comes from the singular values of each module's scaled ΔW,
    computed from the low-rank factors without forming ΔW. Columns: ‖ΔW‖F and σ₁;
    num = numerical rank (σ > max(m,n)·ε·σ₁, ε of float32); stable = Σσ²/σ₁²;
    entropy = exp(−Σ pᵢ log pᵢ), pᵢ = σᵢ/Σσ; e90/e99 = smallest rank holding
    90%/99% of Σσ². Then totals per layer and per module type, and the recommended
    rank: the smallest one rank for every module that keeps 90%/99% of the whole
    adapter's Σσ² (give it to `resize --rank`). Layers are in natural order.

    DoRA: the table shows the LoRA part; below it, per layer, ‖m‖ and with
    --base the magnitude's change ‖m − ‖W0‖row‖/‖‖W0‖row‖ and the full update
    W′ − W0's norm, numerical and entropy effective rank (it is not low-rank).

    \b
    Examples:
      loratools inspect fixtures/adapters/lora
      loratools inspect adapter.safetensors --json | jq '.layers[0].stable_rank'
    """
    from ..device import configure_cpu_threads
    from ..inspect_job import inspect_file
    from . import render

    configure_cpu_threads()
    report = inspect_file(adapter, base=base)
    if as_json:
        render.print_json(report.to_json())
        return
    if not session.quiet:
        session.out.print(f"[bold]{adapter}[/]  {render.inspect_summary(report)}")
    session.out.print(render.inspect_table(report))
    for line in render.dora_lines(report):
        session.out.print(line)
    if not session.quiet:
        session.out.print(render.totals_table(report.by_layer, "layer"))
        session.out.print(render.totals_table(report.by_type, "type"))
        rec = report.recommended_rank
        session.out.print(f"recommended rank: {rec.energy_90} keeps 90% of the adapter's energy, "
                          f"{rec.energy_99} keeps 99% (loratools resize --rank K)")
        session.out.print(f"{report.modules} modules · {report.parameters:,} parameters · rank "
                          f"{report.rank_min}–{report.rank_max} (total {report.rank_total})"
                          + (f" · {len(report.saved_tensors)} full tensors saved" if report.saved_tensors else ""))
