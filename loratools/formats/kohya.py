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

LyCORIS LoHa and LoKr modules in the same layout (``<key>.hada_w1_a``…, ``<key>.lokr_w1``…, the Tucker cores
``hada_t1``/``hada_t2``/``lokr_t2``) are read as the LoRA that holds them exactly, LyCORIS DoRA on LoCon
(``<key>.dora_scale`` (out, 1[, 1, …])) as a DoRA module with LyCORIS's ε, and LyCORIS's other kinds refused by name
(:mod:`.kohya_lycoris`); a LoCon Tucker core (``<key>.lora_mid.weight``) is folded into ``lora_down`` exactly
(:func:`_tucker_down`).

A file of a Stable Diffusion model (SD 1.x/2.x, SDXL: ``lora_unet_`` U-Net keys in diffusers or SGM names,
``lora_te1_``/``lora_te2_`` CLIP keys) that loratools did not write is the read-only format ``kohya-sd``: its
modules get the names diffusers 0.42.1 gives them (:mod:`.kohya_sd`), ``<component>.<module>`` as a diffusers
pipeline file is read, or one component's own names (:func:`read_kohya_sd`). A Flux.1 file of sd-scripts
(``lora_unet_double_blocks_…``/``single_blocks_…``, ``lora_te1_`` CLIP-L, ``lora_te3_`` T5) is the same format, its
fused projections split as diffusers splits them (:mod:`.kohya_flux`, :func:`_read_flux`).
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
from ..errors import (CorruptFileError, InvalidFieldError, InvalidOptionError, MissingModuleError, NotAnAdapterError,
                      UnsupportedModuleError)
from ..io import load_safetensors, save_safetensors
from ..validate import load_json
from .base import BaseModel, Format, peek_safetensors, register
from .kohya_flux import FluxTarget, flux_module_names, is_flux_file, split_flux_module
from .kohya_lycoris import (DORA_EPS, DORA_KEY, LYCORIS_KEYS, REFUSED_KEYS, dora_magnitude, lycoris_factors,
                            lycoris_refusal)
from .kohya_sd import SD_COMPONENTS, is_sd_key, kohya_unnamed, pipeline_clip_name, sd_module_names

__all__ = ["read_kohya", "read_kohya_sd", "held_components", "write_kohya", "kohya_key", "is_flattened",
           "kohya_unsupported", "NAMES_KEY", "UNET_PREFIX", "TE_PREFIX"]

UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"
NAMES_KEY = "loratools_module_names"
FIFO_KEY = "loratools_fan_in_fan_out"
_DOWN, _UP, _ALPHA, _MID = ".lora_down.weight", ".lora_up.weight", ".alpha", ".lora_mid.weight"
#: a name that is already a kohya key base (foreign file read without a base model)
_FLAT = re.compile(r"^(lora_(unet|te\d*)|lycoris)_[^.]*$")
_LYCORIS_NAMES = frozenset(LYCORIS_KEYS) | REFUSED_KEYS
#: kohya's prefixes, and LyCORIS 4.1.3's own (``LycorisNetwork.LORA_PREFIX = "lycoris"``, what ``create_lycoris`` +
#: ``save_weights`` and SimpleTuner write, the module path flattened after it as kohya's)
_PREFIX = re.compile(r"^(lora_(unet|te\d*)|lycoris)_")
#: first path components of diffusers / original-SD U-Net modules
_UNET_HEADS = ("down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "time_embedding", "add_embedding",
               "input_blocks", "middle_block", "output_blocks", "conv_norm_out", "transformer_blocks")
#: U-Net modules whose flattened diffusers names diffusers 0.42.1 cannot tell apart (``_convert_unet_lora_key`` turns
#: ``lora_unet_add_embedding_linear_1`` and ``_2`` both into ``add.embedding.linear``): written under SGM's names,
#: which it maps back one to one (``label.emb.0.0`` → ``add_embedding.linear_1``), as sd-scripts' SDXL files are
_SGM_SPELLED = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
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
    >>> kohya_key("unet.add_embedding.linear_2")
    'lora_unet_label_emb_0_2'
    """
    if _FLAT.match(name):
        return name
    for head, prefix in _COMPONENTS:
        if name.startswith(head):
            return _flattened(prefix, name[len(head):])
    return _flattened(UNET_PREFIX if name.split(".", 1)[0] in _UNET_HEADS else TE_PREFIX, name)


def _flattened(prefix: str, path: str) -> str:
    if prefix == UNET_PREFIX:
        path = _SGM_SPELLED.get(path, path)
    return prefix + path.replace(".", "_")


def kohya_unsupported(adapter: Adapter) -> dict[str, str]:
    """Modules and saved tensors kohya's format cannot hold, with the reason."""
    out = {n: "kohya's format has no embedding LoRA" for n, m in adapter.items() if m.kind == "embedding"}
    out.update({n: "kohya's format has no LoRA bias (lora_bias)" for n, m in adapter.items() if m.bias is not None})
    if fixed_delta_refusal(adapter.config):
        out.update({n: ALORA_WHY for n in adapter.modules})
    out.update({n: "kohya's format has no LoRA on MoE expert tensors (target_parameters)"
                for n, m in adapter.items() if m.kind == "experts"})
    out.update({n: "kohya's format names Flux.1/SD3 modules otherwise (BFL's fused lora_unet_double_blocks_…), which "
                   "loratools does not write: convert to diffusers" for n in adapter.modules if kohya_unnamed(n)})
    out.update({k: "kohya's format holds no full tensors (modules_to_save, trained biases, trainable tokens)"
                for k in adapter.saved})
    keys: dict[str, str] = {}
    for n in adapter.modules:
        k = kohya_key(pipeline_clip_name(n))  # CLIP's module with and without text_model.: one module in diffusers
        if k in keys:
            out[n] = f"its kohya key {kohya_key(n)} names the module of {keys[k]}"
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
               base_shapes: Mapping[str, tuple[int, ...]] | None = None,
               given: Mapping[str, str] | None = None) -> Adapter:
    """Read a kohya LoRA file; ``base_names`` (module paths of the base model) maps flattened names back,
    ``given`` (kohya key → module name) names the keys it holds, before both (a key it lacks is skipped).

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
        dora = tensors.get(key + ".dora_scale")
        why = lycoris_refusal(groups[key], None if dora is None else tuple(dora.shape))
        if why is not None:
            raise NotAnAdapterError(path, f"its module {key} is {why}")
        stray = sorted(groups[key] - {_DOWN[1:], _UP[1:], _ALPHA[1:], _MID[1:], DORA_KEY, *LYCORIS_KEYS})
        if stray:
            raise NotAnAdapterError(path, f"unexpected tensor {key + '.' + stray[0]!r} (not a LoRA, LoHa or LoKr "
                                          "tensor)")
        if groups[key] & set(LYCORIS_KEYS) and groups[key] & {_DOWN[1:], _UP[1:]}:
            raise CorruptFileError(path, f"{key} holds both LoRA (lora_down/lora_up) and LyCORIS tensors")
        if groups[key] <= {_ALPHA[1:]} or (given is not None and key not in given):
            continue  # an alpha alone: the orphan check below or "no tensors" names it
        if given is not None:
            name = given[key]
        elif key in names:
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
    if key + _MID in tensors:
        A, up = _tucker_down(path, key, A, tensors[key + _MID], up), up.to(torch.float64)
    r = int(A.shape[0])
    alpha = float(r) if alpha_t is None else _alpha_value(path, key + _ALPHA, alpha_t)
    kind: Kind = "conv" if A.ndim in (3, 4, 5) else "linear"
    if kind == "conv" and up.ndim == 2:  # some writers store a 1×1 up conv as a matrix
        up = up.reshape(*up.shape, *(1,) * (A.ndim - 2))
    module = Module(A=A, B=up, alpha=alpha, scale=lora_scale(alpha, r) if r else 0.0, kind=kind)
    dora = tensors.get(f"{key}.{DORA_KEY}")
    if dora is None:
        return module
    try:  # LyCORIS DoRA on LoCon, output-row kind (lycoris_refusal refused the others)
        return module.with_factors(magnitude=dora_magnitude(dora, module.weight_shape), dora_eps=DORA_EPS)
    except ValueError as e:
        raise CorruptFileError(path, f"{key}: {e}") from None


def _tucker_down(path: Path, key: str, down: Tensor, mid: Tensor, up: Tensor) -> Tensor:
    """A LoCon Tucker module (LyCORIS 4.1.3 ``modules/locon.py`` ``use_tucker``: down (r, in, 1, 1), mid
    (r, r, kh, kw), up (out, r, 1, 1)) as plain LoRA: ΔW[p, q, …] = Σᵢⱼ up[p, i]·mid[i, j, …]·down[j, q]
    (``functional/locon.py`` ``_diff_weight`` through ``rebuild_tucker``), so A = mid ×₂ down, a (r, in, kh, kw)
    kernel, and B = up: exact, rank r. Computed in float64."""
    d = down.reshape(down.shape[0], -1)
    pointwise = down.shape[2:] == (1,) * (down.ndim - 2)
    if mid.ndim < 3 or mid.shape[1] != d.shape[0] or mid.shape[0] != up.shape[1] or not pointwise:
        raise CorruptFileError(path, f"{key}: lora_mid {tuple(mid.shape)} does not chain lora_down {tuple(down.shape)} "
                                     f"and lora_up {tuple(up.shape)}")
    return torch.einsum("ij...,jq->iq...", mid.to(torch.float64), d.to(torch.float64))


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


# -------------------------------------------------------------- Stable Diffusion files (kohya_sd)

def _detect_sd(path: Path) -> bool:
    """A kohya file of a Stable Diffusion or Flux.1 model: U-Net, Flux block or CLIP keys
    (:func:`.kohya_sd.is_sd_key`, :func:`.kohya_flux.is_flux_file`), not ours."""
    peek = peek_safetensors(path)
    if peek is None or NAMES_KEY in peek[1] or not detect(path):
        return False
    keys = {k.partition(".")[0] for k in peek[0] if k != "__metadata__"}
    return any(is_sd_key(k) for k in keys) or is_flux_file(keys)


def _is_flux(path: Path) -> bool:
    # a Flux block key beside Stable Diffusion U-Net keys is refused by the Stable Diffusion reader, naming it
    keys = _file_keys(path)
    return is_flux_file(keys) and not any(k.startswith(UNET_PREFIX) and is_sd_key(k) for k in keys)


def _file_keys(path: Path) -> list[str]:
    peek = peek_safetensors(path)
    return sorted({k.partition(".")[0] for k in (peek[0] if peek else {}) if k != "__metadata__"})


def _sd_names(path: Path, layers_per_block: int) -> dict[str, tuple[str, str]]:
    """kohya key → (component, module name) for every key of the file; a key diffusers does not map is refused."""
    keys = _file_keys(path)
    odd = [k for k in keys if not is_sd_key(k)]
    if odd:
        raise NotAnAdapterError(path, f"its module {odd[0]} is not a Stable Diffusion U-Net or CLIP text encoder "
                                      "key that diffusers maps (lora_unet_down_blocks_…, lora_unet_input_blocks_…, "
                                      "lora_te1_text_model_…); loratools does not read this mix")
    try:
        return sd_module_names(keys, layers_per_block=layers_per_block)
    except ValueError as e:
        raise NotAnAdapterError(path, str(e)) from None


#: where an original (SGM/LDM) single-file checkpoint keeps the modules of each kohya prefix: SD 1.x/2.x and SDXL
#: as sd-scripts loads them (``library/model_util.py``, ``library/sdxl_model_util.py``) and ComfyUI saves them;
#: SDXL's second text encoder is OpenCLIP there (fused ``in_proj_weight``), which kohya's CLIP names do not reach
_CHECKPOINT_HEADS = (("lora_unet_", "model.diffusion_model."), ("lora_te1_", "conditioner.embedders.0.transformer."),
                     ("lora_te_", "cond_stage_model.transformer."))


def _checkpoint_names(path: Path, keys: Iterable[str], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, str] | None:
    """kohya key → module of an SGM single-file checkpoint ``base`` (``model.diffusion_model.…``), by kohya's own
    rule: the key is the module's flattened path. None when ``shapes`` is no such checkpoint; a key that matches no
    module (or two) is refused by name."""
    if not any(n.startswith("model.diffusion_model.") for n in shapes):
        return None
    tables = {prefix: _base_lookup(n[len(head):] for n in shapes if n.startswith(head))
              for prefix, head in _CHECKPOINT_HEADS}
    out: dict[str, str] = {}
    for key in keys:
        prefix, head = next(((p, h) for p, h in _CHECKPOINT_HEADS if key.startswith(p)), (_prefix_of(key), ""))
        found = tables.get(prefix, {}).get(key[len(prefix):])
        if found is None:
            raise NotAnAdapterError(path, f"its module {key} is no single module of the base checkpoint (under "
                                          f"{head or 'no part kohya names'}); merge that part into its diffusers "
                                          "model with `component`")
        out[key] = head + found
    return out


def _prefix_of(key: str) -> str:
    match = _PREFIX.match(key)
    return match.group(0) if match else ""


def held_components(path: Path) -> list[str]:
    """The diffusers components a kohya Stable Diffusion or Flux.1 file holds LoRAs of; ``[]`` for any other file."""
    if not _detect_sd(path):
        return []
    if _is_flux(path):
        return list(dict.fromkeys(t.component for t in _flux_targets(path).values()))
    return list(dict.fromkeys(c for c, _ in _sd_names(path, 2).values()))


def _component_of(path: Path, held: list[str], base: BaseModel) -> str:
    # a diffusers pipeline keeps each model in a folder of its component's name (unet/, text_encoder_2/ …)
    if base.path.name in held:
        return base.path.name
    if len(held) == 1:
        return held[0]
    raise InvalidOptionError(f"{path} holds the LoRAs of {', '.join(held)}: a base model is one of them; merge each "
                             "into its own model (`component`, or a base folder named after it)")


def read_kohya_sd(path: Path, base: BaseModel | None = None, *, component: str | None = None) -> Adapter:
    """A kohya Stable Diffusion file (SD 1.x/2.x, SDXL) with diffusers' module names (:mod:`.kohya_sd`); a Flux.1
    file goes to :func:`_read_flux`.

    Without ``base`` or ``component``, every module is named ``<component>.<module>`` (``unet.down_blocks.1…``,
    ``text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj``), as a diffusers pipeline file is read.
    With ``component`` (or a ``base``, which is one component: the one its folder is named after, or the file's
    only one) that component's modules, named as the model spells them; a CLIP base without ``text_model.``
    names gets the prefix dropped, as diffusers' ``_load_lora_into_text_encoder`` does. A ``base`` that is an
    SGM single-file checkpoint (``model.diffusion_model.…``, as SD/SDXL ship and ComfyUI loads) holds every part:
    each key is matched to its module there by kohya's own rule (:func:`_checkpoint_names`). ΔW per module is
    kohya's (alpha / r), which is what diffusers applies from ``network_alphas``.
    """
    if _is_flux(path):
        return _read_flux(path, base, component)
    hp = dict(base.hparams or {}) if base is not None else {}
    mapping = _sd_names(path, int(hp.get("layers_per_block", 2)))
    held = list(dict.fromkeys(c for c, _ in mapping.values()))
    if component is None and base is None:
        return read_kohya(path, given={k: f"{c}.{n}" for k, (c, n) in mapping.items()})
    shapes = dict(base.shapes or {}) if base is not None else {}
    whole = _checkpoint_names(path, mapping, shapes) if component is None else None
    if whole is not None:  # an SGM single-file checkpoint holds every part: named as it names them
        return read_kohya(path, given=whole, base_shapes=shapes)
    comp = component if component is not None or base is None else _component_of(path, held, base)
    if comp not in held:
        raise InvalidOptionError(f"`component` {comp!r} is not in {path}; it holds {', '.join(held)}")

    given = {k: _own_name(n, shapes) for k, (c, n) in mapping.items() if c == comp}
    return read_kohya(path, given=given, base_shapes=shapes or None)


def _own_name(name: str, shapes: Mapping[str, tuple[int, ...]]) -> str:
    """A CLIP module name as a base without ``text_model.`` names spells it."""
    if shapes and name.startswith("text_model.") and name not in shapes and name[11:] in shapes:
        return name[len("text_model."):]
    return name


def _flux_targets(path: Path) -> dict[str, FluxTarget]:
    try:
        return flux_module_names(_file_keys(path))
    except ValueError as e:
        raise NotAnAdapterError(path, str(e)) from None


#: where a Black Forest Labs Flux.1 checkpoint keeps the transformer: bare (``flux1-dev.safetensors``) or under
#: ComfyUI's ``model.diffusion_model.``; sd-scripts' ``lora_unet_`` keys are its flattened module paths there
_BFL_HEADS = ("", "model.diffusion_model.")


def _bfl_names(path: Path, targets: Mapping[str, FluxTarget], shapes: Mapping[str, tuple[int, ...]]
               ) -> dict[str, str] | None:
    """kohya key → module of a BFL-layout Flux checkpoint ``shapes`` (``double_blocks.0.img_attn.qkv``, no split:
    sd-scripts trains these very modules); None when ``shapes`` is no such checkpoint. The text encoders' keys are
    other models' and are not read (refused when the checkpoint holds text encoders too); a transformer key that
    matches no module (or two) is refused by name."""
    head = next((h for h in _BFL_HEADS if any(n.startswith((h + "double_blocks.", h + "single_blocks."))
                                              for n in shapes)), None)
    if head is None:
        return None
    table = _base_lookup(n[len(head):] for n in shapes if n.startswith(head))
    encoders = next((n for n in shapes if n.startswith(("text_encoders.", "conditioner.", "cond_stage_model."))), None)
    out: dict[str, str] = {}
    for key, t in targets.items():
        if t.component != "transformer" and encoders is not None:  # not merged silently beside the transformer's
            raise NotAnAdapterError(path, f"its module {key} is a text encoder's, and the checkpoint holds text "
                                          f"encoders ({encoders}) that loratools does not map kohya's keys onto; "
                                          "merge it into the text encoder's own model with `component`")
        if t.component != "transformer":
            continue
        found = table.get(key[len(UNET_PREFIX):])
        if found is None:
            raise NotAnAdapterError(path, f"its module {key} is no single module of the Flux checkpoint (under "
                                          f"{head or 'its top level'})")
        out[key] = head + found
    return out


def _read_flux(path: Path, base: BaseModel | None, component: str | None) -> Adapter:
    """A kohya Flux.1 file (:mod:`.kohya_flux`) named as :func:`read_kohya_sd` names a Stable Diffusion one: every
    module ``<component>.<module>`` without ``base``/``component``, else one component's (fused projections split
    as diffusers splits them); a BFL-layout checkpoint ``base`` takes the transformer's keys unsplit."""
    targets = _flux_targets(path)
    held = list(dict.fromkeys(t.component for t in targets.values()))
    shapes = dict(base.shapes or {}) if base is not None else {}
    whole = _bfl_names(path, targets, shapes) if component is None and base is not None else None
    if whole is not None:
        if not whole:
            raise NotAnAdapterError(path, "it holds no LoRA of the Flux transformer, only of its text encoders")
        return read_kohya(path, given=whole)
    comp = component if component is not None or base is None else _component_of(path, held, base)
    if comp is not None and comp not in held:
        raise InvalidOptionError(f"`component` {comp!r} is not in {path}; it holds {', '.join(held)}")
    adapter = read_kohya(path, given={k: k for k, t in targets.items() if comp is None or t.component == comp})
    modules: dict[str, Module] = {}
    for key, m in adapter.items():
        t = targets[key]
        if m.is_dora:  # a split or reordered module would need its magnitude split alike: not done
            raise NotAnAdapterError(path, f"its module {key} is LyCORIS DoRA (dora_scale) on Flux.1, whose modules "
                                          "loratools reads as diffusers' split ones, without DoRA; merge it with "
                                          "LyCORIS or ComfyUI and extract a LoRA from the result (loratools extract)")
        try:
            parts = split_flux_module(key, m, t)
        except ValueError as e:
            raise NotAnAdapterError(path, str(e)) from None
        for name, part in parts.items():
            modules[f"{t.component}.{name}" if comp is None else _own_name(name, shapes)] = part
    return adapter.with_modules(modules)


def _no_sd_writer() -> None:
    raise InvalidOptionError("kohya-sd is read only: write kohya (`to` kohya, diffusers' U-Net names, which "
                             "diffusers and ComfyUI load), diffusers, comfyui or peft")


# before "kohya": detection runs in registration order, and a Stable Diffusion file is also kohya's
register(Format("kohya-sd", "kohya sd-scripts LoRA of Stable Diffusion 1.x/2.x/SDXL (lora_unet_/lora_te1_/lora_te2_) "
                "or Flux.1 (lora_unet_double_blocks_…), read with diffusers' module names; read only", ".safetensors",
                _detect_sd,
                reader=lambda path, base: read_kohya_sd(path, base),
                writer=lambda adapter, path, base: _no_sd_writer(),
                component_reader=lambda path, component: read_kohya_sd(path, component=component),
                holds_models=True))
register(Format("kohya", "kohya sd-scripts single .safetensors (lora_down/lora_up/alpha, ss_* metadata)",
                ".safetensors", detect, reader=_read, writer=lambda adapter, path, base: write_kohya(adapter, path),
                plain_lora_only=True, cannot_hold=lambda adapter, base: kohya_unsupported(adapter),
                remarks=_flattened_note, name_hint=_flattened_hint, holds_models=True))

