"""Converting adapters between formats, checking that every ΔW survives.

:func:`convert_adapter` is pure: it turns an :class:`Adapter` into what the target
format can hold (AdaLoRA → plain LoRA for formats that hold plain LoRA only, with
the same ΔW) and refuses, or with ``drop_unsupported`` leaves out, modules the
format cannot hold. :func:`convert_file` reads, converts, writes under a temporary
name, reads the written file back, checks each module's ΔW against the source
(:func:`loratools.deltas.check_same_deltas`) and only then renames it into place. What a format can hold,
and what it needs of the base model, is the format's own business
(:class:`~loratools.formats.base.Format`): nothing here names a format.

From the repository root (where the tests run):

>>> from loratools.formats import read_adapter
>>> conv = convert_adapter(read_adapter("fixtures/adapters/adalora"), to="kohya")
>>> conv.adapter.method, sorted(conv.dropped)
('lora', [])
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from .adapter import Adapter, as_lora
from .config import ALORA_WHY, fixed_delta_refusal
from .dora import flatten_dora_modules
from .errors import InvalidOptionError, ShapeMismatchError, UnsupportedConfigError, UnsupportedModuleError
from .formats import (FORMATS, BaseModel, Format, check_base_names, check_base_shapes, detect_format, get_format,
                      load_base, read_with_base)
from .io import ModelReader, atomic_output
from .deltas import check_same_deltas
from .linalg import RankRule

__all__ = ["Conversion", "ConvertResult", "convert_adapter", "convert_file", "flatten_dora"]


@dataclass(frozen=True)
class Conversion:
    """The adapter to write, and what was left out (name → why)."""

    adapter: Adapter
    dropped: Mapping[str, str] = field(default_factory=dict)


def _reasons(adapter: Adapter, fmt: Format, base: BaseModel | None) -> dict[str, str]:
    """What ``fmt`` cannot hold → why; a name another format's reader kept as it found it (kohya's flattened
    keys) is explained by that format, since the unmapped name, not ``fmt``'s limits, is the likely cause."""
    def why(name: str, reason: str) -> str:
        return next((h for f in FORMATS.values() if f is not fmt and (h := f.name_hint(name))), reason)

    return {n: why(n, reason) for n, reason in fmt.unsupported(adapter, base).items()}


def convert_adapter(adapter: Adapter, *, to: str, base: BaseModel | None = None,
                    drop_unsupported: bool = False) -> Conversion:
    """What ``adapter`` becomes in format ``to``, with the same ΔW for every module it keeps.

    A format that holds plain LoRA only (kohya, GGUF) gets AdaLoRA through :func:`as_lora`
    (``A' = (A⊙E)[kept]``, scale carried per module; rank-0 modules add nothing
    and vanish; 16-bit factors become float32 so that ``A⊙E`` is not rounded). Modules the format cannot hold
    raise :class:`UnsupportedModuleError` naming them, unless ``drop_unsupported``. ``base``
    (:func:`load_base`) is what is known of the base model (GGUF checks its architecture against it).
    """
    fmt = get_format(to)  # unknown names fail here, before any work
    refused = fixed_delta_refusal(adapter.config)
    if refused is not None and fmt.plain_lora_only:  # a format of plain ΔW cannot say "after these tokens only"
        raise UnsupportedConfigError(to, *refused, ALORA_WHY)
    out = as_lora(adapter) if fmt.plain_lora_only else adapter
    if adapter.modules and not any(m.rank > 0 for m in out.modules.values()):
        pruned = " (an AdaLoRA adapter pruned to nothing)" if adapter.method == "adalora" else ""
        raise InvalidOptionError(f"every module of this adapter has rank 0{pruned}: it adds nothing, so there is "
                                 f"nothing to write as {to}")
    bad = _reasons(out, fmt, base)
    if bad and not drop_unsupported:
        reasons = "; ".join(dict.fromkeys(bad.values()))
        raise UnsupportedModuleError(to, sorted(bad), reasons)
    if bad:
        out = Adapter({n: m for n, m in out.items() if n not in bad}, out.config,
                      {k: t for k, t in out.saved.items() if k not in bad})
        if not out.modules:
            raise UnsupportedModuleError(to, sorted(bad), "no module would be left")
    return Conversion(out, dict(bad))


@dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert_file` did, for the CLI to show."""

    output: Path
    source_format: str
    format: str
    modules: int
    dropped: Mapping[str, str]
    notes: tuple[str, ...]
    max_error: float
    #: ``as_lora``: each flattened DoRA module's measured relative error ‖D − B′A′‖_F / ‖D‖_F
    flattened: Mapping[str, float] = field(default_factory=dict)


def flatten_dora(adapter: Adapter, base: str | os.PathLike[str] | ModelReader, rule: RankRule, *,
                 seed: int = 0) -> tuple[Adapter, dict[str, float]]:
    """``adapter`` with every DoRA module replaced by plain LoRA factors of its full update W′ − W0
    (:func:`loratools.dora.flatten_dora_modules`), reading each base weight from ``base`` (a path, or the weights
    read already) one at a time. Returns the plain adapter and each flattened module's measured relative error."""
    with base if isinstance(base, ModelReader) else ModelReader(base) as model:
        def weight(name: str) -> Tensor:
            key = f"{name}.weight"
            if key not in model.spans:
                raise ShapeMismatchError(name, f"a weight {key} in `base`", "none",
                                         "give the base the adapter was made for")
            return model.get(key)

        plain, folded = flatten_dora_modules(adapter, weight, rule, seed=seed)
    return plain, {name: err for name, (err, _) in folded.items()}


def _pipeline_folder(base: str | os.PathLike[str] | None) -> bool:
    """``base`` is a pipeline folder (``model_index.json`` beside one folder per model, as diffusers saves one)."""
    return base is not None and (Path(base) / "model_index.json").is_file()


def _read_whole(src: Path, base: str | os.PathLike[str] | None) -> tuple[Adapter, BaseModel | None, str]:
    """The adapter at ``src`` whole, for a target format that holds several models' adapters (a pipeline file):
    every module named ``<component>.<module>``. A ``base`` that is a pipeline folder (``model_index.json``, one
    folder per model) is given to the target format as it is, which checks each module against its own model
    there (``Format.cannot_hold``); any other ``base`` is one model, and the file is read as that model's adapter
    (:func:`~loratools.formats.read_with_base`)."""
    fmt = get_format(detect_format(src))
    if base is None or _pipeline_folder(base):
        return fmt.read(src), None if base is None else BaseModel(Path(base)), fmt.name
    known = load_base(base)
    return fmt.read(src, base=known), known, fmt.name


def _read_as_base(src: Path, base: str | os.PathLike[str]) -> tuple[Adapter, BaseModel | None, str]:
    """A file holding several models' adapters read as ``base``'s (as ``merge`` reads it: a ComfyUI file against
    its SGM checkpoint, a pipeline file against ``PIPELINE/unet``), when that is all of it; else the choice of one
    model is refused as :func:`~loratools.formats.read_with_base` refuses it."""
    fmt = get_format(detect_format(src))
    known = load_base(base)
    mine = fmt.read(src, base=known)
    if len(mine.modules) != len(fmt.read(src).modules):
        return read_with_base(src, base)  # refuses, naming the models it holds and `component`
    return mine, known, fmt.name


def convert_file(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, to: str,
                 base: str | os.PathLike[str] | None = None, drop_unsupported: bool = False,
                 force: bool = False, as_lora: bool = False, rule: RankRule | None = None,
                 component: str | None = None) -> ConvertResult:
    """Convert the adapter at ``src`` into format ``to`` at ``dst``, checked and atomic.

    ``base`` (a model directory, ``config.json``, ``.safetensors`` or ``.gguf``)
    maps kohya's flattened names back to module names and gives GGUF its
    architecture and head counts; without it, a source file that records them (a
    GGUF adapter loratools wrote) stands in for it. With ``base``, every module written must
    be one of its weights (:func:`~loratools.formats.base.check_base_names`), or nothing is written.

    ``component`` takes one model's adapter out of a file holding several (``"unet"`` of a diffusers pipeline
    LoRA), its modules named as that model spells them; such a file needs it, unless ``to`` is a format that holds
    several models itself (a pipeline file): then the whole file is converted, and a ``base`` that is a diffusers
    pipeline folder checks each model's names against that model.

    ``as_lora`` flattens a DoRA adapter to plain LoRA (:func:`flatten_dora`, rank by
    ``rule``) with the weights of ``base``; kohya and GGUF hold no DoRA, so they need it.
    """
    fmt_out = get_format(to)
    src_p, dst_p = Path(src), Path(dst)
    # without `base`, what the source file records of its base stands in (GGUF head counts), when it records any
    several = get_format(detect_format(src_p)).component_reader is not None  # the source holds several models
    whole = component is None and several and fmt_out.holds_models  # … and so does the target: all of them
    pipeline = whole and _pipeline_folder(base)
    if whole:
        adapter, base_m, fmt_in = _read_whole(src_p, base)
    elif component is None and base is not None and several:
        adapter, base_m, fmt_in = _read_as_base(src_p, base)
    else:
        adapter, base_m, fmt_in = read_with_base(src_p, base, component=component)
    if base_m is not None:
        check_base_shapes(adapter, base_m)
    flattened: dict[str, float] = {}
    if as_lora:
        if base is None or not adapter.is_dora:
            raise InvalidOptionError("`as_lora` flattens a DoRA adapter with the weights of its base: "
                                     + ("give `base`" if base is None else "this adapter is not DoRA"))
        weights = base_m.weights if base_m is not None and base_m.weights is not None else base
        adapter, flattened = flatten_dora(adapter, weights, rule if rule is not None else RankRule.from_options())
    notes = [note for fmt in FORMATS.values() for note in fmt.notes(adapter, base_m)]
    conv = convert_adapter(adapter, to=to, base=base_m, drop_unsupported=drop_unsupported)
    if base is not None and base_m is not None:  # names that match nothing in `base` make a file nothing loads
        check_base_names(conv.adapter, base_m)
    reference = Adapter({n: m for n, m in adapter.items() if n not in conv.dropped}, adapter.config,
                        {k: t for k, t in adapter.saved.items() if k not in conv.dropped})
    if reference.method == "adalora" and fmt_out.plain_lora_only:
        notes.append("AdaLoRA written as plain LoRA factors with the same ΔW (rank-0 modules add nothing and "
                     "are left out)")
    with atomic_output(dst_p, force=force, inputs=(src_p,)) as tmp:
        fmt_out.write(conv.adapter, tmp, base=base_m)
        back = fmt_out.read(tmp, base=None if pipeline else base_m)  # against a pipeline folder: read back whole
        worst = check_same_deltas(reference, back)
    return ConvertResult(dst_p, fmt_in, to, len(conv.adapter.modules), conv.dropped, tuple(notes), worst,
                         flattened)
