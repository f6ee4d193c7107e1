"""LoRA, AdaLoRA and DoRA as PyTorch layers (:mod:`.layers`), and putting them into a model and taking the
trained adapter back out (:mod:`.inject`)."""

from __future__ import annotations

from .inject import (LORA_LAYERS, LayerSpec, adapter_layers, adapter_state, expected_parameters, inject,
                     linear_target_names, load_adapter, trainable_parameters)
from .layers import AdaLoRALinear, AdaptedLinear, DoRALinear, LoRALinear

__all__ = ["AdaptedLinear", "LoRALinear", "AdaLoRALinear", "DoRALinear", "LayerSpec", "LORA_LAYERS", "inject",
           "adapter_layers", "adapter_state", "load_adapter", "linear_target_names", "trainable_parameters",
           "expected_parameters"]
