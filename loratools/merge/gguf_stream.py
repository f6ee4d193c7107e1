"""The GGUF merge's engine: adapter modules placed on a GGUF model's tensors, and each adapted tensor
dequantized, summed and requantized a block of rows at a time (the formulas: :mod:`loratools.merge.gguf`).

Every merge, un-merge and record goes through :func:`requant_rows`, so a record can replay an un-merge
bit for bit (:mod:`.gguf_record`).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor

from ..device import cpu_cores, map_in_threads
from ..errors import (InvalidOptionError, MissingModuleError, ShapeMismatchError, UnsupportedConfigError,
                      UnsupportedModuleError)
from ..gguf.arch import NO_LORA, gguf_target, permute_rows, qk_heads
from ..gguf.quants import block_sizes, can_quantize, dequantize, quantize, type_name
from ..io.gguf_model import GGUFModelFile, GGUFTensor, copy_bytes, gguf_heads, write_gguf_model
from ..io.paths import atomic_output, check_output
from .kernels import low_rank
from .plan import AdapterInput, check_bias
from .report import UpdateFit, fit_sums

__all__ = ["Part", "plan_gguf", "gguf_out_types", "Stats", "read_rows", "requant_rows", "merge_tensor",
           "write_model", "QUANTS", "BLOCK_VALUES"]

#: what ``quant`` names besides any type loratools can quantize
QUANTS = ("same", "q8_0", "f16", "bf16", "f32")
BLOCK_VALUES = 1 << 20  # values per block of rows (4 MB of float32): memory stays flat whatever the tensor
_SAMPLE_ROWS = 64  # rows per tensor for the estimate of the base's own quantization error
_DORA_WHY = ("a GGUF merge would add only its ΔW, without DoRA's rescaling of each row to the magnitude m; merge it "
             "into the safetensors model and convert that to GGUF, or flatten it first (`convert --as-lora`)")


@dataclass(frozen=True)
class Part:
    """``sign·w·ΔW`` restricted to a tensor's rows ``first … first + len(L)``, as ``L @ R`` (float32)."""

    first: int
    L: Tensor
    R: Tensor


def plan_gguf(model: GGUFModelFile, inputs: Sequence[AdapterInput], *, sign: float = 1.0,
              precision: torch.dtype = torch.float32) -> dict[str, list[Part]]:
    """``{GGUF tensor name: [Part]}``: every adapter module placed on the model's tensors, or refused by name.

    A ``lora_bias`` goes to the layer's bias tensor (``blk.N.attn_q.bias``), refused as the safetensors merge
    refuses it (:func:`~.plan.check_bias`) where the model has none. Raises :class:`MissingModuleError` naming
    the modules the model has no tensor for, :class:`ShapeMismatchError`, :class:`UnsupportedModuleError`
    (conv layers, full tensors), :class:`UnsupportedConfigError` for DoRA (a merge of its ΔW alone would be wrong).
    """
    arch = str(model.fields.get("general.architecture") or "")
    n_head, n_kv = gguf_heads(model.fields, arch, where=model.paths[0])
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
            if m.is_dora:
                raise UnsupportedConfigError(name, "use_dora", True, _DORA_WHY)
            if m.rank == 0 and m.bias is None:
                continue
            t = gguf_target(name, arch) if m.kind == "linear" or m.kind == "embedding" else None
            gname = f"{t.name}.weight" if t is not None else None
            if t is None or gname not in tensors or (arch, t.name) in NO_LORA:
                missing.append(f"{name}" + (f" ({gname})" if gname else ""))
                continue
            heads = qk_heads(t.name, arch, n_head, n_kv)
            if m.rank > 0:
                plan.setdefault(gname, []).append(_part(name, m, inp.weight * sign, t.expert, tensors[gname],
                                                        heads, precision))
            if m.bias is not None:
                bname = f"{t.name}.bias"
                check_bias(bname, m, {n: (x.qtype, x.shape) for n, x in tensors.items()})
                plan.setdefault(bname, []).append(_bias_part(m, inp.weight * sign, tensors[bname], heads, precision))
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


def _bias_part(m: Any, coeff: float, t: GGUFTensor, heads: int | None, precision: torch.dtype) -> Part:
    """``coeff·scale·bias`` (peft's ``lora_bias``) added to the base's bias ``t`` (out,): one row of ``out`` values,
    permuted as llama.cpp's converter permutes the q/k biases with their weights."""
    bias = m.bias_delta()
    L, R = low_rank(bias, coeff, precision=precision)  # (out, 1) @ (1, 1): ΔW as a column
    col = L @ R
    if heads is not None:
        if heads <= 0 or col.shape[0] % (2 * heads):
            raise InvalidOptionError(f"{t.name} needs the model's head count ({t.name} length {col.shape[0]}, "
                                     f"heads {heads}); the GGUF model lacks a usable attention.head_count")
        col = permute_rows(col, heads)
    return Part(0, torch.ones(1, 1, dtype=precision), col.T.contiguous())


def _out_type(t: GGUFTensor, quant: str | Mapping[str, str]) -> str:
    if not isinstance(quant, str):
        return type_name(quant[t.name])
    # a bias (one row) keeps its own type whatever `quant` says: llama.cpp keeps biases in float
    return t.qtype if quant.lower() == "same" or len(t.shape) == 1 else type_name(quant)


def gguf_out_types(model: GGUFModelFile, plan: dict[str, list[Part]],
                   quant: str | Mapping[str, str]) -> dict[str, tuple[str, int]]:
    """``{tensor: (output type, bytes)}`` for the adapted tensors (``quant``: ``"same"``, one type, or a type per
    tensor); refuses, before anything is written, the types loratools cannot write, naming every such tensor
    and its type."""
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
        same = not isinstance(quant, str) or quant.lower() == "same"
        hint = "choose `quant` q8_0, f16 or bf16" if same else "choose another `quant`"
        raise InvalidOptionError(f"cannot requantize {shown} as {'their own type' if same else q}: {why}; {hint}")
    return out


class Stats:
    """Σ of squared errors and norms per (input type → output type), and per tensor the sums that say how much
    of ΔW the written tensor carries (:class:`~.report.UpdateFit`), for the report."""

    def __init__(self) -> None:
        self.by: dict[str, dict[str, float]] = {}
        self.update_sums: dict[str, tuple[float, float, float]] = {}

    def add(self, key: str, **figures: float) -> None:
        d = self.by.setdefault(key, {"tensors": 0.0, "max_abs": 0.0, "err2": 0.0, "w2": 0.0, "d2": 0.0, "w02": 0.0,
                                     "base_err2": 0.0, "base_w2": 0.0, "u_err2": 0.0, "u_dot": 0.0})
        for k, v in figures.items():
            d[k] = max(d[k], v) if k == "max_abs" else d[k] + v

    def add_update(self, tensor: str, err2: float, dot: float, d2: float) -> None:
        """One tensor's ‖realized − ΔW‖², ⟨realized, ΔW⟩ and ‖ΔW‖² (float64 sums over its blocks)."""
        self.update_sums[tensor] = (err2, dot, d2)

    def update(self) -> UpdateFit | None:
        return UpdateFit.from_sums(self.update_sums)

    def report(self) -> dict[str, dict[str, Any]]:
        def rel(a: float, b: float) -> float:
            return math.sqrt(a / b) if b else 0.0
        return {k: {"tensors": int(d["tensors"]), "requant_rel_error": rel(d["err2"], d["w2"]),
                    "requant_max_abs_error": d["max_abs"], "base_rel_error_est": rel(d["base_err2"], d["base_w2"]),
                    "delta_rel": rel(d["d2"], d["w02"]),
                    "update_rel_error": rel(d["u_err2"], d["d2"]) if d["d2"] else None,
                    "update_kept": d["u_dot"] / d["d2"] if d["d2"] else None} for k, d in self.by.items()}


def _base_error(w0: np.ndarray, qtype: str) -> tuple[float, float]:
    """(Σ err², Σ w²) of quantizing ``w0``'s values to ``qtype`` after shuffling each row (off its grid)."""
    if qtype in ("F32", "F64") or not can_quantize(qtype):
        return 0.0, 0.0
    rows = w0[:_SAMPLE_ROWS]
    x = rows[:, np.random.default_rng(0).permutation(rows.shape[1])]
    err = dequantize(quantize(x, qtype), qtype, x.shape).astype(np.float64) - x
    return float((err * err).sum()), float((x.astype(np.float64) ** 2).sum())


def read_rows(model: GGUFModelFile, t: GGUFTensor, first: int, n: int) -> np.ndarray:
    """Rows ``first … first + n`` of ``t`` dequantized: a writable float32 (n, cols) array."""
    return np.array(dequantize(np.frombuffer(model.read(t, first, n), np.uint8), t.qtype, (n, t.shape[-1])))


def requant_rows(w: np.ndarray, parts: Sequence[Part], first: int, qtype: str, precision: torch.dtype,
                 what: str) -> tuple[np.ndarray, Tensor, Tensor]:
    """``Q(w + Σ L@R)`` for rows ``first … first + len(w)`` of a tensor: (``qtype``'s bytes, the exact sum in
    ``precision``, ΔW's rows). The one definition of a merged block: a record replays it for the un-merge."""
    n = w.shape[0]
    acc = torch.from_numpy(w).to(precision, copy=True)
    delta = torch.zeros_like(acc)
    for p in parts:
        lo, hi = max(first, p.first), min(first + n, p.first + p.L.shape[0])
        if lo < hi:
            delta[lo - first:hi - first].addmm_(p.L[lo - p.first:hi - p.first].to(precision), p.R.to(precision))
    acc += delta
    return quantize(acc.to(torch.float32).numpy(), qtype, what=what), acc, delta


def _merged_block(model: GGUFModelFile, t: GGUFTensor, parts: Sequence[Part], qtype: str, precision: torch.dtype,
                  hook: Any, s: int, n: int) -> tuple[bytes, np.ndarray, dict[str, float], Any]:
    """Rows ``s … s + n`` of ``t`` merged: (the bytes read, the bytes to write, the report's figures, what
    ``hook.prepare`` computes from them). Pure in its inputs, so blocks run on several threads."""
    raw = model.read(t, s, n)
    w0 = np.array(dequantize(np.frombuffer(raw, np.uint8), t.qtype, (n, t.shape[-1])))
    q, acc, delta = requant_rows(w0, parts, s, qtype, precision, t.name)
    out = dequantize(q, qtype, acc.shape).astype(np.float64)
    err = out - acc.to(torch.float64).numpy()
    # what the written block really adds to the base, against the ΔW it was meant to add (float64)
    u_err2, u_dot, d2 = fit_sums(torch.from_numpy(out - w0.astype(np.float64)), delta.to(torch.float64))
    figures = {"max_abs": float(np.abs(err).max()) if err.size else 0.0, "err2": float((err * err).sum()),
               "w2": float((acc.to(torch.float64) ** 2).sum()), "d2": d2,
               "w02": float((w0.astype(np.float64) ** 2).sum()), "u_err2": u_err2, "u_dot": u_dot}
    if s == 0:
        figures["base_err2"], figures["base_w2"] = _base_error(w0, t.qtype)
    return raw, q, figures, hook.prepare(s, n, raw, q) if hook is not None else None


def merge_tensor(model: GGUFModelFile, t: GGUFTensor, parts: Sequence[Part], qtype: str, f: IO[bytes],
                 stats: Stats, precision: torch.dtype, hook: Any = None) -> None:
    """Write ``Q(deq(W0) + Σ L@R)`` of ``t`` to ``f``, a block of rows at a time, and add its figures.

    Blocks are computed on one thread per core but one (the calling thread writes; up to 8) and written in
    order, so the bytes do not depend on the thread count. On 2 cores that is a single thread: two workers beside
    the writer gave no wall-time gain there for 46 % more CPU and 200 MB more memory (docs/benchmarks.md). ``hook`` (a record's :class:`~.gguf_record.PatchRecorder` or
    :class:`~.gguf_record.PatchRestorer`) sees each block as read and as requantized: ``hook.prepare`` on the
    block's thread, ``hook.block`` in order, which gives the bytes to write."""
    step = max(1, BLOCK_VALUES // t.shape[-1])
    key = f"{t.qtype}→{qtype}"
    stats.add(key, tensors=1)
    blocks = [(s, min(step, t.rows - s)) for s in range(0, t.rows, step)]
    work = map_in_threads(lambda b: _merged_block(model, t, parts, qtype, precision, hook, *b), blocks,
                          workers=max(1, min(cpu_cores() - 1, 8)))
    e2 = dot = d2 = 0.0
    for (s, n), (raw, q, figures, prepared) in zip(blocks, work):
        stats.add(key, **figures)
        e2, dot, d2 = e2 + figures["u_err2"], dot + figures["u_dot"], d2 + figures["d2"]
        if hook is not None:
            q = hook.block(s, n, raw, q, prepared)
        f.write(np.ascontiguousarray(q).tobytes())
    stats.add_update(t.name, e2, dot, d2)
    if hook is not None:
        hook.done()


def write_model(model: GGUFModelFile, plan: dict[str, list[Part]], types: dict[str, tuple[str, int]],
                kv: list[list[bytes]], paths: list[Path], prec: torch.dtype, stats: Stats, *, force: bool,
                inputs: tuple[str | os.PathLike[str], ...], progress: Any, hook: Any = None,
                check: Any = None) -> None:
    """Write the model to ``paths`` (through temporary names): adapted tensors merged by :func:`merge_tensor`
    (with ``hook(tensor)`` when given), the others copied; ``check(temporary paths)`` runs before the renames."""
    total = sum(len(ts) for ts in model.tensors)
    if progress:
        progress(0, total=total)

    def data(t: GGUFTensor, f: IO[bytes]) -> None:
        if t.name in plan:
            merge_tensor(model, t, plan[t.name], types[t.name][0], f, stats, prec, hook(t) if hook else None)
        else:
            copy_bytes(model.paths[t.split], t.offset, t.nbytes, f)
        if progress:
            progress(1)

    for p in paths:
        check_output(p, force=force, inputs=inputs)
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(atomic_output(p, force=force, inputs=inputs)) for p in paths]
        write_gguf_model(tmps, model, kv, types, data)
        if check is not None:
            check(tmps)
