"""``loratools prune``."""

from __future__ import annotations

import click

from .options import (ADAPTER, Session, base_option, data_option, device_option, force_option, format_option,
                      json_option, output_option, pass_session)


@click.command()
@click.argument("adapter", type=ADAPTER)
@output_option
@click.option("--budget", type=int, default=None, help="Total number of rank-one triplets to keep, over all layers.")
@click.option("--keep", type=float, default=None, metavar="F",
              help="Instead of --budget: keep this fraction of the adapter's triplets, round(F·Σ ranks) (0 < F ≤ 1).")
@click.option("--max-examples", type=int, default=None, help="Calibrate on at most this many rows of --data (the first).")
@json_option
@base_option("a model directory, for gradient importance with --data")
@data_option('calibration rows, {"text": ...} or {"prompt": ..., "completion": ...} (JSON lines), with --base')
@click.option("--beta1", type=float, default=0.85, show_default=True, help="EMA factor of the sensitivity.")
@click.option("--beta2", type=float, default=0.85, show_default=True, help="EMA factor of the uncertainty.")
@click.option("--to", "to", type=click.Choice(["same", "lora"]), default="same", show_default=True,
              help="Write an AdaLoRA input as plain LoRA (what serving engines load).")
@format_option
@device_option
@force_option
@pass_session
def prune(session: Session, adapter: str, output: str, budget: int | None, keep: float | None,
          max_examples: int | None, as_json: bool, base: str | None, data: str | None, beta1: float,
          beta2: float, to: str, fmt: str, device: str, force: bool) -> None:
    """Keep the BUDGET most important rank-one triplets (AdaLoRA's allocation, after training).

    Each layer is ΔW = c·P diag(λ) Q: AdaLoRA's own triplets, or for LoRA the SVD
    of ΔW (P = U, λ = σ, Q = Vᵀ). With --base and --data the importance is
    AdaLoRA's: s(θ) = Ī·Ū with Ī an EMA (β1) of |θ·∂L/∂θ| and Ū an EMA (β2) of
    |I − Ī| over the calibration examples (base model + adapter, causal-LM loss),
    and Sᵢ = s(λᵢ) + mean s(P·ᵢ) + mean s(Qᵢ·). Without them, Sᵢ = |λᵢ|. The
    BUDGET highest Sᵢ over all layers are kept (--keep F: round(F·Σ ranks) of them);
    the rest are dropped. Calibration reports its progress (a bar on a terminal, lines
    off one); --max-examples bounds its cost.

    \b
    Examples:
      loratools prune fixtures/adapters/adalora -o pruned --budget 12
      loratools prune adapter/ -o half --keep 0.5 --json
      loratools prune adapter/ -o pruned --budget 64 --base base/ --data calib.jsonl --to lora
    """
    from ..compress.prune import prune_file
    from ..device import configure_cpu_threads
    from . import render
    from ._compress import heldout_line, job_progress, prune_table, size

    configure_cpu_threads(device)
    with job_progress(session, "calibrating", quiet=as_json, lines=True) as advance:
        res = prune_file(adapter, output, budget=budget, keep=keep, base=base, data=data, max_examples=max_examples,
                         beta1=beta1, beta2=beta2, to_lora=to == "lora", format=fmt, force=force, device=device,
                         progress=advance)
    if as_json:
        render.print_json(res.to_json())
        return
    if res.importance == "magnitude" and not session.quiet:
        session.err.print("importance: |λᵢ| (magnitude only); pass --base and --data for AdaLoRA's "
                          "gradient-based importance")
    session.out.print(prune_table(res.layers))
    if not session.quiet:
        session.out.print(f"importance: {res.importance} · kept {res.kept} triplets · "
                          f"{size(res.parameters_before)} → {size(res.adapter.parameters)} parameters · "
                          f"{res.method_before} → {res.adapter.method} · wrote {output} ({fmt})")
        session.out.print(f"rank_pattern: {res.rank_pattern}", highlight=False)
    if res.heldout is not None:
        session.out.print(heldout_line(res.heldout) + " (the calibration data)", highlight=False)
