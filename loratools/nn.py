"""LoRA and AdaLoRA as plain PyTorch modules, and AdaLoRA's rank allocator.

- :class:`LoRALinear` (Hu et al. 2021, arXiv:2106.09685): ``y = W0 x + s · B A dropout(x)``
  with ``W0`` frozen, ``A`` (r×in) Kaiming-uniform, ``B`` (out×r) zero, ``s = alpha/r``
  (rsLoRA, Kalajdzievski 2023: ``alpha/√r``). The forward never forms ``ΔW``.
- :class:`AdaLoRALinear` (Zhang et al. 2023, arXiv:2303.10512): ``ΔW = P Λ Q`` stored as PEFT
  stores it: ``lora_B`` = P (out×r), ``lora_E`` = Λ (r×1), ``lora_A`` = Q (r×in), scaled by
  ``alpha/(init_r + 1e-5)``; a boolean ``mask`` on Λ marks the triplets the allocator keeps.
- :class:`RankAllocator` (from :mod:`loratools.adalora`, re-exported here with the rest of the training API):
  importance scores, the cubic budget schedule and the masking.
- :func:`inject` / :func:`adapter_state` / :func:`load_adapter`: wrap a model's modules by name,
  export the trained factors as a :class:`loratools.adapter.Adapter` (PEFT naming), load one back.
  DoRA's layer (``LayerSpec(dora=True)``) lives in :mod:`loratools.nn_dora`.

No peft at run time: everything here is written from the papers' formulas.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# AdaLoRA's allocator and orthogonality penalty are re-exported: they are part of the training API (__all__)
from .adalora import (OrthForm, RankAllocator, budget_schedule, orthogonal_penalty, orthogonal_regularizer,
                      rank_pattern_masks)
from .adapter import Adapter, Module
from .config import AdapterConfig, adalora_scale, lora_scale, target_matches
from .errors import InvalidOptionError, MissingModuleError, ShapeMismatchError, UnsupportedModuleError

__all__ = [
    "LoRALinear",
    "AdaLoRALinear",
    "LayerSpec",
    "RankAllocator",
    "budget_schedule",
    "orthogonal_regularizer",
    "orthogonal_penalty",
    "inject",
    "adapter_layers",
    "adapter_state",
    "load_adapter",
    "trainable_parameters",
    "expected_parameters",
]


def _in_out(base: nn.Module) -> tuple[int, int, bool]:
    """(in, out, fan_in_fan_out) of an nn.Linear or of GPT-2's Conv1D (weight stored in×out)."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features, False
    if type(base).__name__ == "Conv1D" and hasattr(base, "nf"):
        w = base.weight
        return int(w.shape[0]), int(w.shape[1]), True
    raise UnsupportedModuleError("LoRA", [type(base).__name__], "only nn.Linear and GPT-2 Conv1D layers can be adapted")


class _Adapted(nn.Module):
    """What LoRA and AdaLoRA layers share: the frozen base layer and the dropout on the adapter input."""

    def __init__(self, base: nn.Module, *, dropout: float) -> None:
        super().__init__()
        self.in_features, self.out_features, self.fan_in_fan_out = _in_out(base)
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def weight(self) -> Tensor:  # some model code reads `.weight` of its projections (dtype checks)
        return self.base.weight  # type: ignore[return-value]

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(B', A')`` with ``ΔW = B' A'`` (out×in); subclasses fold in scale and Λ."""
        raise NotImplementedError

    def _adapter_out(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + self._adapter_out(self.dropout(x)).to(y.dtype)

    def delta_weight(self) -> Tensor:
        """Dense ``ΔW`` in the base weight's own layout (transposed for Conv1D). For merging and tests only."""
        B, A = self.factors()
        d = B @ A
        return d.T if self.fan_in_fan_out else d

    @torch.no_grad()
    def merge(self) -> None:
        """``W0 ← W0 + ΔW`` in place; the forward then uses the base layer alone."""
        if not self.merged:
            w = self.base.weight
            w.add_(self.delta_weight().to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """``W0 ← W0 − ΔW``: undoes :meth:`merge` (exact up to the rounding of one add and one subtract)."""
        if self.merged:
            w = self.base.weight
            w.sub_(self.delta_weight().to(w.dtype))
            self.merged = False


class LoRALinear(_Adapted):
    """``y = W0 x + s · B (A · dropout(x))`` around a frozen linear layer.

    ``A`` (r×in) starts Kaiming-uniform with ``a = √5`` (as nn.Linear and PEFT), ``B`` (out×r)
    at zero, so training starts from the base model. ``s = alpha/r``, or ``alpha/√r`` with rsLoRA.
    The adapter path is two thin matmuls: ``ΔW`` is never formed.

    >>> layer = LoRALinear(nn.Linear(16, 8), r=4, alpha=8)
    >>> layer(torch.randn(2, 16)).shape, layer.scaling
    (torch.Size([2, 8]), 2.0)
    """

    def __init__(self, base: nn.Module, *, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False) -> None:
        super().__init__(base, dropout=dropout)
        self.r, self.alpha = int(r), float(alpha)
        self.scaling = lora_scale(alpha, r, rslora=rslora)
        dev = base.weight.device
        # adapter weights stay float32 whatever the base dtype: they are what the optimizer updates
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_B, self.lora_A * self.scaling

    def _adapter_out(self, x: Tensor) -> Tensor:
        h = x.to(self.lora_A.dtype) if not torch.is_autocast_enabled() else x
        return F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling


class AdaLoRALinear(_Adapted):
    """``y = W0 x + (alpha/(init_r + 1e-5)) · P (Λ ⊙ (Q · dropout(x)))`` around a frozen linear layer.

    Stored as PEFT stores it: ``lora_A`` = Q (r×in), ``lora_E`` = Λ (r×1), ``lora_B`` = P (out×r).
    P and Q start Gaussian (std 0.02) and Λ at zero (the paper's and PEFT's initialisation).
    ``mask`` (r×1, bool) marks the triplets kept by the allocator; :meth:`apply_mask` zeroes
    the others' Λ so they contribute nothing until a later allocation revives them.

    >>> layer = AdaLoRALinear(nn.Linear(16, 8), r=6, alpha=12)
    >>> tuple(layer.lora_E.shape), round(layer.scaling, 4)
    ((6, 1), 2.0)
    """

    def __init__(self, base: nn.Module, *, r: int, alpha: float, init_r: int | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__(base, dropout=dropout)
        self.r, self.alpha = int(r), float(alpha)
        self.init_r = int(init_r if init_r is not None else r)
        # PEFT's rule: the divisor is init_r (+1e-5) even for a module that keeps fewer triplets
        self.scaling = adalora_scale(alpha, self.init_r)
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.randn(r, self.in_features, device=dev) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(r, 1, device=dev))
        self.lora_B = nn.Parameter(torch.randn(self.out_features, r, device=dev) * 0.02)
        self.register_buffer("mask", torch.ones(r, 1, dtype=torch.bool, device=dev))

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_B, self.lora_A * self.lora_E * self.scaling

    def _adapter_out(self, x: Tensor) -> Tensor:
        h = x.to(self.lora_A.dtype) if not torch.is_autocast_enabled() else x
        return F.linear(F.linear(h, self.lora_A * self.lora_E), self.lora_B) * self.scaling

    @torch.no_grad()
    def apply_mask(self) -> None:
        self.lora_E.masked_fill_(~self.mask, 0.0)

    def orthogonal_regularizer(self, *, form: OrthForm = "paper") -> Tensor:
        return orthogonal_regularizer(self.lora_B, self.lora_A, form=form)


# ---------------------------------------------------------------------------------------------
# Injection and export


@dataclass(frozen=True)
class LayerSpec:
    """How to adapt each targeted layer.

    ``method`` "lora": rank ``r``, ``alpha``, ``rslora``, and ``dora`` for DoRA layers. "adalora": every
    layer starts at ``init_r`` triplets; ``target_r`` is the average kept per layer at the end.
    """

    method: Literal["lora", "adalora"] = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    init_r: int = 12
    target_r: int = 4
    dora: bool = False

    def __post_init__(self) -> None:
        if self.method not in ("lora", "adalora"):
            raise InvalidOptionError(f"`method` must be lora or adalora, got {self.method!r}")
        if self.method == "lora" and self.r <= 0:
            raise InvalidOptionError(f"`r` must be ≥ 1, got {self.r}")
        if self.method == "adalora" and not 0 < self.target_r <= self.init_r:
            raise InvalidOptionError(f"AdaLoRA needs 0 < `target_r` ≤ `init_r`, got {self.target_r} and {self.init_r}")
        if not 0 <= self.dropout < 1:
            raise InvalidOptionError(f"`dropout` must be in [0, 1), got {self.dropout}")
        if self.dora and self.method != "lora":  # peft 0.21.2's AdaLoraConfig refuses use_dora too
            raise InvalidOptionError(f"`dora` works with `method` lora only, not {self.method}")


def _adaptable(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def linear_target_names(model: nn.Module) -> list[str]:
    """The distinct last name components of the layers ``inject`` can adapt, without the output head.

    What ``targets="all-linear"`` means (peft 0.21.2 ``tuners_utils._maybe_include_all_linear_layers``:
    every linear layer but the output embedding, ``lm_head``).
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if n and _adaptable(m) and not isinstance(m, _Adapted) and m is not head})


def inject(model: nn.Module, targets: str | Iterable[str], spec: LayerSpec) -> dict[str, _Adapted]:
    """Wrap every nn.Linear/Conv1D whose name matches ``targets`` and freeze all other parameters.

    ``targets`` is a list of names (``["q_proj", "v_proj"]`` matches ``…self_attn.q_proj``) or
    one regular expression over full names. Returns the new layers by module name. Mutates
    ``model`` (that is what injecting means); the base weights themselves are untouched.

    >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> sorted(inject(net, ["0", "2"], LayerSpec(r=2, alpha=4)))
    ['0', '2']
    """
    targets = targets if isinstance(targets, str) else list(targets)
    matched = [(n, m) for n, m in model.named_modules()
               if n and target_matches(n, targets) and not isinstance(m, _Adapted)]
    _check_every_target_adapted(model, targets, matched)
    chosen = [(n, m) for n, m in matched if _adaptable(m)]
    if not chosen:
        raise MissingModuleError(f"`targets` {targets}", "the model",
                                 "no nn.Linear/Conv1D layer has such a name; its layers are "
                                 f"{', '.join(linear_target_names(model))} (or all-linear)")
    for p in model.parameters():
        p.requires_grad_(False)
    layers: dict[str, _Adapted] = {}
    for name, base in chosen:
        layer: _Adapted
        if spec.method == "lora":
            layer = _lora_class(spec.dora)(base, r=spec.r, alpha=spec.alpha, dropout=spec.dropout, rslora=spec.rslora)
        else:
            layer = AdaLoRALinear(base, r=spec.init_r, alpha=spec.alpha, dropout=spec.dropout)
        _set_submodule(model, name, layer)
        layers[name] = layer
    return layers


def _check_every_target_adapted(model: nn.Module, targets: str | list[str],
                                matched: list[tuple[str, nn.Module]]) -> None:
    """A target that would be listed in the adapter's ``target_modules`` but not trained is refused by name:
    a layer with weights that is not nn.Linear/Conv1D (an embedding, a norm), or a list entry matching nothing."""
    odd = [(n, m) for n, m in matched if not _adaptable(m) and isinstance(getattr(m, "weight", None), torch.Tensor)]
    if odd:
        name, m = odd[0]
        raise InvalidOptionError(f"`targets` names {name} ({type(m).__name__}); train adapts nn.Linear/Conv1D layers "
                                 "only (an embedding LoRA can be made with peft); leave it out of `targets`")
    if not isinstance(targets, str):
        names = [n for n, _ in model.named_modules() if n]
        unknown = [t for t in targets if not any(target_matches(n, [t]) for n in names)]
        if unknown:
            raise MissingModuleError(f"`targets` entry {unknown[0]!r}", "the model",
                                     "no layer has such a name; its layers are "
                                     f"{', '.join(linear_target_names(model))} (or all-linear)")


def _lora_class(dora: bool) -> type[LoRALinear]:
    """LoRALinear, or DoRA's subclass (imported here: nn_dora builds on this module)."""
    if not dora:
        return LoRALinear
    from .nn_dora import DoRALinear

    return DoRALinear


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def adapter_layers(model: nn.Module) -> dict[str, _Adapted]:
    """The LoRA/AdaLoRA layers of ``model`` by module name (the name the wrapped layer had)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _Adapted)}


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def expected_parameters(shapes: Iterable[tuple[int, int]], spec: LayerSpec) -> int:
    """The trainable-parameter formula over (in, out) pairs: LoRA ``Σ r(in + out)`` (DoRA ``+ out``, m);
    AdaLoRA ``Σ init_r(in + out + 1)`` (the +1 is Λ)."""
    if spec.method == "lora":
        return sum(spec.r * (i + o) + (o if spec.dora else 0) for i, o in shapes)
    return sum(spec.init_r * (i + o + 1) for i, o in shapes)


def adapter_state(model: nn.Module, *, base_model: str | None = None, targets: Iterable[str] | str | None = None,
                  extra: Mapping[str, object] | None = None) -> Adapter:
    """The model's trained adapter as an :class:`Adapter` (PEFT naming), detached float32 copies.

    AdaLoRA layers are truncated to their kept triplets (mask), as PEFT saves them; the
    masks go to ``rank_pattern`` and the scale stays ``alpha/(init_r + 1e-5)``.
    """
    layers = adapter_layers(model)
    if not layers:
        raise MissingModuleError("LoRA layers", "the model", "call inject() first")
    ada = {n: m for n, m in layers.items() if isinstance(m, AdaLoRALinear)}
    if ada and len(ada) != len(layers):
        raise InvalidOptionError("a model mixing LoRA and AdaLoRA layers cannot be saved as one adapter")
    modules: dict[str, Module] = {}
    raw: dict[str, object] = dict(extra or {})
    target_list = targets if targets is None or isinstance(targets, str) else tuple(targets)
    fifo = any(m.fan_in_fan_out for m in layers.values())
    if ada:
        init_r = max(m.init_r for m in ada.values())
        alpha = next(iter(ada.values())).alpha
        for name, m in ada.items():
            keep = m.mask.reshape(-1).cpu()
            A, E, B = (t.detach().float().cpu() for t in (m.lora_A, m.lora_E, m.lora_B))
            modules[name] = Module(A=A[keep].clone(), E=E[keep].clone(), B=B[:, keep].clone(), alpha=m.alpha,
                                   scale=adalora_scale(m.alpha, m.init_r), fan_in_fan_out=m.fan_in_fan_out)
        raw["rank_pattern"] = rank_pattern_masks({n: m.mask for n, m in ada.items()}) or None
        raw["lora_alpha"] = alpha
        target_r = raw.pop("target_r", None)
        config = AdapterConfig(method="adalora", fan_in_fan_out=fifo, base_model=base_model, task_type="CAUSAL_LM",
                               init_r=init_r, target_r=int(target_r) if target_r is not None else None,  # type: ignore[arg-type]
                               target_modules=target_list, extra=raw)
    else:
        rslora = False
        for name, m in layers.items():
            assert isinstance(m, LoRALinear)
            rslora = rslora or abs(m.scaling - lora_scale(m.alpha, m.r)) > 1e-12 * abs(m.scaling)
            mag = getattr(m, "lora_magnitude_vector", None)  # DoRA's m (loratools.nn_dora)
            modules[name] = Module(A=m.lora_A.detach().float().cpu().clone(), B=m.lora_B.detach().float().cpu().clone(),
                                   alpha=m.alpha, scale=m.scaling, fan_in_fan_out=m.fan_in_fan_out,
                                   magnitude=None if mag is None else mag.detach().float().cpu().clone())
        config = AdapterConfig(method="lora", use_rslora=rslora, fan_in_fan_out=fifo, base_model=base_model,
                               task_type="CAUSAL_LM", target_modules=target_list, extra=raw)
    return Adapter(modules, config)


@torch.no_grad()
def load_adapter(model: nn.Module, adapter: Adapter) -> dict[str, _Adapted]:
    """Wrap ``model``'s layers named in ``adapter`` (if not wrapped yet) and load its factors.

    Each layer gets the adapter's own rank for that module (a truncated AdaLoRA module keeps its
    rank, and its scale stays ``alpha/(init_r + 1e-5)``). Returns the layers by name.
    """
    layers: dict[str, _Adapted] = {}
    for name, m in adapter.items():
        if m.kind != "linear":
            raise UnsupportedModuleError("loratools.nn", [name], f"{m.kind} adapters cannot be loaded for training")
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise MissingModuleError(name, "the model", "this adapter was made for another base model") from None
        base = current.base if isinstance(current, _Adapted) else current
        layer: _Adapted
        if adapter.method == "adalora":
            assert m.E is not None
            layer = AdaLoRALinear(base, r=m.rank, alpha=m.alpha, init_r=adapter.config.init_r or m.rank)
            layer.lora_E.copy_(m.E)
        else:
            layer = _lora_class(m.is_dora)(base, r=m.rank, alpha=m.alpha, rslora=adapter.config.use_rslora)
            layer.scaling = m.scale
        i, o, _ = _in_out(base)
        if (o, i) != m.matrix_shape:
            raise ShapeMismatchError(name, f"an adapter for a {o}×{i} layer", m.matrix_shape,
                                     "this adapter was made for another base model")
        layer.lora_A.copy_(m.A)
        layer.lora_B.copy_(m.B)
        if m.magnitude is not None:
            layer.lora_magnitude_vector.copy_(m.magnitude)
        _set_submodule(model, name, layer)
        layers[name] = layer
    return layers

