"""``loratools inspect``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from .options import ADAPTER, Session, base_option, json_option, pass_session

if TYPE_CHECKING:
    from ..merge.onto import TrainedOn


@click.command()
@click.argument("adapter", type=ADAPTER)
@json_option
@base_option("for DoRA, each layer's magnitude change and the spectrum of its full update; with --qlora, "
             "the 16-bit weights W0")
@click.option("--qlora", type=click.Choice(["nf4", "nf4-dq", "fp4", "fp4-dq", "int8"]), default=None,
              help="Instead of the spectrum: per layer ‖deq(Q(W0)) − W0‖F / ‖ΔW‖F for this bitsandbytes 4-bit "
                   "(-dq: double quantization) or int8 base, and whether to merge onto the original or the "
                   "dequantized weights (needs --base; refused if the adapter records another base).")
@pass_session
def inspect(session: Session, adapter: str, as_json: bool, base: str | None, qlora: str | None) -> None:
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

    --qlora: for an adapter trained on a quantized base, each layer's quantization
    error ‖deq(Q(W0)) − W0‖F next to its update ‖ΔW‖F, their ratio, the overall
    ratio √Σ‖E‖²/√Σ‖ΔW‖², and which base to merge onto (docs/experiments.md).
    An adapter that records its base (`train --quantize` writes it in
    README.md as peft's card does; training_config.json) says so below its
    table.

    \b
    Examples:
      loratools inspect fixtures/adapters/lora
      loratools inspect adapter.safetensors --json | jq '.layers[0].stable_rank'
      loratools inspect fixtures/adapters/lora --base fixtures/tiny-llama --qlora nf4-dq
    """
    from ..device import configure_cpu_threads
    from ..inspect_job import inspect_file
    from . import render

    configure_cpu_threads()
    trained_on = _trained_on(adapter, qlora)
    if qlora is not None:
        _qlora(session, adapter, base, qlora, as_json)
        return
    report = inspect_file(adapter, base=base)
    if as_json:
        render.print_json(report.to_json())
        return
    if not session.quiet:
        session.out.print(f"[bold]{adapter}[/]  {render.inspect_summary(report)}")
    session.out.print(render.inspect_table(report))
    for line in render.dora_lines(report):
        session.out.print(line)
    if trained_on is not None and not session.quiet:
        session.out.print(f"trained on a bitsandbytes {trained_on.quant} base ({trained_on.where}): --base W0 "
                          f"--qlora {trained_on.quant} shows whether to merge it onto the original or the "
                          "dequantized weights")
    if not session.quiet:
        session.out.print(render.totals_table(report.by_layer, "layer"))
        session.out.print(render.totals_table(report.by_type, "type"))
        rec = report.recommended_rank
        session.out.print(f"recommended rank: {rec.energy_90} keeps 90% of the adapter's energy, "
                          f"{rec.energy_99} keeps 99% (loratools resize --rank K)")
        session.out.print(f"{report.modules} modules · {report.parameters:,} parameters · rank "
                          f"{report.rank_min}–{report.rank_max} (total {report.rank_total})"
                          + (f" · {len(report.saved_tensors)} full tensors saved" if report.saved_tensors else ""))


def _trained_on(adapter: str, qlora: str | None) -> TrainedOn | None:
    """The base the adapter records (:func:`loratools.merge.onto.recorded_base`); a contradicting --qlora refused."""
    from ..merge.onto import check_recorded

    records = check_recorded(qlora, [adapter])
    return records[0] if records else None


def _qlora(session: Session, adapter: str, base: str | None, quant: str, as_json: bool) -> None:
    from rich.table import Table

    from ..errors import InvalidOptionError
    from ..inspect_job import qlora_file
    from . import render

    if base is None:
        raise InvalidOptionError("`qlora` needs `base`: the 16-bit model the QLoRA base was quantized from")
    report = qlora_file(adapter, base=base, quant=quant)
    if as_json:
        render.print_json(report.to_json())
        return
    table = Table("module", "‖E‖F", "‖ΔW‖F", "‖E‖/‖ΔW‖", "‖E‖/‖W0‖")
    for r in report.rows:
        table.add_row(r.module, f"{r.quant_error:.4g}", f"{r.delta:.4g}", f"{r.ratio:.3g}",
                      f"{r.quant_error / r.weight:.3g}" if r.weight else "-")
    session.out.print(table)
    session.out.print(f"overall ‖E‖/‖ΔW‖ = {report.ratio:.3g} ({quant}, {len(report.rows)} modules): merge onto the "
                      f"{report.favours} weights")
