"""AdaLoRA's budget allocation after training: keep the N most important rank-one triplets.

Every module is put in SVD-like form ``ΔW = c · P diag(λ) Q``: an AdaLoRA module
as it is (``P = lora_B``, ``λ = lora_E``, ``Q = lora_A``, ``c = alpha/init_r``),
a LoRA module through the SVD of its ΔW from the factors (``P = U``, ``λ = S``,
``Q = Vᵀ``, ``c = 1``). The triplet ``(λᵢ, P_{·i}, Q_{i·})`` is one rank.

Importance is AdaLoRA's triplet score ``Sᵢ`` (:mod:`loratools.adalora`, the same code the training-time
allocator runs), from gradients of the causal-LM loss of the base model with the adapter applied, one
EMA step per calibration example. Without calibration data, ``Sᵢ = |λᵢ|``.
:func:`loratools.adalora.allocate` keeps the ``budget`` highest ``Sᵢ`` over all modules together.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..adalora import (Sensitivity, allocate, check_betas, mask_key, module_mask, narrow_mask, triplet_scores,
                       update_sensitivity)
from ..adapter import Adapter, Module, as_lora, module_from_svd
from ..dora import refuse_dora
from ..lm.data import IGNORE, Row, encode_chat
from ..errors import InvalidOptionError
from ..linalg import lowrank_svd

__all__ = ["Triplets", "PruneResult", "PruneLayer", "svd_form", "magnitude_scores", "prune_adapter",
           "triplet_gradients", "calibration_scores", "budget_of"]


@dataclass(frozen=True)
class Triplets:
    """``ΔW = scale · P diag(lam) Q`` in matrix layout: P (m, r), lam (r,), Q (r, n)."""

    P: Tensor
    lam: Tensor
    Q: Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.lam.numel())


def svd_form(adapter: Adapter) -> dict[str, Triplets]:
    """Each module as triplets: AdaLoRA's own (P, Λ, Q); LoRA's via the SVD of ΔW (float32)."""
    out: dict[str, Triplets] = {}
    for name, m in adapter.items():
        r = m.rank
        if m.E is not None:
            P = m.B.float().reshape(m.B.shape[0], r)
            Q = m.A.float().reshape(r, m.matrix_shape[1])
            out[name] = Triplets(P, m.E.float().reshape(r), Q, m.scale)
        else:
            U, S, Vh = m.svd()
            out[name] = Triplets(U.float(), S.float(), Vh.float(), 1.0)
    return out


def magnitude_scores(triplets: Mapping[str, Triplets]) -> dict[str, Tensor]:
    """The fallback importance ``Sᵢ = |λᵢ|``."""
    return {name: t.lam.abs() for name, t in triplets.items()}


# --- applying masks --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PruneLayer:
    """One module: rank before/after, the triplets kept (indices), the relative error of the
    pruned ΔW (‖ΔW − ΔW'‖_F/‖ΔW‖_F, from the factors) and the importance kept."""

    name: str
    rank_before: int
    rank_after: int
    kept: tuple[int, ...]
    rel_error: float
    importance_kept: float
    importance_lost: float


@dataclass(frozen=True)
class PruneResult:
    adapter: Adapter
    layers: list[PruneLayer]
    importance: str  # "gradient" or "magnitude"

    @property
    def rank_pattern(self) -> dict[str, int]:
        return {layer.name: layer.rank_after for layer in self.layers}


def _fro(P: Tensor, lam: Tensor, Q: Tensor, scale: float) -> float:
    if lam.numel() == 0:
        return 0.0
    return float(lowrank_svd(P.double() * lam.double(), Q.double())[1].norm()) * abs(scale)


def _pruned_module(m: Module, t: Triplets, idx: Tensor) -> Module | None:
    """Module ``m`` keeping triplets ``idx``: AdaLoRA's own rows, or LoRA factors from the kept SVD triplets
    (None when nothing is left)."""
    if m.E is not None:
        return Module(A=m.A[idx], B=m.B[:, idx], E=m.E[idx], alpha=m.alpha, scale=m.scale, kind=m.kind,
                      fan_in_fan_out=m.fan_in_fan_out)
    if idx.numel() == 0:
        return None
    return module_from_svd(m, t.P[:, idx].double(), t.lam[idx].double(), t.Q[idx].double())


def _report(name: str, m: Module, t: Triplets, keep: Tensor, score: Tensor) -> PruneLayer:
    idx, drop = keep.nonzero().reshape(-1), (~keep).nonzero().reshape(-1)
    norm = _fro(t.P, t.lam, t.Q, t.scale)
    lost = _fro(t.P[:, drop], t.lam[drop], t.Q[drop], t.scale)
    sc = score.double()
    return PruneLayer(name, m.rank, int(idx.numel()), tuple(int(i) for i in idx), lost / norm if norm > 0 else 0.0,
                      float(sc[keep].sum()), float(sc[~keep].sum()))


def budget_of(adapter: Adapter, keep: float) -> int:
    """The absolute budget a relative one means: ``round(keep · Σ ranks)`` triplets, at least 1 (0 < keep ≤ 1).

    >>> budget_of(Adapter({"q": Module(A=torch.ones(4, 3), B=torch.ones(5, 4), alpha=4, scale=1.0)}), 0.5)
    2
    """
    if not 0 < keep <= 1:
        raise InvalidOptionError(f"`keep` must be a fraction in (0, 1], got {keep}")
    total = sum(m.rank for m in adapter.modules.values())
    return max(1, round(keep * total))


def prune_adapter(adapter: Adapter, *, budget: int, importance: Mapping[str, Tensor] | None = None,
                  to_lora: bool = False) -> PruneResult:
    """Keep the ``budget`` most important triplets over all modules (:func:`loratools.adalora.allocate`).

    ``importance`` maps module names to per-triplet scores (as from
    :func:`calibration_scores`); None means ``|λᵢ|``. An AdaLoRA adapter stays
    AdaLoRA (truncated tensors, boolean ``rank_pattern`` masks, as PEFT saves them)
    unless ``to_lora``; a LoRA adapter becomes LoRA with ``B = P_k √λ_k``,
    ``A = √λ_k Q_k`` per module (modules left with no triplet are dropped).

    >>> A, B = torch.randn(3, 10), torch.randn(6, 3)
    >>> res = prune_adapter(Adapter({"q": Module(A=A, B=B, alpha=3, scale=1.0)}), budget=2)
    >>> res.adapter.modules["q"].rank, res.importance
    (2, 'magnitude')
    """
    adapter.dense_only("pruning")
    refuse_dora(adapter, "prune", "flatten it with its base first (convert with `base` and `as_lora`)")
    trip = svd_form(adapter)
    scores = dict(importance) if importance is not None else magnitude_scores(trip)
    for name, t in trip.items():
        if name not in scores or scores[name].numel() != t.rank:
            raise InvalidOptionError(f"`importance` for {name} must hold {t.rank} scores")
    masks = allocate({n: scores[n] for n in trip}, budget)
    modules: dict[str, Module] = {}
    layers: list[PruneLayer] = []
    new_masks: dict[str, list[bool]] = {}
    for name, m in adapter.items():
        t, keep = trip[name], masks[name]
        layers.append(_report(name, m, t, keep, scores[name]))
        idx = keep.nonzero().reshape(-1)
        pruned = _pruned_module(m, t, idx)
        if pruned is not None:
            modules[name] = pruned
        if m.E is not None:
            # the surviving positions of the init_r-long mask, of which the subset `idx` stays
            alive = module_mask(adapter.config.extra.get("rank_pattern"), name, rank=m.rank,
                                init_r=adapter.config.init_r or m.rank)
            new_masks[mask_key(name)] = narrow_mask(alive, idx.tolist())
    if adapter.method == "adalora":
        out = adapter.with_modules(modules, extra={**adapter.config.extra, "rank_pattern": new_masks})
        if to_lora:
            out = as_lora(out)
    else:
        out = adapter.with_modules(modules)
    if set(out.modules) != set(adapter.modules):
        # name the modules one by one: a suffix list would make PEFT create layers for the dropped ones
        out = out.with_modules(out.modules, target_modules=None)
    return PruneResult(out, layers, "magnitude" if importance is None else "gradient")


# --- calibration: gradients of the base model with the adapter applied -----------------------------------------------

def _hook(t: dict[str, Tensor], scale: float, kind: str) -> Callable[..., Tensor]:
    # adds c·P diag(λ) Q applied to the module's input to its output, like a LoRA layer would
    def add_delta(mod: torch.nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
        x = args[0]
        h = torch.nn.functional.embedding(x, t["Q"].T) if kind == "embedding" else x @ t["Q"].T
        return out + scale * ((h * t["lam"]) @ t["P"].T)
    return add_delta


def triplet_gradients(model: torch.nn.Module, triplets: Mapping[str, Triplets],
                      batch: Mapping[str, Tensor], *, kinds: Mapping[str, str]) -> dict[str, dict[str, Tensor]]:
    """``{name: {"P","lam","Q": (value, grad)…}}``: the causal-LM loss gradient w.r.t. every
    triplet parameter, the adapter applied through forward hooks on ``model``'s modules."""
    params = {n: {k: getattr(t, k).detach().clone().requires_grad_(True) for k in ("P", "lam", "Q")}
              for n, t in triplets.items() if t.rank > 0}
    handles = []
    try:
        for name, p in params.items():
            if kinds[name] == "conv":
                raise InvalidOptionError(f"{name} is a convolution; gradient importance supports linear and embedding "
                                         "modules only: prune it without calibration data (magnitude importance)")
            handles.append(model.get_submodule(name).register_forward_hook(_hook(p, triplets[name].scale, kinds[name])))
        loss = model(**batch).loss
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    return {n: {k: torch.stack([v.detach(), v.grad if v.grad is not None else torch.zeros_like(v)])
                for k, v in p.items()} for n, p in params.items()}


def _encode(tokenizer: Any, row: Row, device: torch.device, max_length: int) -> dict[str, Tensor]:
    text, completion = row.text, row.completion
    if row.messages is not None:
        ids, labels = encode_chat(tokenizer, row.messages)
    else:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        labels = list(ids)
    if completion is not None:
        extra = tokenizer(completion, add_special_tokens=False)["input_ids"]
        labels = [IGNORE] * len(ids) + list(extra)  # loss on the completion only
        ids = ids + extra
    ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": torch.tensor([ids], device=device), "labels": torch.tensor([labels], device=device)}


def calibration_scores(adapter: Adapter, model: torch.nn.Module, tokenizer: Any,
                       examples: Sequence[Row], *, beta1: float = 0.85, beta2: float = 0.85,
                       max_length: int = 256, progress: Callable[[int], None] | None = None) -> dict[str, Tensor]:
    """AdaLoRA's triplet importance ``Sᵢ`` accumulated over ``examples`` (one EMA step each).

    ``examples`` are :class:`loratools.lm.data.Row` s (``(text, None)`` or ``(prompt, completion)``, as
    :func:`loratools.lm.data.read_rows` gives them). Each is tokenized with the tokenizer's special tokens
    (BOS) and no EOS, truncated to ``max_length``; with a completion, only its tokens are scored.
    """
    check_betas(beta1, beta2)
    device = next(model.parameters()).device
    trip = {n: Triplets(t.P.to(device), t.lam.to(device), t.Q.to(device), t.scale)
            for n, t in svd_form(adapter).items()}
    for name in trip:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise InvalidOptionError(f"the base model has no module {name}; is this the adapter's base?") from None
    kinds = {n: m.kind for n, m in adapter.items()}
    state: dict[str, dict[str, Sensitivity]] = {}
    for row in examples:
        batch = _encode(tokenizer, Row(*row), device, max_length)  # a plain (text, completion) pair too
        if int((batch["labels"][:, 1:] != IGNORE).sum()) == 0:
            continue  # nothing to predict in this example
        grads = triplet_gradients(model, trip, batch, kinds=kinds)
        for name, g in grads.items():
            st = state.setdefault(name, {})
            for k, vg in g.items():
                st[k] = update_sensitivity(st.get(k), vg[0], vg[1], beta1=beta1, beta2=beta2)
        if progress:
            progress(1)
    if not state:
        raise InvalidOptionError("the calibration data gave no token to predict; give longer examples")
    out: dict[str, Tensor] = {}
    for name, t in trip.items():
        st = state.get(name)
        if st is None:
            out[name] = torch.zeros(t.rank)
        else:
            out[name] = triplet_scores(st["lam"].score, st["P"].score, st["Q"].score).cpu()
    return out

