"""Merge adapters into a llama.cpp GGUF model (and take them out, and check a merge), streaming.

For every adapted tensor, a block of rows at a time::

    W = Q_out( deq(W0) + Σᵢ wᵢ·ΔWᵢ )          ΔW's rows in llama.cpp's q/k order for ``llama``

``deq`` is ``gguf.quants.dequantize`` (bit-identical to llama.cpp), the sum is formed in float32,
and ``Q_out`` is :func:`loratools.gguf.quants.quantize` (byte-identical to llama.cpp's reference
quantizers) to the tensor's own type (``quant="same"``) or to the type asked for. llama.cpp's
converter permutes the rows of ``attn_q``/``attn_k`` for its RoPE (``LlamaModel.permute``), so
ΔW's rows are permuted the same way (:func:`loratools.gguf.arch.permute_rows`), exactly as the GGUF
adapter writer permutes ``lora_b``. Adapter module names map to GGUF tensor names by the model's
``general.architecture`` (:func:`loratools.gguf.arch.gguf_target`).

Untouched tensors and all key/values are copied byte for byte (the merge adds one key,
``loratools.merge``, naming the adapters); a split model is written in the same split layout.
The engine (planning, the block loop, the writer) is :mod:`.gguf_stream`; a merge's ``record``, with which
:func:`unmerge_gguf` gives the base's files back byte for byte, is :mod:`.gguf_record`.

The report gives, per (input type → output type), the requantization error against the exact
``deq(W0) + ΔW`` beside an estimate of what the base's own quantization already cost: that type's
error on the base's values shuffled within each row (so they lie off its grid, as the original
float weights did), on up to 64 rows per tensor. It also gives how much of ΔW the written model carries
(:class:`~.report.UpdateFit`: realized = deq(W) − deq(W0) against ΔW). Requantizing to the base's own
type rounds W0 + ΔW back onto W0's grid where ΔW is below the type's step (a trained adapter on a 4-bit
model), so a merge can keep a small share of ΔW while every other figure looks fine: a merge that keeps
too little (less than :data:`~.report.MIN_KEPT` of ΔW) is refused before anything is put in place, unless
``allow_lossy``; :func:`verify_gguf` fails on the same figure.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CorruptFileError, InvalidOptionError, LossyMergeError, ShapeMismatchError, WrongBaseError
from ..gguf.quants import can_quantize, dequantize, quantize
from ..io.gguf_model import (GGUFModelFile, GGUFTensor, file_sha256, layout_mismatch, open_gguf_model, out_split_paths,
                             raw_kv, string_kv)
from ..io.paths import atomic_output, check_output
from .checks import check_stamp, input_paths
from .gguf_record import PatchRecorder, PatchRestorer, record_info
from .gguf_stream import (BLOCK_VALUES, QUANTS, Part, Stats, gguf_out_types, plan_gguf, read_rows, requant_rows,
                          write_model)
from .plan import METADATA_KEY, AdapterInput, adapter_inputs, resolve_precision, stamp
from .record import RecordWriter, read_record
from .report import MergeReport, ModuleCheck, UpdateFit, VerifyReport

__all__ = ["merge_gguf", "unmerge_gguf", "verify_gguf", "plan_gguf", "gguf_out_types", "QUANTS"]


def _lossy(fit: UpdateFit, types: dict[str, tuple[str, int]]) -> LossyMergeError:
    """The refusal of a merge that keeps too little of ΔW, offering finer types than the ones written."""
    out = {q.upper() for q, _ in types.values()}
    finer = ("q8_0 or f16" if out - {"Q8_0", "F16", "BF16", "F32"} else "f16 or f32" if out & {"Q8_0", "BF16"}
             else "f32")
    return LossyMergeError(fit.rel_error, fit.kept, fit.describe(), f"merge with `quant` {finer}")


def _open_model(path: str | os.PathLike[str]) -> GGUFModelFile:
    """:func:`~loratools.io.gguf_model.open_gguf_model` (every split's header checked), refused when two splits hold
    a tensor of one name (a merge would change both; llama.cpp's ``llama_model_loader`` refuses such a set)."""
    model = open_gguf_model(path)
    seen: dict[str, int] = {}
    for t in model.all_tensors():
        if seen.setdefault(t.name, t.split) != t.split:  # within one file the gguf reader refuses it already
            raise CorruptFileError(model.paths[t.split], f"the tensor {t.name} is also in split {seen[t.name] + 1} "
                                                         "(llama.cpp's model loader refuses a duplicated tensor)")
    return model


def _report(model: GGUFModelFile, plan: dict[str, list[Part]], paths: list[Path], op: str, stats: Stats,
            inputs: Sequence[AdapterInput], **more: Any) -> MergeReport:
    by = model.by_name()
    return MergeReport(paths[0], op, len(plan), sum(len(ts) for ts in model.tensors) - len(plan), model.nbytes,
                       files=tuple(paths), quant=stats.report(), adapters=[i.describe() for i in inputs],
                       adapted_nbytes=sum(by[n].nbytes for n in plan), **more)


def _recorder(model: GGUFModelFile, inputs: Sequence[AdapterInput], plan: dict[str, list[Part]],
              types: dict[str, tuple[str, int]], writer: RecordWriter, prec: torch.dtype, sign: float) -> tuple[Any, Any]:
    """``(hook, finish)`` of a merge that writes a record: the hook makes each tensor's
    :class:`~.gguf_record.PatchRecorder`, replaying the un-merge (``requant_rows`` with −ΔW, to the tensor's own
    type); ``finish(meta)`` writes the record with the ``gguf`` part of its stamp (see :mod:`.gguf_record`)."""
    why = layout_mismatch(model)
    if why:
        raise InvalidOptionError(f"`record` promises the base back byte for byte, and {why}; merge without `record`")
    back = plan_gguf(model, inputs, sign=-sign, precision=prec)

    def hook(t: GGUFTensor) -> PatchRecorder:
        return PatchRecorder(model, t, types[t.name][0],
                             lambda w, s: requant_rows(w, back[t.name], s, t.qtype, prec, t.name)[0], writer)

    def finish(meta: dict[str, Any]) -> None:
        entry = dict(model.kv[0]).get(METADATA_KEY)
        gguf = {"types": {n: t.qtype for n, t in model.by_name().items() if n in plan},
                "files": [file_sha256(p) for p in model.paths], "stamp_kv": entry.hex() if entry else None}
        writer.finish(stamp(**meta, gguf=gguf))

    return hook, finish


def merge_gguf(base: str | os.PathLike[str], adapters: Any, out: str | os.PathLike[str], *, quant: str | None = None,
               precision: str | torch.dtype = torch.float32, record: Any = None, force: bool = False,
               progress: Any = None, sign: float = 1.0,
               op: str = "merge", verify: bool = False, allow_lossy: bool = False) -> MergeReport:
    """Write ``out`` = the GGUF model ``base`` with W = Q(deq(W0) + sign·Σ wᵢ·ΔWᵢ) for every adapted tensor.

    ``quant``: ``"same"`` (default: each tensor's own type, refused before writing where loratools cannot
    write that type), or a type name (``q8_0``, ``f16``, ``bf16``, ``f32``, or any type
    :func:`loratools.gguf.quants.can_quantize` accepts) for the adapted tensors. A split ``base`` gives
    a split ``out`` (see :func:`loratools.io.gguf_model.out_split_paths`). With ``verify``, :func:`verify_gguf`
    checks the written model; a single file is checked before it is renamed into place (nothing is left at
    ``out`` when it fails), a split one once all its parts are in place. With ``record``, also writes the
    record (:mod:`.gguf_record`) that lets :func:`unmerge_gguf` give ``base`` back byte for byte.

    A merge whose written model carries too little of ΔW (``report.update``, see :class:`~.report.UpdateFit`:
    a share of ΔW below :data:`~.report.MIN_KEPT`, typically ``quant="same"`` on a 4-bit model with an
    adapter below its step) raises :class:`~loratools.errors.LossyMergeError` before anything is renamed into
    place; ``allow_lossy`` writes it anyway (``report.allowed_lossy``). An un-merge only reports the figure.
    """
    quant = quant or "same"
    if quant.lower() != "same" and not can_quantize(quant):
        raise InvalidOptionError(f"`quant` {quant!r} is not a type loratools can write; choose one of "
                                 f"{', '.join(QUANTS)}")
    prec = resolve_precision(precision)
    inputs = adapter_inputs(adapters)
    model = _open_model(base)
    plan = plan_gguf(model, inputs, sign=sign, precision=prec)
    types = gguf_out_types(model, plan, quant)
    paths = out_split_paths(Path(out), len(model.paths))
    meta: dict[str, Any] = {"op": op, "inputs": inputs, "precision": prec, "device": torch.device("cpu"), "quant": quant}
    kv = raw_kv(model, [(METADATA_KEY, string_kv(METADATA_KEY, stamp(**meta)[METADATA_KEY]))])
    ins: tuple[str | os.PathLike[str], ...] = (*model.paths, *input_paths(inputs))
    if record is not None:
        check_output(record, force=force, inputs=(*paths, *ins), what="`record`")
    stats, checked, nbytes = Stats(), None, 0
    # the record's temporary (and its scratch) under the record's lock for the whole merge; renamed after OUT
    with atomic_output(record, force=force, inputs=(*paths, *ins)) if record is not None else \
            contextlib.nullcontext() as rtmp:
        writer = RecordWriter(Path(record), rtmp) if record is not None and rtmp is not None else None
        hook, finish = _recorder(model, inputs, plan, types, writer, prec, sign) if writer else (None, None)

        def check(tmps: list[Path]) -> None:
            nonlocal checked
            fit = stats.update()
            if op == "merge" and fit is not None and fit.lossy and not allow_lossy:
                raise _lossy(fit, types)
            if verify and len(paths) == 1:
                checked = verify_gguf(base, inputs, tmps[0], precision=prec, allow_lossy=allow_lossy)
                checked.check()
            if finish is not None:
                finish(meta)

        try:
            write_model(model, plan, types, kv, paths, prec, stats, force=force, inputs=ins, progress=progress,
                        hook=hook, check=check)
        finally:
            if writer is not None:
                nbytes = writer.nbytes
                writer.close()
    if verify and checked is None:  # split parts are named after each other: checked where they now are
        checked = verify_gguf(base, inputs, paths[0], precision=prec, allow_lossy=allow_lossy)
        checked.check()
    fit = stats.update()
    return _report(model, plan, paths, op, stats, inputs, verify=checked,
                   record=Path(record) if record is not None else None, record_nbytes=nbytes, update=fit,
                   allowed_lossy=op == "merge" and fit is not None and fit.lossy)


def unmerge_gguf(merged: str | os.PathLike[str], adapters: Any, out: str | os.PathLike[str], *, record: Any = None,
                 ignore_stamp: bool = False, **options: Any) -> MergeReport:
    """Write ``out`` with W0 ≈ Q(deq(W) − Σ wᵢ·ΔWᵢ): without ``record``, the base again up to one more
    requantization (never exact; the report's figures say how far). With the ``record`` of the merge, the base's
    files byte for byte (each restored tensor and each file checked against the sha256 the record holds), each
    tensor in its original type (``quant`` is then the record's).

    The merged model's stamp (each adapter's content hash and weight) is checked first, as for safetensors
    (:func:`~.checks.check_stamp`), and a mismatch refused; ``ignore_stamp`` skips that check."""
    model = _open_model(merged)
    inputs = adapter_inputs(adapters)
    if not ignore_stamp:
        check_stamp(str(model.fields.get(METADATA_KEY) or "") or None, merged, inputs)
    if record is None:
        return merge_gguf(merged, inputs, out, sign=-1.0, op="unmerge", **options)
    return _restore(model, inputs, Path(out), Path(record), **options)


def _restore(model: GGUFModelFile, inputs: Sequence[AdapterInput], out: Path, record: Path, *,
             quant: str | None = None, precision: Any = None, force: bool = False,
             progress: Any = None) -> MergeReport:
    """:func:`unmerge_gguf` with a record (see :mod:`.gguf_record`)."""
    if quant is not None:
        raise InvalidOptionError("`quant` comes from the record when un-merging with `record`; drop `quant`")
    patches, hashes, info = read_record(record, inputs)
    orig, files, entry = record_info(info, record)
    prec = resolve_precision(info.get("precision", "float32"))
    plan = plan_gguf(model, inputs, sign=-1.0, precision=prec)
    missing = sorted(set(plan) ^ set(orig) | set(plan) - set(hashes))
    if missing or len(files) != len(model.paths):
        raise CorruptFileError(record, f"it is the record of another model: it does not match {missing[0]}" if missing
                               else f"it is the record of a model in {len(files)} files, not {len(model.paths)}")
    types = gguf_out_types(model, plan, orig)
    paths = out_split_paths(out, len(model.paths))
    by = model.by_name()

    def check(tmps: list[Path]) -> None:
        for tmp, want, p in zip(tmps, files, paths):
            if file_sha256(tmp) != want:
                raise CorruptFileError(record, f"the un-merged {p.name} is not the original file byte for byte")

    stats = Stats()
    write_model(model, plan, types, raw_kv(model, [(METADATA_KEY, entry)]), paths, prec, stats, force=force,
           inputs=(*model.paths, *input_paths(inputs), record), progress=progress, check=check,
           hook=lambda t: PatchRestorer(by[t.name], orig[t.name], patches.get(t.name, {}), hashes[t.name], record))
    return _report(model, plan, paths, "unmerge", stats, inputs, record=record, record_nbytes=record.stat().st_size,
                   exact=True)


def _deviation(base: GGUFModelFile, merged: GGUFModelFile, b: GGUFTensor, m: GGUFTensor, parts: Sequence[Part],
               prec: torch.dtype) -> tuple[float, float, float, float, float]:
    """(max |merged − exact|, ‖merged − exact‖², ‖Q(exact) − exact‖², ⟨realized, ΔW⟩, ‖ΔW‖²) with
    exact = deq(W0) + ΔW, realized = deq(merged) − deq(W0) and Q the merged tensor's own type, a block of rows at
    a time (‖merged − exact‖² is ‖realized − ΔW‖²: the :class:`~.report.UpdateFit` sums)."""
    cols, step = b.shape[-1], max(1, BLOCK_VALUES // b.shape[-1])
    mx = e2 = r2 = dot = d2 = 0.0
    for s in range(0, b.rows, step):
        n = min(step, b.rows - s)
        w0 = read_rows(base, b, s, n)
        delta = torch.zeros(n, cols, dtype=prec)
        for p in parts:
            lo, hi = max(s, p.first), min(s + n, p.first + p.L.shape[0])
            if lo < hi:
                delta[lo - s:hi - s].addmm_(p.L[lo - p.first:hi - p.first].to(prec), p.R.to(prec))
        acc = torch.from_numpy(w0).to(prec) + delta  # as requant_rows forms the merged sum
        d64 = delta.to(torch.float64).numpy()
        exact = w0.astype(np.float64) + d64
        out = read_rows(merged, m, s, n).astype(np.float64)
        got = out - exact
        dot += float(((out - w0.astype(np.float64)) * d64).sum())
        d2 += float((d64 * d64).sum())
        ref = dequantize(quantize(acc.to(torch.float32).numpy(), m.qtype), m.qtype, (n, cols)) - exact
        mx = max(mx, float(np.abs(got).max()) if got.size else 0.0)
        e2 += float((got * got).sum())
        r2 += float((ref * ref).sum()) + (1e-6 ** 2) * float((exact * exact).sum())
    return mx, e2, r2, dot, d2


def verify_gguf(base: str | os.PathLike[str], adapters: Any, merged: str | os.PathLike[str], *,
                precision: str | torch.dtype = torch.float32, progress: Any = None,
                allow_lossy: bool = False) -> VerifyReport:
    """Check the GGUF ``merged`` against ``base`` + Σ wᵢ·ΔWᵢ, tensor by tensor (a ``VerifyReport``).

    An adapted tensor's ratio is ‖merged − exact‖F / (1.5·‖Q(exact) − exact‖F), exact = deq(W0) + ΔW in
    float32 and Q the merged tensor's type: requantizing the exact sum itself gives 1/1.5, a merge that
    missed the q/k permutation or the scale gives far more; > 1 fails. Every other tensor must be the
    base's bytes. The merged model must also carry ΔW (``update``, the figure a merge refuses on, see
    :class:`~.report.UpdateFit`): a lossy one fails unless ``allow_lossy``.
    """
    prec = resolve_precision(precision)
    bm, mm = _open_model(base), _open_model(merged)
    plan = plan_gguf(bm, adapter_inputs(adapters), precision=prec)
    bt, mt = bm.by_name(), mm.by_name()
    if set(bt) != set(mt):
        raise WrongBaseError(f"the merged model and the base hold different tensors "
                             f"(first: {sorted(set(bt) ^ set(mt))[0]})")
    checks, bad, types = [], [], set()
    sums: dict[str, tuple[float, float, float]] = {}
    if progress:
        progress(0, total=len(bt))
    for name in sorted(bt):
        b, m = bt[name], mt[name]
        if b.shape != m.shape:
            raise ShapeMismatchError(name, b.shape, m.shape, "the merged model is not a merge of the base")
        if name in plan:
            types.add(m.qtype)
            mx, e2, r2, dot, d2 = _deviation(bm, mm, b, m, plan[name], prec)
            sums[name] = (e2, dot, d2)
            checks.append(ModuleCheck(name, mx, math.sqrt(e2) / (1.5 * math.sqrt(r2)) if r2 else 0.0))
        elif b.qtype != m.qtype or bm.read(b) != mm.read(m):
            bad.append(name)
        if progress:
            progress(1)
    return VerifyReport(checks, bad, ",".join(sorted(types)), update=UpdateFit.from_sums(sums),
                        allow_lossy=allow_lossy)
