"""A model on disk: read lazily, and rewritten tensor by tensor into a mirror of itself.

- :class:`ModelReader` opens a Hugging Face model directory (one
  ``model.safetensors``, or shards with ``model.safetensors.index.json``) or a
  single ``.safetensors`` file. Each header is parsed and checked once; every
  tensor is known by its :class:`~loratools.io.safetensors.Span` and read alone.
- :func:`rewrite_model` writes a model with the same layout (shards, index and
  side files such as config and tokenizer), asking a ``compute`` function for
  each tensor's new value and copying the others byte for byte.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor

from ..errors import CorruptFileError, InputNotFoundError
from .safetensors import CODE_DTYPES, Entry, ShardWriter, Span, read_safetensors_layout, read_tensor, spans_of

__all__ = ["ModelReader", "Progress", "rewrite_model", "INDEX_NAME", "WEIGHTS_NAME"]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class Progress(Protocol):
    """Told the number of steps first (``progress(0, total=n)``), then each step done (``progress(1)``)."""

    def __call__(self, advance: int = 1, *, total: int | None = None) -> None: ...


class ModelReader:
    """Lazy, read-only view of a model's tensors; every header is parsed and checked once, up front.

    >>> with ModelReader("fixtures/tiny-llama") as model:          # doctest: +SKIP
    ...     w = model.get("model.layers.0.self_attn.q_proj.weight")
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise InputNotFoundError(self.path, "model")
        self.shard_of: dict[str, str] = {}
        self.index: dict[str, Any] | None = None
        self.is_dir = self.path.is_dir()
        if self.is_dir:
            self.root = self.path
            self.shards: list[str] = self._read_index()
        else:
            self.root = self.path.parent
            self.shards = [self.path.name]
        self.spans: dict[str, Span] = {}
        self._meta: dict[str, dict[str, str]] = {}
        self._order: dict[str, list[str]] = {}
        for shard in self.shards:
            f = self.root / shard
            if not f.is_file():
                raise InputNotFoundError(f, "model shard")
            header, self._meta[shard], start = read_safetensors_layout(f)
            spans = spans_of(f, header, start)
            if self.index is None:
                self.shard_of = {k: shard for k in spans}
            else:
                for key, s in self.shard_of.items():
                    if s == shard and key not in spans:
                        raise CorruptFileError(f, f"the index lists {key!r} but the shard lacks it")
            self._order[shard] = sorted(spans, key=lambda k: spans[k].start)
            self.spans.update({k: v for k, v in spans.items() if self.shard_of.get(k) == shard})

    def _read_index(self) -> list[str]:
        index, single = self.path / INDEX_NAME, self.path / WEIGHTS_NAME
        if index.is_file():
            try:
                self.index = json.loads(index.read_text())
                self.shard_of = {str(k): str(v) for k, v in self.index["weight_map"].items()}  # type: ignore[index]
            except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
                raise CorruptFileError(index, f"not a safetensors index ({e.__class__.__name__})") from None
            return sorted(set(self.shard_of.values()))
        if single.is_file():
            return [WEIGHTS_NAME]
        raise CorruptFileError(self.path, f"no {WEIGHTS_NAME} or {INDEX_NAME} in this model directory")

    # -- metadata, no tensor data read --------------------------------------------------
    def keys(self) -> list[str]:
        return list(self.shard_of)

    def __contains__(self, key: object) -> bool:
        return key in self.shard_of

    def shape(self, key: str) -> tuple[int, ...]:
        return self.spans[key].shape

    def dtype_name(self, key: str) -> str:
        """safetensors dtype code, e.g. ``"BF16"``."""
        return self.spans[key].dtype

    def shapes(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """``{key: (dtype code, shape)}`` of every tensor."""
        return {k: (s.dtype, s.shape) for k, s in self.spans.items()}

    def shard_keys(self, shard: str) -> list[str]:
        """Keys of one shard in file order (by data offset)."""
        return list(self._order[shard])

    def metadata(self, shard: str | None = None) -> dict[str, str]:
        return dict(self._meta[shard or self.shards[0]])

    @property
    def files(self) -> list[Path]:
        return [self.root / s for s in self.shards]

    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.spans.values())

    # -- tensor data ----------------------------------------------------------------
    def get(self, key: str) -> Tensor:
        """The tensor ``key``, read alone into fresh memory."""
        return read_tensor(self.spans[key])

    read = get

    def close(self) -> None:
        """Nothing stays open between reads; kept so a reader can be used in ``with``."""

    def __enter__(self) -> "ModelReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _mirror_side_files(model: ModelReader, dest: Path, config: Mapping[str, Any] | None = None) -> None:
    """Config, tokenizer, generation config …: copied as they are; ``config`` changes fields of config.json."""
    weights = set(model.shards) | {INDEX_NAME}
    for item in model.root.iterdir():
        if item.name in weights:
            continue
        if item.is_dir():
            shutil.copytree(item, dest / item.name)
        elif item.name == "config.json" and config:
            data = json.loads(item.read_text())
            (dest / item.name).write_text(json.dumps({**data, **config}, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copy2(item, dest / item.name)


def _compute_workers(device_type: str) -> int:
    """Tensors computed at once: one per core (up to 4) on the CPU, each with one torch thread; 1 on a GPU."""
    return 1 if device_type != "cpu" else max(1, min(4, os.cpu_count() or 1))


def rewrite_model(model: ModelReader, dest: Path, *, codes: Mapping[str, str], metadata: Mapping[str, str],
                  compute: Callable[[str], Tensor | None], progress: Progress | None = None,
                  device_type: str = "cpu", added: Mapping[str, str] | None = None,
                  config: Mapping[str, Any] | None = None) -> tuple[int, int]:
    """Write ``model`` to ``dest`` with the same layout; ``compute(key)`` gives a new tensor or None (copy).

    ``codes`` gives each tensor's output dtype code. ``added`` maps a tensor new in the output to the
    tensor it is written beside, in that one's shard, dtype and shape (``compute`` gives it, or None copies
    that one's bytes); ``config`` changes fields of a model directory's config.json. Tensors are computed on a
    few threads and written, in file order, by one writer thread at most two
    tensors behind, so computing overlaps writing; memory holds a handful of
    tensors at most. ``progress`` is told the tensor count first, then each
    tensor written. Returns (tensors computed, tensors copied).
    """
    added = dict(added or {})
    if model.is_dir:
        dest.mkdir()
        _mirror_side_files(model, dest, config)
        shard_paths = {s: dest / s for s in model.shards}
    else:
        shard_paths = {model.shards[0]: dest}
    if progress:
        progress(0, total=len(model.spans) + len(added))
    counts = [0, 0]
    total = 0
    workers = _compute_workers(device_type)
    with ThreadPoolExecutor(workers, thread_name_prefix="loratools-compute") as cpool, \
            ThreadPoolExecutor(1, thread_name_prefix="loratools-writer") as wpool:
        for shard, path in shard_paths.items():
            keys = [k for k in model.shard_keys(shard) if k in model.spans]
            keys += [new for new, beside in added.items() if beside in keys]
            entries = [Entry(k, codes[added.get(k, k)], model.spans[added.get(k, k)].shape) for k in keys]
            total += sum(e.nbytes for e in entries)
            _write_shard(model, ShardWriter(path, entries, {**model.metadata(shard), **metadata}), entries,
                         compute, cpool, wpool, workers, progress, counts, added)
    if model.index is not None:
        index = json.loads(json.dumps(model.index))
        index.setdefault("metadata", {})["total_size"] = total
        index.setdefault("weight_map", {}).update({new: model.shard_of[beside] for new, beside in added.items()})
        (dest / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return counts[0], counts[1]


def _write_shard(model: ModelReader, w: ShardWriter, entries: list[Entry], compute: Callable[[str], Tensor | None],
                 cpool: ThreadPoolExecutor, wpool: ThreadPoolExecutor, workers: int, progress: Progress | None,
                 counts: list[int], added: Mapping[str, str]) -> None:
    """Tensors computed ``workers`` at a time, written in order by ``wpool``."""
    writes: deque[Future[None]] = deque()
    computes: deque[tuple[Entry, Future[Tensor | None]]] = deque()

    def write_next() -> None:
        e, fut = computes.popleft()
        t, span = fut.result(), model.spans[added.get(e.name, e.name)]
        if t is not None:
            writes.append(wpool.submit(w.write, e.name, t.to(CODE_DTYPES[e.dtype])))
        elif e.dtype == span.dtype:
            writes.append(wpool.submit(w.copy_from, e.name, span))
        else:
            writes.append(wpool.submit(w.write, e.name, read_tensor(span).to(CODE_DTYPES[e.dtype])))
        while len(writes) > 2:
            writes.popleft().result()
        if progress:
            progress(1)
        counts[0 if t is not None else 1] += 1

    try:
        for e in entries:
            computes.append((e, cpool.submit(compute, e.name)))
            while len(computes) > workers:
                write_next()
        while computes:
            write_next()
        while writes:
            writes.popleft().result()
        w.close()
    except BaseException:
        for _, fut in computes:
            fut.cancel()
        for fut in [f for _, f in computes] + list(writes):  # let the threads stop before the file closes
            with contextlib.suppress(BaseException):
                fut.result()
        w.abort()
        raise
