"""``loratools inspect``'s one call: read an adapter file (and, for DoRA, its base) and inspect it.

:mod:`loratools.inspection` is the pure part (figures from the factors, the typed
:class:`~loratools.inspection.InspectReport`); this module is its file edge.
"""

from __future__ import annotations

import os

from .device import map_in_threads
from .formats import detect_format, load_base, read_adapter
from .inspection import InspectReport, inspect_adapter
from .io import ModelReader
from .quant.view import dequantized
from .quant.qlora import QloraReport, qlora_report, qlora_row

__all__ = ["inspect_file", "qlora_file"]


def inspect_file(src: str | os.PathLike[str], *, base: str | os.PathLike[str] | None = None) -> InspectReport:
    """The :func:`~loratools.inspection.inspect_adapter` report of the adapter at ``src`` (any format, detected
    from the content). ``base`` (a model directory or ``.safetensors``) is read only for a DoRA adapter: its
    weights W0 give each module's magnitude change and the spectrum of the full update W′ − W0. Without a base,
    the modules are spread over threads.

    >>> inspect_file("fixtures/adapters/lora").to_json()["format"]  # doctest: +SKIP
    'peft'
    """
    fmt = detect_format(src)
    adapter = read_adapter(src, format=fmt)
    if base is not None and adapter.is_dora:
        # the one base reader (its config.json checked like every other command's), its weights' headers kept;
        # a quantized base (FP8, MXFP4) is read dequantized, as transformers loads it
        loaded = load_base(base)
        with loaded.weights or ModelReader(base) as model:
            weights = dequantized(model, loaded.hparams) or model
            return inspect_adapter(adapter, format=fmt, base=lambda name: weights.get(f"{name}.weight"))
    return inspect_adapter(adapter, format=fmt, mapper=map_in_threads)


def qlora_file(src: str | os.PathLike[str], *, base: str | os.PathLike[str], quant: str = "nf4-dq") -> QloraReport:
    """Per adapted linear module of the adapter at ``src``, ‖deq(Q(W0)) − W0‖_F / ‖ΔW‖_F with W0 read from the
    16-bit ``base`` and Q bitsandbytes' 4-bit quantization ``quant`` (:mod:`loratools.quant.qlora`): the figures
    that decide whether to merge a QLoRA adapter onto the original or the dequantized base. Modules that
    bitsandbytes does not quantize (embeddings, convolutions, GPT-2's Conv1D, expert tensors) are left out.
    A DoRA adapter is refused: its update depends on which base it is merged onto."""
    from .errors import DoraError

    adapter = read_adapter(src)
    if adapter.is_dora:
        raise DoraError("the QLoRA figures compare ΔW with the base's quantization error",
                        "flatten it onto the base you mean with convert's `base` and `as_lora` first")
    names = [n for n, m in adapter.modules.items() if m.kind == "linear" and not m.fan_in_fan_out]
    with load_base(base).weights or ModelReader(base) as model:
        return qlora_report((qlora_row(n, model.get(f"{n}.weight"), adapter.modules[n].delta(), quant)
                             for n in names), quant)
