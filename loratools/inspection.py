"""What ``loratools inspect`` reports: pure functions from an :class:`Adapter` to plain data.

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
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from .adapter import Adapter, Module
from .dora import dora_update, magnitude_change
from .linalg import spectrum_summary

#: the base weight of a module, by module name (for DoRA's figures); None when no base is given
BaseWeight = Callable[[str], Tensor]
#: ``map``-like: applies a function to every item of a list, results in order
Mapper = Callable[[Callable[[Any], Any], list[Any]], Iterable[Any]]

__all__ = ["inspect_adapter", "layer_report", "natural_key", "group_totals", "recommended_rank"]

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


def group_totals(layers: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Totals of ``layers`` (``layer_report`` rows) grouped by block index (``key="layer"``) or module type
    (``key="type"``): modules, parameters, Σ rank and ‖ΔW‖_F = √Σ‖ΔWᵢ‖²_F, in natural order of the group."""
    groups: dict[str, dict[str, Any]] = {}
    for row in layers:
        g = _block_of(row["name"]) if key == "layer" else row["name"].rsplit(".", 1)[-1]
        t = groups.setdefault(g, {key: g, "modules": 0, "parameters": 0, "rank_total": 0, "fro_sq": 0.0})
        t["modules"] += 1
        t["parameters"] += row["parameters"]
        t["rank_total"] += row["rank"]
        t["fro_sq"] += row["fro_norm"] ** 2
    out = []
    for g in sorted(groups, key=natural_key):
        t = groups[g]
        t["fro_norm"] = t.pop("fro_sq") ** 0.5
        out.append(t)
    return out


def recommended_rank(spectra: list[list[float]], fraction: float) -> int:
    """The smallest rank k such that keeping the top k triplets of every module keeps ``fraction`` of the
    adapter's energy: Σ_m Σ_{i≤k} σ_{m,i}² ≥ fraction · Σ_m Σ_i σ_{m,i}² (0 for an all-zero adapter).

    >>> recommended_rank([[3.0, 1.0], [2.0, 0.0]], 0.9), recommended_rank([[3.0, 1.0], [2.0, 0.0]], 0.99)
    (1, 2)
    """
    width = max((len(s) for s in spectra), default=0)
    if width == 0:
        return 0
    energy = torch.zeros(width, dtype=torch.float64)
    for s in spectra:
        if s:
            energy[: len(s)] += torch.tensor(s, dtype=torch.float64) ** 2
    total = float(energy.sum())
    if total == 0:
        return 0
    cum = energy.cumsum(0)
    # a relative tolerance so that F = 1 is met by the full rank despite rounding in the cumulative sum
    return int((cum < fraction * total * (1 - 1e-12)).sum()) + 1


def _spectrum(s: Tensor, shape: tuple[int, int]) -> dict[str, Any]:
    return {"fro_norm": float(s.pow(2).sum().sqrt()) if s.numel() else 0.0,
            "sigma_max": float(s[0]) if s.numel() else 0.0, **spectrum_summary(s, shape)}


def dora_report(name: str, m: Module, base: BaseWeight | None) -> dict[str, Any]:
    """DoRA's figures for one module: ‖m‖, and with the base weight the magnitude's change and the full update's spectrum."""
    assert m.magnitude is not None
    out: dict[str, Any] = {"magnitude_norm": float(m.magnitude.double().norm())}
    if base is not None:
        w0 = base(name)
        D = dora_update(w0, m)
        out["magnitude_change"] = magnitude_change(w0, m)
        out["update"] = _spectrum(torch.linalg.svdvals(D), (int(D.shape[0]), int(D.shape[1])))
    return out


def layer_report(name: str, m: Module, base: BaseWeight | None = None) -> dict[str, Any]:
    s = m.singular_values()
    extra = {"dora": dora_report(name, m, base)} if m.is_dora else {}
    return {
        "name": name,
        "kind": m.kind,
        "shape": list(m.weight_shape),
        "rank": m.rank,
        "alpha": m.alpha,
        "scale": m.scale,
        "parameters": m.parameters,
        "singular_values": s.tolist(),
        **_spectrum(s, m.matrix_shape),
        **extra,
    }


def inspect_adapter(adapter: Adapter, *, format: str | None = None, base: BaseWeight | None = None,
                    mapper: Mapper = map) -> dict[str, Any]:
    """The whole report as JSON-ready data (``base``: each module's base weight, for DoRA's figures).

    ``mapper`` maps :func:`layer_report` over the modules, in order: ``map``, or one that spreads them
    over threads (:func:`loratools.device.map_in_threads`; each module's figures are independent).

    >>> import torch
    >>> A, B = torch.eye(2, 16), torch.eye(8, 2)
    >>> report = inspect_adapter(Adapter({"q": Module(A=A, B=B, alpha=4, scale=2.0)}))
    >>> report["modules"], report["layers"][0]["rank"], report["layers"][0]["stable_rank"]
    (1, 2, 2.0)
    """
    work = [(f"{name}[expert {e}]", m.expert(e)) if m.kind == "experts" else (name, m)
            for name, m in sorted(adapter.items(), key=lambda kv: natural_key(kv[0]))
            for e in range(m.experts if m.kind == "experts" else 1)]
    layers = list(mapper(lambda w: layer_report(w[0], w[1], base), work))
    ranks = [m.rank for m in adapter.modules.values()]
    return {
        "format": format,
        "method": adapter.method,
        "dora": adapter.is_dora,
        "base_model": adapter.config.base_model,
        "use_rslora": adapter.config.use_rslora,
        "init_r": adapter.config.init_r,
        "fingerprint": adapter.fingerprint.sha256,
        "modules": len(adapter.modules),
        "parameters": adapter.parameters,
        "rank_min": min(ranks) if ranks else 0,
        "rank_max": max(ranks) if ranks else 0,
        "rank_total": sum(ranks),
        "saved_tensors": sorted(adapter.saved),
        "recommended_rank": {"energy_90": recommended_rank([r["singular_values"] for r in layers], 0.90),
                             "energy_99": recommended_rank([r["singular_values"] for r in layers], 0.99)},
        "by_layer": group_totals(layers, "layer"),
        "by_type": group_totals(layers, "type"),
        "layers": layers,
    }
