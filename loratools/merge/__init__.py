"""Merge adapters into a base model, take them back out, and check a merge.

Merging adds each adapter's low-rank update to the weight it adapts::

    W = cast(W0 + Σᵢ wᵢ·ΔWᵢ)        un-merging:   W0 ≈ cast(W − Σᵢ wᵢ·ΔWᵢ)

with every ΔWᵢ formed and summed in float32 (or float64) and a single cast to
the output dtype at the end. Each job here is the same three steps: plan
(:mod:`.plan`, pure: every check before a byte is written), rewrite (the model
streamed tensor by tensor through :func:`loratools.io.rewrite_model`, with the
arithmetic of :mod:`.kernels`), report. Memory holds a few tensors plus the
adapters whatever the model's size.

A merge can also write a *record* (see :mod:`.record`): what the final cast
lost, so that ``unmerge_model(..., record=...)`` restores the base bit for bit,
even in bfloat16.

>>> from loratools import read_adapter
>>> ad = read_adapter("fixtures/adapters/lora")                         # doctest: +SKIP
>>> merge_model("fixtures/tiny-llama", [(ad, 1.0)], "merged")           # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..adapter import Adapter
from ..device import cpu_threads, resolve_device
from ..errors import (CorruptFileError, InvalidOptionError, NonFiniteError, ShapeMismatchError, VerificationError,
                      WrongBaseError)
from ..io import CODE_DTYPES, ModelReader, Progress, Span, atomic_output, check_output, read_tensor, rewrite_model
from .kernels import (check_finite, delta_sum, jitter, low_rank, merged_tensor, tolerance, ulp,
                      unmerged_tensor)
from .plan import (METADATA_KEY, AdapterInput, TensorPlan, adapter_inputs, find_tie, out_code, plan_merge,
                   resolve_precision, saved_base_key, stamp, tie_notes)
from .experts import resolve_experts
from .record import RecordWriter, apply_patch, make_patch, read_record, tensor_sha256

__all__ = [
    "AdapterInput", "TensorPlan", "MergeReport", "VerifyReport", "ModuleCheck", "Progress",
    "delta_sum", "low_rank", "merged_tensor", "unmerged_tensor", "plan_merge", "saved_base_key", "tolerance",
    "jitter", "merge_model", "unmerge_model", "verify_merge", "METADATA_KEY",
]

Adapters = Sequence[AdapterInput | tuple[Adapter, float] | Adapter]
PathLike = str | os.PathLike[str]


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
    #: un-merge without a record: a per-element bound on |W0' − W0| at the worst element, ½ulp(W0') plus the
    #: rounding a correct merge may leave (:func:`~loratools.merge.kernels.tolerance` at W)
    error_bound: float = 0.0
    adapters: list[dict[str, Any]] = field(default_factory=list)
    #: what the user should know, shown on stderr by the CLI (an untied embedding pair, a tied one changed)
    notes: tuple[str, ...] = ()
    #: ``merge_model(verify=True)``: the check of the written model (it passed, or nothing was written)
    verify: "VerifyReport | None" = None

    def to_json(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["output"], d["record"] = str(self.output), (str(self.record) if self.record else None)
        d["notes"] = list(self.notes)
        d["verify"] = self.verify.to_json() if self.verify is not None else None
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


# --------------------------------------------------------------------------- the jobs

def _hparams(model: ModelReader) -> dict[str, Any] | None:
    """The model's config.json (beside a single file), or None."""
    path = model.root / "config.json"
    try:
        data = json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError as e:
        raise CorruptFileError(path, f"not valid JSON ({e.msg})") from None
    return data if isinstance(data, dict) else None


@dataclass
class _Job:
    """What every job starts from: the inputs, the model read once, the plan."""

    inputs: list[AdapterInput]
    device: torch.device
    precision: torch.dtype
    model: ModelReader
    plan: dict[str, TensorPlan]
    notes: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, path: PathLike, adapters: Adapters, device: str | torch.device,
              precision: str | torch.dtype, *, unmerge: bool = False) -> "_Job":
        dev, prec = resolve_device(device), resolve_precision(precision)
        model = ModelReader(path)
        hparams = _hparams(model)
        # MoE expert LoRA names modules, not parameters: placed on this model's tensors first
        inputs = [replace(i, adapter=resolve_experts(i.adapter, model.shapes(), hparams))
                  for i in adapter_inputs(adapters)]
        tie = find_tie(hparams, model.spans)

        def same_as_base(key: str, t: Tensor) -> bool:
            return bool(torch.equal(model.read(key).to(torch.float64), t.to(torch.float64)))

        plan = plan_merge(model.shapes(), inputs, tie=tie, same_as_base=same_as_base, unmerge=unmerge)
        return cls(inputs, dev, prec, model, plan, tie_notes(plan, tie) if not unmerge else [])

    @property
    def added(self) -> dict[str, str]:
        """Tensors new in the output (an untied output head) → the base tensor each starts from."""
        return {k: p.source for k, p in self.plan.items() if p.source is not None}

    def base(self, key: str) -> Tensor:
        """The base tensor ``key`` starts from (for a new tensor, its ``source``)."""
        p = self.plan.get(key)
        return self.model.read(p.source if p is not None and p.source is not None else key)

    def rewrite(self, tmp: Path, codes: dict[str, str], meta: dict[str, str], compute: Callable[[str], Tensor | None],
                progress: Progress | None) -> tuple[int, int]:
        # parallelism comes from computing whole tensors on separate threads, each with one torch thread
        added = self.added
        config = {"tie_word_embeddings": False} if added else None
        with cpu_threads(1) if self.device.type == "cpu" else contextlib.nullcontext():
            return rewrite_model(self.model, tmp, codes={**codes, **{k: codes[s] for k, s in added.items()}},
                                 metadata=meta, compute=compute, progress=progress, device_type=self.device.type,
                                 added=added, config=config)

    def recon(self, w: Tensor, plan: TensorPlan, dtype: torch.dtype) -> Tensor:
        """What an un-merge computes for this tensor before any record is applied."""
        if plan.restore and plan.replace is not None:
            return plan.replace.to(dtype)
        if not plan.deltas:
            return w.to(dtype)
        return unmerged_tensor(w, plan.deltas, dtype=dtype, precision=self.precision, device=self.device).cpu()


def merge_model(base: PathLike, adapters: Adapters, out: PathLike, *, dtype: torch.dtype | None = None,
                device: str | torch.device = "auto", precision: str | torch.dtype = torch.float32,
                record: PathLike | None = None, force: bool = False, extra_inputs: Sequence[PathLike] = (),
                verify: bool = False, progress: Progress | None = None) -> MergeReport:
    """Write ``out`` = ``base`` with W = cast(W0 + Σ wᵢ·ΔWᵢ) for every adapted weight, streaming.

    ``out`` mirrors ``base`` (same shards, index and non-weight files); untouched
    tensors are copied byte for byte. ``modules_to_save`` tensors replace the base's.
    Everything is checked before a byte is written. With ``record``, also writes
    the sidecar that lets :func:`unmerge_model` restore ``base`` bit for bit
    (the output dtype must then be the base's). With ``verify``, the written model is checked by
    :func:`verify_merge` before it is renamed into place: :class:`VerificationError` leaves nothing at
    ``out`` (nor at ``record``).
    """
    job = _Job.start(base, adapters, device, precision)
    model, plan = job.model, job.plan
    codes = {k: out_code(s.dtype, dtype) for k, s in model.spans.items()}
    if record is not None and any(codes[k] != s.dtype for k, s in model.spans.items()):
        raise InvalidOptionError("`record` restores the base only when `dtype` is kept; drop `dtype` or `record`")
    record_path = Path(record) if record is not None else None
    meta = stamp("merge", job.inputs, job.precision, job.device)
    rec: RecordWriter | None = None

    def compute(key: str) -> Tensor | None:
        p = plan.get(key)
        if p is None:
            return None
        w0 = job.base(key)
        out_dtype = CODE_DTYPES[codes[p.source or key]]
        start = p.replace if p.replace is not None else w0
        try:
            w = p.apply_rows(merged_tensor(start, p.deltas, dtype=out_dtype, precision=job.precision,
                                           device=job.device).cpu() if p.deltas else start.to(out_dtype))
        except NonFiniteError:
            check_finite(key, w0, "the base model")
            raise NonFiniteError(key, f"the merge (the sum overflows {out_dtype})") from None
        if rec is not None and p.source is None:  # a new tensor (an untied head) has no original to restore
            rec.add(key, make_patch(w0, job.recon(w, p, w0.dtype)), tensor_sha256(w0))
        return w

    if record_path is not None:
        check_output(record_path, force=force, inputs=(out, base, *extra_inputs), what="`record`")
    with atomic_output(out, force=force, inputs=(base, *extra_inputs, *([record_path] if record_path else []))) as tmp:
        try:
            rec = RecordWriter(record_path) if record_path is not None else None
            changed, copied = job.rewrite(tmp, codes, meta, compute, progress)
            checked = verify_merge(base, job.inputs, tmp, device=job.device, precision=job.precision) if verify else None
            if checked is not None:
                checked.check()
            if rec is not None:
                rec.finish(meta, force=force, inputs=(base, *extra_inputs))
        finally:
            if rec is not None:
                rec.close()
    notes = list(job.notes)
    if job.added and not model.is_dir:
        notes.append(f"{out} is a single file: set tie_word_embeddings to false in the config that goes with it")
    return MergeReport(Path(out), "merge", changed, copied, model.nbytes(), record_path, rec.nbytes if rec else 0,
                       adapters=[i.describe() for i in job.inputs], notes=tuple(notes), verify=checked)


def _check_stamp(model: ModelReader, merged: PathLike, inputs: Sequence[AdapterInput]) -> None:
    """The merged model says which adapters went in: refuse a different one."""
    stamped = model.metadata().get(METADATA_KEY)
    if not stamped:
        return
    went_in = {a["fingerprint"] for a in json.loads(stamped).get("adapters", [])}
    for i in inputs:
        if went_in and i.adapter.fingerprint.sha256 not in went_in:
            raise WrongBaseError(f"{merged} records the adapters merged into it, and {i.label or 'this adapter'} "
                                 "is not one of them")


class _ErrorStats:
    """The un-merge's error figures without a record (see :func:`unmerge_model`), summed over tensors."""

    def __init__(self) -> None:
        self.max = self.sq = self.ref = self.bound = 0.0
        self._lock = threading.Lock()

    def add(self, key: str, w: Tensor, r: Tensor, p: TensorPlan, job: _Job) -> None:
        probe = jitter(r, seed=len(key))  # the round trip re-run on a stand-in base measures what this dtype loses
        opts = {"precision": job.precision, "device": job.device}
        again = unmerged_tensor(merged_tensor(probe, p.deltas, **opts), p.deltas, **opts).cpu().to(torch.float64)
        err = again - probe.to(torch.float64)
        # |W0' − W0| ≤ ½ulp(W0') + the rounding any correct merge of these adapters may have left in W
        # (verify's tolerance at W, whose ΔW this un-merge forms once more), W0 stored in W's dtype or wider
        tol = tolerance(w.to(device=job.device, dtype=job.precision), r.to(job.precision), p.deltas, w.dtype,
                        precision=job.precision)
        bound = tol.reshape(r.shape).cpu().to(torch.float64) + 0.5 * ulp(r)
        figures = (float(err.abs().max()), float((err * err).sum()), float((r.to(torch.float64) ** 2).sum()),
                   float(bound.max()))
        with self._lock:  # tensors are computed on several threads
            self.max = max(self.max, figures[0])
            self.sq += figures[1]
            self.ref += figures[2]
            self.bound = max(self.bound, figures[3])

    @property
    def rel(self) -> float:
        return math.sqrt(self.sq / self.ref) if self.ref else 0.0


def unmerge_model(merged: PathLike, adapters: Adapters, out: PathLike, *, device: str | torch.device = "auto",
                  precision: str | torch.dtype = torch.float32, record: PathLike | None = None, force: bool = False,
                  extra_inputs: Sequence[PathLike] = (), progress: Progress | None = None) -> MergeReport:
    """Write ``out`` with W0 = cast(W − Σ wᵢ·ΔWᵢ) for every adapted weight, streaming.

    With ``record`` (from ``merge_model(record=...)``) the result is the base bit
    for bit, checked against the sha256 of each restored tensor. Without it, the
    report carries an honest error figure: the true W0 is unknown, so the
    merge→unmerge round trip is re-run on the result W0' (which has W0's
    magnitudes to within an ulp): ``est_max_abs_error`` = max |W0'' − W0'| and
    ``est_rel_error`` = ‖W0'' − W0'‖F / ‖W0'‖F over the adapted tensors (W0'
    jittered by ±2 ulps first, see :func:`jitter`), plus
    ``error_bound`` = max ½ulp(W0') + :func:`~loratools.merge.kernels.tolerance` at W: the true error never
    exceeds it when W is any merge that :func:`verify_merge` accepts (loratools' own, or peft's).
    """
    job = _Job.start(merged, adapters, device, precision, unmerge=True)
    model, plan = job.model, job.plan
    _check_stamp(model, merged, job.inputs)
    record_path = Path(record) if record is not None else None
    patches: dict[str, dict[str, Span]] = {}
    hashes: dict[str, str] = {}
    if record_path is not None:
        patches, hashes, info = read_record(record_path, job.inputs)
        job.precision = resolve_precision(info.get("precision", "float32"))
        missing = sorted(set(plan) - set(hashes))
        if missing:
            raise CorruptFileError(record_path, f"it holds nothing for {missing[0]}")
    else:
        replaced = [(k, "trainable_token_indices" if p.rows is not None else "modules_to_save")
                    for k, p in plan.items() if (p.replace is not None and not p.restore) or p.rows is not None]
        if replaced:
            raise InvalidOptionError(f"the adapter replaced {replaced[0][0]} ({replaced[0][1]}); only the record of "
                                     "the merge (`record`) can give the original back")
    stats = _ErrorStats()

    def compute(key: str) -> Tensor | None:
        p = plan.get(key)
        if p is None:
            return None
        w = model.read(key)
        try:
            r = job.recon(w, p, w.dtype)
        except NonFiniteError:
            check_finite(key, w, "the merged model")
            raise NonFiniteError(key, "the un-merge") from None
        if record_path is not None:
            r = apply_patch(r, {part: read_tensor(span) for part, span in patches.get(key, {}).items()})
            if tensor_sha256(r) != hashes[key]:
                raise CorruptFileError(record_path, f"restoring {key} did not give the base's bits back; un-merge on the "
                                                    "same kind of device as the merge (or the merged model was changed)")
        elif p.deltas and not p.restore:
            stats.add(key, w, r, p, job)
        return r

    meta = stamp("unmerge", job.inputs, job.precision, job.device, exact=record_path is not None)
    with atomic_output(out, force=force, inputs=(merged, *extra_inputs, *([record_path] if record_path else []))) as tmp:
        changed, copied = job.rewrite(tmp, {k: s.dtype for k, s in model.spans.items()}, meta, compute, progress)
    return MergeReport(Path(out), "unmerge", changed, copied, model.nbytes(), record_path,
                       record_path.stat().st_size if record_path else 0, True if record_path is not None else None,
                       stats.max, stats.rel, stats.bound, adapters=[i.describe() for i in job.inputs])


def verify_merge(base: PathLike, adapters: Adapters, merged: PathLike, *, device: str | torch.device = "auto",
                 precision: str | torch.dtype = torch.float32, progress: Progress | None = None) -> VerifyReport:
    """Check ``merged`` against ``base`` + Σ wᵢ·ΔWᵢ, tensor by tensor.

    For each adapted weight: the largest |merged − exact| (exact = W0 + Σ wᵢ·ΔWᵢ
    in ``precision``) and its ratio to :func:`tolerance` (> 1 fails). Every other
    tensor must equal the base's, cast to the merged dtype.
    """
    job = _Job.start(base, adapters, device, precision)
    b, m, plan, dev, prec = job.model, ModelReader(merged), job.plan, job.device, job.precision
    shapes = {**{k: s.shape for k, s in b.spans.items()}, **{k: b.spans[s].shape for k, s in job.added.items()}}
    if set(shapes) != set(m.spans):
        extra = sorted(set(shapes) ^ set(m.spans))
        raise WrongBaseError(f"the merged model and the base hold different tensors (first: {extra[0]})")
    checks: list[ModuleCheck] = []
    bad: list[str] = []
    dtype_names = set()
    if progress:
        progress(0, total=len(shapes))
    for key in sorted(shapes):
        if shapes[key] != m.spans[key].shape:
            raise ShapeMismatchError(key, shapes[key], m.spans[key].shape, "the merged model is not a merge of the base")
        got = m.read(key)
        dtype_names.add(str(got.dtype).replace("torch.", ""))
        p = plan.get(key)
        w0 = job.base(key)
        if p is None:
            if not torch.equal(w0.to(got.dtype), got):
                bad.append(key)
        else:
            start = p.replace if p.replace is not None else w0
            delta = (delta_sum(p.deltas, precision=prec, device=dev).reshape(start.shape) if p.deltas
                     else torch.zeros(start.shape, dtype=prec, device=dev))
            exact = p.apply_rows(start.to(device=dev, dtype=prec) + delta)
            dev_abs = (got.to(device=dev, dtype=prec) - exact).abs()
            tol = tolerance(exact, start, p.deltas, got.dtype, precision=prec)
            checks.append(ModuleCheck(key, float(dev_abs.max()) if dev_abs.numel() else 0.0,
                                      float((dev_abs / tol).max()) if dev_abs.numel() else 0.0))
        if progress:
            progress(1)
    return VerifyReport(checks, bad, ",".join(sorted(dtype_names)))
