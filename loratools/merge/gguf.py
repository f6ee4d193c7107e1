"""Merge adapters into a llama.cpp GGUF model (and take them out, and check a merge), streaming.

For every adapted tensor, a block of rows at a time::

    W = Q_out( deq(W0) + Σᵢ wᵢ·ΔWᵢ )          ΔW's rows in llama.cpp's q/k order for ``llama``

``deq`` is ``gguf.quants.dequantize`` (bit-identical to llama.cpp), the sum is formed in float32,
and ``Q_out`` is :func:`loratools.gguf_quants.quantize` (byte-identical to llama.cpp's reference
quantizers) to the tensor's own type (``quant="same"``) or to the type asked for. llama.cpp's
converter permutes the rows of ``attn_q``/``attn_k`` for its RoPE (``LlamaModel.permute``), so
ΔW's rows are permuted the same way (:func:`loratools.gguf_arch.permute_rows`), exactly as the GGUF
adapter writer permutes ``lora_b``. Adapter module names map to GGUF tensor names by the model's
``general.architecture`` (:func:`loratools.gguf_arch.gguf_target`).

Untouched tensors and all key/values are copied byte for byte (the merge adds one key,
``loratools.merge``, naming the adapters); a split model is written in the same split layout.

The report gives, per (input type → output type), the requantization error against the exact
``deq(W0) + ΔW`` beside an estimate of what the base's own quantization already cost: that type's
error on the base's values shuffled within each row (so they lie off its grid, as the original
float weights did), on up to 64 rows per tensor.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor

from ..errors import InvalidOptionError, MissingModuleError, ShapeMismatchError, UnsupportedModuleError, WrongBaseError
from ..gguf_arch import NO_LORA, gguf_target, permute_rows, qk_heads
from ..gguf_quants import block_sizes, can_quantize, dequantize, quantize, type_name
from ..io.gguf_model import (GGUFModelFile, GGUFTensor, copy_bytes, open_gguf_model, out_split_paths, raw_kv,
                             string_kv, write_gguf_model)
from ..io.paths import atomic_output, check_output
from .kernels import low_rank
from .plan import METADATA_KEY, AdapterInput, adapter_inputs, resolve_precision, stamp

__all__ = ["GGUFMergeReport", "merge_gguf", "unmerge_gguf", "verify_gguf", "plan_gguf", "gguf_out_types", "QUANTS"]

#: what ``quant`` names besides any type loratools can quantize
QUANTS = ("same", "q8_0", "f16", "bf16", "f32")
_BLOCK_VALUES = 1 << 20  # values per block of rows (4 MB of float32): memory stays flat whatever the tensor
_SAMPLE_ROWS = 64  # rows per tensor for the estimate of the base's own quantization error


@dataclass(frozen=True)
class Part:
    """``sign·w·ΔW`` restricted to a tensor's rows ``first … first + len(L)``, as ``L @ R`` (float32)."""

    first: int
    L: Tensor
    R: Tensor


@dataclass(frozen=True)
class GGUFMergeReport:
    """What a GGUF merge or un-merge did, with the requantization figures per type."""

    output: Path
    op: str
    adapted: int
    copied: int
    nbytes: int
    files: list[Path]
    quant: dict[str, dict[str, Any]] = field(default_factory=dict)
    adapters: list[dict[str, Any]] = field(default_factory=list)
    record: Path | None = None
    record_nbytes: int = 0
    exact: bool | None = None
    notes: tuple[str, ...] = ()
    #: ``merge_model(verify=True)``: the check of the written model (it passed)
    verify: Any = None

    def to_json(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["output"], d["files"] = str(self.output), [str(p) for p in self.files]
        d["record"], d["notes"] = None, list(self.notes)
        d["verify"] = self.verify.to_json() if self.verify is not None else None
        return d


def _heads(model: GGUFModelFile, arch: str) -> tuple[int | None, int | None]:
    n = model.fields.get(f"{arch}.attention.head_count")
    kv = model.fields.get(f"{arch}.attention.head_count_kv")
    return (int(n) if n else None), (int(kv) if kv else (int(n) if n else None))


def plan_gguf(model: GGUFModelFile, inputs: Sequence[AdapterInput], *, sign: float = 1.0,
              precision: torch.dtype = torch.float32) -> dict[str, list[Part]]:
    """``{GGUF tensor name: [Part]}``: every adapter module placed on the model's tensors, or refused by name.

    Raises :class:`MissingModuleError` naming the modules the model has no tensor for,
    :class:`ShapeMismatchError`, :class:`UnsupportedModuleError` (conv layers, full tensors).
    """
    arch = str(model.fields.get("general.architecture") or "")
    n_head, n_kv = _heads(model, arch)
    tensors = model.by_name()
    plan: dict[str, list[Part]] = {}
    missing: list[str] = []
    for inp in inputs:
        ad = inp.adapter
        ad.check_finite()
        if not math.isfinite(inp.weight):
            raise InvalidOptionError(f"`weight` {inp.weight} for {inp.label or 'an adapter'} is not a finite number")
        if ad.saved:
            raise UnsupportedModuleError("merging into a GGUF model", sorted(ad.saved),
                                         "full tensors (modules_to_save) are not merged into GGUF models")
        for name, m in ad.items():
            if m.rank == 0:
                continue
            t = gguf_target(name, arch) if m.kind == "linear" or m.kind == "embedding" else None
            gname = f"{t.name}.weight" if t is not None else None
            if t is None or gname not in tensors or (arch, t.name) in NO_LORA:
                missing.append(f"{name}" + (f" ({gname})" if gname else ""))
                continue
            plan.setdefault(gname, []).append(_part(name, m, inp.weight * sign, t.expert, tensors[gname],
                                                    qk_heads(t.name, arch, n_head, n_kv), precision))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise MissingModuleError(f"{missing[0]}{more}", f"the {arch or 'unknown'} GGUF model {model.paths[0]}",
                                 "its tensors are named from general.architecture; wrong base model?")
    return plan


def _part(name: str, m: Any, coeff: float, expert: int | None, t: GGUFTensor, heads: int | None,
          precision: torch.dtype) -> Part:
    want = tuple(m.weight_shape)
    have = t.shape[1:] if expert is not None else t.shape
    if tuple(have) != want or (expert is not None and expert >= t.shape[0]):
        raise ShapeMismatchError(name, f"{t.name} of {t.shape}", f"{want} from the adapter", "wrong base model?")
    L, R = low_rank(m, coeff, precision=precision)
    if heads is not None:  # llama.cpp's q/k row order: permuting ΔW's rows is permuting L's
        if heads <= 0 or L.shape[0] % (2 * heads):
            raise InvalidOptionError(f"{t.name} needs the model's head count ({t.name} rows {L.shape[0]}, "
                                     f"heads {heads}); the GGUF model lacks a usable attention.head_count")
        L = permute_rows(L, heads)
    return Part((expert or 0) * want[0], L.contiguous(), R.contiguous())


def _out_type(t: GGUFTensor, quant: str) -> str:
    return t.qtype if quant.lower() == "same" else type_name(quant)


def gguf_out_types(model: GGUFModelFile, plan: dict[str, list[Part]], quant: str) -> dict[str, tuple[str, int]]:
    """``{tensor: (output type, bytes)}`` for the adapted tensors; refuses, before anything is written, the
    types loratools cannot write, naming every such tensor and its type."""
    tensors = model.by_name()
    out, bad = {}, []
    for name in plan:
        t = tensors[name]
        q = _out_type(t, quant)
        block, size = block_sizes(q) if can_quantize(q) else (0, 0)
        if not block or t.shape[-1] % block:
            bad.append((name, t.qtype, q, block))
            continue
        out[name] = (q, t.rows * (t.shape[-1] // block) * size)
    if bad:
        shown = ", ".join(f"{n} ({a})" for n, a, _, _ in bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        q = bad[0][2]
        why = (f"rows of {tensors[bad[0][0]].shape[-1]} values are not a multiple of {q}'s block of {bad[0][3]}"
               if can_quantize(q) else f"loratools cannot quantize {q}")
        hint = "choose `quant` q8_0, f16 or bf16" if quant.lower() == "same" else "choose another `quant`"
        raise InvalidOptionError(f"cannot requantize {shown} as {'their own type' if quant.lower() == 'same' else q}: "
                                 f"{why}; {hint}")
    return out


class _Stats:
    """Σ of squared errors and norms per (input type → output type), for the report."""

    def __init__(self) -> None:
        self.by: dict[str, dict[str, float]] = {}

    def add(self, key: str, **figures: float) -> None:
        d = self.by.setdefault(key, {"tensors": 0.0, "max_abs": 0.0, "err2": 0.0, "w2": 0.0, "d2": 0.0, "w02": 0.0,
                                     "base_err2": 0.0, "base_w2": 0.0})
        for k, v in figures.items():
            d[k] = max(d[k], v) if k == "max_abs" else d[k] + v

    def report(self) -> dict[str, dict[str, Any]]:
        def rel(a: float, b: float) -> float:
            return math.sqrt(a / b) if b else 0.0
        return {k: {"tensors": int(d["tensors"]), "requant_rel_error": rel(d["err2"], d["w2"]),
                    "requant_max_abs_error": d["max_abs"], "base_rel_error_est": rel(d["base_err2"], d["base_w2"]),
                    "delta_rel": rel(d["d2"], d["w02"])} for k, d in self.by.items()}


def _base_error(w0: np.ndarray, qtype: str) -> tuple[float, float]:
    """(Σ err², Σ w²) of quantizing ``w0``'s values to ``qtype`` after shuffling each row (off its grid)."""
    if qtype in ("F32", "F64") or not can_quantize(qtype):
        return 0.0, 0.0
    rows = w0[:_SAMPLE_ROWS]
    x = rows[:, np.random.default_rng(0).permutation(rows.shape[1])]
    err = dequantize(quantize(x, qtype), qtype, x.shape).astype(np.float64) - x
    return float((err * err).sum()), float((x.astype(np.float64) ** 2).sum())


def _rows(model: GGUFModelFile, t: GGUFTensor, first: int, n: int) -> np.ndarray:
    """Rows ``first … first + n`` of ``t`` dequantized: a writable float32 (n, cols) array."""
    return np.array(dequantize(np.frombuffer(model.read(t, first, n), np.uint8), t.qtype, (n, t.shape[-1])))


def _merge_tensor(model: GGUFModelFile, t: GGUFTensor, parts: Sequence[Part], qtype: str, f: IO[bytes],
                  stats: _Stats, precision: torch.dtype) -> None:
    """Write ``Q(deq(W0) + Σ L@R)`` of ``t`` to ``f``, a block of rows at a time, and add its figures."""
    cols = t.shape[-1]
    step = max(1, _BLOCK_VALUES // cols)
    key = f"{t.qtype}→{qtype}"
    stats.add(key, tensors=1)
    for s in range(0, t.rows, step):
        n = min(step, t.rows - s)
        w0 = _rows(model, t, s, n)
        if s == 0:
            be, bw = _base_error(w0, t.qtype)
            stats.add(key, base_err2=be, base_w2=bw)
        acc = torch.from_numpy(w0).to(precision, copy=True)
        delta = torch.zeros_like(acc)
        for p in parts:
            lo, hi = max(s, p.first), min(s + n, p.first + p.L.shape[0])
            if lo < hi:
                delta[lo - s:hi - s].addmm_(p.L[lo - p.first:hi - p.first].to(precision), p.R.to(precision))
        acc += delta
        exact = acc.to(torch.float32).numpy()
        q = quantize(exact, qtype, what=t.name)
        err = dequantize(q, qtype, exact.shape).astype(np.float64) - acc.to(torch.float64).numpy()
        stats.add(key, max_abs=float(np.abs(err).max()) if err.size else 0.0, err2=float((err * err).sum()),
                  w2=float((acc.to(torch.float64) ** 2).sum()), d2=float((delta.to(torch.float64) ** 2).sum()),
                  w02=float((w0.astype(np.float64) ** 2).sum()))
        f.write(np.ascontiguousarray(q).tobytes())


def merge_gguf(base: str | os.PathLike[str], adapters: Any, out: str | os.PathLike[str], *, quant: str | None = None,
               precision: str | torch.dtype = torch.float32, record: Any = None, force: bool = False,
               extra_inputs: Sequence[str | os.PathLike[str]] = (), progress: Any = None, sign: float = 1.0,
               op: str = "merge", verify: bool = False) -> GGUFMergeReport:
    """Write ``out`` = the GGUF model ``base`` with W = Q(deq(W0) + sign·Σ wᵢ·ΔWᵢ) for every adapted tensor.

    ``quant``: ``"same"`` (default: each tensor's own type, refused before writing where loratools cannot
    write that type), or a type name (``q8_0``, ``f16``, ``bf16``, ``f32``, or any type
    :func:`loratools.gguf_quants.can_quantize` accepts) for the adapted tensors. A split ``base`` gives
    a split ``out`` (see :func:`loratools.io.gguf_model.out_split_paths`). With ``verify``, :func:`verify_gguf`
    checks the written model; a single file is checked before it is renamed into place (nothing is left at
    ``out`` when it fails), a split one once all its parts are in place.
    """
    if record is not None:
        raise InvalidOptionError("`record` is not available for GGUF models: requantization cannot be undone "
                                 "exactly; keep the base .gguf to go back")
    quant = quant or "same"
    if quant.lower() != "same" and not can_quantize(quant):
        raise InvalidOptionError(f"`quant` {quant!r} is not a type loratools can write; choose one of "
                                 f"{', '.join(QUANTS)}")
    prec = resolve_precision(precision)
    inputs = adapter_inputs(adapters)
    model = open_gguf_model(base)
    plan = plan_gguf(model, inputs, sign=sign, precision=prec)
    types = gguf_out_types(model, plan, quant)
    paths = out_split_paths(Path(out), len(model.paths))
    meta = stamp(op, inputs, prec, torch.device("cpu"), quant=quant)
    kv = raw_kv(model, [(METADATA_KEY, string_kv(METADATA_KEY, meta[METADATA_KEY]))])
    stats = _Stats()
    total = sum(len(ts) for ts in model.tensors)
    if progress:
        progress(0, total=total)

    def data(t: GGUFTensor, f: IO[bytes]) -> None:
        if t.name in plan:
            _merge_tensor(model, t, plan[t.name], types[t.name][0], f, stats, prec)
        else:
            copy_bytes(model.paths[t.split], t.offset, t.nbytes, f)
        if progress:
            progress(1)

    ins = (*model.paths, *extra_inputs)
    for p in paths:
        check_output(p, force=force, inputs=ins)
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(atomic_output(p, force=force, inputs=ins)) for p in paths]
        write_gguf_model(tmps, model, kv, types, data)
        checked = verify_gguf(base, inputs, tmps[0], precision=prec) if verify and len(paths) == 1 else None
        if checked is not None:
            checked.check()
    if verify and checked is None:  # split parts are named after each other: checked where they now are
        checked = verify_gguf(base, inputs, paths[0], precision=prec)
        checked.check()
    return GGUFMergeReport(paths[0], op, len(plan), total - len(plan), model.nbytes, paths, stats.report(),
                           [i.describe() for i in inputs], verify=checked)


def unmerge_gguf(merged: str | os.PathLike[str], adapters: Any, out: str | os.PathLike[str],
                 **options: Any) -> GGUFMergeReport:
    """Write ``out`` with W0 ≈ Q(deq(W) − Σ wᵢ·ΔWᵢ): the base again up to one more requantization (never exact;
    the report's figures say how far). Refuses adapters the merged model's stamp says did not go in."""
    model = open_gguf_model(merged)
    stamped = model.fields.get(METADATA_KEY)
    if stamped:
        went_in = {a["fingerprint"] for a in json.loads(stamped).get("adapters", [])}
        for i in adapter_inputs(adapters):
            if went_in and i.adapter.fingerprint.sha256 not in went_in:
                raise WrongBaseError(f"{merged} records the adapters merged into it, and {i.label or 'this adapter'} "
                                     "is not one of them")
    return merge_gguf(merged, adapters, out, sign=-1.0, op="unmerge", **options)


def _deviation(base: GGUFModelFile, merged: GGUFModelFile, b: GGUFTensor, m: GGUFTensor, parts: Sequence[Part],
               prec: torch.dtype) -> tuple[float, float, float]:
    """(max |merged − exact|, ‖merged − exact‖², ‖Q(exact) − exact‖²) with exact = deq(W0) + ΔW and Q the
    merged tensor's own type, a block of rows at a time."""
    cols, step = b.shape[-1], max(1, _BLOCK_VALUES // b.shape[-1])
    mx = e2 = r2 = 0.0
    for s in range(0, b.rows, step):
        n = min(step, b.rows - s)
        acc = torch.from_numpy(_rows(base, b, s, n)).to(prec)
        for p in parts:
            lo, hi = max(s, p.first), min(s + n, p.first + p.L.shape[0])
            if lo < hi:
                acc[lo - s:hi - s].addmm_(p.L[lo - p.first:hi - p.first].to(prec), p.R.to(prec))
        exact = acc.to(torch.float64).numpy()
        got = _rows(merged, m, s, n).astype(np.float64) - exact
        ref = dequantize(quantize(acc.to(torch.float32).numpy(), m.qtype), m.qtype, (n, cols)) - exact
        mx = max(mx, float(np.abs(got).max()) if got.size else 0.0)
        e2 += float((got * got).sum())
        r2 += float((ref * ref).sum()) + (1e-6 ** 2) * float((exact * exact).sum())
    return mx, e2, r2


def verify_gguf(base: str | os.PathLike[str], adapters: Any, merged: str | os.PathLike[str], *,
                precision: str | torch.dtype = torch.float32, progress: Any = None) -> Any:
    """Check the GGUF ``merged`` against ``base`` + Σ wᵢ·ΔWᵢ, tensor by tensor (a ``VerifyReport``).

    An adapted tensor's ratio is ‖merged − exact‖F / (1.5·‖Q(exact) − exact‖F), exact = deq(W0) + ΔW in
    float32 and Q the merged tensor's type: requantizing the exact sum itself gives 1/1.5, a merge that
    missed the q/k permutation or the scale gives far more; > 1 fails. Every other tensor must be the
    base's bytes.
    """
    from . import ModuleCheck, VerifyReport

    prec = resolve_precision(precision)
    bm, mm = open_gguf_model(base), open_gguf_model(merged)
    plan = plan_gguf(bm, adapter_inputs(adapters), precision=prec)
    bt, mt = bm.by_name(), mm.by_name()
    if set(bt) != set(mt):
        raise WrongBaseError(f"the merged model and the base hold different tensors "
                             f"(first: {sorted(set(bt) ^ set(mt))[0]})")
    checks, bad, types = [], [], set()
    if progress:
        progress(0, total=len(bt))
    for name in sorted(bt):
        b, m = bt[name], mt[name]
        if b.shape != m.shape:
            raise ShapeMismatchError(name, b.shape, m.shape, "the merged model is not a merge of the base")
        if name in plan:
            types.add(m.qtype)
            mx, e2, r2 = _deviation(bm, mm, b, m, plan[name], prec)
            checks.append(ModuleCheck(name, mx, math.sqrt(e2) / (1.5 * math.sqrt(r2)) if r2 else 0.0))
        elif b.qtype != m.qtype or bm.read(b) != mm.read(m):
            bad.append(name)
        if progress:
            progress(1)
    return VerifyReport(checks, bad, ",".join(sorted(types)))
