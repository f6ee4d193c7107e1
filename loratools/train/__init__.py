"""Training an adapter on a local causal LM: :func:`train_adapter` and its :class:`TrainConfig`.

- :mod:`.loop`: the training loop (LoRA, DoRA, AdaLoRA with its rank allocator), held-out evaluation, the
  best adapter kept;
- :mod:`.config`: :class:`TrainConfig`, every knob validated once;
- :mod:`.checkpoint`: resumable checkpoints (safetensors and JSON only);
- :mod:`.dist`: data-parallel processes (torch.distributed, gloo on CPU).
"""

from __future__ import annotations

from .config import TrainConfig
from .loop import StepInfo, TrainResult, train_adapter

__all__ = ["TrainConfig", "TrainResult", "StepInfo", "train_adapter"]
