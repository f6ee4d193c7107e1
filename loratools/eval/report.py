"""What ``eval`` reports: one :class:`StackResult` per stack and the :class:`EvalReport` around them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..deltas import MIN_KEPT
from .metrics import NO_EFFECT, NO_EFFECT_REL, Comparison, Effect

__all__ = ["StackResult", "EvalReport", "EXIT_FLAGGED"]

#: the exit code of ``loratools eval`` when a stack is flagged (no effect, effect lost, disagrees); 2 is bad input
EXIT_FLAGGED = 1


@dataclass(frozen=True)
class StackResult:
    """One stack's figures. ``role``: ``reference``, ``base`` (a zero point: the base alone, in transformers or in a
    runtime; never flagged) or ``stack``. ``comparison`` is against the reference (None for the reference)."""

    name: str
    kind: str
    role: str
    nll: float
    label_accuracy: float | None
    greedy_agreement: float | None
    comparison: Comparison | None
    effect: Effect | None
    #: the stack its effect is measured from
    effect_base: str | None
    flags: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "role": self.role, "nll": self.nll,
                "label_accuracy": self.label_accuracy, "greedy_agreement": self.greedy_agreement,
                "comparison": self.comparison.to_json() if self.comparison else None,
                "effect": self.effect.to_json() if self.effect else None, "effect_base": self.effect_base,
                "flags": list(self.flags), "notes": list(self.notes)}


@dataclass(frozen=True)
class EvalReport:
    """Every stack on the same examples of ``data``; ``ok`` when no stack is flagged.

    >>> EvalReport("d.jsonl", 3, 12, "adapter", ()).ok
    True
    """

    data: str
    examples: int
    positions: int
    reference: str
    stacks: tuple[StackResult, ...]
    min_agreement: float = 0.9
    greedy_tokens: int = 0
    notes: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not any(s.flags for s in self.stacks)

    def to_json(self) -> dict[str, Any]:
        return {"data": self.data, "examples": self.examples, "positions": self.positions,
                "reference": self.reference, "ok": self.ok,
                "thresholds": {"min_kept": MIN_KEPT, "no_effect": NO_EFFECT, "no_effect_rel": NO_EFFECT_REL,
                               "min_agreement": self.min_agreement},
                "greedy_tokens": self.greedy_tokens, "notes": list(self.notes),
                "stacks": [s.to_json() for s in self.stacks]}
