"""One tensor of a merge or an exact un-merge, a block of rows at a time.

Each function here yields the output tensor's bytes as consecutive blocks of
rows for :func:`loratools.io.rewrite_model` to write at their planned offset.
A block is read from disk into a reused buffer, merged in cache-sized pieces
(:func:`~.kernels.merge_rows`), and — for a record — compared with what an
un-merge will recompute, so memory holds a few blocks whatever the tensor's
size, and the record costs one more pass over the same cached block.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..dtypes import check_fits
from ..errors import CorruptFileError, NonFiniteError
from ..io import CODE_DTYPES, RowReader, Span, buffer
from .kernels import check_finite, dora_norms, dora_of, dora_scale, factors_of, merge_rows, row_step
from .plan import TensorPlan
from .patch import PatchApplier, PatchBuilder, values_at
from .record import Digest, RecordWriter, read_patch

__all__ = ["Arithmetic", "merged_blocks", "restored_blocks"]


@dataclass(frozen=True)
class Arithmetic:
    """Where and in what precision a job sums."""

    precision: torch.dtype
    device: torch.device


def _shape2(span: Span, plan: TensorPlan) -> tuple[int, int]:
    """The (rows, cols) view a tensor is merged in: (n·d, cols) for stacked experts (see ``kernels._factors``)."""
    experts = any(m.kind == "experts" for m, _ in plan.deltas) and len(span.shape) == 3
    rows = (span.shape[0] * span.shape[1] if experts else span.shape[0]) if span.shape else 1
    n = 1
    for d in span.shape:
        n *= d
    return rows, n // max(1, rows)


def _block(ar: Arithmetic, slot: str, n: int, cols: int, dtype: torch.dtype) -> Tensor | None:
    """This thread's reused ``(n, cols)`` buffer on the CPU; None on a GPU (results come back fresh)."""
    if ar.device.type != "cpu":
        return None
    return buffer(slot, n * cols * dtype.itemsize).view(dtype).reshape(n, cols)


def _merge(w: Tensor, start: Tensor, factors: list[tuple[Tensor, Tensor]], i: int, dtype: torch.dtype,
           ar: Arithmetic, slot: str, key: str, where: str, what: str, check: bool = True,
           **dora: Tensor | None) -> Tensor:
    """:func:`merge_rows` into this thread's buffers, naming ``key`` when the sum is not finite.

    Every call shares one accumulator (free again once its result is cast into the ``slot`` buffer), so a
    record's second pass over a block keeps the working set at the merge's size."""
    n, cols = start.shape
    if not factors:
        if check:  # a full tensor (modules_to_save) or an untied head's source, cast as it is
            check_fits(key, start, dtype)
        out = _block(ar, slot, n, cols, dtype)
        return out.copy_(start) if out is not None else start.to(dtype)
    try:
        r = merge_rows(start, factors, i, dtype=dtype, precision=ar.precision,
                       acc=_block(ar, "acc", n, cols, ar.precision), out=_block(ar, slot, n, cols, dtype),
                       check=check, **dora)
    except NonFiniteError:
        check_finite(key, w, where)
        raise NonFiniteError(key, what) from None
    return r.cpu()


def merged_blocks(key: str, span: Span, plan: TensorPlan, dtype: torch.dtype, ar: Arithmetic,
                  record: RecordWriter | None = None) -> Iterator[Tensor]:
    """``cast(W0 + Σ wᵢ·ΔWᵢ)`` (W0 replaced first where the plan says so) in blocks of rows.

    With ``record``, each block's W0 is compared with what :func:`restored_blocks`
    will recompute from the merged block (the same blocks, the same factors),
    and the patch and W0's checksum go to ``record`` once the last block is out.
    DoRA: a first pass over W0 gives ‖V‖_row (:func:`~.kernels.dora_norms`), which
    the record keeps as the patch's ``dora_norm`` part (the un-merge cannot recompute it).
    """
    rows, cols = _shape2(span, plan)
    base = CODE_DTYPES[span.dtype]
    factors = factors_of(plan.deltas, precision=ar.precision, device=ar.device)
    back = factors_of(plan.deltas, sign=-1.0, precision=ar.precision, device=ar.device) if record else []
    replace = plan.replace.reshape(rows, cols) if plan.replace is not None else None
    step = row_step(rows, cols, ar.device)
    builder = PatchBuilder(span.shape, base, counts=buffer("counts", rows * cols)) if record else None
    sha = Digest()
    with RowReader(span, rows) as reader:
        dora, norms, scale = dora_of(plan.deltas), None, None
        if dora is not None:
            # the pre-pass reuses the main pass's accumulator: fresh blocks per row block cost ~140 MB of
            # peak RSS (allocator arenas of the worker threads) on bench/merge.py's model
            norms = dora_norms(((i, reader.read(i, min(step, rows - i))) for i in range(0, rows, step)), factors,
                               dora, precision=ar.precision,
                               acc=lambda n: _block(ar, "acc", n, cols, ar.precision))
            scale = dora_scale(dora, norms)
        for i in range(0, rows, step):
            n = min(step, rows - i)
            w0 = reader.read(i, n)
            start = replace[i:i + n] if replace is not None else w0
            out = _merge(w0, start, factors, i, dtype, ar, "out", key, "the base model",
                         f"the merge (the sum overflows {dtype})", post_mul=scale)
            out = _token_rows(out, plan, i)
            if builder is not None:
                sha.update(w0.reshape(-1).view(torch.uint8).numpy().data)
                recon = out if not back else _merge(out, out, back, i, base, ar, "recon", key, "the merged tensor",
                                                     "the un-merge of the merged tensor", check=False, pre_div=scale)
                builder.add(w0, recon)
            yield out
        if record is not None and builder is not None:
            patch = builder.patch(lambda idx: values_at(reader.read, idx, rows, cols, step, base))
            if norms is not None:
                patch["dora_norm"] = norms.cpu()
            record.add(key, patch, sha.value())


def _token_rows(out: Tensor, plan: TensorPlan, first: int) -> Tensor:
    """The block of rows ``first …`` with peft's trainable-token rows that fall in it copied in (last, as peft)."""
    if plan.rows is None:
        return out
    idx, values = plan.rows
    sel = (idx >= first) & (idx < first + out.shape[0])
    if not bool(sel.any()):
        return out
    check_fits(f"{plan.key} (trainable_token_indices rows)", values[sel], out.dtype)
    return out.index_copy(0, idx[sel] - first, values[sel].reshape(-1, out.shape[1]).to(out.dtype))


def restored_blocks(key: str, span: Span, plan: TensorPlan, patch: Mapping[str, Span], digest: str, ar: Arithmetic,
                    record_path: Path) -> Iterator[Tensor]:
    """The base's tensor back from the merged one: ``cast(W − Σ wᵢ·ΔWᵢ)`` and the record's patch, in blocks.

    Raises :class:`CorruptFileError` after the last block if the restored bytes
    do not have the checksum ``digest`` (:class:`~.record.Digest`) (the output is then never renamed into place).
    """
    rows, cols = _shape2(span, plan)
    dtype = CODE_DTYPES[span.dtype]
    back = factors_of(plan.deltas, sign=-1.0, precision=ar.precision, device=ar.device)
    parts = read_patch(record_path, key, patch, span.shape, dtype, extra=("dora_norm",))
    dora, norms = dora_of(plan.deltas), parts.pop("dora_norm", None)
    scale = None
    if dora is not None:
        if norms is None:
            raise CorruptFileError(record_path, f"it holds no DoRA row norms for {key}; it is the record of another "
                                   "merge")
        rows_m = dora.magnitude.numel() if dora.magnitude is not None else 0  # is_dora: a magnitude is there
        if (norms.ndim != 1 or norms.numel() != rows_m or not norms.is_floating_point()
                or not bool(torch.isfinite(norms).all())):
            raise CorruptFileError(record_path, f"its DoRA row norms for {key} are not {rows_m} "
                                   f"finite numbers (got {norms.dtype} {tuple(norms.shape)})")
        scale = dora_scale(dora, norms.to(device=ar.device, dtype=ar.precision))
    applier = PatchApplier(parts, span.shape, dtype)
    step = row_step(rows, cols, ar.device)
    sha = Digest(like=digest)
    with RowReader(span, rows) as reader:
        for i in range(0, rows, step):
            n = min(step, rows - i)
            w = reader.read(i, n)
            r = _merge(w, w, back, i, dtype, ar, "out", key, "the merged model", "the un-merge", check=False,
                       pre_div=scale)
            r = applier.apply(r.reshape(-1), i * cols)
            sha.update(r.view(torch.uint8).numpy().data)
            yield r
    if sha.value() != digest:
        raise CorruptFileError(record_path, f"restoring {key} did not give the base's bits back; un-merge on the "
                                            "same kind of device as the merge (or the merged model was changed)")
