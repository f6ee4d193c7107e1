"""loratools: inspect, merge, unmerge, compress, convert, train and share LoRA/AdaLoRA adapters.

The public names load on first use (PEP 562): ``import loratools`` costs no torch,
so the command line starts fast (``loratools --help`` never imports torch).
``pull``/``push`` load huggingface_hub only when used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .adapter import Adapter, Fingerprint, Module, as_lora
    from .config import AdapterConfig, adalora_scale, lora_scale
    from .convert import convert, convert_file
    from .errors import LoraToolsError
    from .extract import extract
    from .formats import FORMATS, detect_format, read_adapter, write_adapter
    from .hub import pull, push
    from .io import ModelReader
    from .merge import merge_model, unmerge_model, verify_merge
    from .modelcard import model_card
    from .nn import AdaLoRALinear, LayerSpec, LoRALinear, RankAllocator, adapter_state, inject, load_adapter
    from .prune import prune
    from .resize import resize
    from .train import TrainConfig

__version__ = "0.1.0"

#: public name → the module that defines it
_HOMES: dict[str, str] = {
    **dict.fromkeys(["Adapter", "Fingerprint", "Module", "as_lora"], "adapter"),
    **dict.fromkeys(["AdapterConfig", "adalora_scale", "lora_scale"], "config"),
    **dict.fromkeys(["convert", "convert_file"], "convert"),
    "LoraToolsError": "errors",
    "extract": "extract",
    **dict.fromkeys(["FORMATS", "detect_format", "read_adapter", "write_adapter"], "formats"),
    **dict.fromkeys(["pull", "push"], "hub"),
    "ModelReader": "io",
    **dict.fromkeys(["merge_model", "unmerge_model", "verify_merge"], "merge"),
    "model_card": "modelcard",
    **dict.fromkeys(["AdaLoRALinear", "LayerSpec", "LoRALinear", "RankAllocator", "adapter_state", "inject",
                     "load_adapter"], "nn"),
    "prune": "prune",
    "resize": "resize",
    "TrainConfig": "train",
}

__all__ = [
    "AdaLoRALinear",
    "Adapter",
    "AdapterConfig",
    "Fingerprint",
    "FORMATS",
    "LayerSpec",
    "LoRALinear",
    "LoraToolsError",
    "ModelReader",
    "Module",
    "RankAllocator",
    "TrainConfig",
    "adalora_scale",
    "adapter_state",
    "as_lora",
    "convert",
    "convert_file",
    "detect_format",
    "extract",
    "inject",
    "load_adapter",
    "lora_scale",
    "merge_model",
    "model_card",
    "pull",
    "push",
    "prune",
    "read_adapter",
    "resize",
    "unmerge_model",
    "verify_merge",
    "write_adapter",
    "__version__",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'loratools' has no attribute {name!r}")
    if home == "hub":  # huggingface_hub is slow to load: only for pull/push
        return getattr(importlib.import_module(".hub", __name__), name)
    _load()
    return globals()[name]


def _load() -> None:
    """Bind every public name, as an eager ``from .x import y`` block would.

    All modules are imported first and the names bound after: importing a submodule
    binds it here under its own name (``loratools.extract``), over a function of that name.
    """
    modules = {home: importlib.import_module(f".{home}", __name__) for home in set(_HOMES.values()) - {"hub"}}
    globals().update({name: getattr(modules[home], name) for name, home in _HOMES.items() if home != "hub"})


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
