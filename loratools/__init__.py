"""loratools: inspect, merge, unmerge, compress, convert, train and share LoRA/AdaLoRA adapters."""

from .adapter import Adapter, Fingerprint, Module, as_lora
from .config import AdapterConfig, adalora_scale, lora_scale
from .errors import LoraToolsError
from .formats import FORMATS, detect_format, read_adapter, write_adapter
from .io import ModelReader
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
    "detect_format",
    "inject",
    "load_adapter",
    "lora_scale",
    "read_adapter",
    "write_adapter",
    "__version__",
]
