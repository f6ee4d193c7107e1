"""Converting adapters between formats, checking that every ΔW survives.

:func:`convert` is pure: it turns an :class:`Adapter` into what the target
format can hold (AdaLoRA → plain LoRA for ``kohya``/``gguf``, with the same
ΔW) and refuses, or with ``drop_unsupported`` leaves out, modules the format
cannot hold. :func:`convert_file` reads, converts, writes under a temporary
name, reads the written file back, checks each module's ΔW against the source
(:func:`delta_error`) and only then renames it into place.

>>> conv = convert(read_adapter("fixtures/adapters/adalora"), to="kohya")   # doctest: +SKIP
>>> conv.adapter.method, sorted(conv.dropped)                                # doctest: +SKIP
('lora', [])
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .adapter import Adapter, Module, as_lora
from .errors import (CorruptFileError, InputNotFoundError, InvalidOptionError, LoraToolsError, ShapeMismatchError,
                     UnsupportedModuleError)
from .formats import detect_format, get_format, read_adapter
from .formats.gguf import (GGUFBase, base_from_gguf, base_from_hparams, base_of_adapter, gguf_model_info, hf_name,
                           read_gguf, write_gguf)
from .formats.gguf import MAGIC as GGUF_MAGIC
from .formats.gguf import gguf_unsupported
from .formats.kohya import is_flattened, kohya_unsupported, read_kohya
from .io import ModelReader, atomic_output
from .linalg import lowrank_svd

__all__ = ["BaseModel", "Conversion", "ConvertResult", "ConversionCheckError", "load_base", "convert",
           "convert_file", "delta_error", "check_same_deltas", "tolerance", "TOLERANCE"]

#: relative Frobenius error allowed between a module's ΔW before and after conversion (float32 factors)
TOLERANCE = 1e-6


class ConversionCheckError(LoraToolsError, ValueError):
    """The written file does not reproduce a module's ΔW: nothing is left at the output."""

    def __init__(self, module: str, why: str) -> None:
        self.module = module
        super().__init__(f"conversion check failed for {module}: {why}; nothing was written")


@dataclass(frozen=True)
class BaseModel:
    """What a conversion may use of the base model: its config and/or its weight names and shapes."""

    path: Path
    hparams: Mapping[str, Any] | None = None
    shapes: Mapping[str, tuple[int, ...]] | None = None  # module name → base weight shape
    gguf_base: GGUFBase | None = None

    @property
    def module_names(self) -> list[str] | None:
        return list(self.shapes) if self.shapes is not None else None

    def gguf(self) -> GGUFBase:
        """llama.cpp architecture and head counts (from a base .gguf or config.json)."""
        if self.gguf_base is not None:
            return self.gguf_base
        if self.hparams is not None:
            return base_from_hparams(self.hparams, where=str(self.path))
        raise InvalidOptionError(f"--base {self.path} has no config.json: GGUF needs the base's architecture and "
                                 "head counts (give the model directory or its .gguf)")


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CorruptFileError(path, f"not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise CorruptFileError(path, "not a JSON object")
    return data


def _weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with ModelReader(path) as model:
        return {k[: -len(".weight")]: model.shape(k) for k in model.keys() if k.endswith(".weight")}


def load_base(path: str | os.PathLike[str]) -> BaseModel:
    """Read what is needed of a base model: a model directory (config.json, weights optional),
    one ``.safetensors``, a ``config.json``, or a llama.cpp model ``.gguf``."""
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(p, "base model")
    if p.is_file():
        with p.open("rb") as f:
            magic = f.read(4)
        if magic == GGUF_MAGIC:
            # shapes stay unknown (): a quantised GGUF's names still map kohya keys back
            gb, tensor_names = gguf_model_info(p)
            names = [hf_name(g[: -len(".weight")], gb.arch) for g in tensor_names if g.endswith(".weight")]
            return BaseModel(p, gguf_base=gb, shapes={n: () for n in names if n} or None)
        if p.suffix == ".json":
            return BaseModel(p, hparams=_read_config(p))
        cfg = p.parent / "config.json"
        return BaseModel(p, hparams=_read_config(cfg) if cfg.is_file() else None, shapes=_weight_shapes(p))
    cfg = p / "config.json"
    hparams = _read_config(cfg) if cfg.is_file() else None
    has_weights = (p / "model.safetensors").is_file() or (p / "model.safetensors.index.json").is_file()
    if hparams is None and not has_weights:
        raise InvalidOptionError(f"--base {p} holds neither config.json nor model.safetensors")
    return BaseModel(p, hparams=hparams, shapes=_weight_shapes(p) if has_weights else None)


@dataclass(frozen=True)
class Conversion:
    """The adapter to write, and what was left out (name → why)."""

    adapter: Adapter
    dropped: Mapping[str, str] = field(default_factory=dict)


def _unsupported(adapter: Adapter, to: str, base: BaseModel | None) -> dict[str, str]:
    if to == "kohya":
        return kohya_unsupported(adapter)
    if to == "gguf":
        bad = gguf_unsupported(adapter, base.gguf() if base is not None else None)
        # a kohya name the base did not map is the likely cause, not the architecture
        return {n: ("it kept kohya's flattened name: pass --base MODEL to map it to the model's name"
                    if is_flattened(n) else why) for n, why in bad.items()}
    return {}


def convert(adapter: Adapter, *, to: str, base: BaseModel | None = None, drop_unsupported: bool = False) -> Conversion:
    """What ``adapter`` becomes in format ``to``, with the same ΔW for every module it keeps.

    kohya and GGUF hold plain LoRA only, so AdaLoRA goes through :func:`as_lora`
    (``A' = (A⊙E)[kept]``, scale carried per module; rank-0 modules add nothing
    and vanish; 16-bit factors become float32 so that ``A⊙E`` is not rounded). Modules the format cannot hold raise
    :class:`UnsupportedModuleError` naming them, unless ``drop_unsupported``.
    """
    get_format(to)  # unknown names fail here, before any work
    out = as_lora(adapter) if to in ("kohya", "gguf") else adapter
    if adapter.modules and not out.modules:
        raise InvalidOptionError(f"every module of this AdaLoRA adapter was pruned to rank 0 (it adds nothing): "
                                 f"there is nothing to write as {to}")
    bad = _unsupported(out, to, base)
    if bad and not drop_unsupported:
        reasons = "; ".join(dict.fromkeys(bad.values()))
        raise UnsupportedModuleError(to, sorted(bad), reasons)
    if bad:
        out = Adapter({n: m for n, m in out.items() if n not in bad}, out.config,
                      {k: t for k, t in out.saved.items() if k not in bad})
        if not out.modules:
            raise UnsupportedModuleError(to, sorted(bad), "no module would be left")
    return Conversion(out, dict(bad))


def delta_error(before: Module, after: Module) -> float:
    """``‖ΔW_after − ΔW_before‖_F / ‖ΔW_before‖_F`` (absolute when ΔW_before = 0), from the factors:
    the difference is ``[B₁, −B₀] @ [A₁; A₀]``, whose singular values come from a QR of the factors."""
    if before.kind != after.kind or before.weight_shape != after.weight_shape:
        raise ShapeMismatchError("module", f"{before.kind} {before.weight_shape}", f"{after.kind} {after.weight_shape}")
    if before.rank == 0 and after.rank == 0:
        return 0.0
    B0, A0 = before.factors(dtype=torch.float64)
    B1, A1 = after.factors(dtype=torch.float64)
    diff = float(lowrank_svd(torch.cat([B1, -B0], 1), torch.cat([A1, A0], 0))[1].norm())
    ref = float(lowrank_svd(B0, A0)[1].norm()) if before.rank else 0.0
    return diff / ref if ref > 0 else diff


def _eps(m: Module) -> float:
    return max(torch.finfo(t.dtype).eps for t in (m.A, m.B) if t.is_floating_point())


def tolerance(before: Module, after: Module) -> float:
    """1e-6, or 8·ε of the written factors' dtype when the written file holds them with less precision
    than the source (loratools' own writers never do: kohya keeps the dtype, GGUF writes float32)."""
    return max(TOLERANCE, 8 * _eps(after)) if _eps(after) > _eps(before) else TOLERANCE


def check_same_deltas(before: Adapter, after: Adapter) -> float:
    """Raise :class:`ConversionCheckError` unless every module of ``before`` has the same ΔW in ``after``
    (rank-0 modules may be absent) and ``after`` has nothing more. Returns the largest relative error."""
    worst = 0.0
    for name, m in before.items():
        if name not in after.modules:
            if m.rank == 0 or float(m.B.abs().max()) == 0 or float(m.A.abs().max()) == 0:
                continue
            raise ConversionCheckError(name, "the module is missing from the written file")
        try:
            err = delta_error(m, after.modules[name])
        except ShapeMismatchError as e:
            raise ConversionCheckError(name, f"expected {e.expected}, got {e.got}") from None
        tol = tolerance(m, after.modules[name])
        if err > tol:
            raise ConversionCheckError(name, f"ΔW differs by {err:.3g} (relative), more than {tol:.0e}")
        worst = max(worst, err)
    extra = sorted(set(after.modules) - set(before.modules))
    if extra:
        raise ConversionCheckError(extra[0], "the written file holds a module the source lacks")
    if set(after.saved) != set(before.saved) or any(not torch.equal(after.saved[k], before.saved[k])
                                                    for k in before.saved):
        raise ConversionCheckError("saved tensors", "full tensors differ after writing")
    return worst


def _read(path: Path, fmt: str, base: BaseModel | None, gguf_base: GGUFBase | None) -> Adapter:
    if fmt == "kohya":
        return read_kohya(path, base_names=base.module_names if base is not None else None)
    if fmt == "gguf":
        return read_gguf(path, base=gguf_base)
    return read_adapter(path, format=fmt)


def _check_base_shapes(adapter: Adapter, base: BaseModel) -> None:
    if not base.shapes:
        return
    for name, m in adapter.items():
        want = base.shapes.get(name)
        if want and tuple(want) != m.weight_shape:
            raise ShapeMismatchError(name, f"a weight of shape {tuple(want)} (from --base)", m.weight_shape,
                                     "this adapter was made for another base model")


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


def convert_file(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, to: str,
                 base: str | os.PathLike[str] | None = None, drop_unsupported: bool = False,
                 force: bool = False) -> ConvertResult:
    """Convert the adapter at ``src`` into format ``to`` at ``dst``, checked and atomic.

    ``base`` (a model directory, ``config.json``, ``.safetensors`` or ``.gguf``)
    maps kohya's flattened names back to module names and gives GGUF its
    architecture and head counts.
    """
    fmt_out = get_format(to)
    src_p, dst_p = Path(src), Path(dst)
    src_fmt = detect_format(src_p)
    base_m = load_base(base) if base is not None else None
    gguf_base: GGUFBase | None = None
    if base_m is not None and "gguf" in (src_fmt, to):
        gguf_base = base_m.gguf()
    elif src_fmt == "gguf":
        gguf_base = base_from_gguf(src_p)  # head counts loratools wrote into the adapter, when there
    adapter = _read(src_p, src_fmt, base_m, gguf_base)
    if base_m is not None:
        _check_base_shapes(adapter, base_m)
    notes: list[str] = []
    flat = [n for n in adapter.modules if is_flattened(n)]
    if flat:
        notes.append(f"{len(flat)} module names kept in kohya's flattened form (e.g. {flat[0]}): "
                     + ("pass --base MODEL to map them to the model's names" if base_m is None else
                        "they match no weight of --base" if base_m.shapes else
                        "--base has no weights (or .gguf) to match them against"))
    if to == "gguf" and gguf_base is None:
        gguf_base = base_of_adapter(adapter)
    conv_base = base_m
    if to == "gguf":  # the architecture found above, whichever source it came from
        conv_base = replace(base_m, gguf_base=gguf_base) if base_m is not None else BaseModel(src_p, gguf_base=gguf_base)
    conv = convert(adapter, to=to, base=conv_base, drop_unsupported=drop_unsupported)
    reference = Adapter({n: m for n, m in adapter.items() if n not in conv.dropped}, adapter.config,
                        {k: t for k, t in adapter.saved.items() if k not in conv.dropped})
    if reference.method == "adalora" and to in ("kohya", "gguf"):
        notes.append("AdaLoRA written as plain LoRA factors with the same ΔW (rank-0 modules add nothing and "
                     "are left out)")
    with atomic_output(dst_p, force=force, inputs=(src_p,)) as tmp:
        if to == "gguf":
            write_gguf(conv.adapter, tmp, base=gguf_base)
        else:
            fmt_out.write(conv.adapter, tmp)
        back = _read(tmp, to, base_m, gguf_base)
        worst = check_same_deltas(reference, back)
    return ConvertResult(dst_p, src_fmt, to, len(conv.adapter.modules), conv.dropped, tuple(notes), worst)
