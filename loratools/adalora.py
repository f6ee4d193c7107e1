"""AdaLoRA's importance scores and rank allocation: the one implementation, for training and for pruning.

Zhang et al. 2023 (arXiv:2303.10512, eq. 8–11). For every entry θ of P (``lora_B``), Λ (``lora_E``)
and Q (``lora_A``) and every step t, with the sensitivity ``I = |θ · ∂L/∂θ|``::

    Ī⁽ᵗ⁾ = β₁ Ī⁽ᵗ⁻¹⁾ + (1 − β₁) I⁽ᵗ⁾                   (smoothed sensitivity)
    Ū⁽ᵗ⁾ = β₂ Ū⁽ᵗ⁻¹⁾ + (1 − β₂) |I⁽ᵗ⁾ − Ī⁽ᵗ⁾|          (its uncertainty)
    s(θ) = Ī · Ū
    Sᵢ   = s(λᵢ) + (mean_j s(Q_{ij}) + mean_j s(P_{ji}))  (the triplet's score)

and an allocation keeps the ``b`` highest ``Sᵢ`` over all modules together, masking the others.
:class:`RankAllocator` drives this during training (:mod:`loratools.nn`) with the cubic budget
:func:`budget_schedule`; :mod:`loratools.compress.prune` applies it once, after training.

Where the two uses had drifted apart, peft 0.21.2 (``peft/tuners/adalora/layer.py``,
``RankAllocator``) decides: β₁, β₂ lie in the open interval (0, 1) (its ``__init__`` asserts
``0 < beta < 1``); the EMAs are the plain expressions above (``update_ipt``); ``Sᵢ`` adds Λ's
score to the sum of Q's and P's mean scores (``mask_to_budget`` → ``_combine_ipt``); and scores
are compared as computed, in their own dtype, never narrowed (``torch.kthvalue`` over
``torch.cat(all_score)``) — here in float64, which holds every float32/bfloat16 value exactly, so
the order and the ties are the same. One deliberate difference: peft masks every score
``≤`` the threshold, so ties at the threshold can keep fewer than ``b``; a stable sort here keeps
exactly ``b`` (ties go to the earlier module, then the lower index).

PEFT records the surviving triplets as ``rank_pattern = {"<module>.lora_E": [kept?] * init_r}``;
:func:`rank_pattern_masks`, :func:`module_mask` and :func:`narrow_mask` are the one reader and
writer of that encoding (used by :mod:`loratools.formats.peft`, :mod:`loratools.nn` and
:mod:`loratools.compress.prune`). They live here, beside the allocation that produces the masks, rather than in
:mod:`loratools.config`, whose rules hold for every method.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from .errors import InvalidOptionError

__all__ = [
    "Sensitivity", "check_betas", "update_sensitivity", "triplet_scores", "allocate", "budget_schedule",
    "RankAllocator", "TripletLayer", "mask_key", "rank_pattern_masks", "module_mask", "narrow_mask",
    "OrthForm", "orthogonal_regularizer", "orthogonal_penalty",
]


# --- importance: pure functions over tensors -------------------------------------------------------------------------

def check_betas(beta1: float, beta2: float) -> None:
    """β₁ and β₂ must lie in (0, 1), as peft 0.21.2 ``RankAllocator.__init__`` asserts."""
    if not (0 < beta1 < 1 and 0 < beta2 < 1):  # NaN fails this test too
        raise InvalidOptionError(f"`beta1` and `beta2` must lie in (0, 1), got {beta1} and {beta2}")


@dataclass(frozen=True)
class Sensitivity:
    """AdaLoRA's running statistics of one parameter tensor: Ī (``ipt``) and Ū (``unc``)."""

    ipt: Tensor
    unc: Tensor

    @property
    def score(self) -> Tensor:
        """``s = Ī · Ū``."""
        return self.ipt * self.unc


def update_sensitivity(state: Sensitivity | None, param: Tensor, grad: Tensor, *, beta1: float = 0.85,
                       beta2: float = 0.85) -> Sensitivity:
    """One EMA step (Ī, Ū start at zero, as in AdaLoRA), in ``param``'s dtype.

    >>> s = update_sensitivity(None, torch.tensor([2.0]), torch.tensor([0.5]), beta1=0.5, beta2=0.5)
    >>> s.ipt.item(), s.unc.item()
    (0.5, 0.25)
    """
    I = (param.detach() * grad.detach()).abs()
    prev_ipt = torch.zeros_like(I) if state is None else state.ipt
    prev_unc = torch.zeros_like(I) if state is None else state.unc
    ipt = beta1 * prev_ipt + (1 - beta1) * I
    unc = beta2 * prev_unc + (1 - beta2) * (I - ipt).abs()
    return Sensitivity(ipt, unc)


def triplet_scores(s_lam: Tensor, s_P: Tensor, s_Q: Tensor) -> Tensor:
    """``Sᵢ = s(λᵢ) + (mean_j s(Q_{ij}) + mean_j s(P_{ji}))`` for element scores of λ (r,) or (r, 1),
    P (m, r) and Q (r, n); the grouping is peft 0.21.2's (``_combine_ipt``).

    >>> triplet_scores(torch.tensor([1.0, 0.0]), torch.ones(3, 2), torch.zeros(2, 4)).tolist()
    [2.0, 1.0]
    """
    return s_lam.reshape(-1) + (s_Q.mean(dim=1) + s_P.mean(dim=0))


def allocate(scores: Mapping[str, Tensor], budget: int) -> dict[str, Tensor]:
    """Boolean keep-masks holding exactly ``budget`` triplets: the highest scores over all
    modules, compared in float64 (ties go to the earlier module, then the lower index).

    >>> m = allocate({"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([2.0])}, 2)
    >>> m["a"].tolist(), m["b"].tolist()
    ([True, False], [True])
    """
    total = sum(int(s.numel()) for s in scores.values())
    if not 0 <= budget <= total:
        raise InvalidOptionError(f"`budget` must lie between 0 and the {total} triplets the adapter holds, "
                                 f"got {budget}")
    names = list(scores)
    flat = (torch.cat([scores[n].detach().double().reshape(-1).cpu() for n in names]) if names
            else torch.zeros(0, dtype=torch.float64))
    order = torch.sort(-flat, stable=True).indices[:budget]
    keep = torch.zeros(total, dtype=torch.bool)
    keep[order] = True
    out: dict[str, Tensor] = {}
    start = 0
    for n in names:
        k = int(scores[n].numel())
        out[n] = keep[start:start + k]
        start += k
    return out


def budget_schedule(step: int, *, initial: int, target: int, total: int, tinit: int, tfinal: int) -> int:
    """AdaLoRA's cubic budget (total number of kept triplets) after ``step`` updates:

    ``b(t) = b_0`` for ``t ≤ t_i``; ``b_T + ⌊(b_0 − b_T)(1 − (t − t_i)/(T − t_i − t_f))³⌋``
    for ``t_i < t ≤ T − t_f``; ``b_T`` after. Computed in integers, so exact (peft evaluates
    the same formula in floats and floors it with ``int()``).

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


# --- the training-time allocator -------------------------------------------------------------------------------------

class TripletLayer(Protocol):
    """What the allocator needs of an AdaLoRA layer (:class:`loratools.nn.AdaLoRALinear`); read-only, so that
    a layer's ``nn.Parameter`` factors fit."""

    @property
    def rank(self) -> int: ...
    @property
    def lora_A(self) -> Tensor: ...
    @property
    def lora_E(self) -> Tensor: ...
    @property
    def lora_B(self) -> Tensor: ...
    @property
    def mask(self) -> Tensor: ...

    def apply_mask(self) -> None: ...


_PARTS = ("lora_A", "lora_E", "lora_B")


class RankAllocator:
    """AdaLoRA's importance-driven allocation of the rank budget over the adapted layers.

    After each optimizer step (gradients still present) :meth:`step` updates every entry's
    :class:`Sensitivity`; every ``delta_t`` steps between ``tinit`` and ``T − tfinal`` the
    ``b(t)`` best triplets (all layers together, :func:`allocate`) are kept and the others' Λ set
    to zero; at ``T − tfinal`` the final pattern is fixed. Masks are re-applied after every step,
    so a masked Λ stays exactly zero until a later allocation keeps it again.
    """

    def __init__(self, layers: Mapping[str, TripletLayer], *, target_rank: int, total_step: int,
                 tinit: int = 0, tfinal: int = 0, delta_t: int = 1, beta1: float = 0.85, beta2: float = 0.85) -> None:
        if not layers:
            raise InvalidOptionError("AdaLoRA found no layers to allocate rank over; check `targets`")
        check_betas(beta1, beta2)
        if tinit + tfinal >= total_step:
            raise InvalidOptionError(f"AdaLoRA needs `tinit` + `tfinal` < `total_step`, got {tinit} + {tfinal} ≥ "
                                     f"{total_step}; train longer")
        self.layers = dict(layers)
        self.total_step, self.tinit, self.tfinal = total_step, tinit, tfinal
        self.delta_t, self.beta1, self.beta2 = max(1, delta_t), beta1, beta2
        self.initial_budget = sum(layer.rank for layer in self.layers.values())
        self.target_budget = min(self.initial_budget, target_rank * len(self.layers))
        self.sensitivity: dict[str, Sensitivity] = {}
        self.final = False

    def _params(self) -> Iterable[tuple[str, Tensor]]:
        for name, layer in self.layers.items():
            for part in _PARTS:
                yield f"{name}.{part}", getattr(layer, part)

    def budget(self, step: int) -> int:
        return budget_schedule(step, initial=self.initial_budget, target=self.target_budget, total=self.total_step,
                               tinit=self.tinit, tfinal=self.tfinal)

    @torch.no_grad()
    def update_importance(self) -> None:
        for key, p in self._params():
            if p.grad is not None:
                self.sensitivity[key] = update_sensitivity(self.sensitivity.get(key), p, p.grad, beta1=self.beta1,
                                                           beta2=self.beta2)

    def triplet_scores(self) -> dict[str, Tensor]:
        """``Sᵢ`` per layer (length r); a part never updated scores zero."""
        out: dict[str, Tensor] = {}
        for name, layer in self.layers.items():
            s = {part: self.sensitivity[f"{name}.{part}"].score if f"{name}.{part}" in self.sensitivity
                 else torch.zeros_like(getattr(layer, part)) for part in _PARTS}
            out[name] = triplet_scores(s["lora_E"], s["lora_B"], s["lora_A"])
        return out

    @torch.no_grad()
    def allocate(self, budget: int) -> None:
        """Keep the ``budget`` highest-scoring triplets over all layers (:func:`allocate`), mask the rest."""
        for name, keep in allocate(self.triplet_scores(), budget).items():
            layer = self.layers[name]
            layer.mask.copy_(keep.reshape(-1, 1))

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
        """PEFT's ``rank_pattern`` of every layer: ``{"<module>.lora_E": [kept?] * init_r}``."""
        return rank_pattern_masks({n: layer.mask for n, layer in self.layers.items()}, only_pruned=False)

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only (the EMAs and a flag), for a safetensors checkpoint; masks live on the layers."""
        out = {f"ipt.{k}": s.ipt for k, s in self.sensitivity.items()}
        out.update({f"unc.{k}": s.unc for k, s in self.sensitivity.items()})
        out["final"] = torch.tensor([int(self.final)])
        return out

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.sensitivity = {k[4:]: Sensitivity(v.clone(), state[f"unc.{k[4:]}"].clone())
                            for k, v in state.items() if k.startswith("ipt.")}
        self.final = bool(int(state["final"].item())) if "final" in state else False


# --- PEFT's rank_pattern: boolean masks of the surviving triplets ----------------------------------------------------

def mask_key(module: str) -> str:
    """The ``rank_pattern`` key of a module's mask: ``"<module>.lora_E"``."""
    return f"{module}.lora_E"


def rank_pattern_masks(masks: Mapping[str, Tensor | Sequence[bool]], *, only_pruned: bool = True
                       ) -> dict[str, list[bool]]:
    """Encode keep-masks by module as PEFT's ``rank_pattern``. With ``only_pruned``, a module that keeps
    every triplet is left out (PEFT then keeps it whole)."""
    out: dict[str, list[bool]] = {}
    for name, mask in masks.items():
        bits = [bool(b) for b in (mask.reshape(-1).tolist() if isinstance(mask, Tensor) else mask)]
        if not (only_pruned and all(bits)):
            out[mask_key(name)] = bits
    return out


def module_mask(rank_pattern: Mapping[str, Any] | None, module: str, *, rank: int, init_r: int) -> list[bool]:
    """Decode the ``init_r``-long mask of a module holding ``rank`` triplets: its ``rank_pattern`` entry when
    that entry is consistent (length ``init_r``, ``rank`` bits set), else the first ``rank`` positions."""
    old = (rank_pattern or {}).get(mask_key(module))
    if old is not None and len(old) == init_r and sum(map(bool, old)) == rank:
        return [bool(b) for b in old]
    return [True] * rank + [False] * (init_r - rank)


def narrow_mask(mask: Sequence[bool], kept: Iterable[int]) -> list[bool]:
    """The mask after keeping only the surviving triplets numbered ``kept`` (0-based among ``mask``'s set bits).

    >>> narrow_mask([True, False, True, True], [0, 2])
    [True, False, False, True]
    """
    alive = [i for i, b in enumerate(mask) if b]
    out = [False] * len(mask)
    for i in kept:
        out[alive[i]] = True
    return out


# --- the orthogonality penalty on P and Q (training) ------------------------------------------------------------------

OrthForm = Literal["paper", "peft"]


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
    raise InvalidOptionError(f"`form` of the orthogonal regulariser must be paper or peft, got {form!r}")


def orthogonal_penalty(layers: Iterable[TripletLayer], *, form: OrthForm = "paper") -> Tensor:
    """The whole model's penalty: the paper sums ``R(P, Q)`` over layers; PEFT averages its norms
    over every P and Q matrix. Multiply by the regulariser weight γ."""
    terms = [orthogonal_regularizer(layer.lora_B, layer.lora_A, form=form) for layer in layers if layer.rank > 0]
    if not terms:
        return torch.zeros(())
    total = torch.stack(terms).sum()
    return total if form == "paper" else total / len(terms)
