"""loratools: inspect, merge, unmerge, compress, convert, train and share LoRA/AdaLoRA adapters."""

from .adapter import Adapter, Fingerprint, Module, as_lora
from .config import AdapterConfig, adalora_scale, lora_scale
from .errors import LoraToolsError
from .formats import FORMATS, detect_format, read_adapter, write_adapter
from .io import ModelReader
from .merge import merge_model, unmerge_model, verify_merge

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterConfig",
    "Fingerprint",
    "FORMATS",
    "LoraToolsError",
    "ModelReader",
    "Module",
    "adalora_scale",
    "as_lora",
    "detect_format",
    "lora_scale",
    "merge_model",
    "read_adapter",
    "unmerge_model",
    "verify_merge",
    "write_adapter",
    "__version__",
]
