"""``loratools inspect``."""

from __future__ import annotations

import click

from .options import ADAPTER, Session, pass_session


@click.command()
@click.argument("adapter", type=ADAPTER)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--base", type=click.Path(), default=None,
              help="Base model: for DoRA, each layer's magnitude change and the spectrum of its full update.")
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
    from ..device import configure_cpu_threads, map_in_threads
    from ..formats import detect_format, read_adapter
    from ..inspection import inspect_adapter
    from . import render

    configure_cpu_threads()
    fmt = detect_format(adapter)
    ad = read_adapter(adapter, format=fmt)
    if base is not None and ad.is_dora:
        from ..io import ModelReader

        with ModelReader(base) as model:
            report = inspect_adapter(ad, format=fmt, base=lambda name: model.get(f"{name}.weight"))
    else:
        report = inspect_adapter(ad, format=fmt, mapper=map_in_threads)
    if as_json:
        render.print_json(report)
        return
    if not session.quiet:
        session.out.print(f"[bold]{adapter}[/]  {fmt} · {report['method']} · base {report['base_model'] or 'unknown'}"
                          f" · fingerprint {report['fingerprint'][:12]}")
    session.out.print(render.inspect_table(report))
    for layer in report["layers"]:
        d = layer.get("dora")
        if d is None:
            continue
        line = f"DoRA {layer['name']}: ‖m‖ {d['magnitude_norm']:.4g}"
        if "update" in d:
            u = d["update"]
            line += (f" · magnitude change {d['magnitude_change']:.3g} · update ‖W′−W0‖F {u['fro_norm']:.4g}, "
                     f"σ₁ {u['sigma_max']:.4g}, num rank {u['numerical_rank']}, entropy {u['effective_rank']:.1f}")
        session.out.print(line)
    if not session.quiet:
        session.out.print(render.totals_table(report["by_layer"], "layer"))
        session.out.print(render.totals_table(report["by_type"], "type"))
        rec = report["recommended_rank"]
        session.out.print(f"recommended rank: {rec['energy_90']} keeps 90% of the adapter's energy, "
                          f"{rec['energy_99']} keeps 99% (loratools resize --rank K)")
        session.out.print(f"{report['modules']} modules · {report['parameters']:,} parameters · rank "
                          f"{report['rank_min']}–{report['rank_max']} (total {report['rank_total']})"
                          + (f" · {len(report['saved_tensors'])} full tensors saved" if report["saved_tensors"] else ""))
