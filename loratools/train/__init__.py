"""Training an adapter on a local causal LM: :func:`train_adapter` and its :class:`TrainConfig`.

- :mod:`.loop`: the training loop (LoRA, DoRA, AdaLoRA with its rank allocator), held-out evaluation, the
  best adapter kept;
- :mod:`.config`: :class:`TrainConfig`, every knob written and validated once (no torch: the command line
  makes its options from it);
- :mod:`.checkpoint`: resumable checkpoints (safetensors and JSON only);
- :mod:`.dist`: data-parallel processes (torch.distributed, gloo on CPU).

The names load on first use (PEP 562), so reading :class:`TrainConfig` does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import attach

if TYPE_CHECKING:
    from .config import TrainConfig
    from .loop import StepInfo, TrainResult, train_adapter

#: public name → the module of this package that defines it
_HOMES = {"TrainConfig": "config", "TrainResult": "loop", "StepInfo": "loop", "train_adapter": "loop"}

__all__ = ["TrainConfig", "TrainResult", "StepInfo", "train_adapter"]


if not TYPE_CHECKING:  # type checkers read the imports above
    __getattr__, __dir__ = attach(__name__, _HOMES)
