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
import os
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..adapter import Adapter
from ..device import cpu_threads, resolve_device
from ..errors import (CorruptFileError, InvalidOptionError, NonFiniteError, ShapeMismatchError, VerificationError,
                      WrongBaseError)
from ..formats.base import BaseModel
from ..io import CODE_DTYPES, ModelReader, Progress, Span, atomic_output, check_output, read_config, rewrite_model
from ..dora import merged_weight
from .config import config_edits
from .kernels import check_finite, delta_sum, dora_of, jitter, tolerance, unmerged_tensor
from .layout import find_tie
from .plan import (AdapterInput, TensorPlan, adapter_inputs, bias_notes, out_code, plan_merge,
                   resolve_precision, stamp, tie_notes)
from .experts import resolve_experts
from .onto import Onto, OntoReport, choose_onto, dequantized_base, onto_keys, onto_tensor, stamped_onto
from .quantized import QuantModel, quant_model
from .record import RecordWriter, read_record
from .stream import Arithmetic, merged_blocks, restored_blocks
from .report import MergeReport, ModuleCheck, UpdateFit, VerifyReport, fit_sums
from .checks import ErrorStats, check_stamp, input_paths
from ..quant.qlora import QloraRow, qlora_report

__all__ = ["Adapters", "check_merge", "merge_model", "unmerge_model", "verify_merge"]

Adapters = Sequence[AdapterInput | tuple[Adapter, float] | Adapter]
PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------- the jobs

@dataclass
class _Job:
    """What every job starts from: the inputs, the model read once, the plan."""

    inputs: list[AdapterInput]
    device: torch.device
    precision: torch.dtype
    model: ModelReader
    plan: dict[str, TensorPlan]
    notes: list[str] = field(default_factory=list)
    #: the base's quantized tensors (:mod:`.quantized`: FP8, MXFP4, NVFP4, bitsandbytes), planned and read dequantized
    quant: QuantModel | None = None
    #: a QLoRA merge's choice (:mod:`.onto`) and the planned weights a 4-bit base holds quantized
    onto: Onto = field(default_factory=Onto)
    onto_keys: frozenset[str] = frozenset()
    onto_rows: dict[str, QloraRow] = field(default_factory=dict)

    @classmethod
    def start(cls, base: PathLike | BaseModel, adapters: Adapters, device: str | torch.device,
              precision: str | torch.dtype, *, unmerge: bool = False) -> "_Job":
        dev, prec = resolve_device(device), resolve_precision(precision)
        model, hparams = _open(base)
        quant = quant_model(model, hparams, precision=prec)
        shapes = quant.shapes() if quant else model.shapes()  # a quantized tensor as its logical float tensor
        # MoE expert LoRA names modules, not parameters: placed on this model's tensors first
        inputs = [replace(i, adapter=resolve_experts(i.adapter, shapes, hparams)) for i in adapter_inputs(adapters)]
        tie = find_tie(hparams, model.spans)

        def same_as_base(key: str, t: Tensor) -> bool:
            w = quant.read(model, key) if quant else model.get(key)
            return bool(torch.equal(w.to(torch.float64), t.to(torch.float64)))

        plan = plan_merge(shapes, inputs, tie=tie, same_as_base=same_as_base, unmerge=unmerge)
        if quant is not None:
            quant.check(plan)
        notes = bias_notes(inputs) + (tie_notes(plan, tie) if not unmerge else [])
        return cls(inputs, dev, prec, model, plan, notes, quant)

    def choose(self, onto: Onto) -> "_Job":
        """This job merging onto ``onto``'s base (:mod:`.onto`): refused on a quantized base, checked on the plan."""
        onto.check_inputs(self.model.path, record=False, gguf=False,
                          quantized=self.quant.codec.name if self.quant is not None else None)
        self.onto, self.onto_keys = onto, onto_keys(onto, self.plan)
        return self

    def onto_merge(self, key: str, dtype: torch.dtype) -> Tensor | None:
        """A 4-bit weight's figures, read whole and quantized once; with ``dequantized``, the merged tensor."""
        row, whole = onto_tensor(key, self.model.get(key), self.plan[key], self.onto, dtype=dtype,
                                 precision=self.precision, device=self.device)
        self.onto_rows[key] = row  # one worker per key: distinct keys, no lock needed
        return whole

    def onto_report(self) -> OntoReport | None:
        if self.onto.quant is None:
            return None
        rows = (self.onto_rows[k] for k in self.model.spans if k in self.onto_rows)
        return OntoReport(self.onto.onto, qlora_report(rows, self.onto.quant))

    @property
    def inputs_on_disk(self) -> tuple[PathLike, ...]:
        """The model and the adapters' files: what an output may not overwrite."""
        return (self.model.path, *input_paths(self.inputs))

    @property
    def added(self) -> dict[str, str]:
        """Tensors new in the output (an untied output head) → the base tensor each starts from."""
        return {k: p.source for k, p in self.plan.items() if p.source is not None}

    def base(self, key: str) -> Tensor:
        """The base tensor ``key`` starts from (for a new tensor, its ``source``)."""
        p = self.plan.get(key)
        key = p.source if p is not None and p.source is not None else key
        w = self.quant.read(self.model, key) if self.quant is not None else self.model.get(key)
        if self.onto.dequantized and key in self.onto_keys:  # merged onto deq(Q(W0)): the base it started from
            assert self.onto.quant is not None
            return dequantized_base(key, w, self.onto.quant)
        return w

    @property
    def arithmetic(self) -> Arithmetic:
        return Arithmetic(self.precision, self.device)

    def rewrite(self, tmp: Path, codes: dict[str, str], meta: dict[str, str],
                compute: Callable[[str], Iterable[Tensor] | Tensor | None], progress: Progress | None,
                side_edits: dict[str, Callable[[bytes], bytes]] | None = None,
                dropped: Collection[str] = ()) -> tuple[int, int]:
        # one torch thread per worker: parallelism comes from tensors on separate threads (see configure_cpu_threads);
        # on a GPU a second worker reads and writes while the first computes
        added = self.added
        codes = {**codes, **{k: codes[s] for k, s in added.items()}}
        shapes: dict[str, tuple[int, ...]] = {}
        if self.quant is not None:  # a plain merge writes each quantized tensor under its logical key and shape
            added |= self.quant.new()
            shapes = self.quant.out_shapes()
        with cpu_threads(1):
            return rewrite_model(self.model, tmp, codes=codes, metadata=meta, compute=compute, progress=progress,
                                 workers=None if self.device.type == "cpu" else 2, added=added, side_edits=side_edits,
                                 dropped=dropped, shapes=shapes)

    def recon(self, w: Tensor, plan: TensorPlan, dtype: torch.dtype) -> Tensor:
        """What an un-merge computes for this tensor before any record is applied."""
        if plan.restore and plan.replace is not None:
            return plan.replace.to(dtype)
        if not plan.deltas:
            return w.to(dtype)
        return unmerged_tensor(w, plan.deltas, dtype=dtype, precision=self.precision, device=self.device).cpu()


def _open(base: PathLike | BaseModel) -> tuple[ModelReader, dict[str, Any] | None]:
    """The model's weights and config.json: those the caller read already (a :class:`BaseModel` from
    :func:`loratools.formats.load_base`), else read here, once."""
    if isinstance(base, BaseModel) and base.weights is not None:
        return base.weights, dict(base.hparams) if base.hparams is not None else None
    model = ModelReader(_path(base))
    return model, read_config(model.path)


def _path(model: PathLike | BaseModel) -> Path:
    return model.path if isinstance(model, BaseModel) else Path(model)


def check_merge(base: PathLike | BaseModel, adapters: Adapters, *, device: str | torch.device = "auto",
                precision: str | torch.dtype = torch.float32) -> None:
    """Every check :func:`merge_model` makes before it writes (the adapters against the base's names and shapes,
    the base's format), writing nothing: a job of several merges checks each before the first writes."""
    _Job.start(base, adapters, device, precision)


def _onto_choice(base: PathLike | BaseModel, adapters: Adapters, onto: str, qlora: str | None, *,
                 record: bool) -> tuple[Onto, tuple[str, ...]]:
    """A merge's QLoRA choice (:mod:`.onto`, ``qlora`` filled from what the adapters record of their base), checked
    against the base and ``record``, and the notes it makes."""
    choice, notes = choose_onto(onto, qlora, [i.label for i in adapter_inputs(adapters)] if adapters else [])
    choice.check_inputs(_path(base), record=record, gguf=_is_gguf(_path(base)))
    return choice, notes


def merge_model(base: PathLike | BaseModel, adapters: Adapters, out: PathLike, *, dtype: torch.dtype | None = None,
                device: str | torch.device = "auto", precision: str | torch.dtype = torch.float32,
                record: PathLike | None = None, force: bool = False, verify: bool = False,
                progress: Progress | None = None, quant: str | None = None,
                allow_lossy: bool = False, onto: str = "original", qlora: str | None = None) -> MergeReport:
    """Write ``out`` = ``base`` with W = cast(W0 + Σ wᵢ·ΔWᵢ) for every adapted weight, streaming.

    ``out`` mirrors ``base`` (same shards, index and non-weight files); untouched
    tensors are copied byte for byte. ``modules_to_save`` tensors replace the base's.
    Everything is checked before a byte is written. With ``record``, also writes
    the sidecar that lets :func:`unmerge_model` restore ``base`` bit for bit
    (the output dtype must then be the base's). With ``verify``, the written model is checked by
    :func:`verify_merge` before it is renamed into place: :class:`VerificationError` leaves nothing at
    ``out`` (nor at ``record``).

    ``base`` is a path, or the :class:`~loratools.formats.BaseModel` the adapters were read against (its weights
    and config are then not read again). An adapter whose label names a path is an input too: ``out`` may not
    overwrite it. A ``.gguf`` ``base`` is merged by :func:`loratools.merge.gguf.merge_gguf` (``quant`` instead
    of ``dtype``; ``allow_lossy`` writes a merge whose requantization keeps too little of ΔW, refused otherwise).

    A QLoRA adapter (:mod:`.onto`): ``qlora`` names the bitsandbytes 4-bit type it was trained on (``nf4``,
    ``nf4-dq``, ``fp4``, ``fp4-dq``), and the report carries ‖deq(Q(W0)) − W0‖_F/‖ΔW‖_F per adapted weight and
    overall, and the choice the figures favour (``report.onto``). ``onto="dequantized"`` writes
    cast(deq(Q(W0)) + ΔW) for each weight bitsandbytes quantizes; ``"original"`` (the default, and what
    docs/experiments.md measured better) leaves the weights as a plain merge writes them. ``dequantized`` needs
    ``qlora`` and the 16-bit safetensors base; DoRA, a GGUF or quantized base and ``record`` are refused.
    """
    choice, onto_notes = _onto_choice(base, adapters, onto, qlora, record=record is not None)
    if _gguf(_path(base), dtype=dtype, quant=quant):
        from .gguf import merge_gguf
        return merge_gguf(_path(base), adapters, out, quant=quant, precision=precision, record=record,
                          force=force, progress=progress, verify=verify, allow_lossy=allow_lossy)
    job = _Job.start(base, adapters, device, precision).choose(choice)
    model, plan, qm = job.model, job.plan, job.quant
    codes = {k: out_code(s.dtype, dtype) for k, s in model.spans.items()}
    if qm is not None:
        qm.dtype = dtype
        codes = qm.codes(codes)
    if record is not None and ((qm is not None and dtype is not None)
                               or any(codes[k] != s.dtype for k, s in model.spans.items())):
        raise InvalidOptionError("`record` restores the base only when `dtype` is kept; drop `dtype` or `record`")
    record_path = Path(record) if record is not None else None
    meta = stamp("merge", job.inputs, job.precision, job.device, **choice.stamp())
    rec: RecordWriter | None = None

    def compute(key: str) -> Iterator[Tensor] | Tensor | None:
        p = plan.get(key)
        if qm is not None and (key in qm.owner or key in qm.tensors):
            return qm.compute(key, plan)
        if p is None:
            return None
        if key in job.onto_keys and (whole := job.onto_merge(key, CODE_DTYPES[codes[key]])) is not None:
            return whole
        # a new tensor (an untied head) starts from its source and has no original for a record to restore
        span = model.spans[p.source or key]
        return merged_blocks(key, span, p, CODE_DTYPES[codes[p.source or key]], job.arithmetic,
                             rec if p.source is None else None)

    ins = job.inputs_on_disk
    if record_path is not None:
        check_output(record_path, force=force, inputs=(out, *ins), what="`record`")
    with atomic_output(out, force=force, inputs=(*ins, *([record_path] if record_path else []))) as tmp, \
            (atomic_output(record_path, force=force, inputs=ins) if record_path is not None
             else contextlib.nullcontext()) as rtmp:
        try:
            rec = RecordWriter(record_path, rtmp) if record_path is not None and rtmp is not None else None
            if qm is not None:
                qm.record = rec
            edits = config_edits(dtype, untie=bool(job.added), dequantized=qm is not None and dtype is not None)
            changed, copied = job.rewrite(tmp, codes, meta, compute, progress, edits, qm.dropped() if qm else ())
            fit = qm.check_fit(allow_lossy) if qm is not None else None
            checked = _check(job, ModelReader(tmp), allow_lossy=allow_lossy) if verify else None
            if checked is not None:
                checked.check()
            if rec is not None:
                rec.finish(meta)
        finally:
            if rec is not None:
                rec.close()
    notes = [*onto_notes, *job.notes]
    if job.added and not model.is_dir:
        notes.append(f"{out} is a single file: set tie_word_embeddings to false in the config that goes with it")
    return MergeReport(Path(out), "merge", changed, copied, model.nbytes(), record=record_path,
                       record_nbytes=rec.nbytes if rec else 0, adapters=[i.describe() for i in job.inputs],
                       notes=tuple(notes), verify=checked, update=fit,
                       allowed_lossy=fit is not None and fit.lossy, onto=job.onto_report())


def _is_gguf(base: Path) -> bool:
    from ..io.gguf_model import is_gguf_model_path

    return is_gguf_model_path(base)


def _gguf(base: Path, *, dtype: torch.dtype | None = None, quant: str | None = None) -> bool:
    """Whether ``base`` is a GGUF model (merged by :mod:`.gguf`); ``quant`` is for GGUF, ``dtype`` for safetensors."""
    from ..io.gguf_model import is_gguf_model_path

    if not is_gguf_model_path(base):
        if quant is not None:
            raise InvalidOptionError("`quant` applies to GGUF models; for safetensors use `dtype`")
        return False
    if dtype is not None:
        raise InvalidOptionError("`dtype` applies to safetensors models; for a GGUF model use `quant`")
    return True


def unmerge_model(merged: PathLike | BaseModel, adapters: Adapters, out: PathLike, *,
                  device: str | torch.device = "auto", precision: str | torch.dtype = torch.float32,
                  record: PathLike | None = None, force: bool = False, progress: Progress | None = None,
                  ignore_stamp: bool = False, quant: str | None = None) -> MergeReport:
    """Write ``out`` with W0 = cast(W − Σ wᵢ·ΔWᵢ) for every adapted weight, streaming.

    With ``record`` (from ``merge_model(record=...)``) the result is the base bit
    for bit, checked against the checksum of each restored tensor. Without it, the
    report carries an honest error figure: the true W0 is unknown, so the
    merge→unmerge round trip is re-run on the result W0' (which has W0's
    magnitudes to within an ulp): ``est_max_abs_error`` = max |W0'' − W0'| and
    ``est_rel_error`` = ‖W0'' − W0'‖F / ‖W0'‖F over the adapted tensors (W0'
    jittered by ±2 ulps first, see :func:`jitter`), plus
    ``error_bound`` = max ½ulp(W0') + :func:`~loratools.merge.kernels.tolerance` at W: the true error never
    exceeds it when W is any merge that :func:`verify_merge` accepts (loratools' own, or peft's).

    Every figure assumes the adapters and weights are the ones merged. The
    merged model's stamp (content hash and weight of each adapter) is checked
    first and a mismatch refused; ``ignore_stamp`` skips that check (for a model
    merged by another tool, or on purpose). ``report.vouched`` says whether the
    stamp confirmed the inputs: when False, nothing bounds the true error.

    A ``.gguf`` ``merged`` is un-merged by :func:`loratools.merge.gguf.unmerge_gguf` (``quant`` as for merging).
    """
    if _gguf(_path(merged), quant=quant):
        from .gguf import unmerge_gguf
        return unmerge_gguf(_path(merged), adapters, out, quant=quant, precision=precision, record=record,
                            force=force, progress=progress, ignore_stamp=ignore_stamp)
    job = _Job.start(merged, adapters, device, precision, unmerge=True)
    model, plan = job.model, job.plan
    vouched, notes = False if ignore_stamp else check_stamp(model, model.path, job.inputs), _onto_notes(model)
    record_path = Path(record) if record is not None else None
    patches: dict[str, dict[str, Span]] = {}
    hashes: dict[str, str] = {}
    if record_path is not None:
        patches, hashes, info = read_record(record_path, job.inputs)
        job.precision = resolve_precision(info.get("precision", "float32"))
        missing = sorted((job.quant.record_keys(plan) if job.quant else set(plan)) - set(hashes))
        if missing:
            raise CorruptFileError(record_path, f"it holds nothing for {missing[0]}")
    else:
        if job.quant is not None and (stored := sorted(set(plan) & set(job.quant.tensors))):
            raise InvalidOptionError(f"{stored[0]} is stored as {job.quant.codec.name}, which loratools un-merges only "
                                     "with the record of the merge (`record`, written by merging with it)")
        dora = [k for k, p in plan.items() if any(m.is_dora for m, _ in p.deltas)]
        if dora:
            raise InvalidOptionError(f"{dora[0]} was merged with DoRA, whose row norms ‖W0 + s·BA‖ the merged model no "
                                     "longer holds, so W0 cannot be solved for; un-merge with the record of the merge "
                                     "(`record`, written by merging with `record`), or keep the base")
        replaced = [(k, "trainable_token_indices" if p.rows is not None else "modules_to_save")
                    for k, p in plan.items() if (p.replace is not None and not p.restore) or p.rows is not None]
        if replaced:
            raise InvalidOptionError(f"the adapter replaced {replaced[0][0]} ({replaced[0][1]}); only the record of "
                                     "the merge (`record`) can give the original back")
    stats = ErrorStats(job.precision, job.device)

    def compute(key: str) -> Iterator[Tensor] | Tensor | None:
        p = plan.get(key)
        if job.quant is not None and record_path is not None and key in job.quant.owner:
            return job.quant.restored(key, plan, patches, hashes, record_path)
        if p is None:
            return None
        if record_path is not None:
            return restored_blocks(key, model.spans[key], p, patches.get(key, {}), hashes[key], job.arithmetic,
                                   record_path)
        w = model.get(key)
        try:
            r = job.recon(w, p, w.dtype)
        except NonFiniteError:
            check_finite(key, w, "the merged model")
            raise NonFiniteError(key, "the un-merge") from None
        if p.deltas and not p.restore:
            stats.add(key, w, r, p)
        return r

    meta = stamp("unmerge", job.inputs, job.precision, job.device, exact=record_path is not None)
    with atomic_output(out, force=force, inputs=(*job.inputs_on_disk, *([record_path] if record_path else []))) as tmp:
        changed, copied = job.rewrite(tmp, {k: s.dtype for k, s in model.spans.items()}, meta, compute, progress)
    return MergeReport(Path(out), "unmerge", changed, copied, model.nbytes(), record=record_path,
                       record_nbytes=record_path.stat().st_size if record_path else 0,
                       exact=True if record_path is not None else None, est_max_abs_error=stats.max,
                       est_rel_error=stats.rel, error_bound=stats.bound, adapters=[i.describe() for i in job.inputs],
                       vouched=vouched or record_path is not None, notes=notes)


def _onto_notes(merged: ModelReader) -> tuple[str, ...]:
    """What an un-merge gives back from a model its stamp says was merged onto deq(Q(W0)) (:mod:`.onto`)."""
    onto = stamped_onto(merged.metadata(), merged.path)
    if not onto.dequantized:
        return ()
    return (f"{merged.path} was merged onto the dequantized 4-bit weights ({onto.quant}): the "
            "un-merged weights are deq(Q(W0)), not the original 16-bit W0",)


def verify_merge(base: PathLike | BaseModel, adapters: Adapters, merged: PathLike, *,
                 device: str | torch.device = "auto", precision: str | torch.dtype = torch.float32,
                 progress: Progress | None = None, allow_lossy: bool = False) -> VerifyReport:
    """Check ``merged`` against ``base`` + Σ wᵢ·ΔWᵢ, tensor by tensor.

    For each adapted weight: the largest |merged − exact| (exact = W0 + Σ wᵢ·ΔWᵢ
    in ``precision``) and its ratio to :func:`tolerance` (> 1 fails). Every other
    tensor must equal the base's, cast to the merged dtype. ``base`` is a path or a
    :class:`~loratools.formats.BaseModel` read already. A ``.gguf`` ``base`` is checked by
    :func:`loratools.merge.gguf.verify_gguf` (the tolerance is the requantization's own error, and a merged model
    that keeps too little of ΔW fails unless ``allow_lossy``).
    """
    if _gguf(_path(base)):
        from .gguf import verify_gguf
        return verify_gguf(_path(base), adapters, merged, precision=precision, progress=progress,
                           allow_lossy=allow_lossy)
    job, m = _Job.start(base, adapters, device, precision), ModelReader(merged)
    onto = stamped_onto(m.metadata(), m.path)
    if onto.dequantized:  # its stamp says it was merged onto deq(Q(W0)): checked against that
        job.choose(onto)
    return replace(_check(job, m, progress, allow_lossy=allow_lossy), onto=onto.quant if onto.dequantized else None)


def _expected(job: _Job, m: ModelReader) -> dict[str, tuple[int, ...]]:
    """The merged model's tensors as a merge of the job's base must hold them, checked against ``m``'s: a quantized
    base's tensors by their logical (dequantized) shapes, kept quantized in ``m`` or written plain; a plain merge
    leaves out the activation parameters beside them."""
    b, quant = job.model, job.quant
    if quant is None:
        shapes = {k: s.shape for k, s in b.spans.items()}
        got = {k: s.shape for k, s in m.spans.items()}
    else:
        shapes = {k: s for k, (_, s) in quant.shapes().items()}
        got = {k: s for k, (_, s) in quant.logical(m).items()}
        if not any(quant.quantized_in(m, k) for k in quant.tensors):  # a plain merge
            shapes = {k: s for k, s in shapes.items() if k not in quant.extra}
    shapes.update({k: b.spans[s].shape for k, s in job.added.items()})
    if set(shapes) != set(got):
        extra = sorted(set(shapes) ^ set(got))
        raise WrongBaseError(f"the merged model and the base hold different tensors (first: {extra[0]})")
    return shapes


def _check(job: _Job, m: ModelReader, progress: Progress | None = None, *, allow_lossy: bool = False) -> VerifyReport:
    """:func:`verify_merge` of the model ``m`` against the job's base and plan (a merge checks what it wrote
    with the plan it wrote it from: the base is not read again)."""
    b, plan, dev, prec, quant = job.model, job.plan, job.device, job.precision, job.quant
    shapes = _expected(job, m)
    checks: list[ModuleCheck] = []
    bad: list[str] = []
    non_finite: list[str] = []
    sums: dict[str, tuple[float, float, float]] = {}  # a re-quantized tensor: the share of ΔW it keeps
    dtype_names = set()
    if progress:
        progress(0, total=len(shapes))
    for key in sorted(shapes):
        got = quant.read(m, key) if quant is not None else m.get(key)
        if shapes[key] != tuple(got.shape):
            raise ShapeMismatchError(key, shapes[key], tuple(got.shape), "the merged model is not a merge of the base")
        dtype_names.add(str(got.dtype).replace("torch.", ""))
        p = plan.get(key)
        w0 = job.base(key)
        if got.is_floating_point() and bool((~torch.isfinite(got) & torch.isfinite(w0)).any()):
            non_finite.append(key)  # every tensor written is checked, adapted or not
        if p is None:
            if not torch.equal(w0.to(got.dtype), got):
                bad.append(key)
        else:
            start = p.replace if p.replace is not None else w0
            dora = dora_of(p.deltas)
            if dora is not None:  # the dense W′ = diag(m/‖V‖)·V, and the update it makes
                exact = merged_weight(w0.to(device=dev, dtype=prec), dora, precision=prec)
                delta = exact - w0.to(device=dev, dtype=prec)
            else:
                delta = (delta_sum(p.deltas, precision=prec, device=dev).reshape(start.shape) if p.deltas
                         else torch.zeros(start.shape, dtype=prec, device=dev))
                exact = p.apply_rows(start.to(device=dev, dtype=prec) + delta)
            dev_abs = (got.to(device=dev, dtype=prec) - exact).abs()
            tol = tolerance(exact, start, p.deltas, got.dtype, precision=prec)
            if quant is not None and quant.quantized_in(m, key):  # re-quantized: the format's own step too
                parts = [m.get(k) for k in quant.tensors[key].parts]
                tol = tol + quant.codec.half_step(exact, parts).to(tol)
                sums[key] = fit_sums(got.to(dev, prec) - w0.to(dev, prec), exact - w0.to(dev, prec))
            checks.append(ModuleCheck(key, float(dev_abs.max()) if dev_abs.numel() else 0.0,
                                      float((dev_abs / tol).max()) if dev_abs.numel() else 0.0))
        if progress:
            progress(1)
    return VerifyReport(checks, bad, ",".join(sorted(dtype_names)), non_finite, UpdateFit.from_sums(sums),
                        allow_lossy)
