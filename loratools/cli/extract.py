"""``loratools extract``."""

from __future__ import annotations

import re

import click

from .options import (Session, data_option, device_option, dtype_option, force_option, format_option, json_option,
                      output_option, pass_session, rank_rule_options)


def _split(targets: tuple[str, ...]) -> list[str] | None:
    # commas separate patterns, except inside a regular expression's {m,n}
    return [t for arg in targets for t in re.split(r",(?![^{]*\})", arg) if t] or None


@click.command()
@click.argument("base", type=click.Path())
@click.argument("tuned", type=click.Path())
@output_option
@rank_rule_options
@click.option("--targets", multiple=True, metavar="PATTERN",
              help="Module names to extract: name suffixes (q_proj) or regular expressions, comma-separated or "
                   "repeated (--targets q_proj,v_proj). "
                   "Default: every linear/conv weight inside the transformer blocks.")
@click.option("--alpha", type=float, default=None, help="LoRA alpha to write (default: alpha = rank, scale 1).")
@format_option
@device_option
@dtype_option
@force_option
@json_option
@data_option("held-out data (.txt or .jsonl as for train): the loss of TUNED itself (before), of "
             "BASE + the extracted adapter (after) and of BASE alone")
@pass_session
def extract(session: Session, base: str, tuned: str, output: str, rank: int | None, energy: float | None,
            error: float | None, max_rank: int | None, targets: tuple[str, ...], alpha: float | None, fmt: str,
            device: str, dtype: str, force: bool, as_json: bool, data: str | None) -> None:
    """Turn a full fine-tune into a LoRA adapter: truncated SVD of TUNED − BASE.

    For each selected weight, ΔW ≈ U_r S_r V_rᵀ is stored as B = U_r·S_r^½,
    A = S_r^½·V_rᵀ with alpha = r (scale 1). The rank is fixed (--rank), or per
    layer the smallest meeting --energy F (Σ_{i≤k}σᵢ² ≥ F·Σσᵢ²) or --error E
    (‖ΔW − BA‖_F ≤ E·‖ΔW‖_F), capped by --max-rank. A randomized SVD (Halko et al.
    2011) is used when the rank is small against the matrix. The error printed is
    measured from the stored factors. Embeddings and norms are left out unless
    --targets names them. With --data, the held-out loss of TUNED (what the adapter
    stands in for) and of BASE + adapter is printed beside the matrix error: how
    much of the fine-tune's gain the adapter keeps.

    \b
    Examples:
      loratools extract base/ tuned/ -o adapter --rank 16
      loratools extract base/ tuned/ -o adapter --energy 0.9 --max-rank 64
      loratools extract base/ tuned/ -o a.safetensors --format loratools --error 0.2 --targets q_proj,v_proj
      loratools extract base/ tuned/ -o adapter --rank 16 --data heldout.txt
    """
    from ..compress.extract import extract_model
    from ..device import configure_cpu_threads
    from . import render
    from ._compress import extract_table, heldout_line, job_progress, size, skipped_summary

    configure_cpu_threads(device)
    with job_progress(session, "extracting", quiet=as_json) as advance:
        res = extract_model(base, tuned, output, rank=rank, energy=energy, error=error, max_rank=max_rank,
                            targets=_split(targets), alpha=alpha, format=fmt, dtype=dtype, device=device,
                            force=force, data=data, progress=advance)
    if as_json:
        render.print_json(res.to_json())
        return
    session.out.print(extract_table(res.layers))
    if not session.quiet:
        ranks = [r.rank for r in res.layers]
        session.out.print(
            f"{len(res.layers)} layers · rank {min(ranks)}–{max(ranks)} · adapter {size(res.parameters)} parameters "
            f"vs {size(res.delta_parameters)} in the full ΔW ({100 * res.parameters / res.delta_parameters:.2f}%) · "
            f"overall rel. error {res.total_rel_error:.4g}")
        if res.skipped:
            session.out.print(skipped_summary(res.skipped), highlight=False)
        session.out.print(f"wrote {output} ({fmt})")
    if res.heldout is not None:
        session.out.print(heldout_line(res.heldout, before="tuned", after="base + adapter"), highlight=False)
