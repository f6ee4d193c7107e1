"""Merge adapters into a base model, take them back out, and check a merge.

Merging adds each adapter's low-rank update to the weight it adapts::

    W = cast(W0 + Σᵢ wᵢ·ΔWᵢ)        un-merging:   W0 ≈ cast(W − Σᵢ wᵢ·ΔWᵢ)

with every ΔWᵢ formed and summed in float32 (or float64) and a single cast to
the output dtype at the end. The pure pieces (:func:`delta_sum`,
:func:`merged_tensor`, :func:`plan_merge`) work on tensors and adapters; the
IO-edge orchestrators (:func:`merge_model`, :func:`unmerge_model`,
:func:`verify_merge`) stream a model tensor by tensor through them, so memory
holds one base tensor plus the adapters whatever the model's size.

A merge can also write a *record* (see :mod:`loratools.record`): what the
final cast lost, so that ``unmerge_model(..., record=...)`` restores the base
bit for bit, even in bfloat16.

>>> from loratools import read_adapter
>>> ad = read_adapter("fixtures/adapters/lora")                         # doctest: +SKIP
>>> merge_model("fixtures/tiny-llama", [(ad, 1.0)], "merged")           # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .adapter import Adapter, Module
from .device import resolve_device
from .errors import (CorruptFileError, InvalidOptionError, MissingModuleError, NonFiniteError,
                     ShapeMismatchError, VerificationError, WrongBaseError)
from .io import INDEX_NAME, ModelReader, atomic_output, check_output
from .record import apply_patch, bits, make_patch, tensor_sha256
from .writer import CODE_DTYPES, DTYPE_CODES, Entry, ShardWriter, Span, read_tensor, tensor_spans

__all__ = [
    "AdapterInput", "TensorPlan", "MergeReport", "VerifyReport", "ModuleCheck",
    "delta_sum", "low_rank", "merged_tensor", "unmerged_tensor", "plan_merge", "saved_base_key", "tolerance",
    "merge_model", "unmerge_model", "verify_merge", "METADATA_KEY",
]

METADATA_KEY = "loratools.merge"
Progress = Callable[[int], None]


# --------------------------------------------------------------------------- pure pieces

@dataclass(frozen=True)
class AdapterInput:
    """One adapter to merge, with its weight wᵢ and a label (its path) for the output's metadata."""

    adapter: Adapter
    weight: float = 1.0
    label: str = ""

    def describe(self) -> dict[str, Any]:
        return {"source": self.label, "weight": self.weight, "method": self.adapter.method,
                "fingerprint": self.adapter.fingerprint.sha256}


def _inputs(adapters: Sequence[AdapterInput | tuple[Adapter, float] | Adapter]) -> list[AdapterInput]:
    out = []
    for a in adapters:
        if isinstance(a, AdapterInput):
            out.append(a)
        elif isinstance(a, Adapter):
            out.append(AdapterInput(a))
        else:
            out.append(AdapterInput(a[0], float(a[1])))
    if not out:
        raise InvalidOptionError("give at least one adapter")
    return out


def delta_sum(parts: Sequence[tuple[Module, float]], *, precision: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> Tensor:
    """Σᵢ wᵢ·ΔWᵢ in ``precision`` on ``device``, in the base weight's layout.

    >>> m = Module(A=torch.ones(1, 2), B=torch.ones(3, 1), alpha=1, scale=1.0)
    >>> delta_sum([(m, 2.0), (m, -0.5)]).tolist()
    [[1.5, 1.5], [1.5, 1.5], [1.5, 1.5]]
    """
    total: Tensor | None = None
    for module, weight in parts:
        d = module.delta(dtype=precision, device=device)
        if weight != 1.0:
            d = d * weight
        total = d if total is None else total + d
    if total is None:
        raise ValueError("delta_sum needs at least one module")
    return total


def low_rank(module: Module, coeff: float = 1.0, *, precision: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """``(L, R)`` with ``coeff·ΔW = L @ R`` as a matrix of the base weight's own rows.

    For weights stored (out, in) (linear, conv flattened) that is ``(B', coeff·A')``;
    for (in, out) layouts (``fan_in_fan_out``, embeddings) ``(A'ᵀ, coeff·B'ᵀ)``.
    Row blocks of W are then updated by row blocks of L, never forming ΔW whole.
    """
    B, A = module.factors(dtype=precision, device=device)
    if module.kind == "embedding" or module.fan_in_fan_out:
        B, A = A.T.contiguous(), B.T.contiguous()
    return B, (A * coeff if coeff != 1.0 else A)


_BLOCK_ELEMS = 1 << 18  # rows per block so one float32 block (≈ 1 MB) stays in cache while it is updated


def merged_tensor(w0: Tensor, parts: Sequence[tuple[Module, float]], *, sign: float = 1.0,
                  dtype: torch.dtype | None = None, precision: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> Tensor:
    """``cast(W0 + sign·Σᵢ wᵢ·ΔWᵢ)`` on ``device``: summed in ``precision``, cast once to ``dtype`` (W0's by default).

    On the CPU the rows are processed in cache-sized blocks: convert, add each
    low-rank product (``addmm``), cast — one pass over memory instead of five.

    >>> m = Module(A=torch.ones(1, 2), B=torch.ones(3, 1), alpha=1, scale=1.0)
    >>> merged_tensor(torch.zeros(3, 2, dtype=torch.bfloat16), [(m, 0.5)]).tolist()
    [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]
    """
    dev = torch.device(device) if device is not None else w0.device
    factors = [low_rank(m, sign * wt, precision=precision, device=dev) for m, wt in parts]
    rows = factors[0][0].shape[0] if factors else (w0.shape[0] if w0.ndim else 1)
    w = w0.reshape(rows, -1)
    out = torch.empty(w.shape, dtype=dtype or w0.dtype, device=dev)
    step = rows if dev.type != "cpu" else max(1, _BLOCK_ELEMS // max(1, w.shape[1]))
    limit = torch.finfo(out.dtype).max if out.dtype.is_floating_point else math.inf
    narrow = limit < 1e30  # float16 output (max 65504): a finite sum can still overflow the cast
    for i in range(0, rows, step):
        acc = w[i:i + step].to(device=dev, dtype=precision, copy=True)
        for L, R in factors:
            acc.addmm_(L[i:i + step], R)
        # NaN/Inf (from W0 or the sum) make the block's sum non-finite; only then (or for float16) look closer
        if acc.numel() and (narrow or not bool(torch.isfinite(acc.sum()))) and not bool(acc.abs().amax() <= limit):
            raise NonFiniteError("the merged tensor", f"rows {i}–{i + acc.shape[0]}")
        out[i:i + step] = acc
    return out.reshape(w0.shape)


def unmerged_tensor(w: Tensor, parts: Sequence[tuple[Module, float]], **options: Any) -> Tensor:
    """``cast(W − Σᵢ wᵢ·ΔWᵢ)``, computed exactly like :func:`merged_tensor` (same blocks, same order)."""
    return merged_tensor(w, parts, sign=-1.0, **options)


def saved_base_key(key: str) -> str:
    """The base weight a PEFT ``modules_to_save`` tensor replaces.

    peft 0.21.2 saves ``base_model.model.lm_head.weight``; older files carry
    ``…lm_head.modules_to_save.default.weight``. Both map to ``lm_head.weight``.
    """
    key = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
    return re.sub(r"\.modules_to_save\.[^.]+(?=\.)", "", key)


@dataclass(frozen=True)
class TensorPlan:
    """What happens to one base tensor: replaced by a saved tensor, and/or Σ wᵢ·ΔWᵢ added."""

    key: str
    deltas: tuple[tuple[Module, float], ...] = ()
    replace: Tensor | None = None


def plan_merge(shapes: Mapping[str, tuple[str, tuple[int, ...]]], adapters: Sequence[AdapterInput]) -> dict[str, TensorPlan]:
    """Check every adapter against the base's ``{key: (dtype code, shape)}`` and plan each changed tensor.

    Raises, naming the first offending module: :class:`WrongBaseError` when none
    of an adapter's modules is in the base, :class:`MissingModuleError`,
    :class:`ShapeMismatchError`, :class:`NonFiniteError`.
    """
    deltas: dict[str, list[tuple[Module, float]]] = {}
    replace: dict[str, Tensor] = {}
    for inp in adapters:
        ad = inp.adapter
        for name, m in ad.items():  # NaN/Inf anywhere makes a sum non-finite: one cheap pass per factor
            for label, t in (("lora_A", m.A), ("lora_B", m.B), ("lora_E", m.E)):
                if t is not None and t.is_floating_point():
                    _check_finite(name, t, label)
        for skey, t in ad.saved.items():
            if t.is_floating_point():
                _check_finite(skey, t, "the adapter")
        if not math.isfinite(inp.weight):
            raise InvalidOptionError(f"weight {inp.weight} for {inp.label or 'an adapter'} is not a finite number")
        names = list(ad.modules)
        if names and not any(f"{n}.weight" in shapes for n in names):
            raise WrongBaseError(f"none of its {len(names)} modules is in the base (first: {names[0]}.weight); "
                                 "check that BASE is the model the adapter was trained on")
        for name, m in ad.items():
            key = f"{name}.weight"
            if key not in shapes:
                raise MissingModuleError(key, "the base model", "wrong base model, or a different architecture")
            code, shape = shapes[key]
            if tuple(shape) != tuple(m.weight_shape):
                raise ShapeMismatchError(name, f"the base's {tuple(shape)}", f"{tuple(m.weight_shape)} from the adapter",
                                         "wrong base model (a different size?)")
            if CODE_DTYPES.get(code) not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                raise InvalidOptionError(f"{key} is stored as {code}; only float tensors can be merged into")
            if m.rank > 0:  # a rank-0 AdaLoRA module adds exactly nothing: leave that tensor byte for byte
                deltas.setdefault(key, []).append((m, inp.weight))
        for skey, t in ad.saved.items():
            key = saved_base_key(skey)
            if key not in shapes:
                raise MissingModuleError(key, "the base model", f"the adapter's full tensor {skey} replaces it")
            if tuple(shapes[key][1]) != tuple(t.shape):
                raise ShapeMismatchError(key, f"the base's {tuple(shapes[key][1])}", f"{tuple(t.shape)} in {skey}")
            if inp.weight != 1.0:
                raise InvalidOptionError(f"{inp.label or 'the adapter'} replaces {key} (modules_to_save), "
                                         "which cannot be weighted; use --weight 1")
            if key in replace:
                raise InvalidOptionError(f"two adapters both replace {key} (modules_to_save); merge them one at a time")
            replace[key] = t
    return {k: TensorPlan(k, tuple(deltas.get(k, ())), replace.get(k)) for k in sorted(set(deltas) | set(replace))}


def tolerance(exact: Tensor, w0: Tensor, delta: Tensor, dtype: torch.dtype) -> Tensor:
    """Allowed |merged − exact| per element for a merge stored in ``dtype``.

    One ulp of ``dtype`` at the exact value (rounding to nearest gives ½; a
    tool that adds in ``dtype`` rounds twice), plus float32 summation slack
    8·ε₃₂·(|W0| + |ΔW|), plus ``dtype``'s smallest normal for values near 0.
    """
    fi = torch.finfo(dtype)
    eps32 = torch.finfo(torch.float32).eps
    return fi.eps * exact.abs() + 8 * eps32 * (w0.abs() + delta.abs()) + fi.smallest_normal


def jitter(t: Tensor, *, seed: int = 0, ulps: int = 2) -> Tensor:
    """``t`` with each element moved by a random whole number of ulps in [−ulps, ulps] (sign kept).

    Un-merging gives W0' with cast(W0' + ΔW) = W, a fixed point of the
    merge→unmerge round trip, so re-running the round trip on W0' itself would
    always report no error. The true W0 has generic low bits; so has this.
    """
    b = bits(t).to(torch.int64)
    width = t.element_size() * 8
    sign = torch.tensor(1 << (width - 1), dtype=torch.int64)
    mag = torch.where(b < 0, b + (1 << width), b)  # unsigned bit pattern
    neg = mag >= sign
    mag = mag - neg.to(torch.int64) * sign
    g = torch.Generator().manual_seed(seed)
    step = torch.randint(-ulps, ulps + 1, t.shape, generator=g, dtype=torch.int64)
    finite = torch.isfinite(t)
    mag = torch.where(finite & (mag > ulps), mag + step, mag)
    out = mag + neg.to(torch.int64) * sign
    out = torch.where(out >= sign, out - (1 << width), out)
    return out.to(bits(t).dtype).view(t.dtype)


def _ulp(t: Tensor) -> Tensor:
    a = t.abs()
    return (torch.nextafter(a, torch.full_like(a, math.inf)) - a).to(torch.float64)


# --------------------------------------------------------------------------- reports

@dataclass(frozen=True)
class MergeReport:
    """What a merge or an un-merge did and, for an un-merge, how exact it is."""

    output: Path
    op: str
    adapted: int
    copied: int
    nbytes: int
    record: Path | None = None
    record_nbytes: int = 0
    exact: bool | None = None
    #: un-merge without a record: error measured by re-running merge→unmerge on the result (see unmerge_model)
    est_max_abs_error: float = 0.0
    est_rel_error: float = 0.0
    #: un-merge without a record: a guaranteed per-element bound, ½ulp(W) + ½ulp(W0') at the worst element
    error_bound: float = 0.0
    adapters: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["output"], d["record"] = str(self.output), (str(self.record) if self.record else None)
        d["record_fraction"] = self.record_nbytes / self.nbytes if self.nbytes else 0.0
        return d


@dataclass(frozen=True)
class ModuleCheck:
    key: str
    max_abs: float
    ratio: float  # max |merged − exact| / tolerance; > 1 fails


@dataclass(frozen=True)
class VerifyReport:
    modules: list[ModuleCheck]
    untouched_mismatches: list[str]
    dtype: str

    @property
    def worst(self) -> ModuleCheck | None:
        return max(self.modules, key=lambda m: m.ratio, default=None)

    @property
    def max_abs(self) -> float:
        return max((m.max_abs for m in self.modules), default=0.0)

    @property
    def ok(self) -> bool:
        return not self.untouched_mismatches and all(m.ratio <= 1.0 for m in self.modules)

    def check(self) -> None:
        """Raise :class:`VerificationError` naming the worst tensor unless :attr:`ok`."""
        if self.ok:
            return
        w = self.worst
        why = (f"{w.key} deviates by {w.max_abs:.3g}, {w.ratio:.3g}× the {self.dtype} rounding tolerance"
               if w is not None and w.ratio > 1 else f"{self.untouched_mismatches[0]} differs from the base")
        raise VerificationError(why)

    def to_json(self) -> dict[str, Any]:
        w = self.worst
        return {"ok": self.ok, "dtype": self.dtype, "max_abs": self.max_abs, "worst": w.key if w else None,
                "worst_ratio": w.ratio if w else 0.0, "untouched_mismatches": self.untouched_mismatches,
                "modules": [m.__dict__ for m in self.modules]}


# --------------------------------------------------------------------------- IO edge

class _Model:
    """A model's tensors as spans, shard by shard (all headers checked up front)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.reader = ModelReader(path)
        self.spans: dict[str, Span] = {}
        self.meta: dict[str, dict[str, str]] = {}
        for shard in self.reader.shards:
            spans, meta = tensor_spans(self.reader.root / shard)
            self.meta[shard] = meta
            for k, s in spans.items():
                if self.reader.shard_of.get(k) == shard:
                    self.spans[k] = s
        self.is_dir = self.reader.path.is_dir()

    def shapes(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {k: (s.dtype, s.shape) for k, s in self.spans.items()}

    def read(self, key: str) -> Tensor:
        return read_tensor(self.spans[key])

    @property
    def nbytes(self) -> int:
        return sum(s.end - s.start for s in self.spans.values())


def _out_code(code: str, dtype: torch.dtype | None) -> str:
    if dtype is None or CODE_DTYPES.get(code) not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        return code
    return DTYPE_CODES[dtype]


def _check_finite(key: str, t: Tensor, where: str) -> None:
    # a sum is NaN/Inf whenever an element is, and costs far less than isfinite() on 16-bit floats;
    # only when the sum is not finite (or overflowed) is the element-wise check run
    if bool(torch.isfinite(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32))):
        return
    if not bool(torch.isfinite(t).all()):
        raise NonFiniteError(key, where)


def _compute_workers(device: torch.device) -> int:
    """Tensors computed at once: one per core (up to 4) on the CPU, each with one torch thread; 1 on a GPU."""
    return 1 if device.type != "cpu" else max(1, min(4, os.cpu_count() or 1))


def _write_model(model: _Model, tmp: Path, *, dtype: torch.dtype | None, metadata: dict[str, str],
                 compute: Callable[[str], Tensor | None], progress: Progress | None,
                 device: torch.device) -> tuple[int, int]:
    """Write ``model`` to ``tmp`` with the same layout; ``compute(key)`` gives a new tensor or None (copy).

    Tensors are computed on a few threads (see :func:`_compute_workers`) and
    written, in file order, by one writer thread at most two tensors behind, so
    that computing overlaps writing; memory holds a handful of tensors at most.
    Returns (tensors computed, tensors copied).
    """
    changed = copied = 0
    shard_paths: dict[str, Path]
    if model.is_dir:
        tmp.mkdir()
        weights = set(model.reader.shards) | {INDEX_NAME}
        for item in model.reader.root.iterdir():  # config, tokenizer, generation config …: copied as they are
            if item.name in weights:
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        shard_paths = {s: tmp / s for s in model.reader.shards}
    else:
        shard_paths = {model.reader.shards[0]: tmp}
    total = 0
    workers = _compute_workers(device)
    writes: deque[Future[None]] = deque()
    computes: deque[tuple[Entry, Future[Tensor | None]]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="loratools-compute") as cpool, \
            ThreadPoolExecutor(1, thread_name_prefix="loratools-writer") as wpool:
        for shard, path in shard_paths.items():
            keys = [k for k in model.reader.shard_keys(shard) if k in model.spans]
            entries = [Entry(k, _out_code(model.spans[k].dtype, dtype), model.spans[k].shape) for k in keys]
            total += sum(e.nbytes for e in entries)
            w = ShardWriter(path, entries, {**model.meta[shard], **metadata})

            def write_next() -> tuple[int, int]:
                e, fut = computes.popleft()
                t, span = fut.result(), model.spans[e.name]
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
                return (1, 0) if t is not None else (0, 1)

            try:
                for e in entries:  # tensors are computed ``workers`` at a time, written in order
                    computes.append((e, cpool.submit(compute, e.name)))
                    while len(computes) > workers:
                        c, k = write_next()
                        changed, copied = changed + c, copied + k
                while computes:
                    c, k = write_next()
                    changed, copied = changed + c, copied + k
                while writes:
                    writes.popleft().result()
                w.close()
            except BaseException:
                for _, fut in computes:
                    fut.cancel()
                for fut in [f for _, f in computes] + list(writes):  # let the threads stop before the file closes
                    with contextlib.suppress(BaseException):
                        fut.result()
                computes.clear()
                writes.clear()
                w.abort()
                raise
    if model.reader.index is not None:
        index = json.loads(json.dumps(model.reader.index))
        index.setdefault("metadata", {})["total_size"] = total
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return changed, copied


@contextlib.contextmanager
def _compute_threads(device: torch.device) -> Iterator[None]:
    """One torch thread per compute thread for CPU merges.

    The blocked kernel issues many small ops while the writer thread copies
    bytes; with several OpenMP threads every op waits at a barrier for a thread
    the writer (or another process) has descheduled — measured 6× slower on 2
    cores than one torch thread beside the writer. Parallelism comes from
    computing whole tensors on separate threads instead.
    """
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _precision(name: str | torch.dtype) -> torch.dtype:
    p = {"float32": torch.float32, "float64": torch.float64}.get(name, name) if isinstance(name, str) else name
    if p not in (torch.float32, torch.float64):
        raise InvalidOptionError(f"precision {name!r} is not float32 or float64")
    return p  # type: ignore[return-value]


def _recon(w: Tensor, plan: TensorPlan, dtype: torch.dtype, precision: torch.dtype, device: torch.device) -> Tensor:
    """What an un-merge computes for this tensor before any record is applied."""
    if not plan.deltas:
        return w.to(dtype)
    return unmerged_tensor(w, plan.deltas, dtype=dtype, precision=precision, device=device).cpu()


def merge_model(base: str | os.PathLike[str], adapters: Sequence[AdapterInput | tuple[Adapter, float] | Adapter],
                out: str | os.PathLike[str], *, dtype: torch.dtype | None = None, device: str | torch.device = "auto",
                precision: str | torch.dtype = torch.float32, record: str | os.PathLike[str] | None = None,
                force: bool = False, extra_inputs: Sequence[str | os.PathLike[str]] = (),
                progress: Progress | None = None) -> MergeReport:
    """Write ``out`` = ``base`` with W = cast(W0 + Σ wᵢ·ΔWᵢ) for every adapted weight, streaming.

    ``out`` mirrors ``base`` (same shards, index and non-weight files); untouched
    tensors are copied byte for byte. ``modules_to_save`` tensors replace the base's.
    Everything is checked before a byte is written. With ``record``, also writes
    the sidecar that lets :func:`unmerge_model` restore ``base`` bit for bit
    (the output dtype must then be the base's).
    """
    inputs = _inputs(adapters)
    dev, prec = resolve_device(device), _precision(precision)
    model = _Model(base)
    plan = plan_merge(model.shapes(), inputs)
    if record is not None and dtype is not None and any(CODE_DTYPES.get(s.dtype) != dtype for s in model.spans.values()
                                                         if s.dtype in ("F32", "F16", "BF16", "F64")):
        raise InvalidOptionError("--record restores the base only when the dtype is kept; drop --dtype or --record")
    record_path = Path(record) if record is not None else None
    guard = (base, *extra_inputs, *([record_path] if record_path else []))
    hashes: dict[str, str] = {}
    # the record's tensors are appended to a scratch file as they come and copied into the record at the end:
    # memory stays flat whatever the record's size
    rec_entries: list[Entry] = []
    rec_lock = threading.Lock()
    scratch = (record_path.parent / f".{record_path.name}.scratch-{os.getpid()}") if record_path else None
    meta = {METADATA_KEY: json.dumps({"op": "merge", "adapters": [i.describe() for i in inputs],
                                      "precision": str(prec).replace("torch.", ""), "device": dev.type})}

    def compute(key: str) -> Tensor | None:
        p = plan.get(key)
        if p is None:
            return None
        w0 = model.read(key)
        out_dtype = CODE_DTYPES[_out_code(model.spans[key].dtype, dtype)]
        start = p.replace if p.replace is not None else w0
        try:
            w = (merged_tensor(start, p.deltas, dtype=out_dtype, precision=prec, device=dev).cpu() if p.deltas
                 else start.to(out_dtype))
        except NonFiniteError:
            _check_finite(key, w0, "the base model")
            raise NonFiniteError(key, f"the merge (the sum overflows {out_dtype})") from None
        if scratch is not None:
            patch = make_patch(w0, _recon(w, p, w0.dtype, prec, dev))
            digest = tensor_sha256(w0)
            with rec_lock:
                hashes[key] = digest
                with scratch.open("ab") as f:
                    for k, t in patch.items():
                        t = t.contiguous()
                        f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                        rec_entries.append(Entry(f"{key}::{k}", DTYPE_CODES[t.dtype], tuple(t.shape)))
        return w

    if record_path is not None:
        check_output(record_path, force=force, inputs=(out, base, *extra_inputs), what="--record")
    try:
        with atomic_output(out, force=force, inputs=guard) as tmp:
            if scratch is not None:
                scratch.write_bytes(b"")
            with _compute_threads(dev):
                changed, copied = _write_model(model, tmp, dtype=dtype, metadata=meta, compute=compute,
                                               progress=progress, device=dev)
            if record_path is not None and scratch is not None:
                rmeta = {"loratools.record": "1", "sha256": json.dumps(hashes), **meta}
                with atomic_output(record_path, force=force, inputs=(base, *extra_inputs)) as rtmp:
                    with ShardWriter(rtmp, rec_entries, rmeta) as rw:
                        pos = 0
                        for e in rec_entries:
                            rw.copy_from(e.name, Span(scratch, e.dtype, e.shape, pos, pos + e.nbytes))
                            pos += e.nbytes
    finally:
        if scratch is not None:
            with contextlib.suppress(FileNotFoundError):
                scratch.unlink()
    rbytes = sum(e.nbytes for e in rec_entries)
    return MergeReport(Path(out), "merge", changed, copied, model.nbytes, record_path, rbytes,
                       adapters=[i.describe() for i in inputs])


def _read_record(path: Path, inputs: Sequence[AdapterInput]) -> tuple[dict[str, dict[str, Span]], dict[str, str],
                                                                       dict[str, Any]]:
    """The record's patches as spans (each read when its tensor comes), its hashes and merge info."""
    tensors, meta = tensor_spans(path)
    if meta.get("loratools.record") != "1" or METADATA_KEY not in meta:
        raise CorruptFileError(path, "not a loratools merge record (made by `loratools merge --record`)")
    info = json.loads(meta[METADATA_KEY])
    made = [(a["fingerprint"], float(a["weight"])) for a in info["adapters"]]
    given = [(i.adapter.fingerprint.sha256, i.weight) for i in inputs]
    if made != given:
        raise WrongBaseError(f"the record {path} was made for other adapters or weights; "
                             "give the same ADAPTERs and --weight values as the merge")
    patches: dict[str, dict[str, Span]] = {}
    for k, t in tensors.items():
        key, _, part = k.rpartition("::")
        patches.setdefault(key, {})[part] = t
    return patches, json.loads(meta["sha256"]), info


def unmerge_model(merged: str | os.PathLike[str], adapters: Sequence[AdapterInput | tuple[Adapter, float] | Adapter],
                  out: str | os.PathLike[str], *, device: str | torch.device = "auto",
                  precision: str | torch.dtype = torch.float32, record: str | os.PathLike[str] | None = None,
                  force: bool = False, extra_inputs: Sequence[str | os.PathLike[str]] = (),
                  progress: Progress | None = None) -> MergeReport:
    """Write ``out`` with W0 = cast(W − Σ wᵢ·ΔWᵢ) for every adapted weight, streaming.

    With ``record`` (from ``merge_model(record=...)``) the result is the base bit
    for bit, checked against the sha256 of each restored tensor. Without it, the
    report carries an honest error figure: the true W0 is unknown, so the
    merge→unmerge round trip is re-run on the result W0' (which has W0's
    magnitudes to within an ulp): ``est_max_abs_error`` = max |W0'' − W0'| and
    ``est_rel_error`` = ‖W0'' − W0'‖F / ‖W0'‖F over the adapted tensors (W0'
    jittered by ±2 ulps first, see :func:`jitter`), plus
    ``error_bound`` = max ½ulp(W) + ½ulp(W0'), which the true error never exceeds
    (up to the float32 rounding of ΔW).
    """
    inputs = _inputs(adapters)
    dev = resolve_device(device)
    model = _Model(merged)
    plan = plan_merge(model.shapes(), inputs)
    stamp = model.meta[model.reader.shards[0]].get(METADATA_KEY)
    if stamp:  # the merged model says which adapters went in: refuse a different one
        went_in = {a["fingerprint"] for a in json.loads(stamp).get("adapters", [])}
        for i in inputs:
            if went_in and i.adapter.fingerprint.sha256 not in went_in:
                raise WrongBaseError(f"{merged} records the adapters merged into it, and {i.label or 'this adapter'} "
                                     "is not one of them")
    record_path = Path(record) if record is not None else None
    patches: dict[str, dict[str, Span]] = {}
    hashes: dict[str, str] = {}
    prec = _precision(precision)
    if record_path is not None:
        patches, hashes, info = _read_record(record_path, inputs)
        prec = _precision(info.get("precision", "float32"))
        missing = sorted(set(plan) - set(hashes))
        if missing:
            raise CorruptFileError(record_path, f"it holds nothing for {missing[0]}")
    else:
        replaced = [k for k, p in plan.items() if p.replace is not None]
        if replaced:
            raise InvalidOptionError(f"the adapter replaced {replaced[0]} (modules_to_save); only the record of the "
                                     "merge (--record) can give the original back")
    stats = {"max": 0.0, "sq": 0.0, "ref": 0.0, "bound": 0.0}
    lock = threading.Lock()

    def compute(key: str) -> Tensor | None:
        p = plan.get(key)
        if p is None:
            return None
        w = model.read(key)
        try:
            r = _recon(w, p, w.dtype, prec, dev)
        except NonFiniteError:
            _check_finite(key, w, "the merged model")
            raise NonFiniteError(key, "the un-merge") from None
        if record_path is not None:
            r = apply_patch(r, {part: read_tensor(span) for part, span in patches.get(key, {}).items()})
            if tensor_sha256(r) != hashes[key]:
                raise CorruptFileError(record_path, f"restoring {key} did not give the base's bits back; un-merge on the "
                                                    "same kind of device as the merge (or the MERGED model was changed)")
            return r
        if p.deltas:  # the round trip re-run on a stand-in base measures what this dtype loses
            probe = jitter(r, seed=len(key))
            opts = {"precision": prec, "device": dev}
            again = unmerged_tensor(merged_tensor(probe, p.deltas, **opts), p.deltas, **opts).cpu().to(torch.float64)
            err = again - probe.to(torch.float64)
            figures = (float(err.abs().max()), float((err * err).sum()), float((r.to(torch.float64) ** 2).sum()),
                       float((0.5 * _ulp(w) + 0.5 * _ulp(r)).max()))
            with lock:  # compute runs on several threads
                stats["max"] = max(stats["max"], figures[0])
                stats["sq"] += figures[1]
                stats["ref"] += figures[2]
                stats["bound"] = max(stats["bound"], figures[3])
        return r

    with atomic_output(out, force=force, inputs=(merged, *extra_inputs, *([record_path] if record_path else []))) as tmp:
        meta = {METADATA_KEY: json.dumps({"op": "unmerge", "adapters": [i.describe() for i in inputs],
                                          "precision": str(prec).replace("torch.", ""), "device": dev.type,
                                          "exact": record_path is not None})}
        with _compute_threads(dev):
            changed, copied = _write_model(model, tmp, dtype=None, metadata=meta, compute=compute,
                                           progress=progress, device=dev)
    rel = math.sqrt(stats["sq"] / stats["ref"]) if stats["ref"] else 0.0
    exact = True if record_path is not None else None
    return MergeReport(Path(out), "unmerge", changed, copied, model.nbytes, record_path,
                       record_path.stat().st_size if record_path else 0, exact, stats["max"], rel, stats["bound"],
                       adapters=[i.describe() for i in inputs])


def verify_merge(base: str | os.PathLike[str], adapters: Sequence[AdapterInput | tuple[Adapter, float] | Adapter],
                 merged: str | os.PathLike[str], *, device: str | torch.device = "auto",
                 precision: str | torch.dtype = torch.float32, progress: Progress | None = None) -> VerifyReport:
    """Check ``merged`` against ``base`` + Σ wᵢ·ΔWᵢ, tensor by tensor.

    For each adapted weight: the largest |merged − exact| (exact = W0 + Σ wᵢ·ΔWᵢ
    in ``precision``) and its ratio to :func:`tolerance` (> 1 fails). Every other
    tensor must equal the base's, cast to the merged dtype.
    """
    inputs = _inputs(adapters)
    dev, prec = resolve_device(device), _precision(precision)
    b, m = _Model(base), _Model(merged)
    plan = plan_merge(b.shapes(), inputs)
    if set(b.spans) != set(m.spans):
        extra = sorted(set(b.spans) ^ set(m.spans))
        raise WrongBaseError(f"the merged model and the base hold different tensors (first: {extra[0]})")
    checks: list[ModuleCheck] = []
    bad: list[str] = []
    dtype_names = set()
    for key in sorted(b.spans):
        if b.spans[key].shape != m.spans[key].shape:
            raise ShapeMismatchError(key, b.spans[key].shape, m.spans[key].shape, "MERGED is not a merge of BASE")
        got = m.read(key)
        dtype_names.add(str(got.dtype).replace("torch.", ""))
        p = plan.get(key)
        w0 = b.read(key)
        if p is None:
            if not torch.equal(w0.to(got.dtype), got):
                bad.append(key)
        else:
            start = p.replace if p.replace is not None else w0
            delta = (delta_sum(p.deltas, precision=prec, device=dev) if p.deltas
                     else torch.zeros(start.shape, dtype=prec, device=dev))
            exact = start.to(device=dev, dtype=prec) + delta
            dev_abs = (got.to(device=dev, dtype=prec) - exact).abs()
            tol = tolerance(exact, start.to(device=dev, dtype=prec), delta, got.dtype)
            checks.append(ModuleCheck(key, float(dev_abs.max()) if dev_abs.numel() else 0.0,
                                      float((dev_abs / tol).max()) if dev_abs.numel() else 0.0))
        if progress:
            progress(1)
    return VerifyReport(checks, bad, ",".join(sorted(dtype_names)))
