"""The figures of ``eval``, pure functions over next-token log-probs (no model, no file).

Every stack is run on the same token ids; for each example the next-token logits are kept at its *scored*
positions (those whose next token is a target: every position of a text row, the completion of a
prompt/completion row, the assistant turns of a chat row). A runtime that returns only the K most likely tokens
(vLLM) leaves the others NaN, and every figure below is then taken over the entries both sides know.

Per stack, on its own:

- ``nll``: token-mean negative log-likelihood of the targets (nats per target token);
- ``label_accuracy`` (prompt/completion and chat rows): the share of rows whose first completion token is the
  most likely among the *labels* — the distinct first completion tokens of all rows;
- ``greedy`` (prompt/completion and chat rows): the first N greedily decoded tokens of each prompt.

Against the reference stack R (default: base + adapter in float32, loratools' own forward), on log-probs
ℓ = log_softmax(logits) over the full vocabulary at every scored position:

- ``max_abs_dlogprob`` = max |ℓ_S − ℓ_R|;  ``kl`` = mean over positions of KL(R ‖ S) = Σ p_R (ℓ_R − ℓ_S);
- ``top1`` = share of positions whose most likely token is the same;  ``greedy_agreement`` = share of prompts
  whose N greedy tokens are the same;
- the adapter's effect kept. With Δ_S = ℓ_S − ℓ_{base of S} and Δ_R = ℓ_R − ℓ_base, each centred over the
  vocabulary at each position (a constant shift of the logits changes no probability),
  ``cosine`` = ⟨Δ_S, Δ_R⟩ / (‖Δ_S‖‖Δ_R‖), ``norm_ratio`` = ‖Δ_S‖ / ‖Δ_R‖ and
  ``kept`` = ⟨Δ_S, Δ_R⟩ / ‖Δ_R‖² (the share of the reference's change that S carries: 1 when S computes it,
  0 when S computes none of it). "The base of S" is the same runtime without the adapter (llama.cpp on the
  base GGUF, vLLM without the LoRA request), so the runtime's own numerics cancel.

Flags (:func:`flags`), each a reason to exit non-zero:

- ``no effect``: a stack that should carry the adapter changes the log-probs by less than :data:`NO_EFFECT` of
  what the reference changes (``norm_ratio``); the reference itself when its change is below
  :data:`NO_EFFECT_REL` of the base's own log-prob spread (e.g. module names that match nothing in the base);
- ``effect lost``: ``kept`` below :data:`loratools.deltas.MIN_KEPT` (the threshold a GGUF merge refuses below, the same idea
  over the weights: ``merge/report.py``'s ``UpdateFit.kept``);
- ``disagrees``: top-1 or greedy agreement with the reference below ``min_agreement`` (default
  :data:`MIN_AGREEMENT`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..deltas import MIN_KEPT

__all__ = ["NO_EFFECT", "NO_EFFECT_REL", "MIN_AGREEMENT", "Effect", "Comparison", "log_probs",
           "nll", "label_accuracy", "compare", "effect", "flags", "greedy_agreement"]

#: ``no effect`` when a stack's change from its base is below this fraction of the reference's change
NO_EFFECT = 0.02
#: ``no effect`` for the reference when its change is below this fraction of the base's centred log-probs
NO_EFFECT_REL = 1e-6
#: ``disagrees`` when top-1 or greedy agreement with the reference falls below this share
MIN_AGREEMENT = 0.9


def log_probs(logits: Tensor) -> Tensor:
    """log_softmax in float64 over the last axis; NaN entries (tokens a runtime did not return) stay NaN and
    count as absent: a runtime's partial list is already log-probs, returned as they are."""
    x = logits.double()
    if torch.isnan(x).any():
        return x
    return torch.log_softmax(x, dim=-1)


def nll(lp: Sequence[Tensor], targets: Sequence[Tensor]) -> float:
    """Token-mean −log p(target) over every scored position (``lp[e]`` (k, V), ``targets[e]`` (k,))."""
    got = torch.cat([x.gather(1, t[:, None].long())[:, 0] for x, t in zip(lp, targets)])
    got = got[~torch.isnan(got)]
    return float(-got.mean()) if got.numel() else math.nan


def label_accuracy(first: Sequence[Tensor | None], labels: Sequence[int | None]) -> float | None:
    """Share of rows whose label (first completion token) is the most likely among all rows' labels.

    ``first[e]`` is row e's (V,) log-probs where its completion starts (None for a text row); None when no
    row has a completion.
    """
    rows = [(x, y) for x, y in zip(first, labels) if x is not None and y is not None]
    if not rows:
        return None
    vocab = torch.tensor(sorted({y for _, y in rows}))
    hits = sum(int(vocab[int(torch.nan_to_num(x[vocab], nan=-math.inf).argmax())] == y) for x, y in rows)
    return hits / len(rows)


def greedy_agreement(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> float | None:
    """Share of prompts whose greedy tokens are identical; None when there is nothing to compare."""
    if not a or len(a) != len(b):
        return None
    return sum(tuple(x) == tuple(y) for x, y in zip(a, b)) / len(a)


def _centred(d: Tensor) -> Tensor:
    mean = torch.nanmean(d, dim=-1, keepdim=True)
    return d - mean


@dataclass(frozen=True)
class Effect:
    """A stack's change from its base against the reference's (see the module docstring)."""

    cosine: float
    norm_ratio: float
    kept: float
    #: ‖Δ_S‖ / ‖centred base log-probs‖: how large the change is at all
    relative_size: float

    def to_json(self) -> dict[str, float]:
        return {"cosine": self.cosine, "norm_ratio": self.norm_ratio, "kept": self.kept,
                "relative_size": self.relative_size}


def effect(stack: Sequence[Tensor], stack_base: Sequence[Tensor], ref: Sequence[Tensor],
           ref_base: Sequence[Tensor]) -> Effect:
    """Cosine, norm ratio and kept share of Δ_S = S − base_S against Δ_R = R − base_R (float64 sums)."""
    dot = ns = nr = nb = 0.0
    for s, sb, r, rb in zip(stack, stack_base, ref, ref_base):
        # centred over the tokens all four know (a runtime's top-K lists differ with and without the adapter)
        unknown = torch.isnan(s) | torch.isnan(sb) | torch.isnan(r) | torch.isnan(rb)
        nan = torch.tensor(math.nan, dtype=torch.float64)
        ds, dr, b = (_centred(torch.where(unknown, nan, x.double())) for x in (s - sb, r - rb, rb))
        ds, dr, b = ds[~unknown], dr[~unknown], b[~unknown]
        dot += float(ds @ dr)
        ns += float(ds @ ds)
        nr += float(dr @ dr)
        nb += float(b @ b)
    rel = math.sqrt(ns / nb) if nb > 0 else math.nan
    if nr == 0:
        return Effect(math.nan, math.nan, math.nan, rel)
    cos = dot / math.sqrt(ns * nr) if ns > 0 else 0.0
    return Effect(cos, math.sqrt(ns / nr), dot / nr, rel)


@dataclass(frozen=True)
class Comparison:
    """One stack's log-probs against the reference's, over the scored positions."""

    max_abs_dlogprob: float
    kl: float
    top1: float
    #: per example: max |Δ log-prob| (the HTML report's per-prompt plot)
    per_example: tuple[float, ...]

    def to_json(self) -> dict[str, object]:
        return {"max_abs_dlogprob": self.max_abs_dlogprob, "kl": self.kl, "top1": self.top1,
                "per_example": list(self.per_example)}


def compare(stack: Sequence[Tensor], ref: Sequence[Tensor]) -> Comparison:
    """max |Δℓ|, mean KL(R ‖ S) and top-1 agreement over every scored position of every example."""
    worst: list[float] = []
    kl_sum, same, n = 0.0, 0, 0
    for s, r in zip(stack, ref):
        d = (s - r).abs()
        worst.append(float(torch.nan_to_num(d, nan=0.0).max()) if d.numel() else 0.0)
        known = ~(torch.isnan(s) | torch.isnan(r))
        p = torch.where(known, r.exp(), torch.zeros_like(r))
        kl_sum += float(torch.where(known, p * (r - s), torch.zeros_like(r)).sum())
        neg = torch.tensor(-math.inf, dtype=s.dtype)
        same += int((torch.where(known, s, neg).argmax(-1) == torch.where(known, r, neg).argmax(-1)).sum())
        n += s.shape[0]
    return Comparison(max(worst, default=0.0), kl_sum / max(n, 1), same / max(n, 1), tuple(worst))


def flags(*, carries_adapter: bool, is_reference: bool, eff: Effect | None, top1: float | None,
          greedy: float | None, min_agreement: float = MIN_AGREEMENT) -> list[str]:
    """The flags of one stack (see the module docstring); a stack without the adapter (the base) has none."""
    if not carries_adapter or eff is None:
        return []
    if is_reference:
        return ["no effect"] if not eff.relative_size > NO_EFFECT_REL else []
    if not eff.norm_ratio > NO_EFFECT:  # NaN (a reference with no effect) counts as none
        return ["no effect"]
    out = ["effect lost"] if eff.kept < MIN_KEPT else []
    if (top1 is not None and top1 < min_agreement) or (greedy is not None and greedy < min_agreement):
        out.append("disagrees")
    return out
