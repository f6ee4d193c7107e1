"""What the merge jobs report: one :class:`MergeReport` for merge and un-merge (safetensors and GGUF),
the :class:`VerifyReport` of ``verify``, and the :class:`UpdateFit` of a GGUF merge (how much of the
adapters' update the written model really carries)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from ..deltas import MIN_KEPT
from ..errors import VerificationError

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    from .onto import OntoReport

__all__ = ["MergeReport", "ModuleCheck", "VerifyReport", "UpdateFit", "MIN_KEPT", "fit_sums"]



@dataclass(frozen=True)
class UpdateFit:
    """How much of the update ΔW = Σ wᵢ·ΔWᵢ a written model carries (a GGUF merge requantizes W0 + ΔW).

    realized = deq(written) − deq(W0), over every adapted tensor together (and per tensor for ``worst``)::

        rel_error = ‖realized − ΔW‖F / ‖ΔW‖F      kept = ⟨realized, ΔW⟩ / ‖ΔW‖F²

    A lossless merge gives 0 and 1; a merge whose requantization rounds ΔW away gives ``kept`` ≈ 0. ``rel_error``
    also counts noise uncorrelated with ΔW (a base moved onto another type's grid); ``kept`` does not, and
    decides :attr:`lossy`.
    """

    rel_error: float
    kept: float
    #: the tensor that keeps the smallest share of its ΔW, and its figures
    worst: str = ""
    worst_rel_error: float = 0.0
    worst_kept: float = 0.0

    @property
    def lossy(self) -> bool:
        """Whether the written model keeps less than :data:`MIN_KEPT` of the update."""
        return self.kept < MIN_KEPT

    @classmethod
    def from_sums(cls, sums: Mapping[str, tuple[float, float, float]]) -> UpdateFit | None:
        """From ``{tensor: (‖realized − ΔW‖², ⟨realized, ΔW⟩, ‖ΔW‖²)}`` (float64 sums); None when ΔW is 0."""
        def fit(e2: float, dot: float, d2: float) -> tuple[float, float]:
            return math.sqrt(e2 / d2), dot / d2
        live = {n: s for n, s in sums.items() if s[2] > 0}
        if not live:
            return None
        rel, kept = fit(*(sum(s[i] for s in live.values()) for i in range(3)))
        worst = min(live, key=lambda n: fit(*live[n])[1])
        return cls(rel, kept, worst, *fit(*live[worst]))

    def to_json(self) -> dict[str, Any]:
        return {"rel_error": self.rel_error, "kept": self.kept, "min_kept": MIN_KEPT, "lossy": self.lossy,
                "worst": {"tensor": self.worst, "rel_error": self.worst_rel_error, "kept": self.worst_kept}}

    def describe(self) -> str:
        """One phrase with the figures, for messages and the summary."""
        return (f"keeps {100 * self.kept:.3g}% of the adapters' update ΔW (at least {100 * MIN_KEPT:g}% needed; "
                f"‖written − ΔW‖/‖ΔW‖ = {self.rel_error:.3g}; least kept: {self.worst}, {100 * self.worst_kept:.3g}%)")


def fit_sums(realized: Tensor, delta: Tensor) -> tuple[float, float, float]:
    """(‖realized − ΔW‖², ⟨realized, ΔW⟩, ‖ΔW‖²), for :meth:`UpdateFit.from_sums`.

    Each row's dot product is taken in the tensors' own precision and the rows are summed in float64
    (⟨realized, ΔW⟩ = ⟨realized − ΔW, ΔW⟩ + ‖ΔW‖²): relative error about 1e-9 against a whole-float64 sum, at a
    fifth of its cost (bench/fp8_merge.py: whole-tensor float64 sums were 55 % of an FP8 merge).

    >>> d = torch.tensor([[1.0, 0.0], [0.0, 2.0]]); fit_sums(d / 2, d)
    (1.25, 2.5, 5.0)
    """
    cols = realized.shape[-1] if realized.dim() else 1
    r, d = realized.reshape(-1, cols), delta.reshape(-1, cols)
    step = max(1, _FIT_CHUNK // max(1, cols))
    if torch.get_num_threads() > 1 or r.shape[0] <= step:
        e = r - d
        rows = [torch.linalg.vecdot(e, e), torch.linalg.vecdot(e, d), torch.linalg.vecdot(d, d)]
    else:  # one thread: the same dot product of each row, a few rows at a time (no tensor-sized temporaries)
        parts = []
        for i in range(0, r.shape[0], step):
            e, dc = r[i:i + step] - d[i:i + step], d[i:i + step]
            parts.append(torch.stack([torch.linalg.vecdot(e, e), torch.linalg.vecdot(e, dc),
                                      torch.linalg.vecdot(dc, dc)]))
        rows = list(torch.cat(parts, dim=1))

    ee, ed, dd = (float(x.to(torch.float64).sum()) for x in rows)
    return ee, ed + dd, dd


#: how many elements of its rows :func:`fit_sums` takes at a time
_FIT_CHUNK = 1 << 16


@dataclass(frozen=True)
class MergeReport:
    """What a merge or an un-merge did (a safetensors or a GGUF model) and, for an un-merge, how exact it is.

    Some fields mean something for one kind of model only: ``files``, ``quant`` and ``adapted_nbytes`` for a
    GGUF model (``files`` is never empty then: :attr:`is_gguf`), the un-merge estimates and ``vouched`` for a
    safetensors one. :meth:`to_json` gives each kind its own keys.
    """

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
    #: un-merge: the merged model's stamp (or the record) confirmed these adapters and weights went in
    vouched: bool | None = None
    #: GGUF: every file written (one, or each split)
    files: tuple[Path, ...] = ()
    #: GGUF: the requantization figures per "input type → output type"
    quant: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: GGUF: the bytes of the adapted tensors in the input model (what a record's patches restore)
    adapted_nbytes: int = 0
    #: GGUF merge or un-merge without a record: how much of ΔW the written model carries (None: ΔW is 0)
    update: UpdateFit | None = None
    #: GGUF: the merge was written although ``update`` is lossy, because ``allow_lossy`` asked for it
    allowed_lossy: bool = False
    #: safetensors merge with ``qlora``: the base merged onto and ‖deq(Q(W0)) − W0‖/‖ΔW‖ (:mod:`.onto`)
    onto: "OntoReport | None" = None

    _GGUF_ONLY: ClassVar[frozenset[str]] = frozenset({"files", "quant", "adapted_nbytes", "update", "allowed_lossy"})
    _SAFETENSORS_ONLY: ClassVar[frozenset[str]] = frozenset({"est_max_abs_error", "est_rel_error", "error_bound",
                                                             "vouched", "onto"})

    @property
    def is_gguf(self) -> bool:
        return bool(self.files)

    def to_json(self) -> dict[str, Any]:
        skip = self._SAFETENSORS_ONLY if self.is_gguf else self._GGUF_ONLY
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        d["output"], d["record"] = str(self.output), (str(self.record) if self.record else None)
        d["notes"] = list(self.notes)
        d["verify"] = self.verify.to_json() if self.verify is not None else None
        if self.is_gguf:
            d["files"] = [str(p) for p in self.files]
            d["update"] = self.update.to_json() if self.update is not None else None
        else:
            d["record_fraction"] = self.record_nbytes / self.nbytes if self.nbytes else 0.0
            if self.update is not None:  # an FP8 base re-quantized: the same figure as a GGUF merge
                d["update"], d["allowed_lossy"] = self.update.to_json(), self.allowed_lossy
            if d.pop("onto") is not None:  # a QLoRA merge: only then is the key there
                assert self.onto is not None
                d["onto"] = self.onto.to_json()
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
    #: tensors holding NaN/±inf where the base holds a finite value (an overflowing cast or sum)
    non_finite: list[str] = field(default_factory=list)
    #: GGUF or re-quantized FP8: how much of ΔW the merged model carries; a lossy one fails unless ``allow_lossy``
    update: UpdateFit | None = None
    allow_lossy: bool = False
    #: the 4-bit type whose dequantized weights deq(Q(W0)) the adapted tensors were checked against, as the merged
    #: model's stamp says it was merged (``merge --onto dequantized``); None: against the base's own weights
    onto: str | None = None

    @property
    def lossy(self) -> bool:
        """The merged model loses most of ΔW and ``allow_lossy`` was not given."""
        return self.update is not None and self.update.lossy and not self.allow_lossy

    @property
    def worst(self) -> ModuleCheck | None:
        """The module furthest from its tolerance; one whose ratio is NaN (a NaN tolerance or deviation) first."""
        return max(self.modules, key=lambda m: (math.isnan(m.ratio), m.ratio), default=None)

    @property
    def max_abs(self) -> float:
        return max((m.max_abs for m in self.modules), default=0.0)

    @property
    def ok(self) -> bool:
        return (not self.untouched_mismatches and not self.non_finite and not self.lossy
                and all(m.ratio <= 1.0 for m in self.modules))

    def check(self) -> None:
        """Raise :class:`VerificationError` naming the worst tensor unless :attr:`ok`."""
        if self.ok:
            return
        w = self.worst
        if self.non_finite:
            raise VerificationError(f"{self.non_finite[0]} holds NaN or ±inf where the base is finite "
                                    f"({len(self.non_finite)} such tensors)")
        if self.lossy and (w is None or w.ratio <= 1) and not self.untouched_mismatches:
            assert self.update is not None
            raise VerificationError(f"the merged model {self.update.describe()}: its requantization rounds the update away; "
                                    "merge with `quant` q8_0 or f16 (GGUF) or a `dtype` (FP8), or serve the adapter "
                                    "unmerged, or pass "
                                    "`allow_lossy` to accept it")
        why = (f"{w.key} deviates by {w.max_abs:.3g}, {w.ratio:.3g}× the {self.dtype} rounding tolerance"
               if w is not None and not w.ratio <= 1 else f"{self.untouched_mismatches[0]} differs from the base")
        raise VerificationError(why)

    def to_json(self) -> dict[str, Any]:
        w = self.worst
        return {"ok": self.ok, "dtype": self.dtype, "max_abs": self.max_abs, "worst": w.key if w else None,
                "worst_ratio": w.ratio if w else 0.0, "untouched_mismatches": self.untouched_mismatches,
                "non_finite": self.non_finite, "modules": [m.__dict__ for m in self.modules],
                "update": self.update.to_json() if self.update is not None else None, "onto": self.onto}


