"""What an un-merge checks and reports: the merged model's stamp, and the error figures without a record.

See :func:`loratools.merge.unmerge_model` for what the figures mean.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import WrongBaseError
from ..io import ModelReader
from .kernels import jitter, merged_tensor, tolerance, ulp, unmerged_tensor
from .plan import METADATA_KEY, AdapterInput, TensorPlan, content_sha256, stamp_entries

__all__ = ["check_stamp", "ErrorStats", "input_paths"]


def input_paths(inputs: Sequence[AdapterInput]) -> tuple[str, ...]:
    """The adapters' labels that name files or directories (what the CLI gives: the path each was read from):
    the inputs an output may not overwrite or lie inside."""
    return tuple(i.label for i in inputs if i.label and os.path.exists(i.label))


def check_stamp(model: ModelReader | str | None, merged: str | os.PathLike[str],
                inputs: Sequence[AdapterInput]) -> bool:
    """The merged model says which adapters, with which weights, went in: refuse any other.

    ``model`` is the safetensors model, or the stamp's text itself (a GGUF model's ``loratools.merge`` key;
    None without one). Returns True when the stamp vouches for every input (same content hash and
    weight); False when there is no stamp to check against (a merge by another
    tool). A loratools stamp older than content hashes is checked by shapes only
    and vouches for nothing more.
    """
    stamped = model.metadata().get(METADATA_KEY) if isinstance(model, ModelReader) else model
    if not stamped:
        return False
    entries = stamp_entries(stamped, where=f"{merged} ({METADATA_KEY})")
    if entries is None:
        return False
    vouched = True
    for i in inputs:
        label = i.label or "this adapter"
        content = content_sha256(i.adapter)
        same = [e for e in entries if (e.content or i.adapter.fingerprint.sha256) in (content, e.fingerprint)
                and (e.content is None or e.content == content)]
        if not same:
            why = ("the same shapes but other factors or scales" if any(
                e.fingerprint == i.adapter.fingerprint.sha256 for e in entries) else "other modules or shapes")
            raise WrongBaseError(f"{merged} records the adapters merged into it, and {label} is not one of them "
                                 f"({why}); pass `ignore_stamp` to un-merge it anyway")
        if not any(e.weight == i.weight for e in same):
            raise WrongBaseError(f"{merged} records {label} merged with weight {same[0].weight:g}, not {i.weight:g}; "
                                 "give that `weight`, or pass `ignore_stamp` to un-merge it anyway")
        vouched = vouched and any(e.content is not None for e in same)
    return vouched


class ErrorStats:
    """The un-merge's error figures without a record (see :func:`unmerge_model`), summed over tensors."""

    def __init__(self, precision: torch.dtype, device: torch.device) -> None:
        self.precision, self.device = precision, device
        self.max = self.sq = self.ref = self.bound = 0.0
        self._lock = threading.Lock()

    def add(self, key: str, w: Tensor, r: Tensor, p: TensorPlan) -> None:
        probe = jitter(r, seed=len(key))  # the round trip re-run on a stand-in base measures what this dtype loses
        prec, dev = self.precision, self.device
        again = unmerged_tensor(merged_tensor(probe, p.deltas, precision=prec, device=dev), p.deltas,
                                precision=prec, device=dev).cpu().to(torch.float64)
        err = again - probe.to(torch.float64)
        # |W0' − W0| ≤ ½ulp(W0') + the rounding any correct merge of these adapters may have left in W
        # (verify's tolerance at W, whose ΔW this un-merge forms once more), W0 stored in W's dtype or wider
        tol = tolerance(w.to(device=self.device, dtype=self.precision), r.to(self.precision), p.deltas, w.dtype,
                        precision=self.precision)
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
