"""Training and calibration data: read, tokenize, split, and the order examples are seen in.

- ``.txt``: the whole text is tokenized once and packed into ``seq_len`` blocks; every token is a target.
- ``.jsonl`` with ``{"text": …}``: each row tokenized and followed by EOS, then packed likewise.
- ``.jsonl`` with ``{"prompt": …, "completion": …}``: one example per row, ``prompt + completion + EOS``
  truncated to ``seq_len``; only completion tokens (and the EOS) count in the loss.
- ``.jsonl`` with ``{"messages": [{"role": …, "content": …}, …]}`` (chat): one example per row, rendered
  with the tokenizer's chat template and truncated to ``seq_len``; only what each assistant turn adds
  (its content and the template's end-of-turn text) counts in the loss (:func:`encode_chat`).
- ``.json``: rows as in ``.jsonl`` (JSON Lines, or one JSON array of rows), as datasets reads it.

A text, a text row and a prompt begin with BOS when the tokenizer's own encoding puts one there (:func:`_bos`).

The order is a pure function of (seed, step): epoch ``e`` visits the training examples in the
permutation drawn from ``seed + e``, and step ``t`` takes the next ``G`` indices of that endless stream
(``G`` = the global batch). So a resumed run, or one split over N processes, sees exactly the same
examples at the same step.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..errors import CorruptFileError, InputNotFoundError, InvalidOptionError, UnsupportedDataError

__all__ = ["Example", "IGNORE", "Row", "is_json_rows", "read_rows", "load_examples", "row_examples", "split_examples",
           "collate",
           "global_batch_indices", "target_tokens", "encode_chat", "row_example", "examples_digest"]

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


def _bos(tokenizer: Any) -> list[int]:
    """``[BOS]`` when the tokenizer's own encoding begins a text with it (``add_special_tokens=True``: Llama,
    Gemma, Mistral), else ``[]`` (GPT-2, SmolLM2, Qwen). transformers' examples/pytorch/language-modeling/run_clm.py
    encodes every text so, and TRL's SFTTrainer every prompt, as inference does; loratools puts this BOS before
    each document and prompt itself and its own EOS after them (a tokenizer that also appends EOS gets one)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    with_specials = list(tokenizer("a")["input_ids"])
    return [bos] if with_specials[:1] == [bos] and _encode(tokenizer, "a")[:1] != [bos] else []


class Row(NamedTuple):
    """One example of a data file: a ``text``, a prompt (``text``) and its ``completion``, or chat ``messages``."""

    text: str
    completion: str | None = None
    messages: tuple[dict[str, str], ...] | None = None

    @property
    def kind(self) -> str:
        return "chat" if self.messages is not None else ("text" if self.completion is None else "prompt/completion")


_SCHEMAS = '{"text"}, {"prompt", "completion"} or {"messages": [{"role", "content"}, …]}'


def is_json_rows(path: str | Path) -> bool:
    """Whether a data file holds JSON rows rather than plain text: its name ends in ``.jsonl`` or ``.json`` (any
    case). datasets reads both with its json builder (src/datasets/packaged_modules/__init__.py,
    ``_EXTENSION_TO_MODULE``: JSON Lines, or one array of objects), so a ``.json`` file of rows must not be trained
    on as the literal text of its braces and keys."""
    return Path(path).suffix.lower() in (".jsonl", ".json")


def _json_array(p: Path, text: str) -> list[Any]:
    """The elements of a ``.json`` file that is one JSON array (of rows)."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise CorruptFileError(p, f"it is not JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(items, list):
        raise CorruptFileError(p, "it is not one JSON array of rows")
    return items


def _json_row(p: Path, i: int, line: str) -> Row:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise CorruptFileError(p, f"line {i} is not JSON ({e.msg})") from None
    return _row(p, i, obj)


def _row(p: Path, i: int, obj: Any) -> Row:
    """Row ``i`` of a data file (a line of JSON Lines, or an element of a JSON array), parsed."""
    if isinstance(obj, dict) and isinstance(obj.get("text"), str):
        return Row(obj["text"])
    if isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
        return Row(obj["prompt"], obj["completion"])
    msgs = obj.get("messages") if isinstance(obj, dict) else None
    if isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                               and isinstance(m.get("content"), str) for m in msgs):
        return Row("", None, tuple({"role": m["role"], "content": m["content"]} for m in msgs))
    raise UnsupportedDataError(p, i, _what_row(obj), _SCHEMAS)


#: JSON's names of the Python types json.loads gives
_JSON_KINDS = {list: "an array", dict: "an object", int: "a number", float: "a number", bool: "true or false",
               type(None): "null", str: "a string"}


def _what_row(obj: Any) -> str:
    """What an unreadable row is, for its error: the field of a known name whose value is of the wrong type, or
    the keys it has."""
    if not isinstance(obj, dict):
        return f"a row that is {_JSON_KINDS.get(type(obj), type(obj).__name__)}"
    for key in ("text", "prompt", "completion"):
        if key in obj and not isinstance(obj[key], str):
            return f'a row whose "{key}" is {_JSON_KINDS.get(type(obj[key]), "not JSON")}, not a string'
    if "messages" in obj:
        return 'a row whose "messages" are not all {"role": string, "content": string} (at least one)'
    return f"a row with {', '.join(sorted(obj)) or 'no keys'}"


def _render(tokenizer: Any, messages: Sequence[dict[str, str]], *, prompt: bool) -> str:
    return str(tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=prompt))


def encode_chat(tokenizer: Any, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[int]]:
    """``(ids, labels)`` of a chat rendered with the tokenizer's chat template, loss on assistant turns.

    The rendering is cut where each assistant turn starts (the template's render of the turns
    before it with the generation prompt) and ends (the render up to and including it); each piece
    is tokenized on its own, and the assistant pieces are the targets (labels = ids), the rest
    ``IGNORE``. A template whose renders are not prefixes of one another cannot be cut so and is refused.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidOptionError("chat rows ({\"messages\": …}) need a tokenizer with a chat template; this base's "
                                 "tokenizer has none: use {\"prompt\", \"completion\"} rows")
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], prompt=True)
        after = _render(tokenizer, messages[:i + 1], prompt=False)
        if not (before.startswith(done) and after.startswith(before)):
            raise InvalidOptionError("the tokenizer's chat template renders a conversation differently from its "
                                     "beginning, so the assistant turns cannot be cut out; use prompt/completion rows")
        pieces += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    whole = _render(tokenizer, messages, prompt=False)
    pieces.append((whole[len(done):], False))
    ids: list[int] = []
    labels: list[int] = []
    for text, target in pieces:
        t = _encode(tokenizer, text) if text else []
        ids += t
        labels += t if target else [IGNORE] * len(t)
    return ids, labels


def read_rows(path: str | Path, *, what: str = "training data", plain_text: bool = True) -> list[Row]:
    """The examples of a data file: the one reader of training and calibration data.

    A ``.jsonl`` or ``.json`` file (:func:`is_json_rows`) holds one JSON object a line (blank lines skipped), or,
    ``.json`` only, one JSON array of them: ``{"text": …}``, ``{"prompt": …, "completion": …}`` or chat
    ``{"messages": …}``, all strings. Any other file is plain text, one :class:`Row` of its whole content, when
    ``plain_text`` (training); without it every file is read as JSON lines (calibration data, whose rows are
    separate examples). A leading UTF-8 byte-order mark (Windows editors write one) is not part of the text.
    """
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(p, what)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise CorruptFileError(p, f"it is not UTF-8 text (byte {e.object[e.start]:#04x} at line {line}); "
                               "save it as UTF-8") from None
    if plain_text and not is_json_rows(p):
        return [Row(text)]
    if p.suffix.lower() == ".json" and text.lstrip().startswith("["):
        rows = [_row(p, i, obj) for i, obj in enumerate(_json_array(p, text), 1)]
    else:
        # rows end at "\n" only (jsonlines.org): U+2028, U+0085 … may stand unescaped inside a JSON string
        rows = [_json_row(p, i, line) for i, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not rows:
        raise CorruptFileError(p, "it holds no examples")
    return rows


def row_example(tokenizer: Any, row: Row, *, seq_len: int, bos: Sequence[int] | None = None) -> Example | None:
    """One row as one example truncated to ``seq_len`` (None when nothing is left to predict): a text row
    ``text + EOS`` (every token a target), a prompt/completion row (the completion and EOS are targets),
    a chat row (:func:`encode_chat`). ``bos`` is :func:`_bos` of the tokenizer, when the caller has it (a file's
    rows share it: two encodings less a row)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    start = _bos(tokenizer) if bos is None else list(bos)
    if row.messages is not None:
        ids, labels = encode_chat(tokenizer, row.messages)
    elif row.completion is None:
        ids = start + _encode(tokenizer, row.text) + eos
        labels = list(ids)
    else:
        prompt, completion = start + _encode(tokenizer, row.text), _encode(tokenizer, row.completion) + eos
        ids, labels = prompt + completion, [IGNORE] * len(prompt) + completion
    ids, labels = ids[:seq_len], labels[:seq_len]
    return Example(tuple(ids), tuple(labels)) if any(lab != IGNORE for lab in labels[1:]) else None


def load_examples(path: str | Path, tokenizer: Any, *, seq_len: int) -> list[Example]:
    """Read ``path`` (:func:`read_rows`) into examples of at most ``seq_len`` tokens (see the module docstring)."""
    if seq_len < 2:
        raise InvalidOptionError(f"`seq_len` must be at least 2, got {seq_len}")
    p = Path(path)
    rows = read_rows(p)
    bos, eos = _bos(tokenizer), [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if not is_json_rows(p):  # plain text: packed as it is, no EOS added
        examples = _pack(bos + _encode(tokenizer, rows[0].text), seq_len)
    elif all(r.kind == "text" for r in rows):
        examples = _pack([t for r in rows for t in bos + _encode(tokenizer, r.text) + eos], seq_len)
    elif all(r.kind == rows[0].kind for r in rows):  # prompt/completion or chat: one example a row
        examples = [e for r in rows if (e := row_example(tokenizer, r, seq_len=seq_len, bos=bos)) is not None]
    else:
        raise UnsupportedDataError(p, 0, "rows of different kinds (" + ", ".join(sorted({r.kind for r in rows})) + ")",
                                   "one kind of row per file")
    if not examples:
        raise InvalidOptionError(f"{p} gives no training example of at least 2 tokens; give it more text")
    return examples


def row_examples(path: str | Path, tokenizer: Any, *, seq_len: int, what: str) -> list[Example]:
    """The examples of a held-out or eval file: plain text packed as for training (:func:`load_examples`); a JSON-rows
    file (:func:`is_json_rows`) one example a row, whatever each row's kind (calibration and eval files may mix text
    and prompt/completion rows), rows with no token to predict left out."""
    if not is_json_rows(path):
        return load_examples(path, tokenizer, seq_len=seq_len)
    bos = _bos(tokenizer)
    rows = read_rows(path, what=what)
    return [e for r in rows if (e := row_example(tokenizer, r, seq_len=seq_len, bos=bos)) is not None]


def split_examples(examples: Sequence[Example], *, eval_split: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded random split: ``round(eval_split · n)`` held-out examples (at least one if asked for)."""
    if not 0 <= eval_split < 1:
        raise InvalidOptionError(f"`eval_split` must be in [0, 1), got {eval_split}")
    n = len(examples)
    n_eval = 0 if eval_split == 0 else max(1, round(eval_split * n))
    if n - n_eval < 1:
        raise InvalidOptionError(f"{n} examples leave none for training with `eval_split` {eval_split}")
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


def examples_digest(*sets: Sequence[Example]) -> str:
    """SHA-256 of the token ids and labels of ``sets`` (training and held-out examples, in order): what a run
    was trained on, whatever the data file's name, so that a checkpoint resumes only on the same data."""
    h = hashlib.sha256()
    for examples in sets:
        h.update(f"{len(examples)};".encode())
        for e in examples:
            h.update((",".join(map(str, e.input_ids)) + "|" + ",".join(map(str, e.labels)) + ";").encode())
    return h.hexdigest()
