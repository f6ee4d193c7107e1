"""``loratools convert``."""

from __future__ import annotations

import click

from .options import ADAPTER, Session, base_option, force_option, output_option, pass_session, rank_rule_options


@click.command()
@click.argument("adapter", type=ADAPTER)
@output_option
@click.option("--to", "to", required=True, metavar="FORMAT",
              help="Target format: peft, loratools, kohya, gguf, mlx, diffusers or comfyui.")
@base_option("maps kohya names back and gives GGUF its architecture and head counts; for --to diffusers or "
             "comfyui, a diffusers pipeline folder")
@click.option("--component", metavar="NAME",
              help="Take one model's adapter out of a file holding several: a diffusers pipeline LoRA, a kohya "
                   "SD/SDXL or ComfyUI file (unet, text_encoder, transformer …).")
@click.option("--drop-unsupported", is_flag=True,
              help="Leave out (and list) modules the target format cannot hold, instead of stopping.")
@click.option("--as-lora", is_flag=True,
              help="DoRA → plain LoRA: factor each layer's full update W′ − W0 (needs --base and a rank rule).")
@rank_rule_options
@force_option
@pass_session
def convert(session: Session, adapter: str, output: str, to: str, base: str | None, component: str | None,
            drop_unsupported: bool, as_lora: bool, rank: int | None, energy: float | None, error: float | None, max_rank: int | None,
            force: bool) -> None:
    """Convert ADAPTER to another format; every module's ΔW is checked after writing.

    The written file is read back and each ΔW compared with the source's
    (relative Frobenius error ≤ 1e-6) before
    it is renamed into place. AdaLoRA becomes plain LoRA for kohya and gguf.
    Modules a format cannot hold stop the conversion unless --drop-unsupported.

    A diffusers pipeline LoRA holds one adapter per model (unet,
    text_encoder …), and so do kohya Stable Diffusion and ComfyUI files:
    --component NAME writes that model's adapter, named as the model spells
    its modules, ready to merge into it. --to diffusers and --to comfyui
    take the whole file (kohya SD/SDXL, diffusers, ComfyUI) and write
    every model's adapter in their own names (diffusers' per-model
    LoraConfig metadata; ComfyUI's SGM U-Net and CLIP names); with --base
    PIPELINE (a diffusers pipeline folder) each module must be a weight of
    its own model there.

    DoRA converts as it is between peft and loratools. Its update
    diag(m/‖W0 + sBA‖)·(W0 + sBA) − W0 depends on the base and is not low-rank,
    so kohya and gguf need it flattened: --as-lora --base BASE with --rank,
    --energy or --error factors each layer's full update (the randomized SVD
    of extract) and reports each layer's measured relative error.

    \b
    Examples:
      loratools convert fixtures/adapters/lora -o lora-kohya.safetensors --to kohya
      loratools convert fixtures/adapters/rslora -o rslora.gguf --to gguf --base fixtures/tiny-llama
      loratools convert lora-kohya.safetensors -o peft-dir --to peft --base fixtures/tiny-llama
      loratools convert dora-dir -o lora-dir --to peft --base fixtures/tiny-llama --as-lora --energy 0.9
      loratools convert pytorch_lora_weights.safetensors -o unet-lora --to peft --component unet
      loratools convert lora_sdxl.safetensors -o pytorch_lora_weights.safetensors --to diffusers --base sdxl-pipeline
      loratools convert lora_sdxl.safetensors -o comfy_lora.safetensors --to comfyui --base sdxl-pipeline
    """
    from ..convert import convert_file
    from ..device import configure_cpu_threads
    from ..errors import InvalidOptionError
    from ..linalg import RankRule

    configure_cpu_threads()
    given = any(v is not None for v in (rank, energy, error, max_rank))
    if given and not as_lora:
        raise InvalidOptionError("`rank`, `energy`, `error` and `max_rank` choose the rank of `as_lora`; add `as_lora`")
    rule = RankRule(rank=rank, energy=energy, error=error, max_rank=max_rank) if as_lora else None
    result = convert_file(adapter, output, to=to, base=base, drop_unsupported=drop_unsupported, force=force,
                          as_lora=as_lora, rule=rule, component=component)
    if session.quiet:
        return
    session.out.print(f"wrote {result.output} ({result.format}, from {result.source_format}): {result.modules} "
                      f"modules, ΔW checked (largest relative error {result.max_error:.1e})")
    for name, err in result.flattened.items():
        session.out.print(f"  {name}: DoRA update flattened to LoRA, relative error {err:.3g}")
    for name, why in result.dropped.items():
        session.err.print(f"dropped {name}: {why}")
    for note in result.notes:
        session.err.print(f"note: {note}")
