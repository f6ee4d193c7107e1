"""diffusers' pipeline LoRA file: ``pytorch_lora_weights.safetensors``, read and written.

Written by ``save_lora_weights`` of diffusers' pipelines (SD 1.5, SDXL, Flux …; diffusers 0.42.1
``loaders/lora_base.py`` ``_save_lora_weights``): one file holding a peft LoRA for each component
model, its keys prefixed by the component (``_pack_dict_with_prefix``):

======================  ===============================================================
LoRA linear / conv      ``<component>.<m>.lora_A.weight``, ``.lora_B.weight``
peft's ``lora_bias``    ``<component>.<m>.lora_B.bias``
metadata (optional)     ``lora_adapter_metadata``: JSON of each component's peft ``LoraConfig``,
                        its keys prefixed the same way (``"unet.r"``, ``"unet.lora_alpha"`` …)
======================  ===============================================================

ΔW is what diffusers applies (``loaders/peft.py`` ``load_lora_adapter``, ``lora_base.py``
``_load_lora_into_text_encoder``): with metadata, the component's ``LoraConfig`` as saved
(``utils/peft_utils.py`` ``_create_lora_config``; a field it leaves out takes peft's default: ``lora_alpha``
8), so ``scale = lora_alpha / r`` (``/ √r`` with ``use_rslora``) after ``rank_pattern``/``alpha_pattern`` (a
component the metadata leaves out is refused, as diffusers fails to load it); without it, ``get_peft_kwargs`` sets
``lora_alpha = r`` and mirrors ``rank_pattern`` into ``alpha_pattern`` (no ``network_alphas`` in a
peft-keyed file), so every module has ``scale = 1``: ΔW = B·A. Module names keep their component
(``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``); :func:`read_component` reads one
component with its names as that model spells them. The older non-peft keys (``….lora.down.weight``,
``processor.to_q_lora``, ``lora_linear_layer``) are refused by name. Read whole, a CLIP text encoder's modules
are named with ``text_model.`` (``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``) whether the file
has it or not (transformers 5's ``CLIPTextModel`` has no ``text_model`` level; diffusers strips it from the keys
for such a model): one name per module, whichever format it came from.

:func:`write_diffusers` writes what ``save_lora_weights`` writes: each component's modules under its prefix
(``unet.``, ``text_encoder.``, ``text_encoder_2.`` …; an adapter whose names have none takes the component its
``base`` folder is named after) and one ``LoraConfig`` per component in ``lora_adapter_metadata`` (peft's
``r``/``lora_alpha``, every other module's rank and alpha in ``rank_pattern``/``alpha_pattern`` keyed by its
name, ``alpha = scale · r``), which diffusers passes to ``LoraConfig`` as it is, so each module gets its own
scale (without metadata diffusers would give every module alpha = r). A text encoder's targets and patterns are
keyed without ``text_model.``: peft matches them as name suffixes, so they reach the module with and without that
level; its keys keep it, which diffusers strips where the model lacks it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from torch import Tensor

from ..adapter import Adapter, Kind, Module
from ..config import AdapterConfig, lora_scale, pattern_value
from ..errors import CorruptFileError, InvalidOptionError, MissingModuleError, NotAnAdapterError, ShapeMismatchError
from ..io import load_safetensors, save_safetensors
from .base import BaseModel, Format, peek_safetensors, register
from .kohya_sd import clip_name, pipeline_clip_name
from .pipeline import (COMPONENTS, as_base_names, component_of, is_pipeline, load_component, pipeline_mismatches,
                       pipeline_models, split_components, writable)
from .peft import peft_config, peft_unsupported
from .peft_fields import check_fields
from .peft_values import check_peft_values

# pipeline_models, load_component and COMPONENTS live in .pipeline; they are named here too, where callers found them
__all__ = ["read_diffusers", "read_component", "components", "other_components", "pipeline_models", "load_component",
           "write_diffusers", "diffusers_unsupported", "COMPONENTS", "METADATA_KEY"]

METADATA_KEY = "lora_adapter_metadata"  # lora_base.py LORA_ADAPTER_METADATA_KEY
#: peft 0.21.2 ``LoraConfig``'s default ``r`` and ``lora_alpha`` (``tuners/lora/config.py``), which a metadata
#: without them gets: diffusers 0.42.1 builds ``LoraConfig(**metadata)`` (``utils/peft_utils.py``
#: ``_create_lora_config``)
_PEFT_DEFAULT = 8
_KEY = re.compile(r"^(?P<c>[a-z_0-9]+)\.(?P<m>.+)\.(?P<f>lora_A|lora_B)\.(?P<t>weight|bias)$")
_OLD = re.compile(r"\.lora\.(down|up)\.weight$|_lora\.(down|up)\.weight$|\.lora_linear_layer\.(down|up)\.weight$")


def detect(path: Path) -> bool:
    """Every key lies under a diffusers component and names a LoRA factor (peft's, or diffusers' older ones)."""
    peek = peek_safetensors(path)
    if peek is None:
        return False
    keys = [k for k in peek[0] if k != "__metadata__"]
    return bool(keys) and all(component_of(k) and (".lora_A." in k or ".lora_B." in k or _OLD.search(k))
                              for k in keys)


def _metadata(path: Path, meta: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Each component's peft ``LoraConfig`` from ``lora_adapter_metadata`` (empty without one), checked as a peft
    config is: a field whose effect loratools does not compute is refused by name."""
    if METADATA_KEY not in meta:
        return {}
    try:
        flat = json.loads(meta[METADATA_KEY])
    except ValueError as e:
        raise CorruptFileError(path, f"{METADATA_KEY} is not JSON ({e})") from None
    if not isinstance(flat, dict):
        raise CorruptFileError(path, f"{METADATA_KEY} is not a JSON object")
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        comp = component_of(str(key))
        if comp is None:
            raise CorruptFileError(path, f"{METADATA_KEY} key {key!r} names no component ({', '.join(COMPONENTS)})")
        out.setdefault(comp, {})[key[len(comp) + 1:]] = value
    for comp, raw in out.items():
        where = f"{path} {METADATA_KEY} ({comp})"
        if str(raw.get("peft_type", "LORA")).upper() != "LORA":
            raise NotAnAdapterError(path, f"{comp}'s peft_type {raw.get('peft_type')!r} is not LORA")
        check_fields(raw, where=where)
        check_peft_values(raw, where=where, adalora=False)
        if raw.get("use_dora"):  # refused rather than half-read: diffusers' DoRA is peft's, not checked here
            raise NotAnAdapterError(path, f"{comp} is DoRA (use_dora), which loratools does not read from a "
                                          "diffusers file; save that component with peft's save_pretrained instead")
    return out


def _scale(comp: str, name: str, rank: int, raw: dict[str, Any] | None) -> tuple[float, float]:
    """(alpha, scale) of module ``name`` (without its component) at file rank ``rank``, as diffusers builds the
    component's LoraConfig: from ``raw`` (the metadata) when given, else ``lora_alpha = r`` for every module."""
    if raw is None:
        return float(rank), 1.0
    r_default = int(raw.get("r", _PEFT_DEFAULT))
    r_cfg = int(pattern_value(name, raw.get("rank_pattern") or {}, r_default))
    if r_cfg != rank:
        raise ShapeMismatchError(f"{comp}.{name}", f"rank {r_cfg} (from {METADATA_KEY})", f"lora_A of rank {rank}")
    # LoraConfig(**metadata): a field it leaves out takes peft's default (lora_alpha 8, not r)
    alpha = float(pattern_value(name, raw.get("alpha_pattern") or {}, float(raw.get("lora_alpha", _PEFT_DEFAULT))))
    return alpha, lora_scale(alpha, r_cfg, rslora=bool(raw.get("use_rslora", False)))


def _group(path: Path, tensors: dict[str, Tensor]) -> dict[str, dict[str, dict[str, Tensor]]]:
    """component → module → factor (``A``, ``B``, ``bias``); anything else is refused by name."""
    old = sorted(k for k in tensors if _OLD.search(k))
    if old:
        raise NotAnAdapterError(path, f"it holds diffusers' older non-peft LoRA keys ({old[0]}), which loratools "
                                      "does not read; load it in diffusers and save it again with save_lora_weights")
    out: dict[str, dict[str, dict[str, Tensor]]] = {}
    for key, t in tensors.items():
        match = _KEY.match(key)
        if match is None or match["c"] not in COMPONENTS or (match["t"] == "bias" and match["f"] == "lora_A"):
            raise NotAnAdapterError(path, f"{key} is not a diffusers LoRA key (<component>.<module>.lora_A/B.weight)")
        factor = "bias" if match["t"] == "bias" else match["f"][-1]
        out.setdefault(match["c"], {}).setdefault(match["m"], {})[factor] = t
    return out


def _one_spelling(path: Path, grouped: dict[str, dict[str, dict[str, Tensor]]]) -> None:
    """Refuse a CLIP module held under two keys, with and without ``text_model.``: diffusers 0.42.1 strips the
    level where the model lacks it (``lora_base.py`` ``_load_lora_into_text_encoder``), so both reach one module and
    one LoRA silently replaces the other."""
    for comp, parts in grouped.items():
        seen: dict[str, str] = {}
        for name in parts:
            same = pipeline_clip_name(f"{comp}.{name}")
            if same in seen:
                raise CorruptFileError(path, f"{comp}.{seen[same]} and {comp}.{name} are one module of {comp} (CLIP's, "
                                             "with and without text_model.); keep one")
            seen[same] = name


def _module(path: Path, comp: str, name: str, fs: dict[str, Tensor], raw: dict[str, Any] | None) -> Module:
    for f in ("A", "B"):
        if f not in fs:
            raise MissingModuleError(f"{comp}.{name}.lora_{f}.weight", str(path), "the adapter file is incomplete")
    A, B = fs["A"], fs["B"]
    if A.ndim not in (2, 4) or B.ndim != A.ndim or B.shape[1] != A.shape[0]:
        raise ShapeMismatchError(f"{comp}.{name}", "lora_A (r, in[, kh, kw]) and lora_B (out, r[, 1, 1])",
                                 f"{tuple(A.shape)} and {tuple(B.shape)}")
    if "bias" in fs and raw is not None and not raw.get("lora_bias", False):
        raise CorruptFileError(path, f"{comp}.{name} holds lora_B.bias but lora_bias is false in {METADATA_KEY}")
    kind: Kind = "conv" if A.ndim == 4 else "linear"
    alpha, scale = _scale(comp, name, int(A.shape[0]), raw)
    return Module(A=A, B=B, alpha=alpha, scale=scale, kind=kind, bias=fs.get("bias"))


def _read(path: Path) -> tuple[dict[str, dict[str, Module]], dict[str, dict[str, Any]]]:
    tensors, meta = load_safetensors(path)
    configs = _metadata(path, meta)
    grouped = _group(path, tensors)
    if not grouped:
        raise NotAnAdapterError(path, "it holds no lora_A/lora_B tensors")
    _one_spelling(path, grouped)
    # with metadata, diffusers filters it by prefix to {} for a component it leaves out and builds LoraConfig(**{})
    # (`_create_lora_config`), which has no target_modules: peft refuses to load that component, and so does this
    left_out = [comp for comp in grouped if METADATA_KEY in meta and comp not in configs]
    if left_out:
        raise CorruptFileError(path, f"{METADATA_KEY} holds no LoraConfig for {', '.join(left_out)}, which diffusers "
                                     "then cannot load (peft's default config targets no module)")
    raws = {comp: configs.get(comp) for comp in grouped}
    mods = {comp: {name: _module(path, comp, name, fs, raws[comp]) for name, fs in parts.items()}
            for comp, parts in grouped.items()}
    return mods, configs


def components(path: str | Path) -> list[str]:
    """The components a diffusers LoRA file holds, in file order (``["unet", "text_encoder"]``)."""
    return list(_read(Path(path))[0])


def other_components(path: str | Path, component: str) -> list[str]:
    """The components besides ``component`` whose LoRAs the file at ``path`` holds (a diffusers pipeline file, a
    kohya Stable Diffusion one or a ComfyUI one; ``[]`` for any other file, or one without ``component``): what a
    merge into
    ``component`` leaves out."""
    from . import comfyui, kohya

    p = Path(path)
    held = components(p) if p.is_file() and detect(p) else kohya.held_components(p) or comfyui.held_components(p)
    return [c for c in held if c != component] if component in held else []


def read_diffusers(path: Path, base: BaseModel | None = None) -> Adapter:
    """Every module of every component, named ``<component>.<module>``.

    A base model is one component's model: a ``base`` whose folder is named after a component the file holds
    (``PIPELINE/unet``, :func:`load_component`) gets that component's adapter; any other is refused: the fix is
    :func:`read_component`
    (``loratools convert FILE --to peft --component NAME``) and that component's adapter with the base.
    """
    mods, configs = _read(path)
    if base is not None and base.path.name in mods:  # a pipeline's model folder is named after its component
        return as_base_names(read_component(path, base.path.name), base)
    if base is not None:
        raise InvalidOptionError(
            f"{path} is a diffusers pipeline LoRA holding {', '.join(mods)}: a base model is one of them, so take "
            f"that component out first (loratools convert {path} --to peft --component {next(iter(mods))} -o DIR) "
            f"and use DIR with `base`")
    rslora = {bool(c.get("use_rslora", False)) for c in configs.values()}
    config = AdapterConfig(method="lora", use_rslora=rslora == {True} and len(configs) == len(mods))
    adapter = Adapter({f"{comp}.{clip_name(name)}": m for comp, ms in mods.items() for name, m in ms.items()}, config)
    adapter.check_finite()
    return adapter




def read_component(path: Path, component: str) -> Adapter:
    """One component's adapter, its module names as that model spells them (``down_blocks.0…to_q``)."""
    mods, configs = _read(path)
    if component not in mods:
        raise InvalidOptionError(f"`component` {component!r} is not in {path}; it holds {', '.join(mods)}")
    raw = configs.get(component, {})
    target = raw.get("target_modules")
    config = AdapterConfig(method="lora", use_rslora=bool(raw.get("use_rslora", False)),
                           target_modules=tuple(target) if isinstance(target, list) else target)
    adapter = Adapter(dict(mods[component]), config)
    adapter.check_finite()
    return adapter


# ------------------------------------------------------------------------------------------- writing

def _targets(comp: str, module: str) -> str:
    # peft matches targets and pattern keys as name suffixes: without text_model. they reach CLIP with and without it
    return module.removeprefix("text_model.") if comp.startswith("text_encoder") else module


def diffusers_unsupported(adapter: Adapter, base: BaseModel | None = None) -> dict[str, str]:
    """Modules (and saved tensors) a diffusers pipeline file cannot hold → why."""
    parts, out = split_components(adapter, base)
    if is_pipeline(base):
        assert base is not None
        out.update(pipeline_mismatches(adapter, base.path))
    out.update({k: "a diffusers LoRA file holds no full tensors (modules_to_save, trained biases)"
                for k in adapter.saved})
    for name, m in adapter.items():
        # a CLIP embedding's update (a ComfyUI .diff) is a matrix here, but peft's embedding LoRA has other keys
        if m.kind not in ("linear", "conv") or m.fan_in_fan_out or name.endswith(("token_embedding",
                                                                                  "position_embedding")):
            out[name] = "diffusers' LoRA files hold LoRA on linear and convolution layers only"
        elif m.magnitude is not None:
            out[name] = "loratools writes no DoRA into a diffusers file; flatten it first (`as_lora` with `base`)"
    for comp, names in parts.items():
        by_target: dict[str, str] = {}
        for module, name in names.items():
            key = _targets(comp, module)
            if key in by_target:
                out[name] = f"peft would take it and {by_target[key]} for one module ({key})"
            by_target.setdefault(key, name)
        sub = Adapter({t: adapter.modules[n] for t, n in by_target.items() if n not in out})
        out.update({by_target[t]: why for t, why in peft_unsupported(sub).items()})
    return out


def write_diffusers(adapter: Adapter, path: Path, base: BaseModel | None = None) -> None:
    """Write ``adapter`` as ``save_lora_weights`` writes a pipeline's LoRA (see the module docstring)."""
    adapter = writable(adapter, base, "diffusers", diffusers_unsupported)
    parts, _ = split_components(adapter, base)
    tensors: dict[str, Tensor] = {}
    metadata: dict[str, Any] = {}
    for comp, names in parts.items():
        kept = {mod: n for mod, n in names.items() if adapter.modules[n].rank > 0}
        if not kept:
            continue
        sub = Adapter({_targets(comp, mod): adapter.modules[n] for mod, n in kept.items()},
                      AdapterConfig(method="lora", use_rslora=adapter.config.use_rslora))
        metadata.update({f"{comp}.{k}": v for k, v in peft_config(sub).items()})
        lora_bias = any(m.bias is not None for m in sub.modules.values())
        for mod, n in kept.items():
            m = adapter.modules[n]
            tensors[f"{comp}.{mod}.lora_A.weight"], tensors[f"{comp}.{mod}.lora_B.weight"] = m.A, m.B
            if lora_bias:  # peft's lora_bias gives every module of the component a bias: zero where it has none
                tensors[f"{comp}.{mod}.lora_B.bias"] = m.bias if m.bias is not None else m.B.new_zeros(m.B.shape[0])
    save_safetensors(tensors, path, {"format": "pt", METADATA_KEY: json.dumps(metadata, indent=2, sort_keys=True)})


register(Format("diffusers", "diffusers pipeline LoRA (pytorch_lora_weights.safetensors: unet./text_encoder./"
                "transformer. + peft keys, per-component LoraConfig metadata)", ".safetensors",
                detect, read_diffusers, write_diffusers, plain_lora_only=True, cannot_hold=diffusers_unsupported,
                component_reader=read_component, holds_models=True))
