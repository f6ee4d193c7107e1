"""What ``loratools inspect`` reports: pure functions from an :class:`Adapter` to a typed :class:`InspectReport`.

Per module, from the singular values σ of the *scaled* ΔW (computed from the
factors, never forming ΔW):

- ``fro_norm`` ‖ΔW‖_F = √Σσ²; ``sigma_max`` σ₁;
- ``numerical_rank``: #σ > max(m, n)·ε₃₂·σ₁ (ε₃₂ = float32 machine epsilon);
- ``stable_rank``: Σσ²/σ₁²;
- ``effective_rank``: exp(−Σ pᵢ log pᵢ), pᵢ = σᵢ/Σσ (Roy & Vetterli 2007);
- ``energy_rank_90``/``_99``: the smallest k with Σ_{i≤k}σᵢ² ≥ 0.90 (0.99) · Σσ².

A DoRA module (:mod:`loratools.dora`) adds ``dora``: ``magnitude_norm`` ‖m‖ and,
given the base weight W0, ``magnitude_change`` ‖m − ‖W0‖_row‖ / ‖‖W0‖_row‖ and
``update``: the same figures for the full update W′ − W0 (dense, float64), which
is in general not low-rank.

Over the whole adapter:

- ``by_layer``/``by_type``: totals per block index (``…layers.N.…``) and per module type (the last
  name component, ``q_proj``): modules, parameters, Σ rank and ‖ΔW‖_F = √Σ‖ΔWᵢ‖²_F;
- ``recommended_rank``: for F in 0.90, 0.99 the smallest one rank k for every module with
  Σ_modules Σ_{i≤k}σᵢ² ≥ F · Σ_modules Σσᵢ² — the rank to give ``resize --rank``.

Layers are listed in natural order (:func:`natural_key`: ``layers.2`` before ``layers.10``).
Every value is a frozen dataclass whose ``to_json()`` is the ``inspect --json`` object (the
fields above, a layer's spectrum flattened into its row). Reading a file is
:func:`loratools.inspect_job.inspect_file`'s (this module does no IO).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from .adapter import Adapter, Module
from .dora import dora_update, magnitude_change
from .linalg import choose_rank, spectrum_summary

#: the base weight of a module, by module name (for DoRA's figures); None when no base is given
BaseWeight = Callable[[str], Tensor]
#: ``map``-like: applies a function to every item of a list, results in order
Mapper = Callable[[Callable[[Any], Any], list[Any]], Iterable[Any]]

__all__ = ["InspectReport", "LayerRow", "Spectrum", "DoraFigures", "GroupTotal", "RecommendedRank",
           "inspect_adapter", "layer_report", "dora_report", "natural_key", "group_totals", "recommended_rank"]

_DIGITS = re.compile(r"(\d+)")
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)(?:\.|$)")


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders the numbers inside module names by value: ``layers.2`` < ``layers.10``.

    Every table of modules (inspect, resize, prune, extract) sorts with this key.

    >>> sorted(["l.10.q", "l.2.q", "l.1.v", "l.1.q"], key=natural_key)
    ['l.1.q', 'l.1.v', 'l.2.q', 'l.10.q']
    """
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in _DIGITS.split(name) if p)


def _block_of(name: str) -> str:
    m = _BLOCK.search(name)
    return m.group(1) if m else "-"


@dataclass(frozen=True)
class Spectrum:
    """The figures of one spectrum σ₁ ≥ σ₂ ≥ … of a matrix (see the module docstring)."""

    fro_norm: float
    sigma_max: float
    numerical_rank: int
    stable_rank: float
    effective_rank: float
    energy_rank_90: int
    energy_rank_99: int

    @classmethod
    def of(cls, s: Tensor, shape: tuple[int, int]) -> Spectrum:
        """From the singular values ``s`` (descending) of a matrix of ``shape``.

        >>> Spectrum.of(torch.tensor([3.0, 4.0]).sort(descending=True).values, (2, 2)).fro_norm
        5.0
        """
        summary = spectrum_summary(s, shape)
        return cls(fro_norm=float(s.pow(2).sum().sqrt()) if s.numel() else 0.0,
                   sigma_max=float(s[0]) if s.numel() else 0.0,
                   numerical_rank=int(summary["numerical_rank"]), stable_rank=float(summary["stable_rank"]),
                   effective_rank=float(summary["effective_rank"]),
                   energy_rank_90=int(summary["energy_rank_90"]), energy_rank_99=int(summary["energy_rank_99"]))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DoraFigures:
    """A DoRA module's ‖m‖ and, given its base weight W0, ``magnitude_change`` ‖m − ‖W0‖_row‖ / ‖‖W0‖_row‖
    and the spectrum of the full update W′ − W0."""

    magnitude_norm: float
    magnitude_change: float | None = None
    update: Spectrum | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"magnitude_norm": self.magnitude_norm}
        if self.update is not None:
            out |= {"magnitude_change": self.magnitude_change, "update": self.update.to_json()}
        return out


@dataclass(frozen=True)
class LayerRow:
    """One module of the report: what it is and the spectrum of its scaled ΔW (σ from the factors)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    rank: int
    alpha: float
    scale: float
    parameters: int
    singular_values: tuple[float, ...]
    spectrum: Spectrum
    dora: DoraFigures | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"name": self.name, "kind": self.kind, "shape": list(self.shape), "rank": self.rank,
               "alpha": self.alpha, "scale": self.scale, "parameters": self.parameters,
               "singular_values": list(self.singular_values), **self.spectrum.to_json()}
        return out | ({"dora": self.dora.to_json()} if self.dora is not None else {})


@dataclass(frozen=True)
class GroupTotal:
    """Totals over the modules of one group: a block index (``by="layer"``) or a module type (``by="type"``);
    ``fro_norm`` = √Σ‖ΔWᵢ‖²_F."""

    by: str
    group: str
    modules: int
    parameters: int
    rank_total: int
    fro_norm: float

    def to_json(self) -> dict[str, Any]:
        return {self.by: self.group, "modules": self.modules, "parameters": self.parameters,
                "rank_total": self.rank_total, "fro_norm": self.fro_norm}


@dataclass(frozen=True)
class RecommendedRank:
    """The one rank for every module that keeps 90% (99%) of the adapter's Σσ² (:func:`recommended_rank`)."""

    energy_90: int
    energy_99: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class InspectReport:
    """What ``loratools inspect`` shows: the adapter's description, totals and one row per module
    (an experts module gives one row per expert), in natural order."""

    format: str | None
    method: str
    dora: bool
    base_model: str | None
    use_rslora: bool
    init_r: int | None
    fingerprint: str
    modules: int
    parameters: int
    rank_min: int
    rank_max: int
    rank_total: int
    saved_tensors: tuple[str, ...]
    recommended_rank: RecommendedRank
    by_layer: tuple[GroupTotal, ...]
    by_type: tuple[GroupTotal, ...]
    layers: tuple[LayerRow, ...]

    def to_json(self) -> dict[str, Any]:
        """The ``inspect --json`` object: these fields by name, the values' own ``to_json()``."""
        return {"format": self.format, "method": self.method, "dora": self.dora, "base_model": self.base_model,
                "use_rslora": self.use_rslora, "init_r": self.init_r, "fingerprint": self.fingerprint,
                "modules": self.modules, "parameters": self.parameters, "rank_min": self.rank_min,
                "rank_max": self.rank_max, "rank_total": self.rank_total,
                "saved_tensors": list(self.saved_tensors), "recommended_rank": self.recommended_rank.to_json(),
                "by_layer": [g.to_json() for g in self.by_layer], "by_type": [g.to_json() for g in self.by_type],
                "layers": [row.to_json() for row in self.layers]}


def group_totals(layers: Sequence[LayerRow], by: str) -> tuple[GroupTotal, ...]:
    """Totals of ``layers`` grouped by block index (``by="layer"``: ``model.layers.3.mlp.up_proj`` → ``"3"``) or
    module type (``by="type"``: → ``"up_proj"``): modules, parameters, Σ rank and ‖ΔW‖_F = √Σ‖ΔWᵢ‖²_F, in natural
    order of the group."""
    groups: dict[str, list[LayerRow]] = {}
    for row in layers:
        groups.setdefault(_block_of(row.name) if by == "layer" else row.name.rsplit(".", 1)[-1], []).append(row)
    return tuple(GroupTotal(by, g, len(rows), sum(r.parameters for r in rows), sum(r.rank for r in rows),
                            sum(r.spectrum.fro_norm ** 2 for r in rows) ** 0.5)
                 for g, rows in sorted(groups.items(), key=lambda kv: natural_key(kv[0])))


def recommended_rank(spectra: list[list[float]], fraction: float) -> int:
    """The smallest rank k such that keeping the top k triplets of every module keeps ``fraction`` of the
    adapter's energy: Σ_m Σ_{i≤k} σ_{m,i}² ≥ fraction · Σ_m Σ_i σ_{m,i}² (0 for an all-zero adapter).

    >>> recommended_rank([[3.0, 1.0], [2.0, 0.0]], 0.9), recommended_rank([[3.0, 1.0], [2.0, 0.0]], 0.99)
    (1, 2)
    """
    width = max((len(s) for s in spectra), default=0)
    energy = torch.zeros(width, dtype=torch.float64)
    for s in spectra:
        if s:
            energy[: len(s)] += torch.tensor(s, dtype=torch.float64) ** 2
    # the adapter-wide spectrum: position i holds √(Σ_m σ_{m,i}²); one energy rule over it (the one rank rule)
    return choose_rank(energy.sqrt(), energy=fraction)


def dora_report(name: str, m: Module, base: BaseWeight | None) -> DoraFigures:
    """DoRA's figures for one module: ‖m‖, and with the base weight the magnitude's change and the full update's spectrum."""
    assert m.magnitude is not None
    norm = float(m.magnitude.double().norm())
    if base is None:
        return DoraFigures(norm)
    w0 = base(name)
    D = dora_update(w0, m)
    return DoraFigures(norm, magnitude_change(w0, m),
                       Spectrum.of(torch.linalg.svdvals(D), (int(D.shape[0]), int(D.shape[1]))))


def layer_report(name: str, m: Module, base: BaseWeight | None = None) -> LayerRow:
    """One module's row: the spectrum of its scaled ΔW from the factors (DoRA: the LoRA part, and its figures)."""
    s = m.singular_values()
    return LayerRow(name=name, kind=m.kind, shape=tuple(m.weight_shape), rank=m.rank, alpha=m.alpha, scale=m.scale,
                    parameters=m.parameters, singular_values=tuple(s.tolist()), spectrum=Spectrum.of(s, m.matrix_shape),
                    dora=dora_report(name, m, base) if m.is_dora else None)


def inspect_adapter(adapter: Adapter, *, format: str | None = None, base: BaseWeight | None = None,
                    mapper: Mapper = map) -> InspectReport:
    """The whole report (``base``: each module's base weight, for DoRA's figures); ``to_json()`` is
    ``inspect --json``.

    ``mapper`` maps :func:`layer_report` over the modules, in order: ``map``, or one that spreads them
    over threads (:func:`loratools.device.map_in_threads`; each module's figures are independent).

    >>> import torch
    >>> A, B = torch.eye(2, 16), torch.eye(8, 2)
    >>> report = inspect_adapter(Adapter({"q": Module(A=A, B=B, alpha=4, scale=2.0)}))
    >>> report.modules, report.layers[0].rank, report.layers[0].spectrum.stable_rank
    (1, 2, 2.0)
    """
    work = [(f"{name}[expert {e}]", m.expert(e)) if m.kind == "experts" else (name, m)
            for name, m in sorted(adapter.items(), key=lambda kv: natural_key(kv[0]))
            for e in range(m.experts if m.kind == "experts" else 1)]
    layers = tuple(mapper(lambda w: layer_report(w[0], w[1], base), work))
    ranks = [m.rank for m in adapter.modules.values()]
    spectra = [list(r.singular_values) for r in layers]
    return InspectReport(
        format=format, method=adapter.method, dora=adapter.is_dora, base_model=adapter.config.base_model,
        use_rslora=adapter.config.use_rslora, init_r=adapter.config.init_r, fingerprint=adapter.fingerprint.sha256,
        modules=len(adapter.modules), parameters=adapter.parameters, rank_min=min(ranks) if ranks else 0,
        rank_max=max(ranks) if ranks else 0, rank_total=sum(ranks), saved_tensors=tuple(sorted(adapter.saved)),
        recommended_rank=RecommendedRank(recommended_rank(spectra, 0.90), recommended_rank(spectra, 0.99)),
        by_layer=group_totals(layers, "layer"), by_type=group_totals(layers, "type"), layers=layers)
