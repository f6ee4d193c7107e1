"""LoRA, AdaLoRA and DoRA as PyTorch layers (:mod:`.layers`), how to adapt a layer (:mod:`.spec`, no torch), and
putting them into a model and taking the trained adapter back out (:mod:`.inject`).

The names load on first use (PEP 562), so :class:`LayerSpec` is read without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import attach

if TYPE_CHECKING:
    from .inject import (LORA_LAYERS, adapter_layers, adapter_state, expected_parameters, inject,
                         linear_target_names, load_adapter, trainable_parameters)
    from .layers import AdaLoRALinear, AdaptedLinear, DoRALinear, LoRALinear
    from .spec import LayerSpec

#: public name → the module of this package that defines it
_HOMES: dict[str, str] = {
    **dict.fromkeys(["LORA_LAYERS", "inject", "adapter_layers", "adapter_state", "load_adapter",
                     "linear_target_names", "trainable_parameters", "expected_parameters"], "inject"),
    **dict.fromkeys(["AdaptedLinear", "LoRALinear", "AdaLoRALinear", "DoRALinear"], "layers"),
    "LayerSpec": "spec",
}

__all__ = ["AdaptedLinear", "LoRALinear", "AdaLoRALinear", "DoRALinear", "LayerSpec", "LORA_LAYERS", "inject",
           "adapter_layers", "adapter_state", "load_adapter", "linear_target_names", "trainable_parameters",
           "expected_parameters"]


if not TYPE_CHECKING:  # type checkers read the imports above
    __getattr__, __dir__ = attach(__name__, _HOMES)
