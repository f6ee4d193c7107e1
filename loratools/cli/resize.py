"""``loratools resize``."""

from __future__ import annotations

import click

from .options import (ADAPTER, Session, base_option, data_option, force_option, format_option, json_option,
                      output_option, pass_session, rank_rule_options)


@click.command()
@click.argument("adapter", type=ADAPTER)
@output_option
@rank_rule_options
@format_option
@force_option
@json_option
@base_option("a model directory; with --data, the held-out loss of base + adapter before and after")
@data_option("held-out data (.txt or .jsonl as for train), with --base")
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
    from ..compress.resize import resize_file
    from ..device import configure_cpu_threads
    from . import render
    from ._compress import heldout_line, job_progress, resize_table, size

    configure_cpu_threads()
    with job_progress(session, "resizing", quiet=as_json) as advance:
        res = resize_file(adapter, output, rank=rank, energy=energy, error=error, max_rank=max_rank, format=fmt,
                          force=force, base=base, data=data, progress=advance)
    if as_json:
        render.print_json(res.to_json())
        return
    session.out.print(resize_table(res.layers))
    if not session.quiet:
        session.out.print(f"{res.method_before} → lora · {size(res.parameters_before)} → "
                          f"{size(res.adapter.parameters)} parameters · wrote {output} ({fmt})")
    if res.heldout is not None:
        session.out.print(heldout_line(res.heldout), highlight=False)
