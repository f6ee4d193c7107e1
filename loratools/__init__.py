"""loratools: inspect, merge, unmerge, combine, compress, convert, train and share LoRA/AdaLoRA adapters."""

from .adapter import Adapter, Fingerprint, Module, as_lora
from .combine import combine_adapters
from .convert import convert, convert_file
from .config import AdapterConfig, adalora_scale, lora_scale
from .errors import LoraToolsError
from .extract import extract
from .formats import FORMATS, detect_format, read_adapter, write_adapter
from .io import ModelReader
from .merge import merge_model, unmerge_model, verify_merge
from .modelcard import model_card
from .prune import prune
from .resize import resize
from .nn import AdaLoRALinear, LayerSpec, LoRALinear, RankAllocator, adapter_state, inject, load_adapter
from .train import TrainConfig

__version__ = "0.1.0"

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
    "combine_adapters",
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


def __getattr__(name: str):  # the Hub functions load huggingface_hub only when first used
    if name in ("pull", "push"):
        from . import hub

        return getattr(hub, name)
    raise AttributeError(f"module 'loratools' has no attribute {name!r}")
