"""mlx-lm's adapter directory: ``adapter_config.json`` + ``adapters.safetensors``.

The rules come from mlx-lm 0.32.2's source (``mlx_lm/tuner/lora.py``, ``tuner/dora.py``, ``tuner/utils.py``):

- ``adapters.safetensors`` holds ``<m>.lora_a`` (in, r) and ``<m>.lora_b`` (r, out) per module ``<m>``
  (mlx-lm's parameter paths, e.g. ``model.layers.0.self_attn.q_proj``: transformers' module names), and
  for DoRA ``<m>.m`` (out,), the magnitude. ``LoRALinear.fuse``: ``W' = W0 + scale · lora_bᵀ · lora_aᵀ``,
  with the config's ``scale`` as is (no division by the rank), so here ``A = lora_aᵀ``, ``B = lora_bᵀ``.
  ``DoRALinear.fuse``: ``W' = diag(m / ‖V‖_row) · V`` with ``V = W0 + scale · lora_bᵀ · lora_aᵀ``
  (:mod:`loratools.dora`'s rule).
- ``adapter_config.json`` (the trainer's arguments): ``fine_tune_type`` (``"lora"`` when absent, ``"dora"``,
  or ``"full"``: not an adapter), ``num_layers`` (LoRA goes into the last ``num_layers`` of
  ``model.layers``; ``-1``, or any count ≤ 0, is all of them), ``lora_parameters`` =
  ``{rank, scale, dropout[, keys]}`` (``linear_to_lora_layers`` reads all three; ``keys`` names modules relative
  to a layer, ``self_attn.q_proj``, or by full path, which reaches a module wherever it is).
- ``load_adapters`` refuses a tensor that is not a ``lora_a``/``lora_b``/``m`` of a module it converted, or
  whose shape differs; the reader refuses the same files.

One rank and one scale hold for every module, so the writer folds per-module scales into ``lora_b``
(:func:`~loratools.adapter.fold_scales`) and pads smaller ranks with zeros (:func:`~loratools.adapter.pad_rank`):
ΔW is unchanged. Only linear layers are read and written here (mlx-lm's ``LoRAEmbedding`` and
``LoRASwitchLinear`` are refused by name).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from torch import Tensor

from ..adapter import Adapter, Module, as_lora, fold_scales, pad_rank
from ..config import ALORA_WHY, AdapterConfig, alpha_for_scale, fixed_delta_refusal
from ..errors import (CorruptFileError, LoraToolsError, MissingModuleError, NotAnAdapterError, ShapeMismatchError,
                      UnsupportedConfigError, UnsupportedModuleError)
from ..io import load_safetensors, read_json, save_safetensors
from ..validate import finite_number, get_field
from .base import BaseModel, Format, register

__all__ = ["read_mlx", "write_mlx", "mlx_config", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapters.safetensors"
_LEAVES = ("lora_a", "lora_b", "m")
#: a module inside ``model.layers`` (what mlx-lm's ``keys`` name relative to the layer)
_IN_LAYER = re.compile(r"^(?:.+\.)?layers\.(?P<i>\d+)\.(?P<rel>.+)$")
#: names of input embeddings (mlx-lm's LoRAEmbedding, lora_a (vocab, r)), whose ΔW is the transpose of a linear's
_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|embeddings?|wte|wpe|word_embeddings|tok_embeddings|embed_in|shared)$")


def _dir_of(path: Path) -> Path:
    if path.is_file() and path.name in (WEIGHTS_NAME, CONFIG_NAME) and (path.parent / WEIGHTS_NAME).is_file():
        return path.parent
    return path


def detect(path: Path) -> bool:
    d = _dir_of(path)
    if not (d.is_dir() and (d / WEIGHTS_NAME).is_file() and (d / CONFIG_NAME).is_file()):
        return False
    try:
        raw = read_json(d / CONFIG_NAME)
    except (LoraToolsError, OSError):  # a damaged or LFS-pointer config is peft's reader's to name
        return False
    return isinstance(raw, dict) and ("lora_parameters" in raw or "fine_tune_type" in raw)


def _read_config(d: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The config and its ``lora_parameters``, every field loratools relies on checked."""
    where = d / CONFIG_NAME
    raw = read_json(where)
    if not isinstance(raw, dict):
        raise CorruptFileError(where, "not a JSON object")
    kind = get_field(raw, "fine_tune_type", str, where=where, default="lora")
    if kind == "full":
        raise UnsupportedConfigError(where, "fine_tune_type", kind, "a full fine-tune's weights replace the model's; "
                                     "it is not a LoRA adapter (load it as a model)")
    if kind not in ("lora", "dora"):
        raise UnsupportedConfigError(where, "fine_tune_type", kind, "mlx-lm 0.32.2 knows lora, dora and full")
    get_field(raw, "num_layers", int, where=where, expected="a layer count (-1: all)")
    params = get_field(raw, "lora_parameters", dict, where=where, expected="a JSON object {rank, scale, dropout}")
    at = f"{where} lora_parameters"
    get_field(params, "rank", int, where=at, check=lambda r: r >= 1, expected="a rank ≥ 1")
    finite_number(get_field(params, "scale", float, where=at), where=at, field="scale")
    dropout = get_field(params, "dropout", float, where=at, default=0.0, check=lambda p: 0 <= p < 1,
                        expected="a probability in [0, 1)")
    keys = get_field(params, "keys", list, where=at, default=None, nullable=True,
                     check=lambda ks: all(isinstance(k, str) for k in ks), expected="a list of module names")
    return raw, {**params, "dropout": dropout, "keys": keys}


def _parts(weights: Path, tensors: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    parts: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        name, _, leaf = key.rpartition(".")
        if not name or leaf not in _LEAVES:
            raise CorruptFileError(weights, f"it holds {key!r}, which is not a lora_a, lora_b or m of a module "
                                            "(mlx-lm's load_adapters refuses it too)")
        parts.setdefault(name, {})[leaf] = t
    return parts


def _module(name: str, fs: dict[str, Tensor], params: dict[str, Any], dora: bool, weights: Path) -> Module:
    for leaf in ("lora_a", "lora_b", "m") if dora else ("lora_a", "lora_b"):
        if leaf not in fs:
            raise MissingModuleError(f"{name}.{leaf}", str(weights), "the adapter file is incomplete")
    if "m" in fs and not dora:
        raise CorruptFileError(weights, f"it holds {name}.m (DoRA's magnitude) but fine_tune_type is not 'dora' in "
                                        f"{CONFIG_NAME}")
    a, b, r = fs["lora_a"], fs["lora_b"], int(params["rank"])
    if a.ndim == 3 or b.ndim == 3:
        raise UnsupportedConfigError(weights, "tensor", f"{name}.lora_a", "mlx-lm's LoRASwitchLinear (mixture-of-"
                                     "experts) is not read by loratools; only linear layers are")
    if _EMBEDDING.search(name):
        raise UnsupportedConfigError(weights, "tensor", f"{name}.lora_a", "mlx-lm's LoRAEmbedding is not read by "
                                     "loratools; only linear layers are")
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != r or b.shape[0] != r:
        raise ShapeMismatchError(name, f"lora_a (in, {r}) and lora_b ({r}, out) (rank from {CONFIG_NAME})",
                                 f"{tuple(a.shape)} and {tuple(b.shape)}")
    m = fs.get("m")
    if m is not None and tuple(m.shape) != (b.shape[1],):
        raise ShapeMismatchError(name, f"m of shape ({b.shape[1]},)", tuple(m.shape))
    scale = float(params["scale"])
    return Module(A=a.T.contiguous(), B=b.T.contiguous(), alpha=alpha_for_scale(scale, r), scale=scale, magnitude=m)


def _check_placement(name: str, raw: dict[str, Any], keys: list[str] | None, base: BaseModel | None,
                     where: Path) -> None:
    """Refuse a module mlx-lm would not give LoRA (so its ``load_adapters`` would refuse the file).

    mlx-lm 0.32.2 ``linear_to_lora_layers``: ``keys`` relative to a layer apply to ``model.layers[-max(num_layers,
    0):]`` (every layer when ``num_layers`` ≤ 0), then a key naming a module by its full path applies to it
    wherever it is; without ``keys``, every linear layer inside ``model.layers`` and nothing outside them.
    """
    layer = _IN_LAYER.match(name)
    if keys is None and not layer:
        raise CorruptFileError(where, f"{name} lies outside the model's layers and lora_parameters has no keys, so "
                                      "mlx-lm would not load it; add it to `keys` or remove its tensors")
    if keys is not None and name in keys:
        return
    if keys is not None and not (layer and layer["rel"] in keys):
        raise CorruptFileError(where, f"{name} is not in lora_parameters.keys, so mlx-lm would not load it; "
                                      "add it to `keys` or remove its tensors")
    n = int(raw["num_layers"])
    total = (base.hparams or {}).get("num_hidden_layers") if base is not None else None
    if layer and n > 0 and isinstance(total, int) and int(layer["i"]) < total - n:
        raise CorruptFileError(where, f"{name} lies outside the last num_layers = {n} of the base's {total} layers, "
                                      "so mlx-lm would not load it; raise num_layers (-1: all)")


def read_mlx(path: Path, base: BaseModel | None = None) -> Adapter:
    """Read an mlx-lm LoRA or DoRA adapter directory."""
    d = _dir_of(Path(path))
    raw, params = _read_config(d)
    weights = d / WEIGHTS_NAME
    dora = raw.get("fine_tune_type") == "dora"
    parts = _parts(weights, load_safetensors(weights)[0])
    if not parts:
        raise NotAnAdapterError(weights, "it holds no lora_a/lora_b tensors")
    modules = {}
    for name, fs in parts.items():
        modules[name] = _module(name, fs, params, dora, weights)
        _check_placement(name, raw, params["keys"], base, d / CONFIG_NAME)
    model = raw.get("model")
    config = AdapterConfig(base_model=model if isinstance(model, str) else None,
                           extra={"lora_dropout": params["dropout"]})
    adapter = Adapter(modules, config)
    adapter.check_finite()
    return adapter


def _unsupported(adapter: Adapter, base: BaseModel | None) -> dict[str, str]:
    if fixed_delta_refusal(adapter.config):  # aLoRA: no fixed ΔW, and mlx-lm's LoRA always applies
        return {n: ALORA_WHY for n in adapter.modules}
    out: dict[str, str] = {}
    dora = adapter.is_dora
    for name, m in adapter.items():
        if m.kind != "linear" or _EMBEDDING.search(name):
            out[name] = "loratools writes mlx-lm LoRA on linear layers only"
        elif m.fan_in_fan_out:
            out[name] = "a GPT-2 Conv1D (fan_in_fan_out) layout, which mlx-lm stores as a Linear"
        elif m.bias is not None:
            out[name] = "mlx-lm's LoRA has no lora_bias"
        elif dora and not m.is_dora:
            out[name] = "mlx-lm's fine_tune_type makes every module DoRA or none"
        elif m.is_dora and m.dora_eps:  # mlx-lm 0.32.2 tuner/dora.py divides by the norm alone
            out[name] = (f"LyCORIS DoRA (ε = {m.dora_eps:.3g}): mlx-lm's DoRA has no ε; merge it with loratools, "
                         "or convert with --as-lora --base BASE")
    for key in adapter.saved:
        out[key] = "mlx-lm's adapter holds lora_a, lora_b and m only (no full tensors such as modules_to_save)"
    return out


def mlx_config(adapter: Adapter, *, rank: int, scale: float, base: BaseModel | None = None) -> dict[str, Any]:
    """The ``adapter_config.json`` that makes mlx-lm's ``load_adapters`` give LoRA to exactly these modules.

    ``keys`` names a module inside ``model.layers`` relative to its layer (as mlx-lm does) and any other by its
    full path; ``num_layers`` reaches the lowest adapted layer when the base's layer count is known, else it is
    ``-1`` (every layer: modules the file does not hold get mlx-lm's zero ``lora_b``, so add nothing).
    """
    keys: set[str] = set()
    lowest: int | None = None
    for name in adapter.modules:
        layer = _IN_LAYER.match(name)
        if layer and name.startswith("model.layers."):
            keys.add(layer["rel"])
            lowest = int(layer["i"]) if lowest is None else min(lowest, int(layer["i"]))
        else:
            keys.add(name)
    total = (base.hparams or {}).get("num_hidden_layers") if base is not None and base.hparams else None
    num_layers = total - lowest if isinstance(total, int) and lowest is not None and lowest < total else -1
    dropout = adapter.config.extra.get("lora_dropout", 0.0)
    # training only (no part of ΔW); mlx's nn.Dropout refuses p outside [0, 1), so load_adapters would too
    if isinstance(dropout, bool) or not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        dropout = 0.0
    cfg: dict[str, Any] = {
        "fine_tune_type": "dora" if adapter.is_dora else "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": rank, "scale": scale, "keys": sorted(keys),
                            "dropout": float(dropout)},
    }
    if adapter.config.base_model:
        cfg["model"] = adapter.config.base_model
    return cfg


def write_mlx(adapter: Adapter, path: Path, base: BaseModel | None = None) -> None:
    """Write an mlx-lm adapter directory at ``path`` (which must not exist yet)."""
    if adapter.method == "adalora":
        adapter = as_lora(adapter)
    bad = _unsupported(adapter, base)
    if bad:
        raise UnsupportedModuleError("mlx", sorted(bad), "; ".join(dict.fromkeys(bad.values())))
    folded, scale = fold_scales(dict(adapter.items()))
    rank = max((m.rank for m in folded.values()), default=0)
    if rank < 1:
        raise UnsupportedModuleError("mlx", sorted(folded), "every module has rank 0 (it adds nothing)")
    tensors: dict[str, Tensor] = {}
    for name, m in folded.items():
        m = pad_rank(m, rank)
        tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"] = m.A.T.contiguous(), m.B.T.contiguous()
        if m.magnitude is not None:
            tensors[f"{name}.m"] = m.magnitude.contiguous()
    config = mlx_config(adapter, rank=rank, scale=scale, base=base)
    path.mkdir(parents=True)
    save_safetensors(tensors, path / WEIGHTS_NAME, {"format": "mlx"})
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


register(Format("mlx", "mlx-lm adapter directory (adapter_config.json + adapters.safetensors)", "dir", detect,
                reader=read_mlx, writer=write_mlx, cannot_hold=_unsupported))
