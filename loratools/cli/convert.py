"""``loratools convert``."""

from __future__ import annotations

import click

from .options import ADAPTER, Session, force_option, output_option, pass_session


@click.command()
@click.argument("adapter", type=ADAPTER)
@output_option
@click.option("--to", "to", required=True, metavar="FORMAT",
              help="Target format: peft, loratools, kohya or gguf.")
@click.option("--base", type=click.Path(), default=None,
              help="Base model (directory with config.json and/or weights, a .safetensors, or a llama.cpp .gguf): "
                   "maps kohya names back and gives GGUF its architecture and head counts.")
@click.option("--drop-unsupported", is_flag=True,
              help="Leave out (and list) modules the target format cannot hold, instead of stopping.")
@force_option
@pass_session
def convert(session: Session, adapter: str, output: str, to: str, base: str | None, drop_unsupported: bool,
            force: bool) -> None:
    """Convert ADAPTER to another format; every module's ΔW is checked after writing.

    The written file is read back and each ΔW compared with the source's
    (relative Frobenius error ≤ 1e-6) before
    it is renamed into place. AdaLoRA becomes plain LoRA for kohya and gguf.
    Modules a format cannot hold stop the conversion unless --drop-unsupported.

    \b
    Examples:
      loratools convert fixtures/adapters/lora -o lora-kohya.safetensors --to kohya
      loratools convert fixtures/adapters/rslora -o rslora.gguf --to gguf --base fixtures/tiny-llama
      loratools convert lora-kohya.safetensors -o peft-dir --to peft --base fixtures/tiny-llama
    """
    from ..convert import convert_file
    from ..device import configure_cpu_threads

    configure_cpu_threads()
    result = convert_file(adapter, output, to=to, base=base, drop_unsupported=drop_unsupported, force=force)
    if session.quiet:
        return
    session.out.print(f"wrote {result.output} ({result.format}, from {result.source_format}): {result.modules} "
                      f"modules, ΔW checked (largest relative error {result.max_error:.1e})")
    for name, why in result.dropped.items():
        session.err.print(f"dropped {name}: {why}")
    for note in result.notes:
        session.err.print(f"note: {note}")
