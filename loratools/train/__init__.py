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

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import TrainConfig
    from .loop import StepInfo, TrainResult, train_adapter

#: public name → the module of this package that defines it
_HOMES = {"TrainConfig": "config", "TrainResult": "loop", "StepInfo": "loop", "train_adapter": "loop"}

__all__ = ["TrainConfig", "TrainResult", "StepInfo", "train_adapter"]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
