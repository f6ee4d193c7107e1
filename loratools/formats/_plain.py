"""Plain LoRA factors for formats that hold nothing else (kohya, GGUF)."""

from __future__ import annotations

import torch

from ..adapter import Adapter, as_lora

__all__ = ["plain_lora"]


def plain_lora(adapter: Adapter) -> Adapter:
    """:func:`~loratools.adapter.as_lora` with AdaLoRA's ``A ⊙ E`` formed in float32 when the factors are
    16-bit: rounding the product to 16 bits would move ΔW by ~1e-4 (relative). LoRA is returned as is."""
    if adapter.method != "adalora":
        return adapter
    up = {n: m.with_factors(A=m.A.float(), B=m.B.float(), E=m.E.float() if m.E is not None else None)
          if m.A.dtype in (torch.float16, torch.bfloat16) else m for n, m in adapter.items()}
    return as_lora(adapter.with_modules(up))
