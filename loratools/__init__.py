"""loratools: inspect, merge, unmerge, compress, convert, train and share LoRA/AdaLoRA adapters."""

from .adapter import Adapter, Fingerprint, Module, as_lora
from .config import AdapterConfig, adalora_scale, lora_scale
from .errors import LoraToolsError
from .extract import extract
from .formats import FORMATS, detect_format, read_adapter, write_adapter
from .io import ModelReader
from .prune import prune
from .resize import resize

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
    "extract",
    "lora_scale",
    "prune",
    "read_adapter",
    "resize",
    "write_adapter",
    "__version__",
]
