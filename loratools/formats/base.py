"""What every adapter format is (:class:`Format`), the registry it joins, and what a format may know of the
base model (:class:`BaseModel`, :func:`load_base`).

Format modules import this module only; the registry face (``loratools.formats``) imports the format
modules, so neither imports the other both ways. A format is data: its name, how it is recognised, and
plain functions for reading, writing and saying what it cannot hold, each given what is known of the
base model (``None`` when nothing is). Adding a format is one module that calls :func:`register`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..adapter import Adapter
from ..errors import InputNotFoundError, InvalidOptionError, LoraToolsError, ShapeMismatchError
from ..io import ModelReader, has_weights, read_config, read_safetensors_header

__all__ = ["BaseModel", "Format", "FORMATS", "register", "peek_safetensors", "load_base", "check_base_shapes",
           "unmatched_modules", "check_base_names"]


@dataclass(frozen=True)
class BaseModel:
    """What is known of the base model an adapter belongs to; every part may be missing.

    ``hparams`` is its ``config.json``; ``shapes`` maps module name → base weight shape (``()`` when
    only the name is known, as for a quantised ``.gguf``); ``weights`` is the :class:`~loratools.io.ModelReader`
    the shapes came from (headers only; nothing stays open); ``facts`` holds what a format read from a
    base file of its own kind, keyed by the format's name (``"gguf"``: llama.cpp's architecture and
    head counts), so that only that format needs to know what the value is.
    """

    path: Path
    hparams: Mapping[str, Any] | None = None
    shapes: Mapping[str, tuple[int, ...]] | None = None
    facts: Mapping[str, Any] = field(default_factory=dict)
    #: the safetensors weights' headers, when read (a merge reuses them rather than parse them again)
    weights: ModelReader | None = field(default=None, compare=False, repr=False)

    @property
    def module_names(self) -> list[str] | None:
        return list(self.shapes) if self.shapes is not None else None


Reader = Callable[[Path, BaseModel | None], Adapter]
Writer = Callable[[Adapter, Path, BaseModel | None], None]
Limits = Callable[[Adapter, BaseModel | None], Mapping[str, str]]
Remarks = Callable[[Adapter, BaseModel | None], Sequence[str]]


def _holds_everything(adapter: Adapter, base: BaseModel | None) -> Mapping[str, str]:
    return {}


def _no_remarks(adapter: Adapter, base: BaseModel | None) -> Sequence[str]:
    return ()


def _no_hint(name: str) -> str | None:
    return None


@dataclass(frozen=True)
class Format:
    """One adapter file format.

    - ``detect(path)``: True when the content (never only the name) is this format;
    - ``reader(path, base)`` / ``writer(adapter, path, base)``: read, or write a file or directory at
      exactly ``path`` (callers wrap it in :func:`loratools.io.atomic_output`); ``base`` is what is
      known of the base model, or None;
    - ``layout``: ``"dir"`` for a directory format, else the file suffix (``".safetensors"``, ``".gguf"``);
    - ``plain_lora_only``: the format holds plain LoRA factors only, so AdaLoRA is written through
      :func:`loratools.adapter.as_lora` (same ΔW);
    - ``cannot_hold(adapter, base)``: modules and saved tensors it cannot hold → why (after ``as_lora``
      when ``plain_lora_only``);
    - ``remarks(adapter, base)``: notes worth showing about an adapter this format's reader produced
      (kohya: names kept flattened);
    - ``name_hint(name)``: why a module name may be unknown to other formats, when it is one this
      format's reader kept as it found it (kohya's flattened keys), else None;
    - ``component_reader(path, component)``: for a file holding the adapters of several models (a diffusers
      pipeline LoRA: ``unet``, ``text_encoder`` …), one of them, named as that model spells its modules;
    - ``holds_models``: a file of this format can hold the adapters of several models of a pipeline, named
      ``<component>.<module>`` (diffusers, ComfyUI, kohya): ``convert`` writes such a file whole;
    - ``base_info(path)``: when files of this format can describe a base model (a llama.cpp model
      ``.gguf``, or a GGUF adapter that records its head counts), what they say; else None.

    Callers use the methods :meth:`read`, :meth:`write`, :meth:`unsupported` and :meth:`notes`.
    """

    name: str
    description: str
    layout: str
    detect: Callable[[Path], bool]
    reader: Reader
    writer: Writer
    plain_lora_only: bool = False
    cannot_hold: Limits = _holds_everything
    remarks: Remarks = _no_remarks
    name_hint: Callable[[str], str | None] = _no_hint
    base_info: Callable[[Path], BaseModel] | None = None
    component_reader: Callable[[Path, str], Adapter] | None = None
    holds_models: bool = False

    def read(self, path: str | os.PathLike[str], *, base: BaseModel | None = None) -> Adapter:
        return self.reader(Path(path), base)

    def write(self, adapter: Adapter, path: str | os.PathLike[str], *, base: BaseModel | None = None) -> None:
        self.writer(adapter, Path(path), base)

    def unsupported(self, adapter: Adapter, base: BaseModel | None = None) -> dict[str, str]:
        """Module (or saved tensor) name → why this format cannot hold it; empty when it holds all."""
        return dict(self.cannot_hold(adapter, base))

    def notes(self, adapter: Adapter, base: BaseModel | None = None) -> tuple[str, ...]:
        return tuple(self.remarks(adapter, base))


#: registered formats by name; registration order is detection order (the most specific first)
FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    FORMATS[fmt.name] = fmt
    return fmt


def peek_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, str]] | None:
    """The checked header and metadata of ``path`` if it is a readable safetensors file, else None
    (for ``detect`` functions: a file that is not safetensors is simply not their format)."""
    if not path.is_file():
        return None
    try:
        return read_safetensors_header(path)
    except (LoraToolsError, OSError):
        return None


def _with_weights(path: Path, hparams: Mapping[str, Any] | None) -> BaseModel:
    """A base whose weights are read (their headers): the module shapes, and the reader kept."""
    model = ModelReader(path)
    shapes = {k[: -len(".weight")]: model.shape(k) for k in model.keys() if k.endswith(".weight")}
    return BaseModel(path, hparams=hparams, shapes=shapes, weights=model)


def load_base(path: str | os.PathLike[str]) -> BaseModel:
    """Read what is needed of a base model: a model directory (config.json, weights optional),
    one ``.safetensors``, a ``config.json``, or a file a format describes (a llama.cpp model ``.gguf``)."""
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(p, "base model")
    if p.is_file():
        own = next((f for f in FORMATS.values() if f.base_info is not None and f.detect(p)), None)
        if own is not None and own.base_info is not None:
            return own.base_info(p)
        if p.suffix == ".json":
            return BaseModel(p, hparams=read_config(p) or {})
        return _with_weights(p, read_config(p))
    hparams = read_config(p)
    weights = has_weights(p)  # transformers' or diffusers' names
    if hparams is None and not weights:
        raise InvalidOptionError(f"`base` {p} holds neither config.json nor model.safetensors")
    return _with_weights(p, hparams) if weights else BaseModel(p, hparams=hparams)


def check_base_shapes(adapter: Adapter, base: BaseModel) -> None:
    """Refuse ``base`` when a module's weight there has another shape than the adapter's: the adapter was made
    for another model, and whatever is written with ``base``'s facts (GGUF q/k rows permuted for its head
    counts) would be wrong. The one check of "does this base match this adapter" that ``convert`` and
    ``export`` share; a module ``base`` does not name (a vision tower) is left to the format's own rules."""
    if not base.shapes:
        return
    for name, m in adapter.items():
        want = base.shapes.get(name)
        if want and tuple(want) != m.weight_shape:
            raise ShapeMismatchError(name, f"a weight of shape {tuple(want)} (from `base`)", m.weight_shape,
                                     "this adapter was made for another base model")


def _tied_head(name: str, base: BaseModel, keys: set[str]) -> bool:
    """``name`` is the output head of a base that ties it to its input embedding (no ``lm_head.weight`` stored):
    peft adapts it there, and ``merge`` unties it."""
    tied = (base.hparams or {}).get("tie_word_embeddings", True)
    return name.rsplit(".", 1)[-1] == "lm_head" and tied is not False and not any(k.endswith("lm_head.weight")
                                                                                 for k in keys)


def unmatched_modules(adapter: Adapter, base: BaseModel) -> list[str]:
    """The modules of ``adapter`` that no weight of ``base`` belongs to, in order; ``[]`` when ``base`` names no
    weights (a ``config.json``). A module matches when ``base`` holds ``NAME.weight``, or a tensor directly under
    ``NAME`` (a quantised ``NAME.weight_packed``) or ``NAME`` itself (a MoE parameter), or it is a tied output head."""
    if not base.shapes:
        return []
    keys = set(base.weights.keys()) if base.weights is not None else {f"{n}.weight" for n in base.shapes}
    owners = {k.rsplit(".", 1)[0] for k in keys}
    return [n for n in adapter.modules
            if n not in base.shapes and n not in owners and n not in keys and not _tied_head(n, base, keys)]


def check_base_names(adapter: Adapter, base: BaseModel) -> None:
    """Refuse to write ``adapter`` against ``base`` when any module's weight is not in ``base`` (or has another
    shape): a file whose names match nothing in its base loads as a no-op or not at all. Names kept as the source
    spells them (kohya's flattened keys, ComfyUI's ``diffusion_model.…``) or an adapter of another model are the
    usual causes."""
    check_base_shapes(adapter, base)
    bad = unmatched_modules(adapter, base)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise InvalidOptionError(
            f"{len(bad)} of {len(adapter.modules)} modules match no weight of `base` {base.path} ({shown}): give the "
            "base the adapter was made for (for a pipeline file, the part's own model with `component`), or leave "
            "`base` out to keep the names as they are")
