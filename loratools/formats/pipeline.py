"""A diffusers pipeline as loratools sees it: its models (components), a folder per model, and an adapter whose
modules are named ``<component>.<module>`` split into each model's own.

The layout is diffusers 0.42.1's (``DiffusionPipeline.save_pretrained``: ``model_index.json`` and one folder per
model; the LoRA loader mixins' ``unet_name``/``text_encoder_name``/``transformer_name`` prefixes). The diffusers and
ComfyUI formats both write pipeline files and check them against a pipeline folder through this module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from ..adapter import Adapter, as_lora
from ..errors import InputNotFoundError, InvalidOptionError, UnsupportedModuleError
from ..io import ModelReader, read_config
from ..io.model import has_weights
from .base import BaseModel, unmatched_modules
from .kohya_sd import clip_name

__all__ = ["COMPONENTS", "component_of", "pipeline_models", "load_component", "as_base_names", "split_components",
           "pipeline_mismatches", "is_pipeline", "writable"]

#: the component prefixes of diffusers' LoRA loader mixins (``unet_name``, ``text_encoder_name``, ``transformer_name``)
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def component_of(key: str) -> str | None:
    """The component ``key`` (a module name or file key) lies under, or None."""
    head = key.split(".", 1)[0]
    return head if head in COMPONENTS and "." in key else None


def pipeline_models(folder: str | Path) -> list[str] | None:
    """The models (subfolders with safetensors weights) of a diffusers pipeline folder (one with
    ``model_index.json``, as ``DiffusionPipeline.save_pretrained`` writes it); None for any other path."""
    root = Path(folder)
    if not (root / "model_index.json").is_file():
        return None
    return sorted(d.name for d in root.iterdir() if d.is_dir() and has_weights(d))


def load_component(pipeline: str | Path, component: str) -> BaseModel:
    """One model of a diffusers pipeline folder as a base: ``PIPELINE/COMPONENT`` (its ``config.json`` and
    weights: ``diffusion_pytorch_model.safetensors`` for a U-Net or transformer, ``model.safetensors`` for a text
    encoder, sharded with its index or not), headers read once."""
    root = Path(pipeline)
    if not root.is_dir():
        raise InputNotFoundError(root, "diffusers pipeline folder")
    folder = root / component
    if not folder.is_dir() or not has_weights(folder):
        held = sorted(d.name for d in root.iterdir() if d.is_dir() and has_weights(d))
        raise InvalidOptionError(f"`component` {component!r}: {root} has no folder {component}/ with safetensors "
                                 f"weights; its models are {', '.join(held) or 'none'}")
    model = ModelReader(folder)
    shapes = {k[: -len(".weight")]: model.shape(k) for k in model.keys() if k.endswith(".weight")}
    return BaseModel(folder, hparams=read_config(folder), shapes=shapes, weights=model)


def as_base_names(adapter: Adapter, base: BaseModel) -> Adapter:
    """CLIP modules named as ``base`` spells them, with or without ``text_model.`` (diffusers' own fix-up)."""
    shapes = base.shapes or {}
    if not shapes:
        return adapter

    def own(name: str) -> str:
        if name in shapes:
            return name
        short = name.removeprefix("text_model.")
        return short if short in shapes else clip_name(name) if clip_name(name) in shapes else name

    return adapter.with_modules({own(n): m for n, m in adapter.items()})


def split_components(adapter: Adapter, base: BaseModel | None = None) -> tuple[dict[str, dict[str, str]],
                                                                                 dict[str, str]]:
    """(component → {module name in the model → adapter name}, adapter name → why no component holds it).

    A name ``<component>.<module>`` belongs to that component; an adapter none of whose names has a component
    belongs to the one ``base``'s folder is named after (``PIPELINE/unet``), if any."""
    parts: dict[str, dict[str, str]] = {}
    bad: dict[str, str] = {}
    own = base.path.name if base is not None and base.path.name in COMPONENTS else None
    whole = own is None or any(component_of(n) for n in adapter.modules)
    for name in adapter.modules:
        comp = component_of(name) if whole else own
        if comp is None:
            bad[name] = (f"a diffusers pipeline file names each module by its model ({', '.join(COMPONENTS)}); "
                         "convert the whole pipeline file, or give `base` as the model's folder (PIPELINE/unet)")
            continue
        module = name[len(comp) + 1:] if whole else name
        parts.setdefault(comp, {})[module] = name
    return parts, bad


def pipeline_mismatches(adapter: Adapter, pipeline: Path) -> dict[str, str]:
    """Modules of ``adapter`` (named ``<component>.<module>``) that no weight of their own model in the diffusers
    pipeline folder ``pipeline`` belongs to, or one of another shape → why (the rule of
    :func:`~loratools.formats.base.check_base_names`, per component); a name without a component is left to the
    caller."""
    parts, _ = split_components(adapter)
    out: dict[str, str] = {}
    for comp, names in parts.items():
        if not (pipeline / comp).is_dir() or not has_weights(pipeline / comp):
            out.update({n: f"`base` {pipeline} has no {comp} model" for n in names.values()})
            continue
        base = load_component(pipeline, comp)
        shapes = base.shapes or {}
        sub = as_base_names(Adapter({mod: adapter.modules[n] for mod, n in names.items()}), base)
        by_sub = dict(zip(sub.modules, names.values()))
        out.update({by_sub[m]: f"it matches no weight of `base` {base.path}" for m in unmatched_modules(sub, base)})
        out.update({by_sub[m]: f"its weight in `base` {base.path} has another shape: this adapter was made for "
                               "another base model"
                    for m, mod in sub.items() if shapes.get(m) and tuple(shapes[m]) != mod.weight_shape})
    return out


def is_pipeline(base: BaseModel | None) -> bool:
    """``base`` is a diffusers pipeline folder (``model_index.json``), each model in a folder of its own."""
    return base is not None and (base.path / "model_index.json").is_file()


def writable(adapter: Adapter, base: BaseModel | None, fmt: str,
             unsupported: Callable[[Adapter, BaseModel | None], Mapping[str, str]]) -> Adapter:
    """``adapter`` as plain LoRA factors (AdaLoRA through :func:`~loratools.adapter.as_lora`), or the refusal that
    names every module format ``fmt`` cannot hold (``unsupported``) and why: a writer's first step."""
    adapter = as_lora(adapter)
    bad = unsupported(adapter, base)
    if bad:
        raise UnsupportedModuleError(fmt, sorted(bad), "; ".join(dict.fromkeys(bad.values())))
    return adapter
