"""A model on disk: read lazily, and rewritten tensor by tensor into a mirror of itself.

- :class:`ModelReader` opens a Hugging Face model directory (one
  ``model.safetensors``, or shards with ``model.safetensors.index.json``; a diffusers model folder such as a
  pipeline's ``unet/`` has ``diffusion_pytorch_model.safetensors`` and its index instead) or a
  single ``.safetensors`` file. Each header is parsed and checked once; every
  tensor is known by its :class:`~loratools.io.safetensors.Span` and read alone.
- :func:`rewrite_model` writes a model with the same layout (shards, index and
  side files such as config and tokenizer), asking a ``compute`` function for
  each tensor's new value and copying the others byte for byte.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from concurrent.futures import as_completed
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from ..device import cpu_cores, worker_pool
from ..dtypes import check_fits
from ..errors import CorruptFileError, InputNotFoundError, UnsafePathError
from ..validate import MAX_JSON_BYTES, get_field, plain_name
from .paths import copy_opened, read_json
from .safetensors import (CODE_DTYPES, DTYPE_CODES, DTYPE_SIZES, Entry, RowReader, Span, buffer, copy_range,
                          header_bytes, read_safetensors_layout, read_tensor, spans_of, write_at)

__all__ = ["ModelReader", "Progress", "config_path", "read_config", "rewrite_model", "has_weights", "copy_entries", "INDEX_NAME",
           "WEIGHTS_NAME", "CONFIG_NAME", "WEIGHTS_NAMES"]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
#: (single file, shard index) of a model folder: transformers' names, then diffusers' (``ModelMixin.save_pretrained``
#: in diffusers 0.42.1 ``utils/constants.py``: ``SAFETENSORS_WEIGHTS_NAME``, ``SAFE_WEIGHTS_INDEX_NAME``)
WEIGHTS_NAMES = ((WEIGHTS_NAME, INDEX_NAME),
                 ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"))


#: other copies of a model's weights (a diffusers ``fp16`` variant, a pickled ``.bin`` beside the safetensors, Flax
#: or TF weights): a rewrite leaves them out, as they would still hold the unmerged values
_OTHER_WEIGHTS = re.compile(r"^(diffusion_pytorch_model|model|pytorch_model|flax_model|tf_model)([.-][\w.-]*)?"
                            r"\.(safetensors|bin|msgpack|h5)(\.index\.json)?$")


def has_weights(folder: str | os.PathLike[str]) -> bool:
    """True when ``folder`` holds a model's safetensors weights under a name :class:`ModelReader` opens."""
    p = Path(folder)
    return any((p / single).is_file() or (p / index).is_file() for single, index in WEIGHTS_NAMES)


def config_path(model_path: str | os.PathLike[str]) -> Path:
    """Where the ``config.json`` of ``model_path`` lies: inside a model directory, beside a single weights file,
    or ``model_path`` itself when it is a ``.json`` file."""
    p = Path(model_path)
    if p.is_dir():
        return p / CONFIG_NAME
    return p if p.suffix == ".json" else p.parent / CONFIG_NAME


def read_config(model_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The model's ``config.json`` (see :func:`config_path`) as a dict, or None when there is no such file.

    The one reader of a model config: bounded like every JSON file (:func:`loratools.io.read_json`), so
    non-UTF-8 bytes, bad JSON, deep nesting or a value that is not an object raise one
    :class:`CorruptFileError` naming the file; a missing file is None (a base given by its weights alone).

    >>> read_config("fixtures/tiny-llama")["model_type"]          # doctest: +SKIP
    'llama'
    """
    path = config_path(model_path)
    if not path.is_file():
        return None
    data = read_json(path)
    if not isinstance(data, dict):
        raise CorruptFileError(path, f"it holds a JSON {type(data).__name__}, not an object; "
                                     "a model's config.json is one {...} object")
    return data


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
        #: the shard index's file name (transformers' or diffusers'), written back under the same name
        self.index_name = INDEX_NAME
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
        # the first naming whose files are there: a folder holding both is read as transformers'
        names = next(((s, i) for s, i in WEIGHTS_NAMES if (self.path / i).is_file() or (self.path / s).is_file()),
                     WEIGHTS_NAMES[0])
        index, single = self.path / names[1], self.path / names[0]
        self.index_name = names[1]
        if index.is_file():
            raw = read_json(index)
            wmap = get_field(raw, "weight_map", dict, where=index)  # refuses a file that is not an object
            self.index = raw if isinstance(raw, dict) else None
            # a shard name is joined to the model directory, and to OUT when the model is rewritten:
            # only a plain name inside the directory is accepted (never ``../x`` or ``/abs``)
            self.shard_of = {str(k): plain_name(v, where=index, field=f"weight_map[{k!r}]") for k, v in wmap.items()}
            if not self.shard_of:
                raise CorruptFileError(index, "its weight_map lists no tensors")
            if self.index_name in self.shard_of.values():
                raise CorruptFileError(index, f"its weight_map names {self.index_name} as a shard")
            return sorted(set(self.shard_of.values()))
        if single.is_file():
            return [single.name]
        raise CorruptFileError(self.path, f"no {WEIGHTS_NAME} or {INDEX_NAME} (nor diffusers' "
                                          f"{WEIGHTS_NAMES[1][0]}) in this model directory")

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

    def close(self) -> None:
        """Nothing stays open between reads; kept so a reader can be used in ``with``."""

    def __enter__(self) -> "ModelReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _mirror_side_files(model: ModelReader, dest: Path, edits: Mapping[str, Callable[[bytes], bytes]]) -> None:
    """Config, tokenizer, generation config …: copied as they are, or through ``edits[name]`` (bytes → bytes).
    Other files of the model's weights (``diffusion_pytorch_model.fp16.safetensors``, ``pytorch_model.bin`` …)
    are left out: they hold the values before the rewrite.

    Only regular files inside the model's folder are copied (see :func:`_open_side`); a symbolic link
    leading out of it, a link to a directory, a FIFO, device or socket is refused with one line before
    anything is copied through it. An edited file is read up to :data:`~loratools.validate.MAX_JSON_BYTES`.
    """
    weights = set(model.shards) | {model.index_name}
    roots = _side_roots(model.root)
    for item in sorted(model.root.iterdir()):
        if item.name in weights or _OTHER_WEIGHTS.match(item.name):
            continue
        if item.name in edits and not stat.S_ISDIR(os.lstat(item).st_mode):
            fd = _open_side(item, roots)
            with open(fd, "rb") as f:
                size = os.fstat(fd).st_size
                if size > MAX_JSON_BYTES:
                    raise CorruptFileError(item, f"it is {size} bytes, over the {MAX_JSON_BYTES}-byte limit "
                                                 "for a file loratools edits")
                data = f.read(MAX_JSON_BYTES + 1)
            (dest / item.name).write_bytes(edits[item.name](data))
        else:
            _copy_new(item, dest / item.name, roots)


def _side_roots(root: Path) -> tuple[Path, ...]:
    """Where a side file's link may lead: the model's folder, and for a Hub cache snapshot
    (``…/snapshots/REV/``, whose files are links to ``../../blobs/``) that repo's ``blobs/``."""
    real = root.resolve()
    return (real, real.parent.parent / "blobs") if real.parent.name == "snapshots" else (real,)


def _open_side(item: Path, roots: tuple[Path, ...]) -> int:
    """A read-only descriptor of the side file ``item``: a regular file, or a link to a regular file inside ``roots``."""
    fix = ("loratools copies only regular files inside the base model's folder: replace it by a copy of the file, "
           "or remove it")
    st = os.lstat(item)
    target = item
    if stat.S_ISLNK(st.st_mode):
        target = item.resolve()
        if not any(target == r or r in target.parents for r in roots):
            raise UnsafePathError(item, f"is a symbolic link to {target}, outside {roots[0]}; {fix}")
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            raise UnsafePathError(item, f"is a symbolic link to {target}, which does not exist; {fix}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory reached through a symbolic link" if stat.S_ISDIR(st.st_mode) else \
            "a FIFO, device or socket"
        raise UnsafePathError(item, f"is {kind}; {fix}")
    try:
        fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO):
            raise UnsafePathError(item, f"changed into a link or special file while it was opened; {fix}") from None
        raise
    if not os.path.samestat(os.fstat(fd), st):
        os.close(fd)
        raise UnsafePathError(item, f"changed while it was opened; {fix}")
    os.set_blocking(fd, True)
    return fd


def _copy_new(src: Path, dst: Path, roots: tuple[Path, ...]) -> None:
    """``src`` (a regular file, or a real directory and what it holds) copied as new files: 0666/0777 less the umask.

    Not ``copy2``/``copytree``, which carry the source's modes over: a 0644 config from the base
    would be world-readable in an output written under umask 077. Each file is copied at the size
    it has when opened (:func:`~loratools.io.paths.copy_opened`); links and special files as in :func:`_open_side`.
    """
    if stat.S_ISDIR(os.lstat(src).st_mode):
        dst.mkdir()
        for item in sorted(src.iterdir()):
            _copy_new(item, dst / item.name, roots)
        return
    fd = _open_side(src, roots)
    try:
        copy_opened(fd, dst, where=src)
    finally:
        os.close(fd)


def copy_entries(root: Path, dest: Path, *, skip: Iterable[str] = ()) -> tuple[str, ...]:
    """Copy every entry of the folder ``root`` but those named in ``skip`` into ``dest``, as new files (what a
    model's side files get: links only to regular files inside ``root`` or its Hub ``blobs/``, :func:`_open_side`);
    the names copied, in order. A diffusers pipeline's unmerged models and configs are copied so."""
    roots, left = _side_roots(root), set(skip)
    names = []
    for item in sorted(root.iterdir()):
        if item.name in left:
            continue
        _copy_new(item, dest / item.name, roots)
        names.append(item.name)
    return tuple(names)


Pieces = Iterable[Tensor]


def rewrite_model(model: ModelReader, dest: Path, *, codes: Mapping[str, str], metadata: Mapping[str, str],
                  compute: Callable[[str], Pieces | Tensor | None], progress: Progress | None = None,
                  workers: int | None = None, added: Mapping[str, str] | None = None,
                  side_edits: Mapping[str, Callable[[bytes], bytes]] | None = None,
                  dropped: Collection[str] = (), shapes: Mapping[str, tuple[int, ...]] | None = None,
                  ) -> tuple[int, int]:
    """Write ``model`` to ``dest`` with the same layout; ``compute(key)`` gives a tensor's new bytes, or None.

    Side files (config, tokenizer …) are copied, except those named in ``side_edits``, whose
    new bytes are ``side_edits[name](old bytes)`` (a merge to another dtype, or one that unties the
    embeddings, edits ``config.json``). ``added`` maps a tensor new in the output to the tensor it is
    written beside, in that one's shard and shape (``compute`` gives it, or None copies that one's bytes), even
    when that one is dropped; the tensors in ``dropped`` are left out (a dequantized merge drops the scales), and a
    shard left with no tensor is not written (nor named by the index). ``shapes`` gives an output tensor its own
    shape (an added one, or a key whose shape changes: MXFP4's ``P`` for ``P_blocks``, a bitsandbytes ``P.weight``
    (out, in) for its packed bytes); ``compute`` must give every such tensor.

    ``codes`` gives each tensor's output dtype code, so every offset of every
    output shard is known before any tensor is computed: the headers are
    written first, then each tensor goes straight to its planned offset, from
    ``workers`` threads at once (default: the cores this process may use).
    ``compute(key)`` returns the new tensor, or an iterable of contiguous
    pieces whose bytes, in order, make it (a block of rows at a time, so memory
    stays flat); it runs on the worker threads. A tensor it returns None for is
    copied by the kernel (``copy_file_range``), or cast block by block when its
    dtype changes. ``progress`` is told the tensor count first, then each
    tensor done. Returns (tensors computed, tensors copied).
    """
    added = dict(added or {})
    shapes = dict(shapes or {})
    jobs: list[tuple[int, int, Entry]] = []
    fds: list[int] = []
    if model.is_dir:
        dest.mkdir()
        _mirror_side_files(model, dest, side_edits or {})
    total = 0
    try:
        for shard in model.shards:
            keys = _shard_entries(model.shard_keys(shard), model.spans, added, dropped)
            if not keys and model.is_dir and model.shard_keys(shard):
                continue  # every tensor dropped: no shard of nothing
            entries = [Entry(k, codes[k], shapes[k] if k in shapes else model.spans[added.get(k, k)].shape)
                       for k in keys]
            head = header_bytes(entries, {**model.metadata(shard), **metadata})
            fd = os.open(dest / shard if model.is_dir else dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            fds.append(fd)
            offset = write_at(fd, head, 0)
            os.ftruncate(fd, offset + sum(e.nbytes for e in entries))
            for e in entries:
                jobs.append((fd, offset, e))
                offset += e.nbytes
            total += sum(e.nbytes for e in entries)
        changed = _run(model, jobs, compute, progress, workers or min(cpu_cores(), 8), added)
    finally:
        for fd in fds:
            os.close(fd)
    if model.index is not None:
        index = json.loads(json.dumps(model.index))
        index.setdefault("metadata", {})["total_size"] = total
        index.setdefault("weight_map", {}).update({new: model.shard_of[beside] for new, beside in added.items()})
        for key in dropped:
            index["weight_map"].pop(key, None)
        (dest / model.index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return changed, len(jobs) - changed


def _shard_entries(order: Iterable[str], spans: Mapping[str, Span], added: Mapping[str, str],
                   dropped: Collection[str]) -> list[str]:
    """The output keys of one shard, in file order: its kept tensors, each added one right after its neighbour
    (kept or dropped)."""
    after: dict[str, list[str]] = {}
    for new, beside in added.items():
        after.setdefault(beside, []).append(new)
    return [k for key in order if key in spans
            for k in ((key,) if key not in dropped else ()) + tuple(after.get(key, ()))]


def _run(model: ModelReader, jobs: list[tuple[int, int, Entry]], compute: Callable[[str], Pieces | Tensor | None],
         progress: Progress | None, workers: int, added: Mapping[str, str]) -> int:
    """Every tensor written by ``workers`` threads; returns how many were computed. The first error stops the rest."""
    if progress:
        progress(0, total=len(jobs))
    changed = 0
    with worker_pool(workers, "loratools-rewrite") as pool:  # the files stay open until every thread has stopped
        futures = [pool.submit(_write_tensor, model.spans[added.get(e.name, e.name)], fd, offset, e, compute)
                   for fd, offset, e in jobs]
        for fut in as_completed(futures):
            changed += fut.result()
            if progress:
                progress(1)
    return changed


def _write_tensor(span: Span, fd: int, offset: int, e: Entry, compute: Callable[[str], Pieces | Tensor | None]) -> bool:
    """Put tensor ``e`` at ``offset`` of ``fd``; True if it was computed, False if copied."""
    pieces = compute(e.name)
    if pieces is None and tuple(e.shape) != tuple(span.shape):
        raise RuntimeError(f"rewrite_model: {e.name} has a shape of its own, {e.shape}, but was not computed")
    if pieces is None and e.dtype == span.dtype:
        copy_range(span, fd, offset)
        return False
    computed = pieces is not None
    if pieces is None:
        pieces = _cast(span, CODE_DTYPES[e.dtype], e.name)
    elif isinstance(pieces, Tensor):
        pieces = (pieces,)
    written = 0
    try:
        for t in pieces:
            if DTYPE_CODES.get(t.dtype) != e.dtype:
                raise RuntimeError(f"rewrite_model: {e.name} computed as {t.dtype}, planned {e.dtype}")
            t = t.detach().to("cpu").contiguous()
            if written + t.numel() * t.element_size() > e.nbytes:
                raise RuntimeError(f"rewrite_model: {e.name} computed larger than its planned {e.nbytes} bytes")
            written += write_at(fd, t, offset + written)
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:  # a generator stopped early by an error releases what it holds now
            close()
    if written != e.nbytes:
        raise RuntimeError(f"rewrite_model: {e.name} computed as {written} bytes, planned {e.nbytes}")
    return computed


def _cast(span: Span, dtype: torch.dtype, name: str = "") -> Iterator[Tensor]:
    """The tensor at ``span`` converted to ``dtype``, block by block; refused where the cast would overflow.

    A finite value beyond ``dtype``'s range (70000 in float16) would be written as ±inf: the block's
    extremes are checked against the range first, so a cast never makes a non-finite value.
    """
    rows = span.shape[0] if span.shape else 1
    cols = max(1, span.nbytes // max(1, rows) // DTYPE_SIZES[span.dtype])
    step = max(1, (1 << 18) // cols)
    with RowReader(span, rows) as reader:
        for i in range(0, rows, step):
            n = min(step, rows - i)
            block = reader.read(i, n)
            check_fits(name, block, dtype)
            out = buffer("cast", n * cols * dtype.itemsize).view(dtype).reshape(n, -1)
            out.copy_(block)
            yield out
