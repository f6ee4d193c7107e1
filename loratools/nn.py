"""LoRA and AdaLoRA as plain PyTorch modules, and AdaLoRA's rank allocator.

- :class:`LoRALinear` (Hu et al. 2021, arXiv:2106.09685): ``y = W0 x + s · B A dropout(x)``
  with ``W0`` frozen, ``A`` (r×in) Kaiming-uniform, ``B`` (out×r) zero, ``s = alpha/r``
  (rsLoRA, Kalajdzievski 2023: ``alpha/√r``). The forward never forms ``ΔW``.
- :class:`AdaLoRALinear` (Zhang et al. 2023, arXiv:2303.10512): ``ΔW = P Λ Q`` stored as PEFT
  stores it: ``lora_B`` = P (out×r), ``lora_E`` = Λ (r×1), ``lora_A`` = Q (r×in), scaled by
  ``alpha/(init_r + 1e-5)``; a boolean ``mask`` on Λ marks the triplets the allocator keeps.
- :class:`RankAllocator`: importance scores, the cubic budget schedule and the masking.
- :func:`inject` / :func:`adapter_state` / :func:`load_adapter`: wrap a model's modules by name,
  export the trained factors as a :class:`loratools.adapter.Adapter` (PEFT naming), load one back.

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

OrthForm = Literal["paper", "peft"]


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


def orthogonal_regularizer(P: Tensor, Q: Tensor, *, form: OrthForm = "paper") -> Tensor:
    """AdaLoRA's penalty pushing P's columns and Q's rows towards orthonormality.

    ``form="paper"``: ``R(P, Q) = ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F`` (the paper's eq. 4).
    ``form="peft"``: ``(‖PᵀP − I‖_F + ‖QQᵀ − I‖_F) / 2`` — the unsquared norms, averaged over
    the two matrices as PEFT (and the authors' code) do.

    >>> float(orthogonal_regularizer(torch.eye(5, 3), torch.eye(3, 7)))
    0.0
    """
    eye = torch.eye(P.shape[1], device=P.device, dtype=P.dtype)
    dp = P.T @ P - eye
    dq = Q @ Q.T - eye
    if form == "paper":
        return dp.pow(2).sum() + dq.pow(2).sum()
    if form == "peft":
        return (torch.linalg.norm(dp) + torch.linalg.norm(dq)) / 2
    raise InvalidOptionError(f"unknown orthogonal regulariser form {form!r}; use paper or peft")


def orthogonal_penalty(layers: Iterable[AdaLoRALinear], *, form: OrthForm = "paper") -> Tensor:
    """The whole model's penalty: the paper sums ``R(P, Q)`` over layers; PEFT averages its norms
    over every P and Q matrix. Multiply by the regulariser weight γ."""
    terms = [layer.orthogonal_regularizer(form=form) for layer in layers if layer.r > 0]
    if not terms:
        return torch.zeros(())
    total = torch.stack(terms).sum()
    return total if form == "paper" else total / len(terms)


# ---------------------------------------------------------------------------------------------
# Rank allocation


def budget_schedule(step: int, *, initial: int, target: int, total: int, tinit: int, tfinal: int) -> int:
    """AdaLoRA's cubic budget (total number of kept triplets) after ``step`` updates:

    ``b(t) = b_0`` for ``t ≤ t_i``; ``b_T + ⌊(b_0 − b_T)(1 − (t − t_i)/(T − t_i − t_f))³⌋``
    for ``t_i < t ≤ T − t_f``; ``b_T`` after. Computed in integers, so exact.

    >>> [budget_schedule(t, initial=12, target=4, total=10, tinit=2, tfinal=2) for t in range(11)]
    [12, 12, 12, 8, 6, 5, 4, 4, 4, 4, 4]
    """
    if step <= tinit:
        return initial
    span = total - tfinal - tinit
    if step > total - tfinal or span <= 0:
        return target
    left = span - (step - tinit)
    return target + ((initial - target) * left**3) // span**3


class RankAllocator:
    """AdaLoRA's importance-driven allocation of the rank budget over the adapted layers.

    After each optimizer step (gradients still present) :meth:`step` does, for every entry θ of
    P, Λ, Q: sensitivity ``I = |θ · ∂L/∂θ|``; smoothed ``Ī ← β1 Ī + (1−β1) I``; uncertainty
    ``Ū ← β2 Ū + (1−β2) |I − Ī|``; score ``s = Ī · Ū``. Triplet i of a layer scores
    ``S_i = s(λ_i) + mean_j s(P_ji) + mean_j s(Q_ij)``. Every ``delta_t`` steps between
    ``tinit`` and ``T − tfinal`` the ``b(t)`` best triplets (all layers together) are kept and the
    others' Λ set to zero; at ``T − tfinal`` the final pattern is fixed. Masks are re-applied after
    every step, so a masked Λ stays exactly zero until a later allocation keeps it again.
    """

    def __init__(self, layers: Mapping[str, AdaLoRALinear], *, target_r: int, total_step: int,
                 tinit: int = 0, tfinal: int = 0, delta_t: int = 1, beta1: float = 0.85, beta2: float = 0.85) -> None:
        if not layers:
            raise InvalidOptionError("AdaLoRA found no layers to allocate rank over; check --targets")
        if not (0 < beta1 < 1 and 0 < beta2 < 1):
            raise InvalidOptionError(f"beta1 and beta2 must be in (0, 1), got {beta1}, {beta2}")
        if tinit + tfinal >= total_step:
            raise InvalidOptionError(
                f"AdaLoRA needs tinit + tfinal < total steps, got {tinit} + {tfinal} ≥ {total_step}; train longer")
        self.layers = dict(layers)
        self.total_step, self.tinit, self.tfinal = total_step, tinit, tfinal
        self.delta_t, self.beta1, self.beta2 = max(1, delta_t), beta1, beta2
        self.initial_budget = sum(layer.r for layer in self.layers.values())
        self.target_budget = min(self.initial_budget, target_r * len(self.layers))
        self.ema_ipt: dict[str, Tensor] = {}
        self.ema_unc: dict[str, Tensor] = {}
        self.final = False

    def _params(self) -> Iterable[tuple[str, Tensor]]:
        for name, layer in self.layers.items():
            for part in ("lora_A", "lora_E", "lora_B"):
                yield f"{name}.{part}", getattr(layer, part)

    def budget(self, step: int) -> int:
        return budget_schedule(step, initial=self.initial_budget, target=self.target_budget, total=self.total_step,
                               tinit=self.tinit, tfinal=self.tfinal)

    @torch.no_grad()
    def update_importance(self) -> None:
        for key, p in self._params():
            if p.grad is None:
                continue
            ipt = (p * p.grad).abs()
            if key not in self.ema_ipt:
                self.ema_ipt[key] = torch.zeros_like(p)
                self.ema_unc[key] = torch.zeros_like(p)
            ema = self.ema_ipt[key].mul_(self.beta1).add_(ipt, alpha=1 - self.beta1)
            self.ema_unc[key].mul_(self.beta2).add_((ipt - ema).abs(), alpha=1 - self.beta2)

    def triplet_scores(self) -> dict[str, Tensor]:
        """``S_i`` per layer (length r), from the smoothed sensitivity times uncertainty."""
        out: dict[str, Tensor] = {}
        for name, layer in self.layers.items():
            s = {part: (self.ema_ipt[f"{name}.{part}"] * self.ema_unc[f"{name}.{part}"])
                 if f"{name}.{part}" in self.ema_ipt else torch.zeros_like(getattr(layer, part))
                 for part in ("lora_A", "lora_E", "lora_B")}
            out[name] = s["lora_E"].reshape(-1) + s["lora_A"].mean(dim=1) + s["lora_B"].mean(dim=0)
        return out

    @torch.no_grad()
    def allocate(self, budget: int) -> None:
        """Keep the ``budget`` highest-scoring triplets over all layers, mask the rest.
        Ties are broken by layer order then index (a stable sort), so the count is exact."""
        scores = self.triplet_scores()
        flat = torch.cat([scores[n].float().cpu() for n in self.layers])
        order = torch.sort(-flat, stable=True).indices
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[order[:budget]] = True
        at = 0
        for layer in self.layers.values():
            layer.mask.copy_(keep[at:at + layer.r].reshape(-1, 1))
            at += layer.r

    @torch.no_grad()
    def apply_masks(self) -> None:
        for layer in self.layers.values():
            layer.apply_mask()

    def step(self, step: int) -> int:
        """Call after the optimizer update of step ``step`` (1-based). Returns the budget in force."""
        if step < self.total_step - self.tfinal:
            self.update_importance()
        budget = self.budget(step)
        if step >= self.total_step - self.tfinal:
            if not self.final:  # the final allocation, then frozen
                self.allocate(self.target_budget)
                self.final = True
        elif step > self.tinit and step % self.delta_t == 0:
            self.allocate(budget)
        self.apply_masks()
        return budget

    def rank_pattern(self) -> dict[str, list[bool]]:
        """PEFT's ``rank_pattern``: ``{"<module>.lora_E": [kept?] * init_r}``."""
        return {f"{n}.lora_E": [bool(b) for b in layer.mask.reshape(-1).tolist()] for n, layer in self.layers.items()}

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only (the EMAs and a flag), for a safetensors checkpoint; masks live on the layers."""
        out = {f"ipt.{k}": v for k, v in self.ema_ipt.items()}
        out.update({f"unc.{k}": v for k, v in self.ema_unc.items()})
        out["final"] = torch.tensor([int(self.final)])
        return out

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.ema_ipt = {k[4:]: v.clone() for k, v in state.items() if k.startswith("ipt.")}
        self.ema_unc = {k[4:]: v.clone() for k, v in state.items() if k.startswith("unc.")}
        self.final = bool(int(state["final"].item())) if "final" in state else False


# ---------------------------------------------------------------------------------------------
# Injection and export


@dataclass(frozen=True)
class LayerSpec:
    """How to adapt each targeted layer.

    ``method`` "lora": rank ``r``, ``alpha``, ``rslora``. "adalora": every layer starts at
    ``init_r`` triplets; ``target_r`` is the average kept per layer at the end.
    """

    method: Literal["lora", "adalora"] = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    init_r: int = 12
    target_r: int = 4

    def __post_init__(self) -> None:
        if self.method not in ("lora", "adalora"):
            raise InvalidOptionError(f"method must be lora or adalora, got {self.method!r}")
        if self.method == "lora" and self.r <= 0:
            raise InvalidOptionError(f"--rank must be positive, got {self.r}")
        if self.method == "adalora" and not 0 < self.target_r <= self.init_r:
            raise InvalidOptionError(f"AdaLoRA needs 0 < target rank ≤ init rank, got {self.target_r} and {self.init_r}")
        if not 0 <= self.dropout < 1:
            raise InvalidOptionError(f"dropout must be in [0, 1), got {self.dropout}")


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
    chosen = [(n, m) for n, m in model.named_modules()
              if n and target_matches(n, targets) and not isinstance(m, _Adapted)
              and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")]
    if not chosen:
        raise MissingModuleError(f"targets {targets}", "the model",
                                 "no nn.Linear/Conv1D layer has such a name; pick names from the model's modules")
    for p in model.parameters():
        p.requires_grad_(False)
    layers: dict[str, _Adapted] = {}
    for name, base in chosen:
        layer: _Adapted
        if spec.method == "lora":
            layer = LoRALinear(base, r=spec.r, alpha=spec.alpha, dropout=spec.dropout, rslora=spec.rslora)
        else:
            layer = AdaLoRALinear(base, r=spec.init_r, alpha=spec.alpha, dropout=spec.dropout)
        _set_submodule(model, name, layer)
        layers[name] = layer
    return layers


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
    """The trainable-parameter formula over (in, out) pairs: LoRA ``Σ r(in + out)``;
    AdaLoRA ``Σ init_r(in + out + 1)`` (the +1 is Λ)."""
    if spec.method == "lora":
        return sum(spec.r * (i + o) for i, o in shapes)
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
        masks: dict[str, list[bool]] = {}
        init_r = max(m.init_r for m in ada.values())
        alpha = next(iter(ada.values())).alpha
        for name, m in ada.items():
            keep = m.mask.reshape(-1).cpu()
            A, E, B = (t.detach().float().cpu() for t in (m.lora_A, m.lora_E, m.lora_B))
            modules[name] = Module(A=A[keep].clone(), E=E[keep].clone(), B=B[:, keep].clone(), alpha=m.alpha,
                                   scale=adalora_scale(m.alpha, m.init_r), fan_in_fan_out=m.fan_in_fan_out)
            if not bool(keep.all()):
                masks[f"{name}.lora_E"] = [bool(b) for b in keep.tolist()]
        raw["rank_pattern"] = masks or None
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
            modules[name] = Module(A=m.lora_A.detach().float().cpu().clone(), B=m.lora_B.detach().float().cpu().clone(),
                                   alpha=m.alpha, scale=m.scaling, fan_in_fan_out=m.fan_in_fan_out)
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
            layer = LoRALinear(base, r=m.rank, alpha=m.alpha, rslora=adapter.config.use_rslora)
            layer.scaling = m.scale
        i, o, _ = _in_out(base)
        if (o, i) != m.matrix_shape:
            raise ShapeMismatchError(name, f"an adapter for a {o}×{i} layer", m.matrix_shape,
                                     "this adapter was made for another base model")
        layer.lora_A.copy_(m.A)
        layer.lora_B.copy_(m.B)
        _set_submodule(model, name, layer)
        layers[name] = layer
    return layers

