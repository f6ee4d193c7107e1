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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .adapter import Adapter, Module
from .dora import dora_update, magnitude_change
from .linalg import spectrum_summary

#: the base weight of a module, by module name (for DoRA's figures); None when no base is given
BaseWeight = Callable[[str], Tensor]

__all__ = ["inspect_adapter", "layer_report"]


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
        "fro_norm": float(s.pow(2).sum().sqrt()) if s.numel() else 0.0,
        "sigma_max": float(s[0]) if s.numel() else 0.0,
        "singular_values": [float(x) for x in s],
        **spectrum_summary(s, m.matrix_shape),
        **extra,
    }


def inspect_adapter(adapter: Adapter, *, format: str | None = None, base: BaseWeight | None = None) -> dict[str, Any]:
    """The whole report as JSON-ready data (``base``: each module's base weight, for DoRA's figures).

    >>> import torch
    >>> A, B = torch.eye(2, 16), torch.eye(8, 2)
    >>> report = inspect_adapter(Adapter({"q": Module(A=A, B=B, alpha=4, scale=2.0)}))
    >>> report["modules"], report["layers"][0]["rank"], report["layers"][0]["stable_rank"]
    (1, 2, 2.0)
    """
    layers = [layer_report(name, m, base) for name, m in adapter.items()]
    ranks = [m.rank for m in adapter.modules.values()]
    return {
        "format": format,
        "method": adapter.method,
        "dora": adapter.is_dora,
        "base_model": adapter.config.base_model,
        "use_rslora": adapter.config.use_rslora,
        "init_r": adapter.config.init_r,
        "fingerprint": adapter.fingerprint.sha256,
        "modules": len(layers),
        "parameters": adapter.parameters,
        "rank_min": min(ranks) if ranks else 0,
        "rank_max": max(ranks) if ranks else 0,
        "rank_total": sum(ranks),
        "saved_tensors": sorted(adapter.saved),
        "layers": layers,
    }
