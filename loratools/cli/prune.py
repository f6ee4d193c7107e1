"""``loratools prune``."""

from __future__ import annotations

import click

from ..errors import InvalidOptionError
from .options import ADAPTER, Session, device_option, force_option, format_option, output_option, pass_session


@click.command()
@click.argument("adapter", type=ADAPTER)
@output_option
@click.option("--budget", type=int, default=None, help="Total number of rank-one triplets to keep, over all layers.")
@click.option("--keep", type=float, default=None, metavar="F",
              help="Instead of --budget: keep this fraction of the adapter's triplets, round(F·Σ ranks) (0 < F ≤ 1).")
@click.option("--max-examples", type=int, default=None, help="Calibrate on at most this many rows of --data (the first).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--base", type=click.Path(), default=None, help="Base model directory (for gradient importance).")
@click.option("--data", type=click.Path(), default=None,
              help='Calibration JSON lines: {"text": ...} or {"prompt": ..., "completion": ...}.')
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
    from ..device import configure_cpu_threads, resolve_device
    from ..formats import read_adapter, write_adapter
    from ..io import check_output
    from ..lm.data import read_rows
    from ..lm.load import load_causal_lm
    from ..compress.prune import budget_of, calibration_scores, prune_adapter
    from . import render
    from ._compress import heldout_line, heldout_report, prune_table, size

    configure_cpu_threads(device)
    check_output(output, force=force, inputs=(adapter,))  # fail before the long computation
    if (base is None) != (data is None):
        raise InvalidOptionError("--base and --data go together: give both for gradient importance, or neither")
    if (budget is None) == (keep is None):
        raise InvalidOptionError("give --budget N or --keep F (one of them)")
    if max_examples is not None and max_examples < 1:
        raise InvalidOptionError(f"--max-examples must be at least 1, got {max_examples}")
    src = read_adapter(adapter)
    budget = budget if budget is not None else budget_of(src, keep or 0.0)
    importance = None
    if base is not None and data is not None:
        examples = read_rows(data, what="calibration data", plain_text=False)[:max_examples]
        model, tokenizer = load_causal_lm(base, device=resolve_device(device), frozen=True)
        with render.progress(session, len(examples), "calibrating", quiet=as_json,
                             lines=True) as advance:
            importance = calibration_scores(src, model, tokenizer, examples, beta1=beta1, beta2=beta2,
                                            progress=advance)
    elif not session.quiet and not as_json:
        session.err.print("importance: |λᵢ| (magnitude only); pass --base and --data for AdaLoRA's "
                          "gradient-based importance")
    res = prune_adapter(src, budget=budget, importance=importance, to_lora=to == "lora")
    # on the calibration data itself: the loss the pruning was scored on (give other data to resize for a test set)
    held = heldout_report(base, data, src, res.adapter, max_examples=max_examples, device=device)
    write_adapter(res.adapter, output, format=fmt, force=force, inputs=(adapter,) + ((base,) if base else ()))
    if as_json:
        render.print_json({"output": output, "importance": res.importance, "budget": budget, "heldout_loss": held,
                           "kept": sum(res.rank_pattern.values()), "parameters_before": src.parameters,
                           "parameters": res.adapter.parameters, "method": res.adapter.method,
                           "rank_pattern": res.rank_pattern, "layers": [vars(r) for r in res.layers]})
        return
    session.out.print(prune_table(res.layers))
    if not session.quiet:
        pattern = {n: r for n, r in res.rank_pattern.items()}
        session.out.print(f"importance: {res.importance} · kept {sum(pattern.values())} triplets · "
                          f"{size(src.parameters)} → {size(res.adapter.parameters)} parameters · "
                          f"{src.method} → {res.adapter.method} · wrote {output} ({fmt})")
        session.out.print(f"rank_pattern: {pattern}", highlight=False)
    if held is not None:
        session.out.print(heldout_line(held) + " (the calibration data)", highlight=False)
