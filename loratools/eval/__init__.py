"""``loratools eval``: the same examples through base, base + adapter and every runtime, measured against a
reference (:func:`.job.eval_stacks`; figures and flags in :mod:`.metrics`, the HTML page in :mod:`.html`)."""

from __future__ import annotations

from .job import eval_stacks
from .report import EXIT_FLAGGED, EvalReport, StackResult

__all__ = ["eval_stacks", "EvalReport", "StackResult", "EXIT_FLAGGED"]
