"""``loratools resize``."""

from __future__ import annotations

import click

from .options import ADAPTER, Session, force_option, format_option, output_option, pass_session, rank_rule_options


@click.command()
@click.argument("adapter", type=ADAPTER)
@output_option
@rank_rule_options
@format_option
@force_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--base", type=click.Path(), default=None, help="Base model directory: with --data, report held-out loss.")
@click.option("--data", type=click.Path(), default=None,
              help="Held-out data (.txt or .jsonl as for train): the loss of base + adapter before and after.")
@pass_session
def resize(session: Session, adapter: str, output: str, rank: int | None, energy: float | None, error: float | None,
           max_rank: int | None, fmt: str, force: bool, as_json: bool, base: str | None, data: str | None) -> None:
    """Re-truncate a LoRA/AdaLoRA adapter to a smaller rank; the output is always plain LoRA.

    Each layer's ΔW spectrum comes from its factors (QR of B and Aᵀ, SVD of the
    r×r core; ΔW is never formed); the top k triplets are kept (the best rank-k
    approximation) as B = U_k·S_k^½, A = S_k^½·V_kᵀ, alpha = k. --rank R keeps
    min(R, r); --energy F the smallest k with Σ_{i≤k}σᵢ² ≥ F·Σσᵢ²; --error E the
    smallest k with √(Σ_{i>k}σᵢ²) ≤ E·√(Σσᵢ²). Layers not reduced keep their
    factors. AdaLoRA input becomes plain LoRA with the same ΔW (what serving
    engines load); `resize --rank 9999` is that conversion alone.

    \b
    Examples:
      loratools resize adapter/ -o small --rank 8
      loratools resize adalora/ -o lora --energy 1.0
      loratools resize adapter/ -o small --rank 4 --base base/ --data heldout.jsonl
    """
    from ..device import configure_cpu_threads
    from ..formats import read_adapter, write_adapter
    from ..io import check_output
    from ..compress.resize import resize_adapter
    from . import render
    from ..errors import InvalidOptionError
    from ._compress import heldout_line, heldout_report, resize_table, size

    configure_cpu_threads()
    check_output(output, force=force, inputs=(adapter,))  # fail before the long computation
    if (base is None) != (data is None):
        raise InvalidOptionError("--base and --data go together: give both for the held-out loss, or neither")
    src = read_adapter(adapter)
    res = resize_adapter(src, rank=rank, energy=energy, error=error, max_rank=max_rank)
    held = heldout_report(base, data, src, res.adapter)
    write_adapter(res.adapter, output, format=fmt, force=force, inputs=(adapter,))
    if as_json:
        render.print_json({"output": output, "parameters_before": res.parameters_before,
                           "parameters": res.adapter.parameters, "heldout_loss": held,
                           "layers": [vars(r) for r in res.layers]})
        return
    session.out.print(resize_table(res.layers))
    if not session.quiet:
        session.out.print(f"{src.method} → lora · {size(res.parameters_before)} → {size(res.adapter.parameters)} "
                          f"parameters · wrote {output} ({fmt})")
    if held is not None:
        session.out.print(heldout_line(held), highlight=False)
