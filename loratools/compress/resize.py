"""LoRA/AdaLoRA → smaller plain LoRA, from the factors alone.

Each module's ``ΔW = B' A'`` (scale and AdaLoRA's Λ folded in) has rank ≤ r,
so its whole spectrum comes from :meth:`Module.svd` — R factors of ``B'`` and
``A'ᵀ`` (Cholesky-QR or Householder, :func:`loratools.linalg.lowrank_svd`), then the
SVD of the r×r core — in O((m+n)r²) without forming ΔW.
Keeping the top k singular triplets gives the best rank-k approximation
(Eckart–Young), stored like :mod:`loratools.compress.extract` does:
``B = U_k S_k^½``, ``A = S_k^½ V_kᵀ``, ``alpha = k`` (scale 1). Its relative
error is exact: ``√(Σ_{i>k} σᵢ²) / √(Σ σᵢ²)``.

The output is always plain LoRA: serving engines load only plain LoRA, and an
AdaLoRA file's one global alpha cannot express per-module ranks after resizing.
A module whose rank is not reduced is kept as it was (bit for bit for LoRA;
AdaLoRA modules become LoRA with the same ΔW, see :func:`loratools.adapter.as_lora`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from ..adapter import Adapter, Module, as_lora, module_from_svd
from ..device import map_in_threads
from ..formats import get_format, read_adapter, write_adapter
from .checks import check_result
from ..io import Progress, check_output
from ..linalg import RankRule, lowrank_svd
from ..lm.heldout import HeldOutReport, heldout_inputs, heldout_report

__all__ = ["resize_adapter", "resize_file", "ResizeResult", "ResizeLayer"]


@dataclass(frozen=True)
class ResizeLayer:
    """One module: its rank before and after, the exact relative error and the energy kept."""

    name: str
    rank_before: int
    rank_after: int
    rel_error: float
    energy_kept: float


@dataclass(frozen=True)
class ResizeResult:
    """The resized adapter and a row per module; from :func:`resize_file`, also where it was written (``output``,
    in ``format``) and the held-out loss before and after (``heldout``, when a base and data were given)."""

    adapter: Adapter
    layers: list[ResizeLayer]
    parameters_before: int
    method_before: str = "lora"
    output: str | None = None
    format: str | None = None
    heldout: HeldOutReport | None = None

    def to_json(self) -> dict[str, Any]:
        return {"output": self.output, "parameters_before": self.parameters_before,
                "parameters": self.adapter.parameters,
                "heldout_loss": self.heldout.to_json() if self.heldout else None,
                "layers": [asdict(r) for r in self.layers]}


def resize_adapter(adapter: Adapter, rule: RankRule | None = None, *, rank: int | None = None,
                   energy: float | None = None, error: float | None = None, max_rank: int | None = None,
                   progress: Callable[[int], None] | None = None, workers: int | None = None) -> ResizeResult:
    """Re-truncate every module to the rank ``rule`` picks; output plain LoRA.

    ``rule`` is a :class:`~loratools.linalg.RankRule`, or give its options as keywords (exactly one of
    ``rank``, ``energy``, ``error``; ``max_rank`` caps). ``rank=R`` keeps ``min(R, r)``; ``energy=F``
    the smallest k with ``Σ_{i≤k}σᵢ² ≥ F·Σσᵢ²``; ``error=E`` the smallest k with
    ``√(Σ_{i>k}σᵢ²)/√(Σσᵢ²) ≤ E``. Modules are resized ``workers`` at a time (default: one per usable
    core, :func:`~loratools.device.map_in_threads`); the result does not depend on it.

    >>> A, B = torch.randn(4, 16), torch.randn(8, 4)
    >>> small = resize_adapter(Adapter({"q": Module(A=A, B=B, alpha=4, scale=1.0)}), rank=2)
    >>> small.adapter.modules["q"].rank, small.layers[0].rank_before
    (2, 4)
    """
    rule = RankRule.from_options(rule, rank=rank, energy=energy, error=error, max_rank=max_rank)
    adapter.dense_only("resizing")
    lora = as_lora(adapter)
    modules: dict[str, Module] = {}
    layers: list[ResizeLayer] = []
    work = [(name, m.rank, lora.modules.get(name)) for name, m in adapter.items()]
    for (name, _, _), (layer, module) in zip(work, map_in_threads(lambda w: _resize_module(*w, rule), work,
                                                                  workers=workers)):
        layers.append(layer)
        if module is not None:
            modules[name] = module
        if progress:
            progress(1)
    # when a module is dropped (rank 0), name the modules one by one: a target_modules suffix list would make
    # PEFT create (zero) layers for the dropped ones and warn about missing keys
    dropped = set(adapter.modules) - set(modules)
    out = lora.with_modules(modules, **({"target_modules": None} if dropped else {}))
    return ResizeResult(out, layers, adapter.parameters, adapter.method)


def _resize_module(name: str, rank_before: int, plain: Module | None, rule: RankRule,
                   ) -> tuple[ResizeLayer, Module | None]:
    """One module's row of the report and its resized module (None when dropped); ``plain`` is its plain-LoRA
    form, None when an AdaLoRA module was pruned to rank 0."""
    if plain is None:
        return ResizeLayer(name, rank_before, 0, 0.0, 1.0), None
    # Module.svd()'s route (linalg.lowrank_svd), with singular vectors for the kept triplets only;
    # the scale is applied to S afterwards (the rank rules do not depend on it): one pass less over the factors
    r = plain.rank
    B64 = plain.B.reshape(plain.B.shape[0], r).to(torch.float64)
    A64 = plain.A.reshape(r, plain.matrix_shape[1]).to(torch.float64)
    U, S, Vh = lowrank_svd(B64, A64, top=lambda s: min(rule.choose(s), s.numel()))
    S = S * abs(plain.scale)
    if plain.scale < 0:
        U = -U
    k = int(U.shape[1])
    e = S**2
    total = float(e.sum())
    kept = float(e[:k].sum())
    rel = math.sqrt(max(total - kept, 0.0) / total) if total > 0 else 0.0
    layer = ResizeLayer(name, rank_before, k if k < r else r, rel, kept / total if total > 0 else 1.0)
    if k >= r:
        return layer, plain  # nothing to cut: keep the factors as they were
    return layer, (module_from_svd(plain, U, S[:k], Vh) if k > 0 else None)


def resize_file(src: str | os.PathLike[str], out: str | os.PathLike[str], rule: RankRule | None = None, *,
                rank: int | None = None, energy: float | None = None, error: float | None = None,
                max_rank: int | None = None, format: str = "peft", force: bool = False,
                base: str | os.PathLike[str] | None = None, data: str | os.PathLike[str] | None = None,
                device: str = "auto", progress: Progress | None = None) -> ResizeResult:
    """Read the adapter at ``src`` (any format), :func:`resize_adapter` it, write it to ``out`` in ``format``.

    The options are checked and ``out`` refused (when it exists and not ``force``, or is an input) before
    anything is read; the write is atomic, so nothing appears at ``out`` unless it completes. With ``base``
    and ``data``, ``heldout`` holds the loss of ``base + adapter`` before and after
    (:func:`loratools.lm.heldout.heldout_report`).

    >>> resize_file("adapter/", "small", rank=8).output  # doctest: +SKIP
    'small'
    """
    rule = RankRule.from_options(rule, rank=rank, energy=energy, error=error, max_rank=max_rank)
    get_format(format)
    held = heldout_inputs(base, data)
    check_output(out, force=force, inputs=(src,))  # fail before the long computation
    adapter = read_adapter(src)
    if progress:
        progress(0, total=len(adapter.modules))
    res = resize_adapter(adapter, rule, progress=progress)
    check_result(res.adapter, empty="the rank rule keeps rank 0 in every module", cause="check the input adapter")
    report = heldout_report(*held, before=adapter, after=res.adapter, device=device) if held else None
    write_adapter(res.adapter, out, format=format, force=force, inputs=(src,))
    return replace(res, output=os.fspath(out), format=format, heldout=report)
