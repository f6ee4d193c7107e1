"""loratools: inspect, merge, unmerge, compress, convert, train and share LoRA/AdaLoRA adapters."""

from .adapter import Adapter, Fingerprint, Module, as_lora
from .convert import convert, convert_file
from .config import AdapterConfig, adalora_scale, lora_scale
from .errors import LoraToolsError
from .extract import extract
from .formats import FORMATS, detect_format, read_adapter, write_adapter
from .io import ModelReader
from .modelcard import model_card
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
    "convert",
    "convert_file",
    "detect_format",
    "extract",
    "lora_scale",
    "model_card",
    "pull",
    "push",
    "prune",
    "read_adapter",
    "resize",
    "write_adapter",
    "__version__",
]


def __getattr__(name: str):  # the Hub functions load huggingface_hub only when first used
    if name in ("pull", "push"):
        from . import hub

        return getattr(hub, name)
    raise AttributeError(f"module 'loratools' has no attribute {name!r}")
