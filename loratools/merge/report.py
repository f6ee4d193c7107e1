"""What the merge jobs report: one :class:`MergeReport` for merge and un-merge (safetensors and GGUF),
and the :class:`VerifyReport` of ``verify``."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import VerificationError

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["MergeReport", "ModuleCheck", "VerifyReport"]


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

    _GGUF_ONLY: ClassVar[frozenset[str]] = frozenset({"files", "quant", "adapted_nbytes"})
    _SAFETENSORS_ONLY: ClassVar[frozenset[str]] = frozenset({"est_max_abs_error", "est_rel_error", "error_bound",
                                                             "vouched"})

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
        else:
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
    #: tensors holding NaN/±inf where the base holds a finite value (an overflowing cast or sum)
    non_finite: list[str] = field(default_factory=list)

    @property
    def worst(self) -> ModuleCheck | None:
        return max(self.modules, key=lambda m: m.ratio, default=None)

    @property
    def max_abs(self) -> float:
        return max((m.max_abs for m in self.modules), default=0.0)

    @property
    def ok(self) -> bool:
        return not self.untouched_mismatches and not self.non_finite and all(m.ratio <= 1.0 for m in self.modules)

    def check(self) -> None:
        """Raise :class:`VerificationError` naming the worst tensor unless :attr:`ok`."""
        if self.ok:
            return
        w = self.worst
        if self.non_finite:
            raise VerificationError(f"{self.non_finite[0]} holds NaN or ±inf where the base is finite "
                                    f"({len(self.non_finite)} such tensors)")
        why = (f"{w.key} deviates by {w.max_abs:.3g}, {w.ratio:.3g}× the {self.dtype} rounding tolerance"
               if w is not None and w.ratio > 1 else f"{self.untouched_mismatches[0]} differs from the base")
        raise VerificationError(why)

    def to_json(self) -> dict[str, Any]:
        w = self.worst
        return {"ok": self.ok, "dtype": self.dtype, "max_abs": self.max_abs, "worst": w.key if w else None,
                "worst_ratio": w.ratio if w else 0.0, "untouched_mismatches": self.untouched_mismatches,
                "non_finite": self.non_finite, "modules": [m.__dict__ for m in self.modules]}


