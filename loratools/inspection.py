"""What ``loratools inspect`` reports: pure functions from an :class:`Adapter` to plain data.

Per module, from the singular values σ of the *scaled* ΔW (computed from the
factors, never forming ΔW):

- ``fro_norm`` ‖ΔW‖_F = √Σσ²; ``sigma_max`` σ₁;
- ``numerical_rank``: #σ > max(m, n)·ε₃₂·σ₁ (ε₃₂ = float32 machine epsilon);
- ``stable_rank``: Σσ²/σ₁²;
- ``effective_rank``: exp(−Σ pᵢ log pᵢ), pᵢ = σᵢ/Σσ (Roy & Vetterli 2007);
- ``energy_rank_90``/``_99``: the smallest k with Σ_{i≤k}σᵢ² ≥ 0.90 (0.99) · Σσ².
"""

from __future__ import annotations

from typing import Any

from .adapter import Adapter, Module
from .linalg import spectrum_summary

__all__ = ["inspect_adapter", "layer_report"]


def layer_report(name: str, m: Module) -> dict[str, Any]:
    s = m.singular_values()
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
    }


def inspect_adapter(adapter: Adapter, *, format: str | None = None) -> dict[str, Any]:
    """The whole report as JSON-ready data.

    >>> import torch
    >>> A, B = torch.eye(2, 16), torch.eye(8, 2)
    >>> report = inspect_adapter(Adapter({"q": Module(A=A, B=B, alpha=4, scale=2.0)}))
    >>> report["modules"], report["layers"][0]["rank"], report["layers"][0]["stable_rank"]
    (1, 2, 2.0)
    """
    layers = [layer_report(f"{name}[expert {e}]", m.expert(e)) if m.kind == "experts" else layer_report(name, m)
              for name, m in adapter.items() for e in range(m.experts if m.kind == "experts" else 1)]
    ranks = [m.rank for m in adapter.modules.values()]
    return {
        "format": format,
        "method": adapter.method,
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
        "layers": layers,
    }
