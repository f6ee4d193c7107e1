"""``loratools check --for RUNTIME`` and ``loratools export --for RUNTIME``: serving an adapter."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from .options import ADAPTER, Session, base_option, force_option, json_option, output_option, pass_session

if TYPE_CHECKING:
    from ..serve.check import CheckReport
    from ..serve.export import ExportResult

#: the names of serve/runtimes.py's RUNTIMES (not imported: `--help` imports click only; a test keeps them equal)
RUNTIME_NAMES = ["vllm", "sglang", "llama.cpp", "ollama"]

runtime_option = click.option("--for", "runtime", required=True, type=click.Choice(RUNTIME_NAMES, case_sensitive=False),
                              help="The serving runtime.")
max_rank_option = click.option("--max-lora-rank", "max_lora_rank", type=int, default=None, metavar="R",
                               help="The runtime's rank limit (vLLM: 1, 8, 16, 32, 64, 128, 256, 320 or 512).")


@click.command()
@click.argument("adapter", type=ADAPTER)
@runtime_option
@max_rank_option
@base_option("its architecture, head counts and shapes, for the rules that need them")
@click.option("--runtime-version", default=None, metavar="V",
              help="Count only the rules that hold in this version of the runtime (e.g. 0.34.0 for vLLM).")
@json_option
@pass_session
def check(session: Session, adapter: str, runtime: str, max_lora_rank: int | None, base: str | None,
          runtime_version: str | None, as_json: bool) -> None:
    """List every rule of RUNTIME that ADAPTER breaks, with the modules and what `export` would do.

    A DoRA adapter is listed under the rule `dora`, with the export that folds
    it into plain LoRA (--base and --error). Exit code 0: the runtime loads it
    and computes the same ΔW for every module;
    1: it would refuse it or compute something else; 2: bad input. The rules, with
    the runtime version and source file each comes from, are in docs/runtimes.md.

    \b
    Examples:
      loratools check fixtures/adapters/rslora --for vllm
      loratools check adapter/ --for vllm --max-lora-rank 16 --json
      loratools check adapter.gguf --for llama.cpp --base model.gguf
    """
    from . import render
    from ..serve.check import check_file

    report = check_file(adapter, runtime, max_lora_rank=max_lora_rank, base=base, runtime_version=runtime_version)
    if as_json:
        render.print_json(report.to_json())
    else:
        _show_check(report, adapter, session)
    if not report.ok:
        sys.exit(1)


def _names(modules: tuple[str, ...], limit: int = 4) -> str:
    shown = ", ".join(modules[:limit])
    return shown + (f" … (+{len(modules) - limit})" if len(modules) > limit else "")


def _show_check(report: CheckReport, adapter: str, session: Session) -> None:
    rt = report.runtime
    for f in report.findings:
        mark = "✗" if f.counts else "·"
        session.out.print(f"{mark} [bold]{f.rule.id}[/]: {f.detail}" + (f" — {_names(f.modules)}" if f.modules else ""),
                         highlight=False)
        if not session.quiet:
            session.out.print(f"    {f.rule.why}", highlight=False)
            session.out.print(f"    export: {f.rule.fix}", highlight=False)
            until = f" (holds up to {f.rule.until})" if f.rule.until else ""
            session.out.print(f"    source: {f.rule.source}{until}", highlight=False)
    for note in report.notes:
        session.out.print(f"note: {note}", highlight=False)
    verdict = ("loads and computes the same ΔW" if report.ok else
               f"would not load or not compute the same ΔW: `loratools export {adapter} --for {rt.name} -o OUT`")
    session.out.print(f"{rt.title} (rules read in {rt.version}): {verdict}", highlight=False)


@click.command()
@click.argument("adapter", type=ADAPTER)
@runtime_option
@output_option
@max_rank_option
@click.option("--budget", type=int, default=None, metavar="PARAMS",
              help="Total LoRA parameters of the output: ranks chosen together for the least total error.")
@click.option("--error", type=float, default=None, metavar="E",
              help="Relative error of the LoRA made from each full tensor (modules_to_save) and from each DoRA "
                   "module's full update; needs --base.")
@base_option("its weights for full tensors (--error), its architecture for llama.cpp, its path for Ollama's FROM")
@click.option("--drop-unsupported", is_flag=True,
              help="Leave out (and list) what the runtime cannot hold, instead of stopping.")
@force_option
@json_option
@pass_session
def export(session: Session, adapter: str, runtime: str, output: str, max_lora_rank: int | None, budget: int | None,
           error: float | None, base: str | None, drop_unsupported: bool, force: bool, as_json: bool) -> None:
    """Rewrite ADAPTER so that RUNTIME loads it with the same ΔW (or the least error its limits allow).

    Every module's exact scale is folded into its factors so the runtime's one
    global scale reproduces it; AdaLoRA becomes LoRA; full tensors become a LoRA
    of W_saved − W_base (--base, --error) or are dropped (--drop-unsupported);
    vision-tower modules are dropped. No runtime here has DoRA: with --base
    (the model directory) and --error and/or --max-lora-rank, each DoRA
    module's full update W′ − W0 is folded into plain LoRA by a truncated SVD
    (as convert --as-lora) and its error reported. An activated LoRA (aLoRA)
    keeps its invocation tokens in the GGUF for llama.cpp (llama-server
    applies it after them). Under --max-lora-rank or --budget every
    module's rank is chosen together for the least total ‖ΔW − ΔW′‖²_F (exact
    spectra from the factors), reported against a uniform-rank resize at the
    same budget. vLLM/SGLang get a PEFT directory, llama.cpp a .gguf, Ollama a
    directory with adapter.gguf and a Modelfile. The output is read back and each
    module's error is measured under the runtime's own arithmetic.

    \b
    Examples:
      loratools export fixtures/adapters/rslora --for vllm -o rslora-vllm
      loratools export adapter/ --for vllm -o served --max-lora-rank 16
      loratools export adapter/ --for sglang -o served --budget 2000000
      loratools export adapter/ --for llama.cpp -o adapter.gguf --base model.gguf
      loratools export adapter/ --for ollama -o ollama-adapter --base model.gguf
      loratools export dora-adapter/ --for vllm -o served --base model/ --error 0.05
    """
    from . import render
    from ..serve.export import export_adapter

    res = export_adapter(adapter, output, runtime=runtime, max_lora_rank=max_lora_rank, budget=budget, error=error,
                         base=base, drop_unsupported=drop_unsupported, force=force)
    if as_json:
        render.print_json(res.to_json())
        return
    _show_export(res, session)


def _show_export(res: ExportResult, session: Session) -> None:
    from rich.table import Table

    from . import render

    changed = [layer for layer in res.layers if layer.rank != layer.rank_before or layer.rel_error > 1e-6
               or layer.change]
    if changed:
        t = Table(pad_edge=False)
        for col, just in [("module", "left"), ("rank", "right"), ("→", "right"), ("rel. error", "right"),
                          ("", "left")]:
            t.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
        for layer in changed:
            t.add_row(layer.name, str(layer.rank_before), str(layer.rank), render.fmt_float(layer.rel_error),
                      layer.change)
        session.out.print(t)
    if session.quiet:
        return
    for change in res.changes:
        session.err.print(f"changed: {change}", highlight=False)
    for name, why in res.dropped.items():
        session.err.print(f"dropped {name}: {why}", highlight=False)
    a = res.allocation
    if a is not None:
        session.out.print(f"ranks ({a.method}): {a.parameters:,} of {a.parameters_before:,} parameters, total relative "
                         f"error {a.error:.4g}; a uniform rank {a.uniform_rank} at the same budget: "
                         f"{a.uniform_parameters:,} parameters, error {a.uniform_error:.4g}", highlight=False)
    session.out.print(f"wrote {res.output} for {res.runtime} from {res.source_format}: {res.parameters:,} parameters; "
                     f"read back under {res.runtime}'s arithmetic: total relative error {res.total_error:.3g} "
                     f"(write check {res.check_error:.1e}); serve with {res.serve_hint}", highlight=False)
