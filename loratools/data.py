"""Training data: read, tokenize, split, and the order examples are seen in.

- ``.txt``: the whole text is tokenized once and packed into ``seq_len`` blocks; every token is a target.
- ``.jsonl`` with ``{"text": …}``: each row tokenized and followed by EOS, then packed likewise.
- ``.jsonl`` with ``{"prompt": …, "completion": …}``: one example per row, ``prompt + completion + EOS``
  truncated to ``seq_len``; only completion tokens (and the EOS) count in the loss.

The order is a pure function of (seed, step): epoch ``e`` visits the training examples in the
permutation drawn from ``seed + e``, and step ``t`` takes the next ``G`` indices of that endless stream
(``G`` = the global batch). So a resumed run, or one split over N processes, sees exactly the same
examples at the same step.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import CorruptFileError, InputNotFoundError, InvalidOptionError

__all__ = ["Example", "IGNORE", "load_examples", "split_examples", "collate", "global_batch_indices", "target_tokens"]

#: label of positions that do not count in the loss (PyTorch's cross-entropy ignore_index)
IGNORE = -100


@dataclass(frozen=True)
class Example:
    """Token ids and their labels (``IGNORE`` where a token is context only)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


def _pack(ids: list[int], seq_len: int) -> list[Example]:
    blocks = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
    if not blocks and len(ids) >= 2:  # shorter than one block: keep what there is
        blocks = [ids]
    return [Example(tuple(b), tuple(b)) for b in blocks]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def load_examples(path: str | Path, tokenizer: Any, *, seq_len: int) -> list[Example]:
    """Read ``path`` (.txt or .jsonl) into examples of at most ``seq_len`` tokens."""
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(p, "training data")
    if seq_len < 2:
        raise InvalidOptionError(f"--seq-len must be at least 2, got {seq_len}")
    eos = tokenizer.eos_token_id
    if p.suffix == ".jsonl":
        rows: list[dict[str, Any]] = []
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorruptFileError(p, f"line {i} is not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not ({"text"} <= row.keys() or {"prompt", "completion"} <= row.keys()):
                raise CorruptFileError(p, f'line {i} needs a "text" field or "prompt" and "completion" fields')
            rows.append(row)
        if rows and "text" not in rows[0]:
            out = []
            for row in rows:
                prompt, completion = _encode(tokenizer, str(row["prompt"])), _encode(tokenizer, str(row["completion"]))
                completion = completion + ([eos] if eos is not None else [])
                ids = (prompt + completion)[:seq_len]
                labels = ([IGNORE] * len(prompt) + completion)[:seq_len]
                if any(lab != IGNORE for lab in labels[1:]):
                    out.append(Example(tuple(ids), tuple(labels)))
            examples = out
        else:
            ids = []
            for row in rows:
                ids += _encode(tokenizer, str(row.get("text", ""))) + ([eos] if eos is not None else [])
            examples = _pack(ids, seq_len)
    else:
        examples = _pack(_encode(tokenizer, p.read_text(encoding="utf-8")), seq_len)
    if not examples:
        raise InvalidOptionError(f"{p} gives no training example of at least 2 tokens; give it more text")
    return examples


def split_examples(examples: Sequence[Example], *, eval_split: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded random split: ``round(eval_split · n)`` held-out examples (at least one if asked for)."""
    if not 0 <= eval_split < 1:
        raise InvalidOptionError(f"--eval-split must be in [0, 1), got {eval_split}")
    n = len(examples)
    n_eval = 0 if eval_split == 0 else max(1, round(eval_split * n))
    if n - n_eval < 1:
        raise InvalidOptionError(f"{n} examples leave none for training with --eval-split {eval_split}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = sorted(perm[:n_eval])
    train = sorted(perm[n_eval:])
    return [examples[i] for i in train], [examples[i] for i in held]


def global_batch_indices(step: int, *, n: int, size: int, seed: int) -> list[int]:
    """Indices of the ``size`` examples of (0-based) step ``step``: the endless stream of
    per-epoch permutations (epoch ``e`` drawn from ``seed + e + 1``), cut into consecutive batches."""
    start, stop = step * size, (step + 1) * size
    out: list[int] = []
    epoch = start // n
    while len(out) < size:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch + 1)).tolist()
        lo = max(start - epoch * n, 0)
        hi = min(stop - epoch * n, n)
        out += perm[lo:hi]
        epoch += 1
    return out


def collate(batch: Sequence[Example], *, pad_id: int) -> dict[str, Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (IGNORE on padding)."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        k = len(e.input_ids)
        ids[i, :k] = torch.tensor(e.input_ids)
        labels[i, :k] = torch.tensor(e.labels)
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def target_tokens(batch: Sequence[Example]) -> int:
    """How many positions a causal LM is scored on: labels after the first position that are not IGNORE."""
    return sum(sum(1 for lab in e.labels[1:] if lab != IGNORE) for e in batch)
