"""loratools: inspect, merge, unmerge, compress, combine, convert, train and share LoRA-family adapters.

The public names load on first use (PEP 562): ``import loratools`` costs no torch,
so the command line starts fast (``loratools --help`` never imports torch).
``pull``/``push`` load huggingface_hub only when used. No public name shadows a
module: ``loratools.compress.extract`` is the module, ``loratools.extract_adapter`` its job.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .adalora import RankAllocator
    from .adapter import Adapter, Fingerprint, Module, as_lora
    from .compress.combine import combine_adapters
    from .config import AdapterConfig, adalora_scale, lora_scale
    from .convert import convert_adapter, convert_file
    from .errors import LoraToolsError
    from .compress.extract import extract_adapter
    from .formats import FORMATS, detect_format, read_adapter, write_adapter
    from .hub.client import pull, push
    from .io import ModelReader
    from .linalg import RankRule
    from .merge.jobs import merge_model, unmerge_model, verify_merge
    from .hub.card import model_card
    from .nn.layers import AdaLoRALinear, LoRALinear
    from .nn.inject import LayerSpec, adapter_state, inject, load_adapter
    from .compress.prune import prune_adapter
    from .compress.resize import resize_adapter
    from .train.config import TrainConfig

__version__ = "0.1.0"

#: public name → the module that defines it
_HOMES: dict[str, str] = {
    "RankAllocator": "adalora",
    **dict.fromkeys(["Adapter", "Fingerprint", "Module", "as_lora"], "adapter"),
    "combine_adapters": "compress.combine",
    **dict.fromkeys(["AdapterConfig", "adalora_scale", "lora_scale"], "config"),
    **dict.fromkeys(["convert_adapter", "convert_file"], "convert"),
    "LoraToolsError": "errors",
    "extract_adapter": "compress.extract",
    **dict.fromkeys(["FORMATS", "detect_format", "read_adapter", "write_adapter"], "formats"),
    **dict.fromkeys(["pull", "push"], "hub.client"),
    "ModelReader": "io",
    "RankRule": "linalg",
    **dict.fromkeys(["merge_model", "unmerge_model", "verify_merge"], "merge"),
    "model_card": "hub.card",
    **dict.fromkeys(["AdaLoRALinear", "DoRALinear", "LayerSpec", "LoRALinear", "adapter_state", "inject", "load_adapter"],
                  "nn"),
    "prune_adapter": "compress.prune",
    "resize_adapter": "compress.resize",
    **dict.fromkeys(["TrainConfig", "train_adapter"], "train"),
}

__all__ = sorted(_HOMES) + ["__version__"]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:  # a submodule not imported yet (``loratools.compress.resize``), as an eager package would have it
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module 'loratools' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
