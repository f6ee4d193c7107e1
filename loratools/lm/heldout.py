"""Held-out loss of a base model with and without an adapter: the task-level figure beside the matrix error.

``resize``/``prune``/``extract``/``combine`` report, with ``--base --data``, the token-mean next-token
cross-entropy of ``base + adapter`` on the data's examples before and after the operation (the same
loss ``train`` reports as its held-out loss, :func:`evaluate`), so that a compression's
cost can be read in the units that matter to the task. ``extract``'s "before" is the fine-tuned model
itself (:meth:`HeldOut.model_loss`), on the same examples.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapter import Adapter
from .data import Example, collate, load_examples, read_rows, row_example, target_tokens
from ..errors import InvalidOptionError

__all__ = ["HeldOut", "causal_lm_loss", "evaluate"]


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
    """Plain text packed as for training; a ``.jsonl`` file one example a row, whatever each row's kind
    (calibration files may mix text and prompt/completion rows)."""
    if Path(data).suffix != ".jsonl":
        return load_examples(data, tokenizer, seq_len=seq_len)
    examples = [e for r in read_rows(data, what="held-out data") if (e := row_example(tokenizer, r, seq_len=seq_len))]
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
