"""loratools: inspect, merge, unmerge, compress, convert, train and share LoRA/AdaLoRA adapters."""

from .adapter import Adapter, Fingerprint, Module, as_lora
from .convert import convert, convert_file
from .config import AdapterConfig, adalora_scale, lora_scale
from .errors import LoraToolsError
from .formats import FORMATS, detect_format, read_adapter, write_adapter
from .io import ModelReader

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
    "convert",
    "convert_file",
    "detect_format",
    "lora_scale",
    "read_adapter",
    "write_adapter",
    "__version__",
]
