"""Adapters → one adapter whose update is a weighted sum of theirs, without the base.

For each module, the result's update is ``ΔW = Σᵢ wᵢ·ΔWᵢ`` (modules present in
only some inputs included; any real weights, negative too). With
``ΔWᵢ = Bᵢ·A'ᵢ`` where ``A'ᵢ = sᵢ·(Aᵢ ⊙ Eᵢ)`` (scale and AdaLoRA's Λ folded in,
:meth:`Module.factors`), stacking the factors

    B = [B₁ B₂ … B_k]   (m × Σrᵢ),      A = [w₁A'₁; w₂A'₂; …; w_kA'_k]   (Σrᵢ × n)

gives ``B·A = Σ wᵢΔWᵢ`` exactly, at rank ``R = Σrᵢ``: that is the default
output, plain LoRA with ``alpha = R`` (scale 1). peft 0.21.2's
``add_weighted_adapter(combination_type="cat")`` builds the same factors.

With a :class:`~loratools.linalg.RankRule`, each module's sum is truncated to its
best rank-k approximation (Eckart–Young) from the stacked factors alone: QR of
``B`` and ``Aᵀ`` (or Cholesky of their Gram matrices when well conditioned), then
the SVD of the R×R core, in O((m+n)·R²) — ΔW is never formed
(:func:`~loratools.linalg.lowrank_svd`). The whole spectrum of the sum comes
out, so the relative error ``√(Σ_{i>k}σᵢ²)/√(Σσᵢ²)`` is exact.

``method="ties"`` / ``"dare"`` are the task-arithmetic merges of TIES-Merging
(Yadav et al. 2023, arXiv:2306.01708) and DARE (Yu et al. 2023,
arXiv:2311.03099). They are defined element by element, so they work on each
module's dense ``ΔWᵢ`` (one module at a time) and the merged matrix is then
truncated by the rank rule (required) with :func:`~loratools.linalg.truncated_svd`.
Their result is no longer the sum: the report gives its distance from it.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor

from ..adapter import Adapter, Module, as_lora, module_from_svd
from ..config import AdapterConfig
from ..device import resolve_device
from ..errors import InvalidOptionError, WrongBaseError
from ..formats import FORMATS, get_format, read_adapter, write_adapter
from ..io import Progress, check_output
from ..linalg import RankRule, all_finite, lowrank_svd, truncated_svd
from .checks import check_result
from ..lm.heldout import HeldOutReport, heldout_inputs, heldout_report

__all__ = ["combine_adapters", "combine_files", "CombineResult", "CombineLayer", "ties_merge", "dare_merge", "METHODS"]

Method = Literal["sum", "ties", "dare"]
METHODS: tuple[str, ...] = ("sum", "ties", "dare")
#: the fraction of entries TIES and DARE keep when ``density`` is not given: the TIES paper's k = 20 %
DEFAULT_DENSITY = 0.2


@dataclass(frozen=True)
class CombineLayer:
    """One output module.

    ``input_ranks[i]`` is the rank input i contributes (0 for an AdaLoRA module
    pruned to nothing, None where the input lacks the module). ``rel_error`` is
    ``‖ΔW − T‖_F / ‖T‖_F`` with ``T`` the method's target (Σ wᵢΔWᵢ for ``sum``,
    the merged dense matrix for ``ties``/``dare``); ``sum_error`` is the same
    against ``Σ wᵢΔWᵢ`` (equal to ``rel_error`` for ``sum``).
    """

    name: str
    shape: tuple[int, ...]
    input_ranks: tuple[int | None, ...]
    rank: int
    rel_error: float
    sum_error: float


@dataclass(frozen=True)
class CombineResult:
    adapter: Adapter
    layers: list[CombineLayer]
    weights: tuple[float, ...]
    method: str
    rule: RankRule | None
    #: ``ties``/``dare`` only: the fraction of entries kept and the seed (None for ``sum``)
    density: float | None = None
    seed: int | None = None
    #: notes for the user that change nothing in the result (e.g. inputs naming different base models)
    notes: tuple[str, ...] = ()
    #: from :func:`combine_files`: the input paths, where the result was written (in ``format``), and the
    #: held-out loss of the base alone (before) and of base + the combined adapter (after)
    inputs: tuple[str, ...] = ()
    output: str | None = None
    format: str | None = None
    heldout: HeldOutReport | None = None

    @property
    def exact(self) -> bool:
        """The result's ΔW is Σ wᵢΔWᵢ (up to float32 rounding of the factors) in every module."""
        return self.method == "sum" and all(layer.rel_error == 0.0 for layer in self.layers)

    def to_json(self) -> dict[str, Any]:
        return {"output": self.output, "format": self.format, "method": self.method, "inputs": list(self.inputs),
                "weights": list(self.weights), "rule": self.rule.describe() if self.rule else None,
                "exact": self.exact, "density": self.density, "seed": self.seed,
                "parameters": self.adapter.parameters, "notes": list(self.notes),
                "layers": [asdict(layer) | {"shape": list(layer.shape), "input_ranks": list(layer.input_ranks)}
                           for layer in self.layers],
                "heldout_loss": self.heldout.to_json() if self.heldout else None}


# --- input checks -----------------------------------------------------------------------------------------------------

def _pairs(inputs: Sequence[Adapter | tuple[Adapter, float]]) -> list[tuple[Adapter, float]]:
    pairs: list[tuple[Adapter, float]] = []
    for i, item in enumerate(inputs, 1):
        adapter, weight = (item, 1.0) if isinstance(item, Adapter) else item
        if not isinstance(adapter, Adapter):
            raise InvalidOptionError(f"`inputs` item {i} is not an Adapter or an (Adapter, weight) pair")
        try:
            w = float(weight)
        except (TypeError, ValueError):
            raise InvalidOptionError(f"`weights`: input {i} has weight {weight!r}, not a number") from None
        if not math.isfinite(w):
            raise InvalidOptionError(f"`weights` must be finite numbers; input {i} has {w}")
        pairs.append((adapter, w))
    if not pairs:
        raise InvalidOptionError("`inputs` is empty: give at least one adapter")
    return pairs


def _check_input(i: int, adapter: Adapter) -> None:
    """Refuse what a weighted sum of low-rank updates cannot represent."""
    if adapter.is_dora or adapter.config.extra.get("use_dora"):
        raise InvalidOptionError(
            f"input {i} is a DoRA adapter: its update m·(W0 + BA)/‖W0 + BA‖ − W0 depends on the base, so DoRA "
            "updates do not add; merge it into its base and extract a plain LoRA from the difference first")
    if adapter.saved:
        keys = sorted(adapter.saved)
        shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
        raise InvalidOptionError(
            f"input {i} carries full tensors that replace base weights (modules_to_save: {shown}); a replacement "
            "is not an update ΔW, so it has no weighted sum; write the adapter without them first")


def _describe(m: Module) -> str:
    layout = ", fan_in_fan_out" if m.fan_in_fan_out else ""
    return f"a {m.kind}{layout} weight of shape {m.weight_shape}"


def _file_form(name: str) -> str | None:
    """The format whose reader kept ``name`` as its file spells it (``Format.name_hint``: kohya's flattened
    keys), or None for a module name of the model."""
    return next((f.name for f in FORMATS.values() if f.name_hint(name)), None)


def _check_same_base(pairs: Sequence[tuple[Adapter, float]]) -> None:
    """Every module two inputs share must adapt the same base weight: same kind, layout and shape.

    Module names must be comparable: a file whose format keeps its own names when read without its
    base (kohya's flattened ``lora_te_model_layers_0_…``) never meets another input's dotted names.
    """
    kept = [(i, n, fmt) for i, (a, _) in enumerate(pairs, 1) for n in a.modules if (fmt := _file_form(n))]
    if kept and len({i for i, _, _ in kept}) < len(pairs):
        i, example, fmt = kept[0]
        raise InvalidOptionError(f"input {i} keeps {fmt}'s flattened module names ({example}), which cannot be "
                                 "matched with the other inputs' names; convert it to peft with its base model first "
                                 "(loratools convert --base MODEL)")
    seen: dict[str, tuple[int, Module]] = {}
    for i, (adapter, _) in enumerate(pairs, 1):
        for name, m in adapter.items():
            if name not in seen:
                seen[name] = (i, m)
                continue
            j, ref = seen[name]
            if (m.kind, m.weight_shape, m.fan_in_fan_out) != (ref.kind, ref.weight_shape, ref.fan_in_fan_out):
                raise WrongBaseError(f"input {j} adapts {name} as {_describe(ref)} but input {i} as {_describe(m)}; "
                                     "combine only adapters made for one base model")


def _check_method(method: str, rule: RankRule | None, density: float | None) -> float:
    if method not in METHODS:
        raise InvalidOptionError(f"`method` must be one of {', '.join(METHODS)}, got {method!r}")
    if rule is not None and not isinstance(rule, RankRule):
        raise InvalidOptionError("`rule` must be a loratools.linalg.RankRule (rank=, energy= or error=)")
    if method == "sum":
        if density is not None:
            raise InvalidOptionError("`density` applies to `method` ties or dare only")
        return 1.0
    if rule is None:
        raise InvalidOptionError(f"`method` {method} gives a dense ΔW per module: give a rank rule "
                                 "(`rank`, `energy` or `error`) for the adapter it becomes")
    d = DEFAULT_DENSITY if density is None else float(density)
    if not 0.0 < d <= 1.0:  # NaN fails this test too
        raise InvalidOptionError(f"`density` is the fraction of each ΔWᵢ's entries kept, in (0, 1], got {density}")
    return d


# --- the element-wise merges (dense, one module at a time) ------------------------------------------------------------

def ties_merge(tasks: Sequence[Tensor], density: float) -> Tensor:
    """TIES-Merging (Yadav et al. 2023) of task updates ``τᵢ`` (already weighted: ``τᵢ = wᵢΔWᵢ``).

    1. trim: keep the ``⌊density·n⌋`` entries of each ``τᵢ`` largest in magnitude, zero the rest (``τ̂ᵢ``);
    2. elect: ``γ = sign(Σᵢ τ̂ᵢ)`` per entry (``+1`` where the sum is 0);
    3. disjoint mean: ``τ = Σᵢ [sign τ̂ᵢ = γ]·τ̂ᵢ / max(1, #{i : sign τ̂ᵢ = γ})``.

    peft 0.21.2's ``utils/merge_utils.ties`` follows the same steps but elects the sign on the
    unweighted ``τ̂ᵢ``; here the weight is part of the task vector, so a negative weight (task
    negation) votes with its sign. With equal positive weights the two agree.

    >>> ties_merge([torch.tensor([3.0, -1.0, 2.0]), torch.tensor([1.0, 2.0, -4.0])], 2 / 3)
    tensor([ 3.,  2., -4.])
    """
    trimmed = torch.stack([_keep_largest(t, density) for t in tasks])
    gamma = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0).to(trimmed.dtype)
    agree = trimmed.sign() == gamma
    return (trimmed * agree).sum(0) / agree.sum(0).clamp_min(1)


def _keep_largest(t: Tensor, density: float) -> Tensor:
    k = int(density * t.numel())
    if k >= t.numel():
        return t
    out = torch.zeros_like(t).reshape(-1)
    idx = torch.topk(t.abs().reshape(-1), k).indices
    out[idx] = t.reshape(-1)[idx]
    return out.reshape(t.shape)


def dare_merge(tasks: Sequence[Tensor], density: float, generator: torch.Generator) -> Tensor:
    """DARE (Yu et al. 2023) of task updates ``τᵢ`` (already weighted): drop each entry with
    probability ``1 − density`` and rescale the survivors, ``τ = Σᵢ τᵢ ⊙ Mᵢ / density`` with
    ``Mᵢ ~ Bernoulli(density)`` drawn from ``generator`` (on the CPU, so a seed gives the same
    masks on every device). ``E[τ] = Σ τᵢ``; peft 0.21.2's ``dare_linear`` is the same rule.
    """
    out = torch.zeros_like(tasks[0])
    for t in tasks:
        keep = torch.rand(t.shape, generator=generator) < density
        out += torch.where(keep.to(t.device), t, 0.0)
    return out / density


def _module_seed(seed: int, name: str) -> int:
    """A seed per module that does not depend on the order modules are visited in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


# --- one module ----------------------------------------------------------------------------------------------------

def _from_matrices(like: Module, B: Tensor, A: Tensor, dtype: torch.dtype) -> Module:
    """Plain LoRA module (scale 1, alpha = rank) with ``ΔW_matrix = B @ A``, in ``like``'s kind and layout."""
    k = int(A.shape[0])
    if like.kind == "conv":
        A, B = A.reshape(k, *like.A.shape[1:]), B.reshape(B.shape[0], k, 1, 1)
    return Module(A=A.to("cpu", dtype).contiguous(), B=B.to("cpu", dtype).contiguous(), alpha=float(k), scale=1.0,
                  kind=like.kind, fan_in_fan_out=like.fan_in_fan_out)


def _stack(parts: Sequence[tuple[Module, float]], *, dtype: torch.dtype, device: torch.device,
           out: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """``B = [B₁ … B_k]``, ``A = [w₁A'₁; …; w_kA'_k]`` (matrix layout): ``B @ A = Σ wᵢΔWᵢ``."""
    Bs, As = [], []
    for m, w in parts:
        B, A = m.factors(dtype=dtype, device=device)
        Bs.append(B)
        As.append(_finite(A * w, w, out or dtype))
    return torch.cat(Bs, 1), torch.cat(As, 0)


def _finite(t: Tensor, w: float, dtype: torch.dtype) -> Tensor:
    """``t`` (a factor or update times the weight ``w``), or one line when it overflowed ``dtype``."""
    if not all_finite(t if t.dtype == dtype else t.to(dtype)):  # computed wider: must fit the output's dtype
        raise InvalidOptionError(f"`weights`: weight {w:g} times an input's update overflows {dtype} (±inf); "
                                 "nothing was written: use smaller weights")
    return t


def _sum_module(parts: Sequence[tuple[Module, float]], rule: RankRule | None, dtype: torch.dtype,
                device: torch.device) -> tuple[Module | None, float]:
    """The module for Σ wᵢΔWᵢ, exact or truncated from the stacked factors, and its relative error."""
    like = parts[0][0]
    if rule is None:
        B, A = _stack(parts, dtype=dtype, device=device)
        return _from_matrices(like, B, A, dtype), 0.0
    B, A = _stack(parts, dtype=torch.float64, device=device, out=dtype)
    U, S, Vh = lowrank_svd(B, A, top=lambda s: min(rule.choose(s), s.numel()))
    k = int(U.shape[1])
    e = S**2
    total, kept = float(e.sum()), float(e[:k].sum())
    rel = math.sqrt(max(total - kept, 0.0) / total) if total > 0 else 0.0
    if k >= B.shape[1]:
        return _from_matrices(like, B, A, dtype), 0.0  # nothing to cut: the exact stacked factors
    if k == 0:
        return None, rel
    return module_from_svd(like, U.cpu(), S[:k].cpu(), Vh.cpu(), dtype=dtype), rel


def _dense_module(name: str, parts: Sequence[tuple[Module, float]], method: str, rule: RankRule, density: float,
                  seed: int, dtype: torch.dtype, device: torch.device) -> tuple[Module | None, float, float]:
    """TIES/DARE on the dense ΔWᵢ of one module, truncated by ``rule``: module, error vs target, error vs sum."""
    tasks = []
    for m, w in parts:
        B, A = m.factors(dtype=torch.float32, device=device)
        tasks.append(_finite(w * (B @ A), w, torch.float32))
    exact = tasks[0].clone()
    for t in tasks[1:]:
        exact += t
    gen = torch.Generator().manual_seed(_module_seed(seed, name))
    target = ties_merge(tasks, density) if method == "ties" else dare_merge(tasks, density, gen)
    del tasks
    U, S, Vh, _ = truncated_svd(target, rank=rule.rank, energy=rule.energy, error=rule.error,
                                max_rank=rule.max_rank, generator=torch.Generator(device=device).manual_seed(seed))
    approx = (U * S) @ Vh
    rel = _rel(approx, target)
    sum_rel = _rel(approx, exact)
    if S.numel() == 0:
        return None, rel, sum_rel
    return module_from_svd(parts[0][0], U.cpu(), S.cpu(), Vh.cpu(), dtype=dtype), rel, sum_rel


def _rel(x: Tensor, ref: Tensor) -> float:
    """``‖x − ref‖_F / ‖ref‖_F`` (0 when both are 0; inf when only ``ref`` is)."""
    den = float(torch.linalg.vector_norm(ref))
    num = float(torch.linalg.vector_norm(x - ref))
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


# --- the job ----------------------------------------------------------------------------------------------------------

def combine_adapters(inputs: Sequence[Adapter | tuple[Adapter, float]], *, rule: RankRule | None = None,
                     method: Method = "sum", density: float | None = None, seed: int = 0,
                     device: str | torch.device = "auto",
                     progress: Callable[[int], None] | None = None) -> CombineResult:
    """One plain-LoRA adapter whose update is ``Σ wᵢ·ΔWᵢ`` per module (see the module docstring).

    ``inputs`` are ``(adapter, weight)`` pairs (a bare adapter has weight 1), in any
    format loratools reads, LoRA and AdaLoRA mixed; modules two inputs share must
    adapt the same base weight. ``rule=None`` with ``method="sum"`` is exact (rank
    Σrᵢ); a :class:`RankRule` truncates each module's sum optimally. ``ties``/``dare``
    need a rule; ``density`` (default 0.2) is the fraction of entries they keep, and
    ``seed`` makes DARE's masks (and the randomized SVD) reproducible.

    >>> g = torch.Generator().manual_seed(0)
    >>> q = Module(A=torch.randn(2, 6, generator=g), B=torch.randn(5, 2, generator=g), alpha=2, scale=1.0)
    >>> a = Adapter({"q": q})
    >>> res = combine_adapters([(a, 1.0), (a, -0.5)], device="cpu")
    >>> res.layers[0].rank, bool(torch.allclose(res.adapter.delta("q"), 0.5 * a.delta("q"), atol=1e-6))
    (4, True)
    """
    pairs = _pairs(inputs)
    for i, (adapter, _) in enumerate(pairs, 1):
        _check_input(i, adapter)
    _check_same_base(pairs)
    dens = _check_method(method, rule, density)
    dev = resolve_device(device)
    loras = [as_lora(a) for a, _ in pairs]  # AdaLoRA → LoRA with the same ΔW; modules of rank 0 dropped
    wide = any(m.A.dtype == torch.float64 or m.B.dtype == torch.float64 for a in loras for m in a.modules.values())
    dtype = torch.float64 if wide else torch.float32  # 16-bit inputs come out float32: w·s·A is not exact in 16 bits
    names = list(dict.fromkeys(name for a, _ in pairs for name in a.modules))

    modules: dict[str, Module] = {}
    layers: list[CombineLayer] = []
    for name in names:
        ranks = tuple((lora.modules[name].rank if name in lora.modules else 0) if name in a.modules else None
                      for (a, _), lora in zip(pairs, loras))
        parts = [(lora.modules[name], w) for (_, w), lora in zip(pairs, loras) if name in lora.modules and w != 0.0]
        shape = next(a.modules[name].weight_shape for a, _ in pairs if name in a.modules)
        module, rel, sum_rel = None, 0.0, 0.0
        if parts and method == "sum":
            module, rel = _sum_module(parts, rule, dtype, dev)
            sum_rel = rel
        elif parts:
            assert rule is not None
            module, rel, sum_rel = _dense_module(name, parts, method, rule, dens, seed, dtype, dev)
        if module is not None:
            modules[name] = module
        layers.append(CombineLayer(name, shape, ranks, module.rank if module is not None else 0, rel, sum_rel))
        if progress:
            progress(1)
    dense = method != "sum"
    return CombineResult(Adapter(modules, _config(pairs)), layers, tuple(w for _, w in pairs), method, rule,
                         dens if dense else None, seed if dense else None, _notes(pairs))


def _config(pairs: Sequence[tuple[Adapter, float]]) -> AdapterConfig:
    """A fresh plain-LoRA config: modules are named one by one (no input's target_modules covers the union)."""
    cfgs = [a.config for a, _ in pairs]
    return AdapterConfig(method="lora", fan_in_fan_out=any(c.fan_in_fan_out for c in cfgs),
                         base_model=next((c.base_model for c in cfgs if c.base_model), None),
                         task_type=next((c.task_type for c in cfgs if c.task_type), None))


def _notes(pairs: Sequence[tuple[Adapter, float]]) -> tuple[str, ...]:
    bases = list(dict.fromkeys(a.config.base_model for a, _ in pairs if a.config.base_model))
    if len(bases) > 1:
        return (f"the inputs name different base models ({', '.join(bases)}); their module shapes agree, "
                f"the output names {bases[0]}",)
    return ()


def combine_files(inputs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *,
                  weights: Sequence[float] | None = None, rule: RankRule | None = None, rank: int | None = None,
                  energy: float | None = None, error: float | None = None, max_rank: int | None = None,
                  method: Method = "sum", density: float | None = None, seed: int = 0, format: str = "peft",
                  device: str = "auto", force: bool = False, base: str | os.PathLike[str] | None = None,
                  data: str | os.PathLike[str] | None = None, progress: Progress | None = None) -> CombineResult:
    """Read the adapters at ``inputs`` (any formats, mixed), :func:`combine_adapters` them with ``weights``
    (one per input; default 1 each) and write the result to ``out`` in ``format``.

    A rank rule (``rule``, or ``rank``/``energy``/``error`` with ``max_rank``) truncates each module's sum;
    none keeps it exact. With ``base`` and ``data``, ``heldout`` holds the held-out loss of the base alone
    (before) and of base + the combined adapter (after). The options are checked and ``out`` refused before
    anything is read; the write is atomic (nothing appears at ``out`` unless it completes).

    >>> combine_files(["style/", "task/"], "both", weights=[1.0, -0.5]).exact  # doctest: +SKIP
    True
    """
    paths = tuple(os.fspath(p) for p in inputs)
    if weights and len(weights) != len(paths):
        raise InvalidOptionError(f"{len(weights)} `weights` for {len(paths)} adapters; give one per adapter or none")
    loose = (rank, energy, error, max_rank) != (None, None, None, None)
    rule = RankRule.from_options(rule, rank=rank, energy=energy, error=error, max_rank=max_rank) if loose else rule
    get_format(format)
    held = heldout_inputs(base, data)
    check_output(out, force=force, inputs=paths)  # fail before reading and computing
    pairs = [(read_adapter(p), w) for p, w in zip(paths, weights or (1.0,) * len(paths))]
    if progress:
        progress(0, total=len({n for a, _ in pairs for n in a.modules}))
    res = combine_adapters(pairs, rule=rule, method=method, density=density, seed=seed, device=device,
                           progress=progress)
    zero = all(w == 0.0 for _, w in pairs)
    check_result(res.adapter, cause="use smaller `weights`",
                 empty="every weight is zero" if zero else "no module keeps a nonzero update (the inputs cancel, "
                 "or the rank rule keeps rank 0 everywhere)")
    report = heldout_report(*held, after=res.adapter, device=device) if held else None
    write_adapter(res.adapter, out, format=format, force=force, inputs=paths)
    return replace(res, inputs=paths, output=os.fspath(out), format=format, heldout=report)
