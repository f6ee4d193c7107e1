"""Adapter file formats, registered by name, detected by content.

Each format is a :class:`~loratools.formats.base.Format` (see there for what it holds); its
``read(path, *, base=None)`` and ``write(adapter, path, *, base=None)`` take what is known of the base
model as a :class:`~loratools.formats.base.BaseModel` (:func:`load_base`). This module is the face of the
registry: it imports the format modules, which import only :mod:`loratools.formats.base`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..adapter import Adapter
from ..errors import InputNotFoundError, InvalidOptionError, LfsPointerError, NotAnAdapterError, UnknownFormatError
from ..io import atomic_output
from .base import (FORMATS, BaseModel, Format, check_base_names, check_base_shapes, load_base, peek_safetensors,
                   register)

# Registration order is detection order: the most specific formats first.
from . import single, mlx, peft, comfyui, kohya, gguf, diffusers  # noqa: E402,F401,I001

__all__ = ["Format", "FORMATS", "BaseModel", "register", "peek_safetensors", "detect_format", "get_format",
           "check_base_names", "check_base_shapes", "held_models", "load_base", "read_adapter", "read_with_base",
           "write_adapter"]


def detect_format(path: str | os.PathLike[str]) -> str:
    """Name of the format of the adapter at ``path``, judged by its content."""
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(p, "adapter")
    for fmt in FORMATS.values():
        if fmt.detect(p):
            return fmt.name
    if p.is_dir():
        raise NotAnAdapterError(p, _why_not_a_directory(p))
    with p.open("rb") as f:
        LfsPointerError.check(p, f.read(len(LfsPointerError.MAGIC)))
    raise NotAnAdapterError(p, f"not a format loratools reads ({', '.join(FORMATS)})")


def _why_not_a_directory(p: Path) -> str:
    """Why the directory ``p`` is no adapter, naming the subfolders to pass when the adapters lie one level down:
    a transformers Trainer checkpoint (``trainer_state.json`` beside the adapter's folder) or peft's
    ``save_pretrained(selected_adapters=…)``, which writes each adapter but ``default`` to a folder of its name."""
    subs = sorted(s for s in p.iterdir() if s.is_dir() and not s.name.startswith(".")
                  and ((s / "adapter_config.json").is_file() or (s / "adapter_model.safetensors").is_file()
                       or any(fmt.detect(s) for fmt in FORMATS.values())))
    if not subs:
        return "no adapter_config.json or adapter file in this directory"
    shown = ", ".join(str(s) for s in subs[:5]) + (f" and {len(subs) - 5} more" if len(subs) > 5 else "")
    if (p / "trainer_state.json").is_file():
        return f"it is a Trainer checkpoint; pass its adapter folder instead: {shown}"
    return f"it holds adapters in subfolders (one per adapter name, as peft saves selected_adapters); pass one: {shown}"


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise UnknownFormatError(name, list(FORMATS))
    return FORMATS[name]


def read_adapter(path: str | os.PathLike[str], *, format: str | None = None, base: BaseModel | None = None) -> Adapter:
    """Read an adapter from ``path`` in any registered format (detected when ``format`` is None);
    ``base`` (:func:`load_base`) lets a format map names back (kohya) or check the architecture (GGUF)."""
    name = format or detect_format(path)
    return get_format(name).read(Path(path), base=base)


def read_with_base(path: str | os.PathLike[str], base: str | os.PathLike[str] | None = None, *,
                   component: str | None = None) -> tuple[Adapter, BaseModel | None, str]:
    """``(adapter, what is known of its base, format name)`` for the adapter at ``path``.

    What is known of the base is ``base`` (:func:`load_base`) when given, else what the file itself
    records of its base where its format says (a GGUF adapter's architecture and head counts,
    ``Format.base_info``), else None; the adapter is read with it (kohya names mapped back, GGUF
    rows un-permuted).

    ``component`` picks one model's adapter from a file that holds several (``"unet"`` of a diffusers pipeline
    LoRA, ``Format.component_reader``), named as that model spells its modules; ``base`` is then that model.
    """
    p = Path(path)
    fmt = get_format(detect_format(p))
    known = load_base(base) if base is not None else fmt.base_info(p) if fmt.base_info else None
    if component is None and fmt.component_reader is not None:  # a model's names are not the file's
        raise InvalidOptionError(f"{p} holds the adapters of {', '.join(held_models(p) or {})} ({fmt.name}): choose "
                                 "one with `component` (its base is that model)")
    if component is None:
        return fmt.read(p, base=known), known, fmt.name
    if fmt.component_reader is None:
        raise InvalidOptionError(f"`component` picks one model of a file that holds several (a diffusers pipeline "
                                 f"LoRA); {p} is {fmt.name}, which holds one: leave `component` out")
    return fmt.component_reader(p, component), known, fmt.name


def held_models(path: str | os.PathLike[str]) -> dict[str, int] | None:
    """The models a file holding several models' adapters (a pipeline LoRA: ``Format.component_reader``) has LoRAs
    of, each with its module count, in file order; None for the adapter of one model. Read without a base, such a
    file names each module ``<component>.<module>``."""
    fmt = get_format(detect_format(path))
    if fmt.component_reader is None:
        return None
    counts: dict[str, int] = {}
    for name in fmt.read(Path(path)).modules:
        comp = name.split(".", 1)[0]
        counts[comp] = counts.get(comp, 0) + 1
    return counts


def write_adapter(adapter: Adapter, path: str | os.PathLike[str], *, format: str = "peft", force: bool = False,
                  inputs: tuple[str | os.PathLike[str], ...] = (), base: BaseModel | None = None) -> Path:
    """Write ``adapter`` to ``path`` atomically: nothing appears at ``path`` unless the write completes."""
    fmt = get_format(format)
    with atomic_output(path, force=force, inputs=inputs) as tmp:
        fmt.write(adapter, tmp, base=base)
    return Path(path)
