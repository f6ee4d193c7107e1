"""``loratools merge``, ``loratools unmerge`` and ``loratools verify``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from ..errors import InvalidOptionError
from .options import (ADAPTER, Session, device_option, dtype_option, force_option, json_option, output_option,
                      pass_session)

if TYPE_CHECKING:
    from collections.abc import Iterable

    from rich.console import Console

    from ..merge.onto import OntoReport
    from ..merge.pipeline import PipelineMergeReport
    from ..merge.report import MergeReport, VerifyReport

__all__ = ["merge", "unmerge", "verify"]

weight_option = click.option("--weight", "weights", type=float, multiple=True, metavar="W",
                             help="Weight wᵢ of each adapter, once per ADAPTER in order (default 1 each).")
precision_option = click.option("--precision", default="float32", show_default=True,
                                type=click.Choice(["float32", "float64"]),
                                help="Precision in which each ΔW is formed and added before the one cast.")
quant_option = click.option("--quant", default=None, metavar="same|q8_0|f16|bf16|f32",
                             help="GGUF BASE only: the type of each adapted tensor (default same: its own type).")
onto_option = click.option("--onto", default="original", show_default=True,
                            type=click.Choice(["original", "dequantized"]),
                            help="QLoRA adapter: add ΔW to the original weights W0, or to deq(Q(W0)), the "
                                 "quantized weights it was trained on (needs --qlora, or an adapter that records "
                                 "its base).")
qlora_option = click.option("--qlora", default=None,
                             type=click.Choice(["nf4", "nf4-dq", "fp4", "fp4-dq", "int8"]),
                             help="The bitsandbytes type a QLoRA adapter was trained on (-dq: double quantization; "
                                  "int8: LLM.int8 rows): report ‖deq(Q(W0)) − W0‖/‖ΔW‖ per weight and overall. "
                                  "--onto dequantized takes the type the adapter records when this is left out.")
lossy_option = click.option("--allow-lossy", is_flag=True,
                            help="GGUF or quantized safetensors BASE: accept a merged model that keeps too little "
                                 "of the adapters' update (its re-quantization rounds ΔW away; refused otherwise).")


def _notes(session: Session, notes: Iterable[str]) -> None:
    """Each library note on stderr, its backquoted parameters spelled as this command's flags."""
    from . import with_flags

    command = click.get_current_context().command
    for note in notes:
        session.err.print(f"note: {with_flags(note, command)}")


def _summary(out: Console, r: MergeReport) -> None:
    names = ", ".join(f"{a['source']}×{a['weight']:g}" for a in r.adapters)
    out.print(f"[bold]{r.op}[/] {names} → {r.output}: {r.adapted} tensors changed, {r.copied} copied")
    if r.op == "merge" and r.record:
        adapted = r.adapted_nbytes  # a GGUF merge: its patches against the tensors they restore
        of = (f"{100 * r.record_nbytes / adapted:.3f}% of the adapted tensors' {adapted:,} bytes" if adapted
              else f"{100 * r.record_nbytes / max(r.nbytes, 1):.3f}% of the model's {r.nbytes:,} bytes")
        out.print(f"record {r.record}: {r.record_nbytes:,} bytes of patches ({of})")
    for types, q in r.quant.items():  # a GGUF merge: the requantization per type
        kept = (f"; keeps {100 * q['update_kept']:.3g}% of ΔW (‖written − ΔW‖/‖ΔW‖ {q['update_rel_error']:.3g})"
                if q.get("update_kept") is not None else "")
        out.print(f"{types}: {q['tensors']} tensors, requantization error {q['requant_rel_error']:.3g} relative "
                  f"(max {q['requant_max_abs_error']:.3g}); the base's own quantization ≈ {q['base_rel_error_est']:.3g}; "
                  f"ΔW {q['delta_rel']:.3g} of W0{kept}")
    if r.onto is not None:
        _onto_lines(out, r.onto)
    if r.update is not None:
        lossy = " — LOSSY, written because of --allow-lossy" if r.allowed_lossy else ""
        out.print(f"update: the written model {r.update.describe()}{lossy}")
    if r.op != "unmerge":
        return
    if r.is_gguf:
        if r.exact:
            out.print("exact: every restored tensor and file matches the base's sha256 from the record")
    elif r.exact:
        out.print("exact: every restored tensor matches its checksum in the record")
    else:
        out.print(f"not exact (no --record): estimated max |error| {r.est_max_abs_error:.3g}, "
                  f"relative (Frobenius) {r.est_rel_error:.3g}; bound {r.error_bound:.3g} per element")
        if not r.vouched:
            out.print("unchecked: MERGED's stamp does not confirm these adapters and weights; the figures above "
                      "hold only if they are the ones merged, and the true error is otherwise unbounded")


def _onto_lines(out: Console, r: OntoReport) -> None:
    """A QLoRA merge's figures: one row per adapted 4-bit weight, then the overall line."""
    from rich.table import Table

    table = Table("weight", "‖deq(Q(W0)) − W0‖F", "‖ΔW‖F", "ratio", title=f"QLoRA base ({r.figures.quant})")
    for row in r.figures.rows:
        table.add_row(row.module, f"{row.quant_error:.4g}", f"{row.delta:.4g}", f"{row.ratio:.3g}")
    out.print(table)
    out.print(r.describe())


def _verify_lines(out: Console, v: VerifyReport) -> None:
    w = v.worst
    if v.onto is not None:
        out.print(f"verify: checked against the dequantized {v.onto} base deq(Q(W0)) + ΔW, which the merged model's "
                  "stamp says it was merged onto")
    if w is not None:
        out.print(f"verify: {len(v.modules)} merged tensors ({v.dtype}); largest deviation {v.max_abs:.3g}; "
                  f"worst {w.key} at {w.ratio:.3g}× the rounding tolerance")
    if v.update is not None:
        allowed = " (allowed: --allow-lossy)" if v.update.lossy and v.allow_lossy else ""
        out.print(f"verify: the merged model {v.update.describe()}{allowed}")
    if v.untouched_mismatches:
        out.print(f"verify: {len(v.untouched_mismatches)} tensors the adapters do not touch differ from the "
                  f"base (first: {v.untouched_mismatches[0]})")


@click.command()
@click.argument("base", type=click.Path())
@click.argument("adapters", type=ADAPTER, nargs=-1, required=True)
@output_option
@weight_option
@dtype_option
@device_option
@precision_option
@quant_option
@lossy_option
@onto_option
@qlora_option
@click.option("--record", type=click.Path(), default=None,
              help="Also write a safetensors sidecar that lets `unmerge --record` restore BASE bit for bit "
                   "(a GGUF BASE: its files byte for byte).")
@click.option("--verify", "do_verify", is_flag=True,
              help="Check the result against BASE + adapters before it is put in place (nothing is left if it fails).")
@click.option("--component", default=None, metavar="NAME",
              help="BASE is a diffusers pipeline folder: merge into its NAME/ model only (unet, transformer, "
                   "text_encoder, text_encoder_2); OUTPUT is that model's folder, merged.")
@click.option("--only", "only", multiple=True, metavar="NAME",
              help="Pipeline BASE: merge the LoRAs of these models only (repeat for several); the other models are "
                   "copied unmerged and the report lists the parts left out.")
@click.option("--partial", is_flag=True,
              help="Pipeline BASE: merge what it has a model for and leave out the LoRA parts of models it lacks "
                   "(e.g. text_encoder_2 into SD 1.5; refused otherwise); the report lists them.")
@force_option
@json_option
@pass_session
def merge(session: Session, base: str, adapters: tuple[str, ...], output: str, weights: tuple[float, ...], dtype: str,
          device: str, precision: str, quant: str | None, allow_lossy: bool, onto: str, qlora: str | None,
          record: str | None, do_verify: bool, component: str | None, only: tuple[str, ...], partial: bool,
          force: bool, as_json: bool) -> None:  # long: the docstring is the command's --help
    """Merge adapters into a base model: W = W0 + Σ wᵢ·ΔWᵢ, streaming, one tensor at a time.

    BASE is a model directory (single or sharded safetensors) or one .safetensors
    file; OUTPUT mirrors it (shards, index, config and tokenizer files) and
    records the adapters and weights in its metadata. Each ΔW is formed in
    float32 (or --precision float64) and the sum cast once to --dtype (auto:
    the base's). PEFT modules_to_save tensors replace the base's. Everything is
    checked before a byte is written; an existing OUTPUT needs --force.

    A .gguf BASE (llama.cpp model, split files too) gives a .gguf OUTPUT: each
    adapted tensor is dequantized, ΔW added in float32 and requantized to its
    own type (--quant same) or to --quant's. The summary says how much of ΔW
    the written model keeps: requantizing to a 4-bit type rounds a trained
    adapter's small ΔW mostly away, so a merge that keeps less than half of
    ΔW is refused before anything is written; merge to q8_0 or f16, serve
    the adapter unmerged, or pass --allow-lossy.

    A quantized safetensors BASE (FP8 block-wise or compressed-tensors, NVFP4,
    compressed-tensors int4/int8 packs, GPTQ v1/v2 with act-order, AutoAWQ GEMM,
    gpt-oss MXFP4 experts, bitsandbytes 4-bit and int8) is read dequantized as its
    producer defines it; each adapted weight is re-quantized in its format on the
    base's own grid (the same kept-share check applies) or, with --dtype, written
    plain without quantization_config.

    A QLoRA adapter (trained on a bitsandbytes 4-bit or int8 base) merges into
    the 16-bit model that base was quantized from. --qlora names its type
    (an adapter loratools trained records it) and prints ‖deq(Q(W0)) − W0‖/‖ΔW‖ per adapted weight and overall, and the
    base the figures favour. --onto original (default: merged onto W0, the
    lower held-out loss in docs/experiments.md) writes the weights as a plain
    merge does; --onto dequantized writes deq(Q(W0)) + ΔW for every weight
    bitsandbytes quantizes (not lm_head, embeddings), in the base's dtype or
    --dtype. Not with --record, DoRA, a GGUF or an already quantized BASE.

    A diffusers pipeline BASE (a folder with model_index.json) and a pipeline
    LoRA (diffusers' pytorch_lora_weights.safetensors, a kohya SD/SDXL file)
    give a whole pipeline OUTPUT: each part of the LoRA merged into its own
    model folder (unet/, transformer/, text_encoder/, text_encoder_2/), the
    rest (model_index.json, scheduler, tokenizers, untouched models) copied,
    nothing written unless every part succeeds. A LoRA part for a model BASE
    lacks is refused unless --partial; --only NAME merges the named models
    only. --component NAME instead writes that one model's folder.

    \b
    Examples:
      loratools merge fixtures/tiny-llama fixtures/adapters/lora -o merged
      loratools merge base a1 a2 --weight 0.7 --weight 0.3 -o merged --dtype bfloat16
      loratools merge base adapter -o merged --record merged.record.safetensors --verify
      loratools merge model.Q4_K_M.gguf adapter -o merged.gguf --quant q8_0 --verify
      loratools merge sdxl-pipeline lora_sdxl.safetensors -o sdxl-merged --verify
      loratools merge sd15-pipeline lora_sdxl.safetensors -o sd15-merged --partial
      loratools merge sdxl-pipeline lora_sdxl.safetensors --component unet -o unet-merged
      loratools merge fixtures/tiny-llama qlora-adapter -o merged --qlora nf4-dq --onto dequantized
    """
    from ..device import configure_cpu_threads, resolve_dtype
    from ..formats.diffusers import pipeline_models
    from ..merge.jobs import merge_model
    from ..merge.pipeline import left_out_notes, read_inputs
    from . import render

    configure_cpu_threads(device)
    if component is None and pipeline_models(base) is not None:
        _merge_pipeline(session, base, adapters, output, weights, dtype, device, precision, allow_lossy, do_verify,
                        only, partial, force, as_json, one_model={"--record": record, "--quant": quant,
                                                                  "--qlora": qlora, "--onto": onto != "original"})
        return
    if only or partial:
        raise InvalidOptionError("--only and --partial apply to a diffusers pipeline BASE merged whole (a folder with "
                                 "model_index.json, without --component)")
    model, inputs = read_inputs(base, adapters, weights, component=component)
    _notes(session, left_out_notes(adapters, model))
    with render.progress(session, None, "merge", quiet=as_json) as advance:
        report = merge_model(model, inputs, output, dtype=resolve_dtype(dtype), device=device, precision=precision,
                             record=record, force=force, verify=do_verify, progress=advance, quant=quant,
                             allow_lossy=allow_lossy, onto=onto, qlora=qlora)
    _notes(session, report.notes)
    if as_json:
        render.print_json(report.to_json())
    elif not session.quiet:
        _summary(session.out, report)
        if report.verify:
            _verify_lines(session.out, report.verify)


def _merge_pipeline(session: Session, base: str, adapters: tuple[str, ...], output: str, weights: tuple[float, ...],
                    dtype: str, device: str, precision: str, allow_lossy: bool, do_verify: bool, only: tuple[str, ...],
                    partial: bool, force: bool, as_json: bool, one_model: dict[str, object]) -> None:
    """``merge PIPELINE LORA… -o OUT``: the whole pipeline, each part into its own model."""
    from ..device import resolve_dtype
    from ..merge.pipeline import merge_pipeline, weighted
    from . import render

    given = [flag for flag, value in one_model.items() if value]
    if given:
        raise InvalidOptionError(f"{', '.join(given)} applies to one model: merge that model of the pipeline with "
                                 "--component NAME")
    with render.progress(session, None, "merge", quiet=as_json) as advance:
        report = merge_pipeline(base, weighted(adapters, weights), output, only=only or None, partial=partial,
                                dtype=resolve_dtype(dtype), device=device, precision=precision, verify=do_verify,
                                force=force,
                                allow_lossy=allow_lossy, progress=advance)
    _notes(session, report.notes)
    if as_json:
        render.print_json(report.to_json())
    elif not session.quiet:
        _pipeline_summary(session.out, report)


def _pipeline_summary(out: Console, r: PipelineMergeReport) -> None:
    """One line per model merged (its parts, its tensors), its check with --verify, then what was copied."""
    out.print(f"[bold]merge[/] → {r.output} (diffusers pipeline{', PARTIAL' if r.partial else ''})")
    for c in r.merged:
        parts = ", ".join(f"{p.source}×{a['weight']:g} ({p.modules} modules)"
                          for p, a in zip(c.parts, c.report.adapters))
        out.print(f"  {c.component}/: {parts}; {c.report.adapted} tensors changed, {c.report.copied} copied")
        if c.report.verify is not None:
            _verify_lines(out, c.report.verify)
    out.print(f"  copied as they are: {', '.join(r.copied) or 'nothing'}")
    for x in r.left_out:
        out.print(f"  not merged: {x.describe()}")


@click.command()
@click.argument("merged", type=click.Path())
@click.argument("adapters", type=ADAPTER, nargs=-1, required=True)
@output_option
@weight_option
@device_option
@precision_option
@quant_option
@click.option("--record", type=click.Path(), default=None,
              help="The record written by `merge --record`: restores the base bit for bit.")
@click.option("--ignore-stamp", is_flag=True,
              help="Un-merge even when MERGED's stamp names other adapters or weights (a merge by another tool).")
@force_option
@json_option
@pass_session
def unmerge(session: Session, merged: str, adapters: tuple[str, ...], output: str, weights: tuple[float, ...],
            device: str, precision: str, quant: str | None, record: str | None, ignore_stamp: bool, force: bool,
            as_json: bool) -> None:
    """Take adapters back out of a merged model: W0 = W − Σ wᵢ·ΔWᵢ, streaming.

    With --record (from `merge --record`) the base comes back bit for bit,
    checked against the checksum of every restored tensor. Without it, the
    rounding of the merge cannot be undone exactly: the estimated maximum and
    relative error, and a per-element bound, are printed.

    \b
    Examples:
      loratools unmerge merged fixtures/adapters/lora -o base-again
      loratools unmerge merged adapter -o base-again --record merged.record.safetensors
    """
    from ..device import configure_cpu_threads
    from ..merge.jobs import unmerge_model
    from ..merge.pipeline import read_inputs
    from . import render

    configure_cpu_threads(device)
    model, inputs = read_inputs(merged, adapters, weights)
    with render.progress(session, None, "unmerge", quiet=as_json) as advance:
        report = unmerge_model(model, inputs, output, device=device, precision=precision, record=record,
                               force=force, progress=advance, ignore_stamp=ignore_stamp, quant=quant)
    _notes(session, report.notes)
    if as_json:
        render.print_json(report.to_json())
    elif not session.quiet:
        _summary(session.out, report)


@click.command()
@click.argument("base", type=click.Path())
@click.argument("adapters", type=ADAPTER, nargs=-1, required=True)
@click.argument("merged", type=click.Path())
@weight_option
@device_option
@precision_option
@lossy_option
@json_option
@pass_session
def verify(session: Session, base: str, adapters: tuple[str, ...], merged: str, weights: tuple[float, ...], device: str,
           precision: str, allow_lossy: bool, as_json: bool) -> None:
    """Check that MERGED is BASE with the adapters merged in, tensor by tensor.

    Prints the largest deviation |merged − (W0 + Σ wᵢ·ΔWᵢ)| and exits with code 2
    if any element exceeds the rounding tolerance of MERGED's dtype (one ulp of
    the exact value plus float32 summation slack), or if a tensor the adapters
    do not touch differs from the base. A GGUF MERGED must also carry the
    adapters' update: one that keeps too little of ΔW (the figure `merge`
    refuses on) fails unless --allow-lossy. A model merged with --onto
    dequantized (its stamp says so) is checked against deq(Q(W0)) + ΔW.

    \b
    Examples:
      loratools verify fixtures/tiny-llama fixtures/adapters/lora merged
    """
    from ..device import configure_cpu_threads
    from ..merge.jobs import verify_merge
    from ..merge.pipeline import read_inputs
    from . import render

    configure_cpu_threads(device)
    model, inputs = read_inputs(base, adapters, weights)
    with render.progress(session, None, "verify", quiet=as_json) as advance:
        v = verify_merge(model, inputs, merged, device=device, precision=precision, progress=advance,
                         allow_lossy=allow_lossy)
    if as_json:
        render.print_json(v.to_json())
    else:
        _verify_lines(session.out, v)
        if v.ok:
            session.out.print("verify: ok")
    v.check()
