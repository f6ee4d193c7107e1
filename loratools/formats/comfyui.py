"""ComfyUI's own LoRA files (the "Extract and Save Lora" node, ``LoraSave``), read as ComfyUI applies them, and
written.

Written by ComfyUI ``comfy_extras/nodes_lora_extract.py`` (``calc_lora_model``, at commit 962638c9): keys are
the model's own state-dict names under ``diffusion_model.`` (the diffusion model: SGM names for SD/SDXL,
``double_blocks…`` for Flux) or ``text_encoders.`` (ComfyUI's CLIP names, ``clip_l.transformer.…``):

=========================  =============================================================================
``<m>.lora_up.weight``     B (out, r[, 1, 1]) of a truncated SVD of the weight difference (``standard``)
``<m>.lora_down.weight``   A (r, in[, kh, kw]); no ``alpha`` is written
``<m>.diff``               the whole weight difference (``full_diff``; a 1-D weight such as a norm's in
                           ``standard`` with ``bias_diff``)
``<m>.diff_b``             the bias difference (``bias_diff``)
=========================  =============================================================================

ComfyUI applies them (``comfy/lora.py`` ``load_lora`` at commit 41444b5, ``comfy/weight_adapter/lora.py``
``LoRAAdapter.calculate_weight`` at commit 0323d87): W += s·B·A with s = alpha / r when an ``alpha`` is
there, else 1 (not kohya's alpha-less rule, which gives the same 1); W += diff for ``.diff``, of the weight's
own shape; bias += diff_b. Here:

- LoRA modules as they are (scale as above);
- a ``.diff`` of a matrix or convolution as the exact LoRA I·D (or D·I, the smaller rank): no approximation;
- a ``.diff_b`` as the module's bias update (peft's ``lora_bias``, scale 1 after dividing by the module's);
- a ``.diff``/``.diff_b`` of zeros as nothing (ComfyUI adds zero);
- refused by name: a 1-D ``.diff`` (a norm's weight: an adapter holds no update of it), a ``.diff_b`` on a
  module with no weight update, ``lora_mid``/``dora_scale`` and the other LyCORIS kinds ComfyUI also reads,
  a module holding both a LoRA and a ``.diff`` (ComfyUI keeps the ``.diff`` and drops the LoRA).

Names. ComfyUI loads ``diffusion_model.<m>`` and ``text_encoders.<m>`` for every weight ``<m>`` of its models
(``comfy/lora.py`` ``model_lora_keys_unet``/``model_lora_keys_clip`` at 41444b5, "generic lora format"): SGM names
for an SD/SDXL U-Net, ``clip_l``/``clip_h``/``clip_g.transformer.`` + transformers' CLIP names for the text
encoders (``comfy/sd1_clip.py``, ``comfy/clip_model.py``). Read without a base, a file's modules get the names of
a diffusers pipeline file (:func:`pipeline_names`): ``unet.<diffusers name>`` (the structural SGM map,
:func:`~.kohya_sd.unet_name`), ``text_encoder.text_model.…`` (clip_l, clip_h), ``text_encoder_2.…`` (clip_g), so it
converts and merges as a kohya or diffusers file does; a U-Net that is not SD's (Flux's ``double_blocks…``) and T5
keep the file's names. With a diffusers model as base (``PIPELINE/unet``, ``merge --component``) its modules get
that model's names; with any other base, ``diffusion_model.X`` is matched to the base's
``model.diffusion_model.X`` (a ComfyUI/SGM single-file checkpoint) or ``X``; names the base lacks are left for
the merge to refuse.

Written (:func:`write_comfyui`): the inverse names, ``lora_up``/``lora_down``/``alpha`` (= scale · r) and
``diff_b`` for a LoRA bias; only U-Net and CLIP modules of SD/SDXL pipelines and ComfyUI's own names, the rest
(Flux or SD3 transformers, T5, SD 2.x's clip_h) refused by name.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..adapter import Adapter, Kind, Module
from ..config import AdapterConfig, alpha_for_scale
from ..errors import CorruptFileError, InvalidFieldError, InvalidOptionError, NotAnAdapterError
from ..io import load_safetensors, read_config, save_safetensors
from .base import BaseModel, Format, peek_safetensors, register
from .kohya_sd import clip_name, sgm_name, unet_name, up_attention
from .pipeline import is_pipeline, pipeline_mismatches, writable

__all__ = ["read_comfyui", "read_component", "held_components", "pipeline_names", "write_comfyui", "comfyui_names",
           "comfyui_unsupported", "HEADS", "CLIP_COMPONENTS"]

#: the top-level prefixes of a LoraSave file (``calc_lora_model``'s ``prefix_lora``)
HEADS = ("diffusion_model.", "text_encoders.")
#: ComfyUI's CLIP text encoders (``text_encoders.<name>.transformer.`` + transformers' CLIP names, ``comfy/sd1_clip.py``
#: ``clip_<name>``, ``comfy/clip_model.py``) → the diffusers component of SD 1.x (clip_l), 2.x (clip_h), SDXL (clip_l,
#: clip_g); T5 (t5xxl) is left as it is: Flux's text_encoder_2 but SD3's text_encoder_3
CLIP_COMPONENTS = {"clip_l": "text_encoder", "clip_h": "text_encoder", "clip_g": "text_encoder_2"}
_PARTS = ("lora_up.weight", "lora_down.weight", "alpha", "diff", "diff_b")
_REFUSED = {"lora_mid.weight": "a Tucker/LoCon middle factor (lora_mid)", "dora_scale": "DoRA (dora_scale)"}


def _split(key: str) -> tuple[str, str]:
    for part in (*_PARTS, *_REFUSED):
        if key.endswith("." + part):
            return key[: -len(part) - 1], part
    return key, ""


def detect(path: Path) -> bool:
    """Every key lies under ``diffusion_model.``/``text_encoders.`` and ends in a LoraSave part (or one refused
    by name), with at least one LoRA factor or ``.diff``."""
    peek = peek_safetensors(path)
    if peek is None:
        return False
    keys = [k for k in peek[0] if k != "__metadata__"]
    parts = [_split(k)[1] for k in keys]
    return bool(keys) and all(k.startswith(HEADS) and p for k, p in zip(keys, parts)) \
        and any(p in ("lora_down.weight", "diff") for p in parts)


def _identity_lora(d: Tensor) -> tuple[Tensor, Tensor, Kind]:
    """(A, B, kind) with B·A = D exactly: one factor an identity, of the smaller rank (out, or in·kh·kw)."""
    out, rest = int(d.shape[0]), int(math.prod(d.shape[1:]))
    flat = d.reshape(out, rest)
    if out <= rest:
        A, B = flat, torch.eye(out, dtype=d.dtype)
    else:
        A, B = torch.eye(rest, dtype=d.dtype), flat
    if d.ndim == 2:
        return A, B, "linear"
    return A.reshape(A.shape[0], *d.shape[1:]), B.reshape(*B.shape, *(1,) * (d.ndim - 2)), "conv"


def _module(path: Path, name: str, t: dict[str, Tensor]) -> Module:
    bad = next((why for part, why in _REFUSED.items() if part in t), None)
    if bad is not None:
        raise NotAnAdapterError(path, f"its module {name} is {bad}, which loratools does not read from a ComfyUI "
                                      "file; merge it in ComfyUI and extract a LoRA from the result")
    if "diff" in t and "lora_down.weight" in t:
        raise CorruptFileError(path, f"{name} holds both a LoRA and a .diff; ComfyUI applies the .diff alone")
    if "diff" in t:
        d = t["diff"]
        if d.ndim < 2:
            raise NotAnAdapterError(path, f"its {name}.diff is the difference of a {d.ndim}-D weight (a norm layer's), "
                                          "which an adapter cannot hold; save the LoRA again with bias_diff off, or "
                                          "merge it in ComfyUI")
        A, B, kind = _identity_lora(d)
        return _with_bias(path, name, Module(A=A, B=B, alpha=float(A.shape[0]), scale=1.0, kind=kind), t)
    if "lora_down.weight" not in t or "lora_up.weight" not in t:
        missing = "lora_up.weight" if "lora_down.weight" in t else "lora_down.weight"
        if "diff_b" in t and "lora_down.weight" not in t and "lora_up.weight" not in t:
            raise NotAnAdapterError(path, f"its {name}.diff_b changes a bias whose weight has no update here; an "
                                          "adapter cannot hold it alone: merge it in ComfyUI")
        raise CorruptFileError(path, f"{name} lacks {name}.{missing}")
    A, B = t["lora_down.weight"], t["lora_up.weight"]
    r = int(A.shape[0])
    kind = "conv" if A.ndim > 2 else "linear"
    if kind == "conv" and B.ndim == 2:
        B = B.reshape(*B.shape, *(1,) * (A.ndim - 2))
    alpha = _alpha(path, name, t.get("alpha"))
    scale = 1.0 if alpha is None else alpha / r
    return _with_bias(path, name, Module(A=A, B=B, alpha=float(r) if alpha is None else alpha, scale=scale,
                                         kind=kind), t)


def _alpha(path: Path, name: str, t: Tensor | None) -> float | None:
    if t is None:
        return None
    if t.numel() != 1:
        raise CorruptFileError(path, f"{name}.alpha holds {t.numel()} values; an alpha is one number")
    value = float(t.reshape(()).to(torch.float64).item())
    if not math.isfinite(value):
        raise InvalidFieldError(path, f"{name}.alpha", value, "a finite alpha")
    return value


def _with_bias(path: Path, name: str, m: Module, t: dict[str, Tensor]) -> Module:
    from dataclasses import replace

    b = t.get("diff_b")
    if b is None:
        return m
    if m.scale == 0:
        raise NotAnAdapterError(path, f"{name}.diff_b sits on a module of scale 0 (alpha 0), which cannot carry it")
    # Module.bias adds scale·bias (peft's lora_bias): divide so the added bias is diff_b itself
    return replace(m, bias=(b.to(torch.float64) / m.scale).to(b.dtype) if m.scale != 1.0 else b)


def _groups(path: Path) -> dict[str, dict[str, Tensor]]:
    tensors, _ = load_safetensors(path)
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        name, part = _split(key)
        if not part or not key.startswith(HEADS):
            raise NotAnAdapterError(path, f"{key} is not a ComfyUI LoRA key (diffusion_model./text_encoders. + "
                                          f"{', '.join(_PARTS)})")
        groups.setdefault(name, {})[part] = value
    return groups


def pipeline_names(names: Iterable[str], *, layers_per_block: int = 2) -> dict[str, str]:
    """File module name → the name a diffusers pipeline file gives it (``<component>.<module>``).

    ``diffusion_model.<SGM name>`` → ``unet.<diffusers name>`` (:func:`~.kohya_sd.unet_name`) when every
    ``diffusion_model.`` name is an SD/SDXL U-Net's, else all are kept as they are (Flux …);
    ``text_encoders.<clip>.transformer.<m>`` → ``<component>.<m>`` (:data:`CLIP_COMPONENTS`), with CLIP's
    ``text_model.`` level whether ``<m>`` has it or not (:func:`~.kohya_sd.clip_name`: a file holding both spellings
    of one module is refused when read); T5 and others kept.

    >>> names = pipeline_names(["diffusion_model.input_blocks.4.1.proj_in",
    ...                         "text_encoders.clip_g.transformer.text_model.encoder.layers.0.mlp.fc1"])
    >>> list(names.values())
    ['unet.down_blocks.1.attentions.0.proj_in', 'text_encoder_2.text_model.encoder.layers.0.mlp.fc1']
    """
    names = list(names)
    unet = [n for n in names if n.startswith(HEADS[0])]
    try:
        out = {n: "unet." + unet_name(n[len(HEADS[0]):], layers_per_block=layers_per_block) for n in unet}
    except ValueError:  # not a Stable Diffusion U-Net: its names are ComfyUI's own
        out = {n: n for n in unet}
    for n in names:
        if n in out:
            continue
        clip, _, rest = n[len(HEADS[1]):].partition(".")
        comp = CLIP_COMPONENTS.get(clip)
        # one name per CLIP module, with text_model. (as the diffusers reader names it): both spellings meet there
        out[n] = f"{comp}.{clip_name(rest[len('transformer.'):])}" if comp and rest.startswith("transformer.") else n
    return out


def _base_component(base: BaseModel | None) -> str | None:
    """The diffusers model ``base`` is: the component its folder is named after, or ``unet`` for a diffusers
    U-Net's weights (``conv_in`` and ``down_blocks.…``) in any folder; else None."""
    if base is None:
        return None
    if base.path.name in ("unet", *CLIP_COMPONENTS.values()):
        return base.path.name
    shapes = base.shapes or {}
    return "unet" if "conv_in" in shapes and any(n.startswith("down_blocks.") for n in shapes) else None


def read_comfyui(path: Path, base: BaseModel | None = None) -> Adapter:
    """A LoraSave file (see the module docstring): without ``base``, every module under its pipeline name
    (:func:`pipeline_names`); with a diffusers model as ``base`` (``PIPELINE/unet`` …), that model's modules under
    its own names; with any other ``base`` (an SGM checkpoint), the file's names matched to it."""
    groups = _groups(path)
    lpb = int((base.hparams or {}).get("layers_per_block", 2)) if base is not None else 2
    comp = _base_component(base)
    if base is not None and comp is None:
        shapes = dict(base.shapes or {})
        return _adapter(path, groups, {n: _base_name(n, shapes) for n in groups})
    names = pipeline_names(groups, layers_per_block=lpb)
    if comp is None:
        return _adapter(path, groups, names)
    assert base is not None
    mine = {n: p[len(comp) + 1:] for n, p in names.items() if p.startswith(comp + ".")}
    if not mine:
        held = ", ".join(dict.fromkeys(p.split(".", 1)[0] for p in names.values()))
        raise InvalidOptionError(f"{path} holds no LoRA of {comp} (`base` {base.path}); it holds {held}")
    known = base.shapes or {}
    own = {n: p.removeprefix("text_model.") if known and p not in known and p.removeprefix("text_model.") in known
           else p for n, p in mine.items()}
    return _adapter(path, {n: groups[n] for n in own}, own)


def read_component(path: Path, component: str) -> Adapter:
    """One model's modules of a LoraSave file, named as that model spells them (``component`` is a head of the
    pipeline names: ``unet``, ``text_encoder``, ``text_encoder_2``, or ``diffusion_model`` of a Flux file)."""
    groups = _groups(path)
    names = pipeline_names(groups)
    mine = {n: p[len(component) + 1:] for n, p in names.items() if p.startswith(component + ".")}
    if not mine:
        held = ", ".join(held_components(path))
        raise InvalidOptionError(f"`component` {component!r} is not in {path}; it holds {held}")
    return _adapter(path, {n: groups[n] for n in mine}, mine)


def held_components(path: Path) -> list[str]:
    """The models a LoraSave file holds LoRAs of (``unet``, ``text_encoder`` …); ``[]`` for any other file."""
    if not detect(path):
        return []
    return list(dict.fromkeys(p.split(".", 1)[0] for p in pipeline_names(_groups(path)).values()))


def _adapter(path: Path, groups: dict[str, dict[str, Tensor]], names: dict[str, str]) -> Adapter:
    modules: dict[str, Module] = {}
    source: dict[str, str] = {}
    for name in sorted(groups):
        # a zero difference changes nothing where ComfyUI adds it: LoraSave writes one for every untouched norm
        # weight and bias of a model whose fine-tune left them alone (full_diff, bias_diff)
        parts = {p: t for p, t in groups[name].items() if p not in ("diff", "diff_b") or bool(t.any())}
        if set(parts) <= {"alpha"}:
            continue
        if names[name] in source:
            raise CorruptFileError(path, f"{source[names[name]]} and {name} are both the module {names[name]}")
        source[names[name]] = name
        modules[names[name]] = _module(path, name, parts)
    if not modules:
        raise NotAnAdapterError(path, "it holds no LoRA factors or weight differences")
    adapter = Adapter(modules, AdapterConfig(method="lora"))
    adapter.check_finite()
    return adapter


def _base_name(name: str, shapes: dict[str, tuple[int, ...]]) -> str:
    """The base's name of ``name``: itself, ``model.`` + it (a ComfyUI/SGM checkpoint), or it without its head."""
    if not shapes or name in shapes:
        return name
    for candidate in ("model." + name, name.split(".", 1)[1]):
        if candidate in shapes:
            return candidate
    return name


# ------------------------------------------------------------------------------------------- writing

_CLIP_OF = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}


def _file_name(name: str, comp: str, module: str, m: Module, attention: Mapping[int, bool], lpb: int) -> str:
    """The LoraSave module name of ``module`` of ``comp`` (``ValueError`` saying why there is none)."""
    if comp in ("diffusion_model", "text_encoders"):  # ComfyUI's own names, kept from a LoraSave file
        return name
    if comp == "model" and module.startswith(HEADS[0]):  # an SGM single-file checkpoint's U-Net, as ComfyUI loads it
        return module
    if comp == "unet":
        return HEADS[0] + sgm_name(module, layers_per_block=lpb, attention=attention)
    if comp in _CLIP_OF:
        if comp == "text_encoder" and 1024 in m.weight_shape:
            raise ValueError("a text encoder 1024 wide is SD 2.x's OpenCLIP ViT-H, which ComfyUI names clip_h; "
                             "loratools writes text_encoder as clip_l (SD 1.x, SDXL) only")
        return f"{HEADS[1]}{_CLIP_OF[comp]}.transformer.{clip_name(module)}"
    raise ValueError(f"loratools writes ComfyUI names for SD/SDXL pipelines only (unet, text_encoder, "
                     f"text_encoder_2) and ComfyUI's own names, not for {comp} modules")


def comfyui_names(adapter: Adapter, base: BaseModel | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """(adapter name → LoraSave module name, adapter name → why it has none). Names are pipeline names
    (``unet.…``), or one model's own when ``base`` is that model (:func:`_base_component`)."""
    comp_of_base = _base_component(base)
    heads = ("unet", *_CLIP_OF, "diffusion_model", "text_encoders", "model")
    whole = comp_of_base is None or any(n.split(".", 1)[0] in heads for n in adapter.modules)
    full = {n: n if whole else f"{comp_of_base}.{n}" for n in adapter.modules}
    hp = _unet_config(base)
    lpb = int(hp.get("layers_per_block", 2))
    attention = up_attention(hp if "up_block_types" in hp else None,
                             [f[5:] for f in full.values() if f.startswith("unet.")])
    out: dict[str, str] = {}
    bad: dict[str, str] = {}
    taken: dict[str, str] = {}
    for name, m in adapter.items():
        comp, _, module = full[name].partition(".")
        try:
            out[name] = _file_name(name, comp, module, m, attention, lpb)
        except ValueError as e:
            bad[name] = str(e)
            continue
        if out[name] in taken:  # CLIP's name with and without text_model.: one key, one LoRA would be lost
            bad[name] = f"its ComfyUI key {out[name]} is also {taken[out[name]]}'s"
        taken.setdefault(out[name], name)
    return out, bad


def _unet_config(base: BaseModel | None) -> Mapping[str, Any]:
    """The U-Net's ``config.json`` (its block layout): ``base``'s own, or its ``unet/``'s in a pipeline folder."""
    if base is not None and is_pipeline(base):
        return read_config(base.path / "unet") or {}
    return (base.hparams or {}) if base is not None else {}


def comfyui_unsupported(adapter: Adapter, base: BaseModel | None = None) -> dict[str, str]:
    """Modules (and saved tensors) a LoraSave file cannot hold → why; with a diffusers pipeline folder as
    ``base``, also those that match no weight of their own model there."""
    _, out = comfyui_names(adapter, base)
    if base is not None and is_pipeline(base):
        out.update({n: why for n, why in pipeline_mismatches(adapter, base.path).items() if n not in out})
    out.update({k: "a ComfyUI LoRA file holds no full tensors here (modules_to_save, trained tokens)"
                for k in adapter.saved})
    for name, m in adapter.items():
        if m.kind not in ("linear", "conv") or m.fan_in_fan_out:
            out[name] = "loratools writes ComfyUI LoRA on linear and convolution layers only"
        elif m.magnitude is not None:
            out[name] = "loratools writes no DoRA into a ComfyUI file; flatten it first (`as_lora` with `base`)"
    return out


def write_comfyui(adapter: Adapter, path: Path, base: BaseModel | None = None) -> None:
    """Write ``adapter`` as a LoraSave file ComfyUI loads (``comfy/lora.py`` ``model_lora_keys_unet``/``_clip`` map
    ``diffusion_model.<m>`` and ``text_encoders.<m>`` for every weight of its models): per module
    ``lora_up.weight`` = B, ``lora_down.weight`` = A, ``alpha`` = scale · r (ComfyUI multiplies by alpha / r), and a
    LoRA bias as ``diff_b`` = scale · bias (added as it is)."""
    adapter = writable(adapter, base, "comfyui", comfyui_unsupported)
    names, _ = comfyui_names(adapter, base)
    tensors: dict[str, Tensor] = {}
    for name, m in adapter.items():
        if m.rank == 0:
            continue
        key = names[name]
        tensors[f"{key}.lora_up.weight"], tensors[f"{key}.lora_down.weight"] = m.B, m.A
        tensors[f"{key}.alpha"] = torch.tensor(alpha_for_scale(m.scale, m.rank, keep=m.alpha), dtype=torch.float32)
        if m.bias is not None:
            tensors[f"{key}.diff_b"] = (m.bias.to(torch.float64) * m.scale).to(m.bias.dtype)
    save_safetensors(tensors, path)


register(Format("comfyui", "ComfyUI LoraSave file (diffusion_model./text_encoders. keys, .diff/.diff_b); written "
                "with SGM U-Net and CLIP names from SD/SDXL pipeline names", ".safetensors", detect, read_comfyui,
                write_comfyui, plain_lora_only=True, cannot_hold=comfyui_unsupported, component_reader=read_component,
                holds_models=True))
