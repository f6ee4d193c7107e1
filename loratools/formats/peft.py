"""PEFT's adapter directory: ``adapter_config.json`` + ``adapter_model.safetensors``.

Key grammar (``<m>`` is the module path, e.g. ``model.layers.0.self_attn.q_proj``):

========================  ==============================================
LoRA linear / conv        ``base_model.model.<m>.lora_A.weight``, ``.lora_B.weight``
``lora_bias``             ``base_model.model.<m>.lora_B.bias``
LoRA embedding            ``base_model.model.<m>.lora_embedding_A``, ``.lora_embedding_B``
DoRA magnitude            ``base_model.model.<m>.lora_magnitude_vector`` ((out,); (1, out, 1, …) for conv)
AdaLoRA                   ``base_model.model.<m>.lora_A``, ``.lora_B``, ``.lora_E``
older files               the same with ``.default`` after the factor (``….lora_A.default.weight``)
modules_to_save, biases,  kept verbatim in :attr:`Adapter.saved`: full tensors that replace the base's
base_layer copies,        (``bias="all"``/``"lora_only"`` biases, ``….base_layer.weight`` of embeddings), and
trainable tokens          ``<m>.token_adapter.trainable_tokens_delta`` (:func:`~loratools.adapter.token_rows`)
========================  ==============================================

AdaLoRA files pruned by PEFT hold truncated tensors (possibly rank 0) and a
``rank_pattern`` of boolean masks keyed ``<m>.lora_E``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from torch import Tensor

from ..adapter import Adapter, Kind, Module, token_rows
from ..adalora import mask_key, module_mask
from ..config import (AdapterConfig, adalora_scale, alpha_for_scale, experts_targets, lora_scale, pattern_value,
                      undeclared_bias_note,
                      target_matches)
from ..errors import (CorruptFileError, InvalidOptionError, MissingModuleError, NotAnAdapterError, ShapeMismatchError,
                      UnsupportedModuleError)
from ..io import load_safetensors, read_json, save_safetensors
from .base import BaseModel, Format, register
from .peft_fields import check_fields
from .peft_values import check_peft_values

__all__ = ["read_peft", "write_peft", "peft_config", "peft_tensors", "peft_unsupported", "CONFIG_NAME",
           "WEIGHTS_NAME", "PREFIX"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

#: ``<m>.<factor>[.default][.weight|.bias]``: peft 0.21.2 saves without the adapter name
#: (``utils/save_and_load.py`` ``_remove_adapter_name_from_key``); older files keep ``.default``, which peft still
#: loads (``BaseTuner._remap_adapter_state_dict_for_load`` passes keys that already name the model's parameter through).
#: DoRA's magnitude is saved without its ``.weight`` (``save_and_load.py`` ``renamed_dora_weights``).
_KEY = re.compile(r"^(?P<m>.+)\.(?P<f>lora_A|lora_B|lora_E|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
                  r"(?:\.default)?(?P<t>\.weight|\.bias)?$")
_FACTOR = {"lora_A": "A", "lora_B": "B", "lora_E": "E", "lora_embedding_A": "A", "lora_embedding_B": "B",
           "lora_magnitude_vector": "m"}
_BARE_ONLY = ("lora_E", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
_ADALORA_ONLY = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step")


def _dir_of(path: Path) -> Path:
    # a path to adapter_model.safetensors or adapter_config.json inside a PEFT directory means the directory
    if path.is_file() and path.name in (WEIGHTS_NAME, CONFIG_NAME) and (path.parent / CONFIG_NAME).is_file():
        return path.parent
    return path


def detect(path: Path) -> bool:
    d = _dir_of(path)
    return d.is_dir() and (d / CONFIG_NAME).is_file()


def _split_key(key: str) -> tuple[str, str, Kind | None] | None:
    """(module, factor, kind hint) of a LoRA factor key; factor ``"bias"`` is lora_B's bias (``lora_bias``),
    ``"m"`` DoRA's magnitude."""
    match = _KEY.match(key)
    if match is None or (match["t"] == ".weight" and match["f"] in _BARE_ONLY):
        return None
    name = match["m"][len(PREFIX):] if match["m"].startswith(PREFIX) else match["m"]
    if match["t"] == ".bias":
        return (name, "bias", None) if match["f"] == "lora_B" else None
    return name, _FACTOR[match["f"]], ("embedding" if match["f"].startswith("lora_embedding") else None)


def _read_config(d: Path) -> dict[str, Any]:
    """``adapter_config.json``, checked: a LoRA/AdaLoRA config whose every field loratools honours."""
    loaded = read_json(d / CONFIG_NAME)
    if not isinstance(loaded, dict):
        raise CorruptFileError(d / CONFIG_NAME, "not a JSON object")
    raw: dict[str, Any] = loaded
    peft_type = str(raw.get("peft_type", "")).upper() if isinstance(raw.get("peft_type"), str) else ""
    if peft_type not in ("LORA", "ADALORA"):
        raise NotAnAdapterError(d, f"peft_type {raw.get('peft_type')!r} is not LORA or ADALORA")
    check_fields(raw, where=str(d / CONFIG_NAME))
    check_peft_values(raw, where=str(d / CONFIG_NAME), adalora=peft_type == "ADALORA")
    return raw


def _group(d: Path, tensors: dict[str, Tensor]) -> tuple[dict[str, dict[str, Tensor]], dict[str, Kind],
                                                          dict[str, Tensor]]:
    """The file's tensors as (factors by module, kind hints, full tensors kept as they are)."""
    parts: dict[str, dict[str, Tensor]] = {}
    kinds: dict[str, Kind] = {}
    saved: dict[str, Tensor] = {}
    for key, t in tensors.items():
        split = _split_key(key)
        if split is None:
            saved[key] = t
            continue
        name, factor, kind = split
        parts.setdefault(name, {})[factor] = t
        if kind:
            kinds[name] = kind
    return parts, kinds, saved


def _module(name: str, fs: dict[str, Tensor], hint: Kind | None, raw: dict[str, Any], where: Path) -> Module:
    """One module from its factors and the config: rank checked, scale by the config's rule."""
    adalora = str(raw.get("peft_type", "")).upper() == "ADALORA"
    for f in ("A", "B", "E") if adalora else ("A", "B"):
        if f not in fs:
            raise MissingModuleError(f"{name}.lora_{f}", str(where), "the adapter file is incomplete")
    A, B = fs["A"], fs["B"]
    on_parameter = not adalora and bool(experts_targets(name, raw.get("target_parameters")))
    kind: Kind = hint or ("experts" if on_parameter else "conv" if A.ndim in (3, 4, 5) else "linear")
    r_default = int(raw.get("r", 8))
    alpha = float(raw.get("lora_alpha", 8))  # peft 0.21.2 tuners/lora/config.py: LoraConfig.lora_alpha defaults to 8
    n_experts = 1
    if adalora:
        scale = adalora_scale(alpha, int(raw["init_r"]))
    else:
        r_cfg = int(pattern_value(name, raw.get("rank_pattern") or {}, r_default))
        n_experts = A.shape[0] // r_cfg if kind == "experts" and r_cfg > 0 else 1
        if A.shape[0] != r_cfg * n_experts:
            raise ShapeMismatchError(name, f"rank {r_cfg} (from {CONFIG_NAME})" + (" per expert" if on_parameter
                                     else ""), f"lora_A of shape {tuple(A.shape)}")
        alpha = float(pattern_value(name, raw.get("alpha_pattern") or {}, alpha))
        scale = lora_scale(alpha, r_cfg, rslora=bool(raw.get("use_rslora", False)))
    use_dora = bool(raw.get("use_dora", False)) and not adalora  # AdaloraConfig refuses use_dora
    if ("m" in fs) != use_dora:  # peft would ignore a stray magnitude, or start one at ‖W0‖ for a missing one
        raise CorruptFileError(where, f"{name} {'holds' if 'm' in fs else 'lacks'} lora_magnitude_vector but "
                                      f"use_dora is {use_dora} in {CONFIG_NAME}")
    magnitude = fs["m"].reshape(-1) if "m" in fs else None  # conv: peft's (1, out, 1, …)
    fifo = bool(raw.get("fan_in_fan_out", False)) and kind == "linear"
    return Module(A=A, B=B, E=fs.get("E"), alpha=alpha, scale=scale, kind=kind, fan_in_fan_out=fifo,
                  bias=fs.get("bias"), experts=n_experts, magnitude=magnitude)


_MAGNITUDE = re.compile(r"\.(lora_magnitude_vector|magnitude)(\.default)?(\.weight)?$")


def _refuse_torchtune_dora(d: Path, raw: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """Refuse torchtune's DoRA export by name. peft writes ``use_dora`` in every config since DoRA exists;
    torchtune's ``tune_to_peft_adapter_config`` (torchtune/models/convert_weights.py) writes only ``r``,
    ``lora_alpha``, ``target_modules`` and ``peft_type``, and its ``tune_to_peft_adapter_weights`` permutes the
    q_proj/k_proj ``lora_B`` rows to transformers' order but not their magnitudes, which are per row: read as
    DoRA, those modules would be wrong."""
    magnitudes = sorted(k for k in tensors if _MAGNITUDE.search(k))
    if magnitudes and "use_dora" not in raw:
        raise NotAnAdapterError(d, f"it is a torchtune DoRA adapter ({magnitudes[0]}, and no use_dora in "
                                   f"{CONFIG_NAME}), which loratools does not read: torchtune's export leaves the "
                                   "q_proj/k_proj magnitudes in its own row order; merge it with torchtune instead")


def read_peft(path: Path) -> Adapter:
    """Read a PEFT LoRA / rsLoRA / AdaLoRA / DoRA adapter directory."""
    d = _dir_of(Path(path))
    raw = _read_config(d)
    weights = d / WEIGHTS_NAME
    if not weights.is_file():
        if (d / "adapter_model.bin").is_file():
            raise NotAnAdapterError(d, "only a pickled adapter_model.bin is present; loratools loads safetensors only "
                                       "(re-save it with safe_serialization=True)")
        raise MissingModuleError(WEIGHTS_NAME, str(d), "the weights file is missing")
    tensors = load_safetensors(weights)[0]
    _refuse_torchtune_dora(d, raw, tensors)
    parts, kinds, saved = _group(d, tensors)
    modules = {name: _module(name, fs, kinds.get(name), raw, weights) for name, fs in parts.items()}
    if not modules:
        raise NotAnAdapterError(weights, "it holds no lora_A/lora_B tensors")
    method: Literal["lora", "adalora"] = "adalora" if str(raw["peft_type"]).upper() == "ADALORA" else "lora"
    target = raw.get("target_modules")
    config = AdapterConfig(
        method=method,
        use_rslora=bool(raw.get("use_rslora", False)),
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        base_model=raw.get("base_model_name_or_path"),
        task_type=raw.get("task_type"),
        init_r=int(raw["init_r"]) if method == "adalora" else None,
        target_r=int(raw["target_r"]) if method == "adalora" and raw.get("target_r") is not None else None,
        target_modules=tuple(target) if isinstance(target, list) else target,
        extra=raw,
    )
    adapter = Adapter(modules, config, saved)
    adapter.check_finite()
    token_rows(adapter)  # trainable tokens: one saved row per index of trainable_token_indices
    return adapter


def _mode(values: list[Any]) -> Any:
    return Counter(values).most_common(1)[0][0]


def _matches_target(name: str, target: tuple[str, ...] | str | None) -> bool:
    # "all-linear" covers every module an adapter can hold here; None matches nothing
    if target is None:
        return False
    return target == "all-linear" or target_matches(name, target)


def peft_config(adapter: Adapter) -> dict[str, Any]:
    """The ``adapter_config.json`` that makes PEFT rebuild exactly this adapter."""
    cfg = adapter.config
    raw = dict(cfg.extra)
    # LoRA on expert parameters is targeted by target_parameters (kept in extra), not target_modules
    names = [n for n, m in adapter.items() if m.kind != "experts"]
    target: Any = cfg.target_modules
    # with lora_bias, a target the file holds no factors for would get a lora_B bias peft cannot merge: name each
    if not (target is not None and all(_matches_target(n, target) for n in names)) or _has_lora_bias(adapter):
        target = sorted(names)
    elif isinstance(target, tuple):
        target = list(target)
    raw.update(
        base_model_name_or_path=cfg.base_model,
        task_type=cfg.task_type,
        fan_in_fan_out=cfg.fan_in_fan_out,
        target_modules=target,
        inference_mode=True,
    )
    raw.setdefault("lora_dropout", 0.0)
    raw.setdefault("bias", "none")
    if adapter.method == "adalora":
        scales = {m.scale for m in adapter.modules.values()}
        one_alpha = {m.alpha for m in adapter.modules.values()}
        if len(one_alpha) > 1 or len(scales) > 1:
            raise InvalidOptionError("AdaLoRA in PEFT has one alpha for all modules; write it as LoRA instead (--to lora)")
        init_r = cfg.init_r or max(m.rank for m in adapter.modules.values())
        masks: dict[str, list[bool]] = {}
        for name, m in adapter.items():
            if m.rank > init_r:
                raise ShapeMismatchError(name, f"rank ≤ init_r = {init_r}", m.rank)
            if m.rank < init_r:
                masks[mask_key(name)] = module_mask(raw.get("rank_pattern"), name, rank=m.rank, init_r=init_r)
        raw.update(peft_type="ADALORA", init_r=init_r, target_r=cfg.target_r or init_r, lora_alpha=next(iter(one_alpha)),
                   rank_pattern=masks or None, r=raw.get("r", 8))
        raw.setdefault("total_step", 1)
        raw.pop("alpha_pattern", None)
        return raw
    for key in _ADALORA_ONLY:
        raw.pop(key, None)
    # alpha is chosen per module so that the scaling rule gives each module's exact scale
    alphas = {n: alpha_for_scale(m.scale, m.rank, rslora=cfg.use_rslora, keep=m.alpha) for n, m in adapter.items()}
    ranks = {n: m.rank for n, m in adapter.items()}
    r0, a0 = _mode(list(ranks.values())), _mode(list(alphas.values()))
    raw.update(
        peft_type="LORA",
        r=r0,
        lora_alpha=a0,
        use_rslora=cfg.use_rslora,
        use_dora=adapter.is_dora,
        lora_bias=_has_lora_bias(adapter),
        rank_pattern={n: r for n, r in ranks.items() if r != r0},
        alpha_pattern={n: a for n, a in alphas.items() if a != a0},
    )
    return raw


def _has_lora_bias(adapter: Adapter) -> bool:
    return any(m.bias is not None for m in adapter.modules.values())


#: why a module without lora_B.bias cannot sit beside modules with one (mergekit 0.1.5 extracts Qwen2's q/k/v biases
#: as lora_B.bias, o_proj and the MLP have none); the CLI turns the backquoted `base` into --base
_SOME_BIASES = ("lora_B.bias on only some modules (mergekit): peft's lora_bias gives every module one and cannot "
                "merge it where the base layer has no bias; merge it with `loratools merge`, or give `base` if every "
                "adapted layer has a bias there")
_NO_BIAS_KIND = "peft's lora_bias is not supported on embeddings or MoE expert parameters"


def peft_unsupported(adapter: Adapter, base: BaseModel | None = None) -> dict[str, str]:
    """Modules a peft file cannot hold (beside others with ``lora_B.bias``, or with a DoRA ε) → why.

    peft's ``lora_bias`` is one flag for every module: each gets a ``lora_B`` bias, and ``merge_and_unload``
    raises where the base layer has none (peft 0.21.2 ``lora/layer.py``: "Impossible to merge LoRA with
    lora_bias=True because the base layer has no bias"). A module without a bias is written with a zero one,
    which is exact and merges only where ``base`` (its weights) shows ``<m>.bias``; embeddings and MoE
    parameters take no ``lora_bias`` in peft at all.

    A DoRA module with an ε (``dora_eps``, LyCORIS's DoRA) is refused too: peft 0.21.2 divides by ‖V‖ alone
    (``tuners/lora/dora.py``), so the file would merge to another weight. Empty when no module has a bias or an ε.
    """
    eps = {n: _eps_why(m.dora_eps) for n, m in adapter.items() if m.is_dora and m.dora_eps}
    if not any(m.bias is not None for m in adapter.modules.values()):
        return eps
    out = {n: _NO_BIAS_KIND for n, m in adapter.items() if m.kind in ("embedding", "experts")}
    keys = set(base.weights.keys()) if base is not None and base.weights is not None else set()
    out.update({n: _SOME_BIASES for n, m in adapter.items()
                if m.bias is None and n not in out and f"{n}.bias" not in keys})
    return {**out, **eps}


def _eps_why(eps: float) -> str:
    return (f"LyCORIS DoRA (ε = {eps:.3g}): peft's DoRA has no ε; merge it with loratools, or convert with "
            "--as-lora --base BASE")


def peft_tensors(adapter: Adapter) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    lora_bias = _has_lora_bias(adapter)
    for name, m in adapter.items():
        base = PREFIX + name
        if m.kind == "embedding":
            out[f"{base}.lora_embedding_A"], out[f"{base}.lora_embedding_B"] = m.A, m.B
        elif adapter.method == "adalora":
            assert m.E is not None
            out[f"{base}.lora_A"], out[f"{base}.lora_B"], out[f"{base}.lora_E"] = m.A, m.B, m.E
        else:
            out[f"{base}.lora_A.weight"], out[f"{base}.lora_B.weight"] = m.A, m.B
            if lora_bias:  # peft gives every lora_B a bias when the config says lora_bias: zero where there was none
                out[f"{base}.lora_B.bias"] = m.bias if m.bias is not None else m.B.new_zeros(m.B.shape[0])
        if m.magnitude is not None:
            mag = m.magnitude.reshape(1, -1, *([1] * (m.A.ndim - 2))) if m.kind == "conv" else m.magnitude
            out[f"{base}.lora_magnitude_vector"] = mag.contiguous()
    out.update(adapter.saved)
    return out


def write_peft(adapter: Adapter, path: Path, base: BaseModel | None = None) -> None:
    """Write a PEFT adapter directory at ``path`` (which must not exist yet); ``base`` (its weights) lets
    modules without ``lora_B.bias`` sit beside modules with one (:func:`peft_unsupported`)."""
    if any(m.rank == 0 for m in adapter.modules.values()) and adapter.method == "lora":
        adapter = adapter.with_modules({n: m for n, m in adapter.items() if m.rank > 0})
    bad = peft_unsupported(adapter, base)
    if bad:  # a file peft loads but cannot merge is never written
        raise UnsupportedModuleError("peft", sorted(bad), "; ".join(dict.fromkeys(bad.values())))
    config = peft_config(adapter)
    path.mkdir(parents=True)
    save_safetensors(peft_tensors(adapter), path / WEIGHTS_NAME, {"format": "pt"})
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _remarks(adapter: Adapter, base: BaseModel | None) -> tuple[str, ...]:
    note = undeclared_bias_note(adapter.config, sum(m.bias is not None for m in adapter.modules.values()))
    return (note,) if note else ()


register(Format("peft", "PEFT adapter directory (adapter_config.json + adapter_model.safetensors)", "dir", detect,
                reader=lambda path, base: read_peft(path),
                writer=write_peft, cannot_hold=peft_unsupported, remarks=_remarks))
