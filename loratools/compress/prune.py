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

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..adalora import (Sensitivity, allocate, check_betas, mask_key, module_mask, narrow_mask, triplet_scores,
                       update_sensitivity)
from ..adapter import Adapter, Module, as_lora, module_from_svd
from ..device import resolve_device
from ..dora import refuse_dora
from ..errors import InvalidOptionError
from ..formats import get_format, read_adapter, write_adapter
from .checks import check_result
from ..io import Progress, check_output
from ..linalg import lowrank_svd
from ..lm.data import Row, read_rows, row_example
from ..lm.heldout import HeldOutReport, heldout_report

__all__ = ["Triplets", "PruneResult", "PruneLayer", "svd_form", "magnitude_scores", "prune_adapter", "prune_file",
           "triplet_gradients", "calibration_scores", "budget_of"]

PathLike = str | os.PathLike[str]


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
    """The pruned adapter, a row per module, the importance used (``"gradient"`` or ``"magnitude"``), the
    ``budget`` kept and the input's size and method; from :func:`prune_file`, also where it was written
    (``output``, in ``format``) and the held-out loss on the calibration data before and after (``heldout``)."""

    adapter: Adapter
    layers: list[PruneLayer]
    importance: str
    budget: int = 0
    parameters_before: int = 0
    method_before: str = "lora"
    output: str | None = None
    format: str | None = None
    heldout: HeldOutReport | None = None

    @property
    def rank_pattern(self) -> dict[str, int]:
        return {layer.name: layer.rank_after for layer in self.layers}

    @property
    def kept(self) -> int:
        """Triplets kept over all modules."""
        return sum(self.rank_pattern.values())

    def to_json(self) -> dict[str, Any]:
        return {"output": self.output, "importance": self.importance, "budget": self.budget,
                "heldout_loss": self.heldout.to_json() if self.heldout else None, "kept": self.kept,
                "parameters_before": self.parameters_before, "parameters": self.adapter.parameters,
                "method": self.adapter.method, "rank_pattern": self.rank_pattern,
                "layers": [asdict(r) for r in self.layers]}


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
    return PruneResult(out, layers, "magnitude" if importance is None else "gradient", budget, adapter.parameters,
                       adapter.method)


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


def _encode(tokenizer: Any, row: Row, device: torch.device, max_length: int) -> dict[str, Tensor] | None:
    """One row as a batch of one, encoded as training encodes it (:func:`loratools.lm.data.row_example`);
    None when nothing is left to predict."""
    ex = row_example(tokenizer, row, seq_len=max_length)
    if ex is None:
        return None
    return {"input_ids": torch.tensor([ex.input_ids], device=device),
            "labels": torch.tensor([ex.labels], device=device)}


def calibration_scores(adapter: Adapter, model: torch.nn.Module, tokenizer: Any,
                       examples: Sequence[Row], *, beta1: float = 0.85, beta2: float = 0.85,
                       max_length: int = 256, progress: Callable[[int], None] | None = None) -> dict[str, Tensor]:
    """AdaLoRA's triplet importance ``Sᵢ`` accumulated over ``examples`` (one EMA step each).

    ``examples`` are :class:`loratools.lm.data.Row` s (``(text, None)``, ``(prompt, completion)`` or chat,
    as :func:`loratools.lm.data.read_rows` gives them). Each is one example encoded as training encodes a
    row (:func:`loratools.lm.data.row_example`: ``text + EOS``; with a completion, only it and the EOS are
    scored; chat, the assistant turns), truncated to ``max_length``.
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
        if batch is None:
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
        got = state.get(name)
        if got is None:
            out[name] = torch.zeros(t.rank)
        else:
            out[name] = triplet_scores(got["lam"].score, got["P"].score, got["Q"].score).cpu()
    return out


def _check_prune_options(base: PathLike | None, data: PathLike | None, budget: int | None, keep: float | None,
                         max_examples: int | None) -> None:
    if (base is None) != (data is None):
        raise InvalidOptionError("`base` and `data` go together: give both for gradient importance, or neither")
    if (budget is None) == (keep is None):
        raise InvalidOptionError("give `budget` N or `keep` F (one of them)")
    if max_examples is not None and max_examples < 1:
        raise InvalidOptionError(f"`max_examples` must be at least 1, got {max_examples}")


def _file_scores(adapter: Adapter, base: PathLike, data: PathLike, *, max_examples: int | None, beta1: float,
                 beta2: float, device: str, progress: Progress | None) -> dict[str, Tensor]:
    """:func:`calibration_scores` over the first ``max_examples`` rows of the file ``data``, ``base`` loaded."""
    from ..lm.load import load_causal_lm

    examples = read_rows(Path(data), what="calibration data", plain_text=False)[:max_examples]
    model, tokenizer = load_causal_lm(Path(base), device=resolve_device(device), frozen=True)
    if progress:
        progress(0, total=len(examples))
    return calibration_scores(adapter, model, tokenizer, examples, beta1=beta1, beta2=beta2, progress=progress)


def prune_file(src: PathLike, out: PathLike, *, budget: int | None = None, keep: float | None = None,
               base: PathLike | None = None, data: PathLike | None = None, max_examples: int | None = None,
               beta1: float = 0.85, beta2: float = 0.85, to_lora: bool = False, format: str = "peft",
               force: bool = False, device: str = "auto", progress: Progress | None = None) -> PruneResult:
    """Read the adapter at ``src``, keep its ``budget`` most important triplets (:func:`prune_adapter`), write
    it to ``out`` in ``format``.

    Give ``budget`` (triplets kept over all modules) or ``keep`` (a fraction of them, :func:`budget_of`).
    With ``base`` and ``data`` (calibration rows, :func:`loratools.lm.data.read_rows`; the first
    ``max_examples``) the importance is AdaLoRA's gradient score (:func:`calibration_scores`, ``progress``
    told each example), and ``heldout`` holds the loss of ``base + adapter`` on that data before and after;
    without them, ``|λᵢ|``. The options are checked and ``out`` refused before anything is read; the write
    is atomic (nothing appears at ``out`` unless it completes).

    >>> prune_file("adalora/", "pruned", keep=0.5).kept  # doctest: +SKIP
    12
    """
    _check_prune_options(base, data, budget, keep, max_examples)
    get_format(format)
    check_output(out, force=force, inputs=(src,))  # fail before the long computation
    adapter = read_adapter(src)
    n = budget if budget is not None else budget_of(adapter, keep or 0.0)
    scores, held = None, None
    if base is not None and data is not None:
        scores = _file_scores(adapter, base, data, max_examples=max_examples, beta1=beta1, beta2=beta2,
                              device=device, progress=progress)
    res = prune_adapter(adapter, budget=n, importance=scores, to_lora=to_lora)
    check_result(res.adapter, empty=f"a budget of {n} triplets keeps none", cause="check the input adapter")
    if base is not None and data is not None:
        # on the calibration data itself: the loss the pruning was scored on (resize takes other data for a test set)
        held = heldout_report(base, data, before=adapter, after=res.adapter, max_examples=max_examples,
                              device=device)
    write_adapter(res.adapter, out, format=format, force=force, inputs=(src,) + ((base,) if base else ()))
    return replace(res, output=os.fspath(out), format=format, heldout=held)
