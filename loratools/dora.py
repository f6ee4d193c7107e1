"""DoRA's arithmetic (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"), on tensors only.

A DoRA module is a LoRA module plus a magnitude vector ``m`` with one entry per
row of ΔW as a matrix (``out``; ``dim`` for embeddings)::

    V  = W0 + s·B·A                      (as an (out, in·kh·kw) matrix)
    W′ = diag(m / ‖V‖_row) · V           ‖V‖_row: the L2 norm of each row of V

(``m / (‖V‖_row + ε)`` for a module with ``dora_eps`` ε ≠ 0: LyCORIS's DoRA, see :func:`dora_factor`)

which is peft 0.21.2's merge (``peft/tuners/lora/variants.py``, ``DoraLinearVariant.merge_safe``:
``dora_factor = m / weight_norm``, ``new_weight = dora_factor · (W0 + ΔW)``, the norm from
``peft/tuners/lora/dora.py`` ``get_weight_norm``: ``torch.linalg.norm(W0ᵀ? + ΔW, dim=1)``).
The same definition covers peft's three layer kinds once W is read as that matrix:

- ``Linear`` (weight (out, in)): the rows of the stored weight; with ``fan_in_fan_out``
  (GPT-2's Conv1D, stored (in, out)) peft transposes first, so the *columns* of the stored tensor;
- ``Conv2d`` (weight (out, in, kh, kw)): ``_DoraConvNdLayer.get_weight_norm`` takes the norm over
  dims (1, 2, 3), i.e. the rows of the (out, in·kh·kw) matrix; peft stores m as (1, out, 1, 1);
- ``Embedding`` (weight (vocab, dim)): ``DoraEmbeddingLayer`` is built with ``fan_in_fan_out=True``
  and ΔW = (A·B)ᵀ, so the norm is over the vocabulary: the columns of the stored tensor.

The update ``W′ − W0 = diag(m/‖V‖)·V − W0`` is in general of full rank: DoRA is
merged exactly (streamed, :mod:`loratools.merge`) or flattened to plain LoRA by a
truncated SVD of that update (``convert --as-lora``), never summed with other updates.
"""

from __future__ import annotations

import torch
from torch import Tensor

from collections.abc import Callable

from .adapter import Adapter, Module, module_from_svd
from .errors import DoraError, ShapeMismatchError
from .linalg import RankRule, truncated_svd

__all__ = ["DoraError", "refuse_dora", "norms_along_rows", "row_norms", "dora_factor", "merged_weight",
           "dora_update", "magnitude_change", "flatten_module",
           "flatten_dora_modules"]


def refuse_dora(adapter: Adapter, what: str, fix: str) -> None:
    """Raise :class:`DoraError` when ``adapter`` holds a DoRA module (``what`` cannot take one; ``fix`` says what to do)."""
    if adapter.is_dora:
        raise DoraError(what, fix)


def norms_along_rows(module: Module) -> bool:
    """True when DoRA's norm runs along the stored weight's rows (linear, conv); False for its columns
    (``fan_in_fan_out`` linear, embedding), where the matrix V is the stored tensor transposed."""
    return not (module.kind == "embedding" or module.fan_in_fan_out)


def _as_matrix(w: Tensor, module: Module) -> Tensor:
    """The stored weight as DoRA's (out, ·) matrix V (a view where possible)."""
    w2 = w.reshape(w.shape[0], -1)
    return w2 if norms_along_rows(module) else w2.T


def row_norms(w0: Tensor, module: Module, *, precision: torch.dtype = torch.float32) -> Tensor:
    """‖V‖_row = ‖W0 + s·B·A‖ per row of the matrix V, in ``precision`` (length ``out``)."""
    v = w0.to(precision) + module.delta(dtype=precision, device=w0.device)
    norms: Tensor = torch.linalg.vector_norm(_as_matrix(v, module), dim=1)  # torch.linalg's functions are untyped
    return norms


def dora_factor(module: Module, norms: Tensor) -> Tensor:
    """``m / (‖V‖_row + ε)`` in ``norms``' dtype: what multiplies each row of V, ε the module's ``dora_eps``.

    ε = 0 is peft's ``dora_factor`` (bit for bit: nothing is added); LyCORIS 4.1.3 adds the float32 eps
    (``functional/general.py`` ``_weight_decompose``). The one home of the rule: the dense merge, the streamed
    merge and un-merge (:mod:`loratools.merge.kernels`) and :class:`~loratools.nn.DoRALinear` all call it.
    """
    assert module.magnitude is not None
    m = module.magnitude.to(device=norms.device, dtype=norms.dtype)
    return m / (norms + module.dora_eps) if module.dora_eps else m / norms


def merged_weight(w0: Tensor, module: Module, *, precision: torch.dtype = torch.float32,
                  dtype: torch.dtype | None = None) -> Tensor:
    """W′ = diag(m/‖V‖_row)·V in W0's stored layout, computed whole in ``precision`` and cast once to
    ``dtype`` (W0's by default). The dense reference the streamed merge is checked against.

    >>> m = Module(A=torch.ones(1, 2), B=torch.ones(2, 1), alpha=1, scale=1.0, magnitude=torch.tensor([1.0, 2.0]))
    >>> merged_weight(torch.zeros(2, 2), m).tolist()   # V = 1: each row rescaled to norm m
    [[0.7071067690849304, 0.7071067690849304], [1.4142135381698608, 1.4142135381698608]]
    """
    v = w0.to(precision) + module.delta(dtype=precision, device=w0.device)
    f = dora_factor(module, torch.linalg.vector_norm(_as_matrix(v, module), dim=1))
    shape = (-1,) + (1,) * (v.ndim - 1) if norms_along_rows(module) else (1, -1)
    return (f.reshape(shape) * v).to(dtype or w0.dtype)


def dora_update(w0: Tensor, module: Module, *, precision: torch.dtype = torch.float64) -> Tensor:
    """The full update W′ − W0 as DoRA's (out, in·kh·kw) matrix, in ``precision`` (not low-rank in general)."""
    w = w0.to(precision)
    return _as_matrix(merged_weight(w, module, precision=precision) - w, module)


def magnitude_change(w0: Tensor, module: Module) -> float:
    """‖m − ‖W0‖_row‖ / ‖‖W0‖_row‖ (float64): how far training moved the magnitudes from the base's row norms
    (DoRA initialises m to ‖W0‖_row, and to ‖W0 + s·BA‖_row = ‖W0‖_row when B starts at 0)."""
    assert module.magnitude is not None
    ref = torch.linalg.vector_norm(_as_matrix(w0.to(torch.float64), module), dim=1)
    diff = module.magnitude.to(torch.float64) - ref
    den = float(ref.norm())
    return float(diff.norm()) / den if den > 0 else float(diff.norm())


def flatten_module(w0: Tensor, module: Module, rule: RankRule, *,
                   generator: torch.Generator | None = None) -> tuple[Module | None, float]:
    """A plain LoRA module for DoRA's full update ``D = W′ − W0`` (``as_lora``), and its measured relative error.

    D is formed in float64 (from W0 and the factors), factored in float32 by the
    truncated SVD that ``extract`` uses (:func:`~loratools.linalg.truncated_svd`,
    rank by ``rule``), and the error ``‖D − B′A′‖_F / ‖D‖_F`` is measured in
    float64 against the factors as stored. By Eckart–Young no rank-k factors do
    better than the top k singular triplets of D. Returns ``(None, 0.0)`` when D = 0.
    """
    D = dora_update(w0, module)
    norm = float(torch.linalg.vector_norm(D))
    if norm == 0.0:
        return None, 0.0
    U, S, Vh, _ = truncated_svd(D.float(), rank=rule.rank, energy=rule.energy, error=rule.error,
                                max_rank=rule.max_rank, generator=generator)
    if S.numel() == 0:
        return None, 1.0
    dtype = module.A.dtype if module.A.dtype in (torch.float32, torch.float64) else torch.float32
    plain = module_from_svd(module.with_factors(magnitude=None, dora_eps=0.0), U, S, Vh, dtype=dtype)
    B, A = plain.factors(dtype=torch.float64)
    return plain, float(torch.linalg.vector_norm(D - B @ A)) / norm


def flatten_dora_modules(adapter: Adapter, base: Callable[[str], Tensor], rule: RankRule, *,
                         seed: int = 0) -> tuple[Adapter, dict[str, tuple[float, float]]]:
    """``adapter`` with every DoRA module replaced by plain LoRA factors of its full update D = W′ − W0
    (:func:`flatten_module`), W0 of module ``name`` from ``base(name)`` (read one at a time by the caller's IO: a
    file for ``convert --as-lora``, the weights of ``export --base``). Returns the plain adapter and each flattened
    module's (measured relative error, ‖D‖_F). The one home of this loop: convert and export both call it."""
    gen = torch.Generator().manual_seed(seed)
    modules: dict[str, Module] = {}
    folded: dict[str, tuple[float, float]] = {}
    for name, m in adapter.items():
        if not m.is_dora:
            modules[name] = m
            continue
        w0 = base(name)
        if tuple(w0.shape) != m.weight_shape:
            raise ShapeMismatchError(name, f"{m.weight_shape}", f"{tuple(w0.shape)} in `base`",
                                     "give the base the adapter was made for")
        plain, err = flatten_module(w0, m, rule, generator=gen)
        folded[name] = (err, float(torch.linalg.vector_norm(dora_update(w0, m))))
        if plain is not None:
            modules[name] = plain
    extra = {k: v for k, v in adapter.config.extra.items() if k != "use_dora"}
    return adapter.with_modules(modules, extra=extra), folded
