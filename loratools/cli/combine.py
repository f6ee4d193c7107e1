"""``loratools combine``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from .options import (ADAPTER, Session, device_option, force_option, format_option, output_option, pass_session,
                      rank_rule_options)

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["combine"]


@click.command()
@click.argument("adapters", nargs=-1, required=True, type=ADAPTER, metavar="ADAPTER...")
@output_option
@click.option("--weight", "weights", type=float, multiple=True, metavar="W",
              help="Weight wᵢ of each adapter, once per ADAPTER in order (default 1 each; negative subtracts).")
@rank_rule_options
@click.option("--method", default="sum", show_default=True, type=click.Choice(["sum", "ties", "dare"]),
              help="sum: Σ wᵢΔWᵢ from the factors; ties/dare: element-wise task merging of the dense ΔWᵢ "
                   "(needs a rank rule).")
@click.option("--density", type=float, default=None, metavar="D",
              help="ties/dare: fraction of each ΔWᵢ's entries kept (default 0.2).")
@click.option("--seed", type=int, default=0, show_default=True, help="ties/dare: seed of DARE's masks and the SVD.")
@format_option
@device_option
@force_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--base", type=click.Path(), default=None, help="Base model directory: with --data, report held-out loss.")
@click.option("--data", type=click.Path(), default=None,
              help="Held-out data (.txt or .jsonl as for train): the loss of the base alone (before) and of "
                   "base + the combined adapter (after).")
@pass_session
def combine(session: Session, adapters: tuple[str, ...], output: str, weights: tuple[float, ...], rank: int | None,
            energy: float | None, error: float | None, max_rank: int | None, method: str, density: float | None,
            seed: int, fmt: str, device: str, force: bool, as_json: bool, base: str | None,
            data: str | None) -> None:
    """Combine adapters into one adapter whose ΔW is Σ wᵢ·ΔWᵢ per module (the base is not needed).

    Exact by default: the scaled factors are stacked, B = [B₁ … B_k],
    A = [w₁s₁A₁; …; w_ks_kA_k], so B·A = Σ wᵢΔWᵢ at rank Σrᵢ (plain LoRA, alpha
    folded in). --rank/--energy/--error truncate each module's sum to its best
    rank-k approximation, computed from the stacked factors (QR, then the SVD of
    the small core; ΔW is never formed), with the exact relative error. Modules in
    only some inputs are included; inputs may be any format loratools reads, mixed,
    but must adapt one base. --method ties|dare merge the dense ΔWᵢ element-wise
    (TIES-Merging, DARE) and truncate: the result is no longer an exact sum.
    With --base and --data, the held-out loss of the base alone and of base + the
    combined adapter is printed.

    \b
    Examples:
      loratools combine style/ task/ -o both
      loratools combine a/ b/ --weight 1 --weight -0.5 -o a-minus-half-b --rank 16
      loratools combine t1/ t2/ t3/ -o merged --method ties --density 0.2 --rank 32
      loratools combine a/ b/ -o both --base base/ --data heldout.jsonl
    """
    from ..compress.combine import combine_adapters
    from ..errors import InvalidOptionError
    from ..formats import read_adapter, write_adapter
    from ..io import check_output
    from ..device import configure_cpu_threads
    from ..linalg import RankRule
    from . import render

    configure_cpu_threads(device)

    if weights and len(weights) != len(adapters):
        raise InvalidOptionError(f"{len(weights)} `weights` for {len(adapters)} adapters; give one per adapter or none")
    given = (rank, energy, error, max_rank) != (None, None, None, None)
    rule = RankRule(rank=rank, energy=energy, error=error, max_rank=max_rank) if given else None
    if (base is None) != (data is None):
        raise InvalidOptionError("--base and --data go together: give both for the held-out loss, or neither")
    check_output(output, force=force, inputs=adapters)  # fail before reading and computing
    ws = weights or (1.0,) * len(adapters)
    pairs = [(read_adapter(p), w) for p, w in zip(adapters, ws)]
    with render.progress(session, len({n for a, _ in pairs for n in a.modules}), "combining",
                         quiet=as_json) as advance:
        res = combine_adapters(pairs, rule=rule, method=method, density=density,  # type: ignore[arg-type]
                               seed=seed, device=device, progress=advance)
    from ._compress import heldout_line, heldout_report

    held = heldout_report(base, data, None, res.adapter, device=device)
    write_adapter(res.adapter, output, format=fmt, force=force, inputs=adapters)
    if as_json:
        render.print_json(_json(res, adapters, output, fmt) | {"heldout_loss": held})
        return
    session.out.print(_table(res))
    for note in res.notes:
        session.err.print(f"note: {note}", highlight=False)
    if not session.quiet:
        session.out.print(_summary(res, adapters, output, fmt), highlight=False)
    if held is not None:
        session.out.print(heldout_line(held, before="base alone", after="base + combined"), highlight=False)


def _json(res: Any, adapters: tuple[str, ...], output: str, fmt: str) -> dict[str, Any]:
    return {"output": output, "format": fmt, "method": res.method, "inputs": list(adapters),
            "weights": list(res.weights), "rule": res.rule.describe() if res.rule else None, "exact": res.exact,
            "density": res.density, "seed": res.seed,
            "parameters": res.adapter.parameters, "notes": list(res.notes),
            "layers": [{**vars(layer), "shape": list(layer.shape), "input_ranks": list(layer.input_ranks)}
                       for layer in res.layers]}


def _table(res: Any) -> Table:
    from rich.table import Table

    from .render import fmt_float

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


def _summary(res: Any, adapters: tuple[str, ...], output: str, fmt: str) -> str:
    from ._compress import size
    from .render import fmt_float

    terms = ", ".join(f"{a}×{w:g}" for a, w in zip(adapters, res.weights))
    worst = max((layer.rel_error for layer in res.layers), default=0.0)
    tail = f"\n{len(res.adapter.modules)} modules · {size(res.adapter.parameters)} parameters · wrote {output} ({fmt})"
    if res.method == "sum" and res.exact:
        return f"exact sum of {terms} (rank Σrᵢ per module){tail}"
    if res.method == "sum":
        return (f"sum of {terms}, truncated ({res.rule.describe()}): the best rank-k approximation per module, "
                f"relative error ≤ {fmt_float(worst)}{tail}")
    off = max((layer.sum_error for layer in res.layers), default=0.0)
    return (f"{res.method} (density {res.density:g}, seed {res.seed}) of {terms}, truncated ({res.rule.describe()}): "
            f"not an exact sum — relative error vs "
            f"Σ wᵢΔWᵢ up to {fmt_float(off)} (vs the {res.method} merge up to {fmt_float(worst)}){tail}")
