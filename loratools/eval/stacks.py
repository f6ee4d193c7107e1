"""The stacks ``eval`` runs — what a model is made of and where it runs — and the transformers runner.

A stack is written ``KIND[:WHAT]`` (:func:`parse_stack`):

- ``base``: the base model alone (transformers, float32);
- ``adapter``: the base + the ADAPTER arguments, loratools' own forward in float32 (the default reference);
  ``adapter:PATH`` another adapter on the same base;
- ``merged:DIR``: a merged model directory (transformers, float32);
- ``gguf:MODEL.gguf`` or ``gguf:MODEL.gguf+ADAPTER.gguf``: llama.cpp (node-llama-cpp), CPU;
- ``vllm`` or ``vllm:ADAPTER_DIR``: vLLM with the base and the (first) ADAPTER directory.

An adapter is applied by module name, as the runtimes do: a module whose name matches nothing in the base is
left out and listed (vLLM #34186: a prefix that matches nothing makes an adapter that does nothing), so that
``eval`` reports what happens instead of stopping; the flags say it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..adapter import Adapter, as_lora
from ..errors import InvalidOptionError, UnsupportedModuleError

__all__ = ["StackSpec", "parse_stack", "StackRun", "combined_adapter", "applicable", "TransformersRunner"]

KINDS = ("base", "adapter", "merged", "gguf", "vllm")


@dataclass(frozen=True)
class StackSpec:
    """One stack: ``kind``, and its model file/directory and adapter where it has them."""

    name: str
    kind: str
    model: str | None = None
    adapter: str | None = None

    @property
    def carries_adapter(self) -> bool:
        """Whether this stack should show the adapter's effect (all but the base alone)."""
        return self.kind != "base"


def parse_stack(text: str) -> StackSpec:
    """``gguf:m.gguf+a.gguf`` → StackSpec("gguf:m.gguf+a.gguf", "gguf", "m.gguf", "a.gguf").

    >>> parse_stack("merged:out").model
    'out'
    >>> parse_stack("gguf:m.gguf+a.gguf").adapter
    'a.gguf'
    """
    kind, _, what = text.partition(":")
    if kind not in KINDS:
        raise InvalidOptionError(f"`stack` {text!r} is not a stack; use one of base, adapter[:PATH], merged:DIR, "
                                 "gguf:MODEL.gguf[+ADAPTER.gguf], vllm[:ADAPTER_DIR]")
    if kind == "base" and what:
        raise InvalidOptionError(f"`stack` {text!r}: base takes nothing after it (the base is BASE)")
    if kind in ("merged", "gguf") and not what:
        raise InvalidOptionError(f"`stack` {text!r} needs a path: {kind}:PATH")
    if kind == "gguf":
        model, _, lora = what.partition("+")
        return StackSpec(text, kind, model, lora or None)
    if kind == "merged":
        return StackSpec(text, kind, what)
    return StackSpec(text, kind, None, what or None)


@dataclass(frozen=True)
class StackRun:
    """A stack's logits at each example's scored positions ((k, V) each), greedy answers (None: not run), notes."""

    logits: list[Tensor]
    greedy: list[list[int]] | None
    notes: tuple[str, ...] = ()


def combined_adapter(adapters: Sequence[Adapter]) -> Adapter:
    """One adapter computing Σ ΔWᵢ: the factors of each module stacked (B = [s₁B₁ s₂B₂ …], A = [A₁; A₂; …], scale 1).

    One adapter is returned as it is; DoRA (whose weight is not W0 + ΔW) only alone.
    """
    if len(adapters) == 1:
        return adapters[0]
    if any(a.is_dora for a in adapters):
        raise InvalidOptionError("a DoRA adapter is evaluated alone: give one ADAPTER, or merge them first")
    lora = [as_lora(a) for a in adapters]
    names = list(dict.fromkeys(n for a in lora for n in a.modules))
    out = {}
    for n in names:
        ms = [a.modules[n] for a in lora if n in a.modules]
        A = torch.cat([m.A.float() for m in ms])
        B = torch.cat([m.B.float() * m.scale for m in ms], dim=1)
        out[n] = ms[0].with_factors(A=A, B=B, alpha=float(A.shape[0]), scale=1.0)
    return lora[0].with_modules(out, use_rslora=False)


def applicable(model: torch.nn.Module, adapter: Adapter) -> tuple[Adapter, list[str]]:
    """The modules of ``adapter`` the model has, and the names of those it has not (what a runtime skips)."""
    have = dict(model.named_modules())
    if adapter.saved:
        raise UnsupportedModuleError("eval", sorted(adapter.saved)[:3], "full tensors (modules_to_save, trainable "
                                     "tokens) are not applied by loratools' forward; evaluate `loratools merge`'s "
                                     "output with --stack merged:DIR")
    kept = {n: m for n, m in adapter.items() if n in have}
    return adapter.with_modules(kept), [n for n in adapter.modules if n not in have]


class TransformersRunner:
    """The base loaded once (float32, transformers); runs it alone, with an adapter, or another model directory."""

    def __init__(self, base: Path, *, device: torch.device) -> None:
        from ..lm.load import load_causal_lm

        self.device = device
        self.model, self.tokenizer = load_causal_lm(base, device=device, frozen=True)

    def with_adapter(self, adapter: Adapter) -> tuple[Any, list[str]]:
        """A copy of the base with ``adapter``'s matching modules in it (loratools' layers), and the names left out."""
        from ..nn.inject import load_adapter

        usable, missing = applicable(self.model, adapter)
        model = copy.deepcopy(self.model)
        load_adapter(model, usable)
        return model.eval(), missing

    def other(self, path: Path) -> Any:
        from ..lm.load import load_causal_lm

        return load_causal_lm(path, device=self.device, frozen=True)[0]


@torch.no_grad()
def transformers_run(model: Any, examples: Sequence[tuple[Sequence[int], Sequence[int]]],
                     prompts: Sequence[Sequence[int]], *, n_greedy: int, eos: int | None, device: torch.device,
                     advance: Callable[[int], None]) -> tuple[list[Tensor], list[list[int]]]:
    """Logits at each example's positions and greedy answers of a transformers model, one example at a time."""
    rows = []
    for ids, pos in examples:
        logits = model(input_ids=torch.tensor([list(ids)], device=device)).logits[0]
        rows.append(logits[list(pos)].float().cpu())
        advance(1)
    answers = []
    for p in prompts:
        answer, step, cache = list[int](), list(p), None
        while len(answer) < n_greedy:  # one token at a time on the model's own KV cache
            out = model(input_ids=torch.tensor([step], device=device), past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
            answer.append(nxt)
            step = [nxt]
            if nxt == eos:
                break
        answers.append(answer)
    return rows, answers
