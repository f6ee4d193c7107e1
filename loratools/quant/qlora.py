"""The QLoRA merge question, as figures: should an adapter trained on a 4-bit base be merged onto the original
16-bit weights W0, or onto the dequantized 4-bit weights deq(Q(W0)) it was trained against?

Per module, with E = deq(Q(W0)) − W0 the quantization error of the base weight and ΔW the adapter's update::

    ratio = ‖E‖_F / ‖ΔW‖_F                        overall: √Σ‖E‖²_F / √Σ‖ΔW‖²_F over the adapted modules

Merged onto W0, the served model differs from the one the adapter was trained in by −E; merged onto
deq(Q(W0)) it is that model exactly, with the quantization error kept. The ratio says how large the first
difference is next to the adapter's own change (NF4 leaves ‖E‖ ≈ 9 % of ‖W0‖, usually more than ‖ΔW‖).
Which choice the figures favour follows the measurement in docs/experiments.md ("Which base to merge a QLoRA
adapter onto"): :data:`DEQUANTIZED_FROM_RATIO`.

>>> w0 = torch.randn(64, 128) * 0.02
>>> row = qlora_row("q", w0, torch.zeros(64, 128) + 1e-4, "nf4")
>>> row.ratio > 10
True
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import InvalidOptionError, ShapeMismatchError
from .bnb import Bnb4bit

__all__ = ["DEQUANTIZED_FROM_RATIO", "QLORA_QUANTS", "QloraReport", "QloraRow", "qlora_codec", "qlora_report",
           "qlora_row"]

#: the 4-bit bases a QLoRA adapter may have been trained on: bitsandbytes' types, ``-dq`` with nested absmax
QLORA_QUANTS = ("nf4", "nf4-dq", "fp4", "fp4-dq")
#: the overall ratio from which the figures favour merging onto deq(Q(W0)); None: they never do (measured on
#: SmolLM2-135M, docs/experiments.md: the original weights gave the lower held-out loss at every ratio seen)
DEQUANTIZED_FROM_RATIO: float | None = None


def qlora_codec(quant: str) -> Bnb4bit:
    """The bitsandbytes 4-bit codec named by ``quant`` (one of :data:`QLORA_QUANTS`), blocks of 64 as
    transformers' ``BitsAndBytesConfig`` quantizes by default."""
    if quant not in QLORA_QUANTS:
        raise InvalidOptionError(f"`qlora` must be one of {', '.join(QLORA_QUANTS)}, not {quant!r}")
    return Bnb4bit(quant.removesuffix("-dq"), 64, nested=quant.endswith("-dq"))


@dataclass(frozen=True)
class QloraRow:
    """One module: ‖E‖_F, ‖ΔW‖_F, ‖W0‖_F and their ratio ‖E‖/‖ΔW‖ (inf for a zero update)."""

    module: str
    quant_error: float
    delta: float
    weight: float

    @property
    def ratio(self) -> float:
        return self.quant_error / self.delta if self.delta > 0 else math.inf

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"ratio": self.ratio}


def qlora_row(module: str, w0: Tensor, delta: Tensor, quant: str) -> QloraRow:
    """The figures of one module: W0 (out, in) quantized by bitsandbytes' rule for ``quant`` and dequantized,
    in float32; norms accumulated in float64."""
    if w0.shape != delta.shape or w0.dim() != 2:
        raise ShapeMismatchError(module, f"a 2-D base weight of ΔW's shape {tuple(delta.shape)}", tuple(w0.shape))
    codec = qlora_codec(quant)
    w = w0.to(torch.float32)
    err = codec.dequantize("w", codec.quantize("w", w)) - w
    return QloraRow(module, float(err.double().norm()), float(delta.double().norm()), float(w.double().norm()))


@dataclass(frozen=True)
class QloraReport:
    """Every adapted module's row and the overall figure; ``favours`` is ``"original"`` or ``"dequantized"``."""

    quant: str
    rows: tuple[QloraRow, ...]

    @property
    def quant_error(self) -> float:
        return math.sqrt(sum(r.quant_error ** 2 for r in self.rows))

    @property
    def delta(self) -> float:
        return math.sqrt(sum(r.delta ** 2 for r in self.rows))

    @property
    def ratio(self) -> float:
        return self.quant_error / self.delta if self.delta > 0 else math.inf

    @property
    def favours(self) -> str:
        """Merging onto ``"dequantized"`` when the overall ratio reaches :data:`DEQUANTIZED_FROM_RATIO`,
        else onto the ``"original"`` weights."""
        cut = DEQUANTIZED_FROM_RATIO
        return "dequantized" if cut is not None and self.ratio >= cut else "original"

    def to_json(self) -> dict[str, Any]:
        return {"quant": self.quant, "rows": [r.to_json() for r in self.rows],
                "overall": {"quant_error": self.quant_error, "delta": self.delta, "ratio": self.ratio},
                "favours": self.favours}


def qlora_report(rows: Iterable[QloraRow], quant: str) -> QloraReport:
    return QloraReport(quant, tuple(rows))
