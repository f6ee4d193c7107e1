"""AdaLoRA's budget allocation after training: keep the N most important rank-one triplets.

Every module is put in SVD-like form ``ΔW = c · P diag(λ) Q``: an AdaLoRA module
as it is (``P = lora_B``, ``λ = lora_E``, ``Q = lora_A``, ``c = alpha/init_r``),
a LoRA module through the SVD of its ΔW from the factors (``P = U``, ``λ = S``,
``Q = Vᵀ``, ``c = 1``). The triplet ``(λᵢ, P_{·i}, Q_{i·})`` is one rank.

Importance (Zhang et al. 2023, AdaLoRA, eq. 8–11). For each parameter θ and
calibration step t, with ``I = |θ · ∂L/∂θ|``::

    Ī⁽ᵗ⁾ = β₁ Ī⁽ᵗ⁻¹⁾ + (1 − β₁) I⁽ᵗ⁾                   (smoothed sensitivity)
    Ū⁽ᵗ⁾ = β₂ Ū⁽ᵗ⁻¹⁾ + (1 − β₂) |I⁽ᵗ⁾ − Ī⁽ᵗ⁾|          (its uncertainty)
    s(θ) = Ī⁽ᵀ⁾ · Ū⁽ᵀ⁾
    Sᵢ   = s(λᵢ) + mean_j s(P_{ji}) + mean_j s(Q_{ij})

with gradients of the causal-LM loss of the base model with the adapter applied.
Without calibration data, ``Sᵢ = |λᵢ|``. :func:`allocate` keeps the ``budget``
highest ``Sᵢ`` over all modules together.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .adapter import Adapter, Module, as_lora
from .errors import CorruptFileError, InputNotFoundError, InvalidOptionError, MissingDependencyError
from .linalg import lowrank_svd
from .resize import module_from_svd

__all__ = [
    "Triplets", "Sensitivity", "PruneResult", "PruneLayer", "svd_form", "update_sensitivity", "triplet_scores",
    "magnitude_scores", "allocate", "prune", "triplet_gradients", "calibration_scores", "read_calibration",
    "load_causal_lm",
]


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


# --- importance: pure functions over tensors -------------------------------------------------------------------------

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
    """One EMA step (Ī, Ū start at zero, as in AdaLoRA).

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
    """``Sᵢ = s(λᵢ) + mean_j s(P_{ji}) + mean_j s(Q_{ij})`` for element scores of
    λ (r,), P (m, r) and Q (r, n).

    >>> triplet_scores(torch.tensor([1.0, 0.0]), torch.ones(3, 2), torch.zeros(2, 4)).tolist()
    [2.0, 1.0]
    """
    return s_lam.reshape(-1) + s_P.mean(dim=0) + s_Q.mean(dim=1)


def magnitude_scores(triplets: Mapping[str, Triplets]) -> dict[str, Tensor]:
    """The fallback importance ``Sᵢ = |λᵢ|``."""
    return {name: t.lam.abs() for name, t in triplets.items()}


def allocate(scores: Mapping[str, Tensor], budget: int) -> dict[str, Tensor]:
    """Boolean keep-masks holding exactly ``budget`` triplets: the highest scores over all
    modules (ties go to the earlier module, then the lower index).

    >>> m = allocate({"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([2.0])}, 2)
    >>> m["a"].tolist(), m["b"].tolist()
    ([True, False], [True])
    """
    total = sum(int(s.numel()) for s in scores.values())
    if not 0 <= budget <= total:
        raise InvalidOptionError(f"--budget must lie between 0 and the {total} triplets the adapter holds, got {budget}")
    names = list(scores)
    flat = torch.cat([scores[n].detach().double().reshape(-1).cpu() for n in names]) if names else torch.zeros(0)
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


def prune(adapter: Adapter, *, budget: int, importance: Mapping[str, Tensor] | None = None,
          to_lora: bool = False) -> PruneResult:
    """Keep the ``budget`` most important triplets over all modules.

    ``importance`` maps module names to per-triplet scores (as from
    :func:`calibration_scores`); None means ``|λᵢ|``. An AdaLoRA adapter stays
    AdaLoRA (truncated tensors, boolean ``rank_pattern`` masks, as PEFT saves them)
    unless ``to_lora``; a LoRA adapter becomes LoRA with ``B = P_k √λ_k``,
    ``A = √λ_k Q_k`` per module (modules left with no triplet are dropped).

    >>> A, B = torch.randn(3, 10), torch.randn(6, 3)
    >>> res = prune(Adapter({"q": Module(A=A, B=B, alpha=3, scale=1.0)}), budget=2)
    >>> res.adapter.modules["q"].rank, res.importance
    (2, 'magnitude')
    """
    trip = svd_form(adapter)
    scores = dict(importance) if importance is not None else magnitude_scores(trip)
    for name, t in trip.items():
        if name not in scores or scores[name].numel() != t.rank:
            raise InvalidOptionError(f"importance for {name} must hold {t.rank} scores")
    masks = allocate({n: scores[n] for n in trip}, budget)
    modules: dict[str, Module] = {}
    layers: list[PruneLayer] = []
    old_masks: Mapping[str, Any] = adapter.config.extra.get("rank_pattern") or {}
    new_masks: dict[str, list[bool]] = {}
    for name, m in adapter.items():
        t, keep = trip[name], masks[name]
        idx = keep.nonzero().reshape(-1)
        drop = (~keep).nonzero().reshape(-1)
        norm = _fro(t.P, t.lam, t.Q, t.scale)
        lost = _fro(t.P[:, drop], t.lam[drop], t.Q[drop], t.scale)
        sc = scores[name].double()
        layers.append(PruneLayer(name, m.rank, int(idx.numel()), tuple(int(i) for i in idx),
                                 lost / norm if norm > 0 else 0.0, float(sc[keep].sum()), float(sc[~keep].sum())))
        if m.E is not None:
            A = m.A[idx]
            modules[name] = Module(A=A, B=m.B[:, idx], E=m.E[idx], alpha=m.alpha, scale=m.scale, kind=m.kind,
                                   fan_in_fan_out=m.fan_in_fan_out)
            init_r = adapter.config.init_r or m.rank
            old = old_masks.get(f"{name}.lora_E")
            # positions in the init_r-long mask that were alive, of which we keep the subset `idx`
            alive = [i for i, b in enumerate(old) if b] if old is not None and len(old) == init_r else list(range(m.rank))
            if len(alive) != m.rank:
                alive = list(range(m.rank))
            mask = [False] * init_r
            for i in idx.tolist():
                mask[alive[i]] = True
            new_masks[f"{name}.lora_E"] = mask
        elif idx.numel() > 0:
            modules[name] = module_from_svd(m, t.P[:, idx].double(), t.lam[idx].double(), t.Q[idx].double())
    if adapter.method == "adalora":
        extra = dict(adapter.config.extra)
        extra["rank_pattern"] = new_masks
        out = adapter.with_modules(modules, extra=extra)
        if to_lora:
            out = as_lora(out)
    else:
        out = adapter.with_modules(modules)
    if set(out.modules) != set(adapter.modules):
        # name the modules one by one: a suffix list would make PEFT create layers for the dropped ones
        out = out.with_modules(out.modules, target_modules=None)
    return PruneResult(out, layers, "magnitude" if importance is None else "gradient")


# --- calibration: gradients of the base model with the adapter applied -----------------------------------------------

def read_calibration(path: str | Path) -> list[tuple[str, str | None]]:
    """``(text, None)`` for ``{"text": …}`` lines, ``(prompt, completion)`` for
    ``{"prompt": …, "completion": …}`` lines of a JSON-lines file."""
    p = Path(path)
    if not p.is_file():
        raise InputNotFoundError(p, "calibration data")
    rows: list[tuple[str, str | None]] = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise CorruptFileError(p, f"line {i} is not JSON") from None
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            rows.append((obj["text"], None))
        elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
            rows.append((obj["prompt"], obj["completion"]))
        else:
            raise CorruptFileError(p, f'line {i} needs {{"text": ...}} or {{"prompt": ..., "completion": ...}}')
    if not rows:
        raise CorruptFileError(p, "it holds no examples")
    return rows


def load_causal_lm(path: str | Path, *, device: torch.device) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a local model directory, with transformers (the ``train`` extra)."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise MissingDependencyError("transformers", "train") from None
    p = Path(path)
    if not (p / "config.json").is_file():
        raise InputNotFoundError(p / "config.json", "base model config")
    # importance is computed in float32 whatever dtype the checkpoint holds
    model = AutoModelForCausalLM.from_pretrained(str(p)).float().to(device).eval()
    model.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(str(p))


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
                                         "modules only: prune without --data")
            handles.append(model.get_submodule(name).register_forward_hook(_hook(p, triplets[name].scale, kinds[name])))
        loss = model(**batch).loss
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    return {n: {k: torch.stack([v.detach(), v.grad if v.grad is not None else torch.zeros_like(v)])
                for k, v in p.items()} for n, p in params.items()}


def _encode(tokenizer: Any, text: str, completion: str | None, device: torch.device, max_length: int) -> dict[str, Tensor]:
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    labels = list(ids)
    if completion is not None:
        extra = tokenizer(completion, add_special_tokens=False)["input_ids"]
        labels = [-100] * len(ids) + list(extra)  # loss on the completion only
        ids = ids + extra
    ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": torch.tensor([ids], device=device), "labels": torch.tensor([labels], device=device)}


def calibration_scores(adapter: Adapter, model: torch.nn.Module, tokenizer: Any,
                       examples: Sequence[tuple[str, str | None]], *, beta1: float = 0.85, beta2: float = 0.85,
                       max_length: int = 256, progress: Callable[[int], None] | None = None) -> dict[str, Tensor]:
    """AdaLoRA's triplet importance ``Sᵢ`` accumulated over ``examples`` (one EMA step each)."""
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise InvalidOptionError(f"--beta1/--beta2 must lie in [0, 1), got {beta1} and {beta2}")
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
    for text, completion in examples:
        batch = _encode(tokenizer, text, completion, device, max_length)
        if int((batch["labels"][:, 1:] != -100).sum()) == 0:
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

