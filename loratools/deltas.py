"""Does a rewritten adapter hold the same ΔW as its source? The one check behind ``convert``, ``export`` and
``push`` (each writes an adapter, reads it back and calls :func:`check_same_deltas` before it keeps the file).

Errors are relative Frobenius norms computed from the factors, never from dense ΔW:
``‖ΔW_after − ΔW_before‖_F / ‖ΔW_before‖_F``.
"""

from __future__ import annotations

import torch

from .adapter import Adapter, Module
from .errors import ConversionCheckError, ShapeMismatchError
from .linalg import lowrank_svd

__all__ = ["TOLERANCE", "MIN_KEPT", "delta_error", "rewrite_tolerance", "check_same_deltas"]

#: the largest relative ΔW error a rewrite may introduce when it keeps the factors' precision
TOLERANCE = 1e-6
#: the smallest share of ΔW (:attr:`UpdateFit.kept`) a merge writes without ``allow_lossy``: below it the written
#: model carries less than half of what the adapters change in the weights. The share, not the relative error,
#: because a merge that changes the type (Q4_1 → Q8_0) also moves every base weight onto the new grid: noise at
#: the new type's step, uncorrelated with ΔW, that can be larger than a small ΔW while the whole of ΔW is kept.
#: Measured on SmolLM2-135M-Instruct Q4_1 with an r=8 LoRA on q and v, ΔW 0.29 % of W0: ``quant="same"`` keeps
#: 6 % (relative error 1.25), q8_0 keeps 100 % (relative error 1.95: the re-gridding, 0.57 % of W0), f16 100 %
#: (0.07). On the tests' Q4_0/Q4_1 model the share falls from 99 % to 28 % as ΔW goes from 20 % to 4 % of W0:
#: a merge lands far from ½ either way.
MIN_KEPT = 0.5


def delta_error(before: Module, after: Module) -> float:
    """``‖ΔW_after − ΔW_before‖_F / ‖ΔW_before‖_F`` (absolute when ΔW_before = 0), from the factors:
    the difference is ``[B₁, −B₀] @ [A₁; A₀]``, whose singular values come from a QR of the factors."""
    if before.kind != after.kind or before.weight_shape != after.weight_shape:
        raise ShapeMismatchError("module", f"{before.kind} {before.weight_shape}", f"{after.kind} {after.weight_shape}")
    if before.kind == "experts":  # the worst expert
        return max(delta_error(before.expert(e), after.expert(e)) for e in range(before.experts))
    if before.rank == 0 and after.rank == 0:
        return 0.0
    B0, A0 = before.factors(dtype=torch.float64)
    B1, A1 = after.factors(dtype=torch.float64)
    diff = float(lowrank_svd(torch.cat([B1, -B0], 1), torch.cat([A1, A0], 0))[1].norm())
    ref = float(lowrank_svd(B0, A0)[1].norm()) if before.rank else 0.0
    return diff / ref if ref > 0 else diff


def _eps(m: Module) -> float:
    return max(torch.finfo(t.dtype).eps for t in (m.A, m.B) if t.is_floating_point())


def rewrite_tolerance(before: Module, after: Module) -> float:
    """1e-6, or 8·ε of the written factors' dtype when the written file holds them with less precision
    than the source (loratools' own writers never do: kohya keeps the dtype, GGUF writes float32)."""
    return max(TOLERANCE, 8 * _eps(after)) if _eps(after) > _eps(before) else TOLERANCE


def check_same_deltas(before: Adapter, after: Adapter) -> float:
    """Raise :class:`ConversionCheckError` unless every module of ``before`` has the same ΔW in ``after``
    (rank-0 modules may be absent) and ``after`` has nothing more. Returns the largest relative error."""
    worst = 0.0
    for name, m in before.items():
        if name not in after.modules:
            if m.rank == 0 or float(m.B.abs().max()) == 0 or float(m.A.abs().max()) == 0:
                continue
            raise ConversionCheckError(name, "the module is missing from the written file")
        try:
            err = delta_error(m, after.modules[name])
        except ShapeMismatchError as e:
            raise ConversionCheckError(name, f"expected {e.expected}, got {e.got}") from None
        mag, mag_after = m.magnitude, after.modules[name].magnitude
        if (mag is None) != (mag_after is None) or (
                mag is not None and mag_after is not None and not torch.equal(mag, mag_after)):
            raise ConversionCheckError(name, "the DoRA magnitude vector differs after writing")
        tol = rewrite_tolerance(m, after.modules[name])
        if err > tol:
            raise ConversionCheckError(name, f"ΔW differs by {err:.3g} (relative), more than {tol:.0e}")
        worst = max(worst, err)
    extra = sorted(set(after.modules) - set(before.modules))
    if extra:
        raise ConversionCheckError(extra[0], "the written file holds a module the source lacks")
    if set(after.saved) != set(before.saved) or any(not torch.equal(after.saved[k], before.saved[k])
                                                    for k in before.saved):
        raise ConversionCheckError("saved tensors", "full tensors differ after writing")
    return worst
