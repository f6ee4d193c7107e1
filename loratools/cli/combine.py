"""``loratools combine``."""

from __future__ import annotations

import click

from .options import (ADAPTER, Session, base_option, data_option, device_option, force_option, format_option,
                      json_option, output_option, pass_session, rank_rule_options)

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
@json_option
@base_option("a model directory; with --data, the held-out loss of the base alone and of base + the combined adapter")
@data_option("held-out data (.txt or .jsonl as for train), with --base")
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
    from ..compress.combine import combine_files
    from ..device import configure_cpu_threads
    from . import render
    from ._compress import combine_summary, combine_table, heldout_line, job_progress

    configure_cpu_threads(device)
    with job_progress(session, "combining", quiet=as_json) as advance:
        res = combine_files(adapters, output, weights=weights or None, rank=rank, energy=energy, error=error,
                            max_rank=max_rank, method=method, density=density,  # type: ignore[arg-type]
                            seed=seed, format=fmt, device=device, force=force, base=base, data=data,
                            progress=advance)
    if as_json:
        render.print_json(res.to_json())
        return
    session.out.print(combine_table(res))
    for note in res.notes:
        session.err.print(f"note: {note}", highlight=False)
    if not session.quiet:
        session.out.print(combine_summary(res), highlight=False)
    if res.heldout is not None:
        session.out.print(heldout_line(res.heldout, before="base alone", after="base + combined"), highlight=False)
