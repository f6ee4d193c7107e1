"""ComfyUI's own LoRA files (the "Extract and Save Lora" node, ``LoraSave``), read as ComfyUI applies them.

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

With a base, ``diffusion_model.X`` is matched to the base's ``model.diffusion_model.X`` (a ComfyUI/SGM
single-file checkpoint) or ``X``; names the base lacks are left for the merge to refuse.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from ..adapter import Adapter, Kind, Module
from ..config import AdapterConfig
from ..errors import CorruptFileError, InvalidFieldError, InvalidOptionError, NotAnAdapterError
from ..io import load_safetensors
from .base import BaseModel, Format, peek_safetensors, register

__all__ = ["read_comfyui", "HEADS"]

#: the top-level prefixes of a LoraSave file (``calc_lora_model``'s ``prefix_lora``)
HEADS = ("diffusion_model.", "text_encoders.")
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


def read_comfyui(path: Path, base: BaseModel | None = None) -> Adapter:
    """A LoraSave file: every module under its own name, or the base's (see the module docstring)."""
    tensors, _ = load_safetensors(path)
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        name, part = _split(key)
        if not part or not key.startswith(HEADS):
            raise NotAnAdapterError(path, f"{key} is not a ComfyUI LoRA key (diffusion_model./text_encoders. + "
                                          f"{', '.join(_PARTS)})")
        groups.setdefault(name, {})[part] = value
    shapes = dict(base.shapes or {}) if base is not None else {}
    modules: dict[str, Module] = {}
    for name in sorted(groups):
        # a zero difference changes nothing where ComfyUI adds it: LoraSave writes one for every untouched norm
        # weight and bias of a model whose fine-tune left them alone (full_diff, bias_diff)
        parts = {p: t for p, t in groups[name].items() if p not in ("diff", "diff_b") or bool(t.any())}
        if set(parts) <= {"alpha"}:
            continue
        modules[_base_name(name, shapes)] = _module(path, name, parts)
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


def _write(adapter: Adapter, path: Path, base: BaseModel | None) -> None:
    raise InvalidOptionError("loratools reads ComfyUI LoRA files but does not write them; write kohya (`to` kohya), "
                             "which ComfyUI loads")


register(Format("comfyui", "ComfyUI LoraSave file (diffusion_model./text_encoders. keys, .diff/.diff_b), read only",
                ".safetensors", detect, read_comfyui, _write))
