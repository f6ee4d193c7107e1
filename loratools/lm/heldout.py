"""Held-out loss of a base model with and without an adapter: the task-level figure beside the matrix error.

The compression jobs (``resize_file``, ``prune_file``, ``extract_model``, ``combine_files``) report, given a
base model and data, the token-mean next-token cross-entropy of ``base + adapter`` on the data's examples
before and after the operation (the same loss ``train`` reports as its held-out loss, :func:`evaluate`),
as a :class:`HeldOutReport` (:func:`heldout_report`), so that a compression's cost can be read in the units
that matter to the task. ``extract``'s "before" is the fine-tuned model itself (:meth:`HeldOut.model_loss`),
on the same examples.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapter import Adapter
from .data import Example, collate, row_examples, target_tokens
from ..errors import InvalidOptionError

__all__ = ["HeldOut", "HeldOutReport", "heldout_report", "heldout_inputs", "causal_lm_loss", "evaluate"]


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum (not mean) of next-token cross-entropy over positions whose label is not IGNORE."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                           reduction="sum")



@torch.no_grad()
def evaluate(model: nn.Module, examples: Sequence[Example], *, batch_size: int, pad_id: int, device: torch.device,
             autocast: bool) -> float:
    """Token-mean held-out loss."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        b = {k: v.to(device) for k, v in collate(chunk, pad_id=pad_id).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        total += float(causal_lm_loss(logits, b["labels"]))
        count += target_tokens(chunk)
    model.train(was)
    return total / max(1, count)



def _examples(data: str | Path, tokenizer: Any, seq_len: int) -> list[Example]:
    """:func:`~loratools.lm.data.row_examples`, at least one."""
    examples = row_examples(data, tokenizer, seq_len=seq_len, what="held-out data")
    if not examples:
        raise InvalidOptionError(f"{data} gives no example with a token to predict; give longer examples")
    return examples


class HeldOut:
    """A base model and the examples of a data file, loaded once; :meth:`loss` of any adapter on them."""

    def __init__(self, base: str | Path, data: str | Path, *, seq_len: int = 256, max_examples: int | None = None,
                 device: str = "auto") -> None:
        from ..device import resolve_device
        from .load import load_causal_lm

        self.device = resolve_device(device)
        self.model, tokenizer = load_causal_lm(base, device=self.device, frozen=True)
        self.examples: list[Example] = _examples(data, tokenizer, seq_len)[:max_examples]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    def model_loss(self, model_dir: str | Path, *, batch_size: int = 4) -> float:
        """Token-mean held-out loss of another model (a full fine-tune of the base) on the same examples."""
        from .load import load_causal_lm

        model, _ = load_causal_lm(model_dir, device=self.device, frozen=True)
        return evaluate(model, self.examples, batch_size=batch_size, pad_id=self.pad_id, device=self.device,
                        autocast=False)

    def loss(self, adapter: Adapter | None, *, batch_size: int = 4) -> float:
        """Token-mean held-out loss of the base with ``adapter`` applied (None: the base alone)."""
        from ..nn.inject import load_adapter

        model: Any = self.model
        if adapter is not None and adapter.modules:
            model = copy.deepcopy(self.model)  # the base stays clean for the next adapter
            load_adapter(model, adapter)
        return evaluate(model, self.examples, batch_size=batch_size, pad_id=self.pad_id, device=self.device,
                        autocast=False)


@dataclass(frozen=True)
class HeldOutReport:
    """Token-mean held-out loss (nats per target token) on ``data``: the base alone, ``before`` and ``after`` a job.

    ``before`` is the job's input (the input adapter; the base alone for ``combine``, which has no single
    input; the fine-tuned model itself for ``extract``), ``after`` the base with the job's output adapter.
    ``after − before`` is what the compression cost on this data.

    >>> HeldOutReport("heldout.txt", base=3.5, before=2.25, after=2.5).to_json()["after"]
    2.5
    """

    data: str
    base: float
    before: float
    after: float

    def to_json(self) -> dict[str, str | float]:
        return {"data": self.data, "base": self.base, "before": self.before, "after": self.after}


PathLike = str | os.PathLike[str]


def heldout_inputs(base: PathLike | None, data: PathLike | None) -> tuple[PathLike, PathLike] | None:
    """``(base, data)`` when both are given (a held-out report is asked), None when neither; one alone is refused.

    >>> heldout_inputs(None, None) is None
    True
    """
    if (base is None) != (data is None):
        raise InvalidOptionError("`base` and `data` go together: give both for the held-out loss, or neither")
    return (base, data) if base is not None and data is not None else None


def heldout_report(base: PathLike, data: PathLike, *, after: Adapter, before: Adapter | None = None,
                   tuned: PathLike | None = None, max_examples: int | None = None,
                   device: str = "auto") -> HeldOutReport:
    """The held-out loss on ``data`` (its first ``max_examples`` examples) of ``base`` alone, of ``base + after``,
    and before: of ``tuned`` (a fine-tune of the base) when given, else of ``base + before`` (None: the base alone).

    Each loss is ``Σ CE(next token) / #target tokens`` over the examples (:func:`evaluate`); the base is loaded
    once and stays clean between adapters.
    """
    held = HeldOut(Path(base), Path(data), max_examples=max_examples, device=device)
    with torch.no_grad():
        alone, loss_after = held.loss(None), held.loss(after)
        loss_before = (held.model_loss(Path(tuned)) if tuned is not None else
                       alone if before is None else held.loss(before))
    return HeldOutReport(str(data), alone, loss_before, loss_after)
