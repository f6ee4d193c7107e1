"""kohya's sd-scripts single-file LoRA format, used across image-model tools.

One ``.safetensors`` with, per module ``<key>`` = ``<prefix>_<module path, '.'→'_'>``:

==========================  =====================================================
``<key>.lora_down.weight``  A: (r, in) linear, (r, in, kh, kw) conv
``<key>.lora_up.weight``    B: (out, r) linear, (out, r, 1, 1) conv
``<key>.alpha``             a 0-d (sometimes 1-element) tensor; missing means α = r
==========================  =====================================================

kohya scales each module by ``alpha / r``, so each module's own alpha is written
as ``scale · r`` (rsLoRA, ``alpha_pattern`` and AdaLoRA keep their exact ΔW).
Prefixes: ``lora_unet_`` for U-Net modules, ``lora_te_`` (``lora_te1_``/``lora_te2_``
for SDXL's two encoders) for text encoders. An LLM is a text model, so its
modules get ``lora_te_`` + the transformers module path, the convention PEFT's
own kohya export example and ComfyUI's text-encoder key maps (``lora_te3_`` +
transformers path for T5) use; ``lora_unet_`` is only for diffusion U-Nets.

Flattening '.'→'_' is lossy (``layers_0`` vs ``layers.0``), so names come back
in this order of preference: the ``loratools_module_names`` metadata this writer
adds (exact); else a match against the base model's weight names (``--base``);
else the flattened key is kept as the module name (``lora_te_model_layers_0_…``)
and written back unchanged.

LyCORIS LoHa and LoKr modules in the same layout (``<key>.hada_w1_a``…, ``<key>.lokr_w1``…) are read
as the LoRA that holds them exactly, and LyCORIS's other kinds refused by name (:mod:`.kohya_lycoris`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from ..adapter import Adapter, Kind, Module, as_lora
from ..config import ALORA_WHY, AdapterConfig, alpha_for_scale, fixed_delta_refusal, lora_scale, stores_in_out
from ..errors import CorruptFileError, InvalidFieldError, MissingModuleError, NotAnAdapterError, UnsupportedModuleError
from ..io import load_safetensors, save_safetensors
from ..validate import load_json
from .base import BaseModel, Format, peek_safetensors, register
from .kohya_lycoris import LYCORIS_KEYS, REFUSED_KEYS, lycoris_factors, lycoris_refusal

__all__ = ["read_kohya", "write_kohya", "kohya_key", "is_flattened", "kohya_unsupported", "NAMES_KEY", "UNET_PREFIX", "TE_PREFIX"]

UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"
NAMES_KEY = "loratools_module_names"
FIFO_KEY = "loratools_fan_in_fan_out"
_DOWN, _UP, _ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
#: a name that is already a kohya key base (foreign file read without a base model)
_FLAT = re.compile(r"^lora_(unet|te\d*)_[^.]*$")
_LYCORIS_NAMES = frozenset(LYCORIS_KEYS) | REFUSED_KEYS
_PREFIX = re.compile(r"^lora_(unet|te\d*)_")
#: first path components of diffusers / original-SD U-Net modules
_UNET_HEADS = ("down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "time_embedding", "add_embedding",
               "input_blocks", "middle_block", "output_blocks", "conv_norm_out", "transformer_blocks")
#: component prefixes of a diffusers pipeline adapter, and the kohya prefix each gets
_COMPONENTS = (("unet.", UNET_PREFIX), ("text_encoder_2.", "lora_te2_"), ("text_encoder.", TE_PREFIX))


def is_flattened(name: str) -> bool:
    """True for a module name that is still a kohya key base (a foreign file read without a base model)."""
    return _FLAT.match(name) is not None


def kohya_key(name: str) -> str:
    """The kohya key base of a module name.

    >>> kohya_key("model.layers.0.self_attn.q_proj")
    'lora_te_model_layers_0_self_attn_q_proj'
    >>> kohya_key("unet.down_blocks.0.resnets.0.conv1")
    'lora_unet_down_blocks_0_resnets_0_conv1'
    """
    if _FLAT.match(name):
        return name
    for head, prefix in _COMPONENTS:
        if name.startswith(head):
            return prefix + name[len(head):].replace(".", "_")
    prefix = UNET_PREFIX if name.split(".", 1)[0] in _UNET_HEADS else TE_PREFIX
    return prefix + name.replace(".", "_")


def kohya_unsupported(adapter: Adapter) -> dict[str, str]:
    """Modules and saved tensors kohya's format cannot hold, with the reason."""
    out = {n: "kohya's format has no embedding LoRA" for n, m in adapter.items() if m.kind == "embedding"}
    out.update({n: "kohya's format has no LoRA bias (lora_bias)" for n, m in adapter.items() if m.bias is not None})
    if fixed_delta_refusal(adapter.config):
        out.update({n: ALORA_WHY for n in adapter.modules})
    out.update({n: "kohya's format has no LoRA on MoE expert tensors (target_parameters)"
                for n, m in adapter.items() if m.kind == "experts"})
    out.update({k: "kohya's format holds no full tensors (modules_to_save, trained biases, trainable tokens)"
                for k in adapter.saved})
    keys: dict[str, str] = {}
    for n in adapter.modules:
        k = kohya_key(n)
        if k in keys:
            out[n] = f"its kohya key {k} collides with {keys[k]}"
        keys[k] = n
    return out


def detect(path: Path) -> bool:
    peek = peek_safetensors(path)
    if peek is None:
        return False
    keys = peek[0]
    if any(k.endswith(_DOWN) for k in keys) and any(k.endswith(_UP) for k in keys):
        return True
    # a LyCORIS file: read (LoHa, LoKr) or refused by its kind's name rather than "not an adapter"
    return any(_PREFIX.match(k) and k.partition(".")[2] in _LYCORIS_NAMES for k in keys)


def _alpha_value(path: Path, key: str, t: Tensor) -> float:
    if t.numel() != 1:
        raise CorruptFileError(path, f"{key} holds {t.numel()} values; kohya alphas are single numbers")
    value = float(t.reshape(()).to(torch.float64).item())
    if not math.isfinite(value):
        raise InvalidFieldError(path, key, value, "a finite alpha")
    return value


def _base_lookup(names: Iterable[str]) -> dict[str, str | None]:
    """flattened module path → module name; None when two names flatten alike (ambiguous)."""
    table: dict[str, str | None] = {}
    for n in names:
        flat = n.replace(".", "_")
        table[flat] = None if flat in table and table[flat] != n else n
    return table


def read_kohya(path: Path, *, base_names: Iterable[str] | None = None,
               base_shapes: Mapping[str, tuple[int, ...]] | None = None) -> Adapter:
    """Read a kohya LoRA file; ``base_names`` (module paths of the base model) maps flattened names back.

    LyCORIS LoHa and LoKr modules are read as the LoRA that holds them exactly (:mod:`.kohya_lycoris`);
    ``base_shapes`` (module name → weight shape) gives a convolution its kernel when the file does not.
    """
    tensors, meta = load_safetensors(path)
    names = load_json(meta.get(NAMES_KEY, "{}"), where=path)
    if not isinstance(names, dict) or not all(isinstance(v, str) and v for v in names.values()):
        raise InvalidFieldError(path, NAMES_KEY, names, "an object mapping kohya keys to module names")
    fifo_list = load_json(meta.get(FIFO_KEY, "[]"), where=path)
    if not isinstance(fifo_list, list) or not all(isinstance(v, str) for v in fifo_list):
        raise InvalidFieldError(path, FIFO_KEY, fifo_list, "a list of module names")
    fifo = set(fifo_list)
    source: dict[str, str] = {}
    known = base_names if base_names is not None else base_shapes
    lookup = _base_lookup(known) if known is not None else {}
    groups: dict[str, set[str]] = {}
    for k in tensors:
        key, _, rest = k.partition(".")
        groups.setdefault(key, set()).add(rest)
    modules: dict[str, Module] = {}
    for key in sorted(groups):
        why = lycoris_refusal(groups[key])
        if why is not None:
            raise NotAnAdapterError(path, f"its module {key} is {why}")
        stray = sorted(groups[key] - {_DOWN[1:], _UP[1:], _ALPHA[1:], *LYCORIS_KEYS})
        if stray:
            raise NotAnAdapterError(path, f"unexpected tensor {key + '.' + stray[0]!r} (not a LoRA, LoHa or LoKr "
                                          "tensor)")
        if groups[key] & set(LYCORIS_KEYS) and groups[key] & {_DOWN[1:], _UP[1:]}:
            raise CorruptFileError(path, f"{key} holds both LoRA (lora_down/lora_up) and LyCORIS tensors")
        if groups[key] <= {_ALPHA[1:]}:
            continue  # an alpha alone: the orphan check below or "no tensors" names it
        if key in names:
            name = names[key]
        else:
            found = lookup.get(_PREFIX.sub("", key))
            name = found if found is not None else key
        if name in source:  # two keys for one module: one would silently get the other's ΔW
            raise CorruptFileError(path, f"{source[name]!r} and {key!r} both map to the module {name!r}")
        source[name] = key
        module = _module(path, key, tensors, (base_shapes or {}).get(name))
        if module is not None:
            modules[name] = replace(module, fan_in_fan_out=name in fifo)
    for name, key in source.items():  # the tensors' own key names the layer: the metadata may not move it
        if key in names and _PREFIX.sub("", kohya_key(name)) != _PREFIX.sub("", key):
            raise CorruptFileError(path, f"its {NAMES_KEY} metadata maps the tensors {key!r} to the module {name!r}, "
                                         f"whose kohya key is {kohya_key(name)!r}: the metadata and the tensors "
                                         "disagree")
    orphans = [k for k in tensors if k.endswith(_UP) and k[: -len(_UP)] + _DOWN not in tensors]
    if orphans:
        raise MissingModuleError(orphans[0][: -len(_UP)] + _DOWN, str(path), "the adapter file is incomplete")
    if not modules:
        raise NotAnAdapterError(path, "it holds no lora_down/lora_up (or LyCORIS LoHa/LoKr) tensors")
    # ss_* training metadata is not PEFT config: it is not carried into other formats
    config = AdapterConfig(method="lora", base_model=meta.get("ss_sd_model_name") or None)
    adapter = Adapter(modules, config)
    adapter.check_finite()
    return adapter


def _module(path: Path, key: str, tensors: dict[str, Tensor], shape: tuple[int, ...] | None) -> Module | None:
    """The module under ``key``: kohya LoRA, or LyCORIS LoHa/LoKr as its exact LoRA; None when it has no up/down."""
    alpha_t = tensors.get(key + _ALPHA)
    if key + _DOWN not in tensors:
        if key + _UP in tensors:
            return None  # the orphan check names it
        own = {k.partition(".")[2]: t for k, t in tensors.items() if k.partition(".")[0] == key}
        try:
            f = lycoris_factors(own, None if alpha_t is None else _alpha_value(path, key + _ALPHA, alpha_t))
        except ValueError as e:
            raise CorruptFileError(path, f"{key}: {e}") from None
        A, B, kernel = f.A, f.B, f.kernel
        if kernel is None and shape is not None and len(shape) > 2 and math.prod(shape[1:]) == A.shape[1]:
            kernel = tuple(shape[2:])  # LoHa and a factored LoKr side store a conv's kernel flattened
        if kernel is not None:
            A, B = A.reshape(A.shape[0], -1, *kernel), B.reshape(*B.shape, *(1,) * len(kernel))
        r = int(A.shape[0])
        return Module(A=A, B=B, alpha=f.scale * r, scale=f.scale, kind="conv" if kernel is not None else "linear")
    up = tensors.get(key + _UP)
    if up is None:
        raise MissingModuleError(key + _UP, str(path), "the adapter file is incomplete")
    A = tensors[key + _DOWN]
    r = int(A.shape[0])
    alpha = float(r) if alpha_t is None else _alpha_value(path, key + _ALPHA, alpha_t)
    kind: Kind = "conv" if A.ndim in (3, 4, 5) else "linear"
    if kind == "conv" and up.ndim == 2:  # some writers store a 1×1 up conv as a matrix
        up = up.reshape(*up.shape, *(1,) * (A.ndim - 2))
    return Module(A=A, B=up, alpha=alpha, scale=lora_scale(alpha, r) if r else 0.0, kind=kind)


def _summary(values: list[float]) -> str:
    # kohya writes "Dynamic" when modules differ (its resize script does the same)
    if len(set(values)) != 1:
        return "Dynamic"
    v = values[0]
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def write_kohya(adapter: Adapter, path: Path) -> None:
    """Write ``adapter`` as a kohya file (AdaLoRA as plain LoRA, same ΔW); alpha per module = scale · r."""
    adapter = as_lora(adapter)
    bad = kohya_unsupported(adapter)
    if bad:
        raise UnsupportedModuleError("kohya", sorted(bad), "; ".join(dict.fromkeys(bad.values())))
    tensors: dict[str, Tensor] = {}
    names: dict[str, str] = {}
    ranks: list[int] = []
    alphas: list[float] = []
    conv: list[int] = []
    for name, m in adapter.items():
        if m.rank == 0:
            continue
        key = kohya_key(name)
        names[key] = name
        # kohya's rule is always alpha/r: carry rsLoRA/pattern/AdaLoRA scales in alpha itself
        alpha = alpha_for_scale(m.scale, m.rank, keep=m.alpha)
        tensors[key + _DOWN], tensors[key + _UP] = m.A, m.B
        tensors[key + _ALPHA] = torch.tensor(alpha, dtype=torch.float32)
        (conv if m.kind == "conv" else ranks).append(m.rank)
        alphas.append(alpha)
    args: dict[str, str] = {}
    if conv:
        args["conv_dim"] = _summary([float(r) for r in conv])
    meta: dict[str, str] = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": _summary([float(r) for r in ranks or conv]),
        "ss_network_alpha": _summary(alphas),
        "ss_network_args": json.dumps(args),
        NAMES_KEY: json.dumps(names, sort_keys=True),
    }
    fifo = sorted(n for n, m in adapter.items() if m.fan_in_fan_out)
    if fifo:
        meta[FIFO_KEY] = json.dumps(fifo)
    if adapter.config.base_model:
        meta["ss_sd_model_name"] = str(adapter.config.base_model)
    save_safetensors(tensors, path, meta)


def _read(path: Path, base: BaseModel | None) -> Adapter:
    adapter = read_kohya(path, base_names=base.module_names if base is not None else None,
                         base_shapes=base.shapes if base is not None else None)
    peek = peek_safetensors(path)
    written_by_us = peek is not None and NAMES_KEY in peek[1]  # then its metadata says which are fan_in_fan_out
    return _in_out_layout(adapter, base) if base is not None and not written_by_us else adapter


def _in_out_layout(adapter: Adapter, base: BaseModel) -> Adapter:
    """Modules of a GPT-2 style base (``Conv1D``, weight stored (in, out)) marked ``fan_in_fan_out``.

    Other tools write these files without saying so; a module is marked when the base's config says
    Conv1D (transformers' GPT-2 family) and its weight has the (in, out) shape, or the base has no
    weights to look at; ``lm_head`` is an ``nn.Linear`` there and never marked.
    """
    if not stores_in_out(base.hparams):
        return adapter

    def in_out(name: str, m: Module) -> bool:
        if m.kind != "linear" or m.fan_in_fan_out or is_flattened(name) or name.split(".")[-1] == "lm_head":
            return False
        shape = (base.shapes or {}).get(name)
        return not shape or tuple(shape) == (int(m.A.shape[1]), int(m.B.shape[0]))

    marked = {n for n, m in adapter.items() if in_out(n, m)}
    if not marked:
        return adapter
    return adapter.with_modules({n: replace(m, fan_in_fan_out=True) if n in marked else m for n, m in adapter.items()},
                                fan_in_fan_out=True)


def _flattened_note(adapter: Adapter, base: BaseModel | None) -> tuple[str, ...]:
    flat = [n for n in adapter.modules if is_flattened(n)]
    if not flat:
        return ()
    # says --base, not `base`: notes are shown as they are (the CLI rewrites backquoted parameters in errors)
    return (f"{len(flat)} module names kept in kohya's flattened form (e.g. {flat[0]}): "
            + ("pass --base MODEL to map them to the model's names" if base is None else
               "they match no weight of --base" if base.shapes else
               "--base has no weights (or .gguf) to match them against"),)


def _flattened_hint(name: str) -> str | None:
    # a kohya key the base did not map is the likely cause, not the target format's limits
    if not is_flattened(name):
        return None
    return "it kept kohya's flattened name: pass --base MODEL to map it to the model's name"


register(Format("kohya", "kohya sd-scripts single .safetensors (lora_down/lora_up/alpha, ss_* metadata)",
                ".safetensors", detect, reader=_read, writer=lambda adapter, path, base: write_kohya(adapter, path),
                plain_lora_only=True, cannot_hold=lambda adapter, base: kohya_unsupported(adapter),
                remarks=_flattened_note, name_hint=_flattened_hint))
