"""``eval_stacks``: the same examples through every stack, each compared with the reference (see :mod:`.metrics`).

The base (transformers, float32) is loaded once; its tokenizer makes the token ids every stack is given, so
runtimes compare on identical inputs. Each stack's logits are kept at the scored positions only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import InvalidOptionError
from ..lm.data import IGNORE, read_rows, row_examples
from . import metrics as M
from .report import EvalReport, StackResult
from .stacks import StackRun, StackSpec, TransformersRunner, combined_adapter, parse_stack, transformers_run

__all__ = ["eval_stacks", "Prepared", "prepare"]

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class Prepared:
    """The examples as every stack gets them: ids and scored positions, targets, and the completion rows'
    first-token position (index into the positions), label and prompt."""

    examples: list[tuple[list[int], list[int]]]
    targets: list[Tensor]
    first: list[int | None]
    labels: list[int | None]
    prompts: list[list[int]]


def prepare(tokenizer: Any, data: Path, *, seq_len: int, max_examples: int | None) -> Prepared:
    """Read ``data`` (the rows ``train`` reads) into :class:`Prepared` examples."""
    exs = row_examples(data, tokenizer, seq_len=seq_len, what="eval data")[:max_examples]
    if not exs:
        raise InvalidOptionError(f"{data} gives no example with a token to predict; give longer examples")
    out = Prepared([], [], [], [], [])
    for e in exs:
        pos = [p for p in range(len(e.input_ids) - 1) if e.labels[p + 1] != IGNORE]
        out.examples.append((list(e.input_ids), pos))
        out.targets.append(torch.tensor([e.labels[p + 1] for p in pos]))
        completion = e.labels[0] == IGNORE  # a prompt (context only) before the targets
        out.first.append(0 if completion else None)
        out.labels.append(e.labels[pos[0] + 1] if completion else None)
        if completion:
            out.prompts.append(list(e.input_ids[:pos[0] + 1]))
    return out


@dataclass
class _Context:
    """What the stacks share during one run."""

    base: Path
    adapters: list[Any]
    adapter_paths: list[Path]
    prep: Prepared
    runner: TransformersRunner
    options: dict[str, Any]
    advance: Callable[..., None]
    runs: dict[str, StackRun] = field(default_factory=dict)

    @property
    def vocab(self) -> int:
        return int(self.runner.model.get_output_embeddings().weight.shape[0])


def _transformers(ctx: _Context, spec: StackSpec) -> StackRun:
    from ..formats import read_adapter

    notes: list[str] = []
    if spec.kind == "base":
        model = ctx.runner.model
    elif spec.kind == "merged":
        model = ctx.runner.other(Path(spec.model or ""))
    else:
        adapter = read_adapter(spec.adapter) if spec.adapter else combined_adapter(ctx.adapters)
        model, missing = ctx.runner.with_adapter(adapter)
        if missing:
            notes.append(f"{len(missing)} of {len(adapter.modules)} modules match nothing in the base and were "
                         f"left out, as a runtime does (first: {missing[0]})")
    logits, greedy = transformers_run(model, ctx.prep.examples, ctx.prep.prompts, n_greedy=ctx.options["greedy"],
                                      eos=ctx.runner.tokenizer.eos_token_id, device=ctx.runner.device,
                                      advance=ctx.advance)
    return StackRun(logits, greedy, tuple(notes))


def _llama_cpp(ctx: _Context, model: str, lora: str | None) -> StackRun:
    from .runtimes import llama_cpp_run

    for p in (model, lora):
        if p is not None and not Path(p).is_file():
            raise InvalidOptionError(f"`stack` gguf: {p} does not exist")
    logits, greedy = llama_cpp_run(Path(model), Path(lora) if lora else None, ctx.prep.examples, ctx.prep.prompts,
                                   vocab=ctx.vocab, n_greedy=ctx.options["greedy"],
                                   eos=ctx.runner.tokenizer.eos_token_id)
    ctx.advance(len(ctx.prep.examples))
    return StackRun(logits, greedy)


def _vllm(ctx: _Context, spec: StackSpec) -> tuple[StackRun, StackRun]:
    """vLLM without and with the adapter directory (one engine start): (its base, the stack)."""
    from .runtimes import vllm_python, vllm_run

    python = vllm_python(ctx.options["vllm_python"])
    adapter = Path(spec.adapter) if spec.adapter else (ctx.adapter_paths[0] if ctx.adapter_paths else None)
    if adapter is None or not adapter.is_dir():
        raise InvalidOptionError("the vllm stack needs a PEFT adapter directory: give ADAPTER or vllm:DIR "
                                 "(`loratools export ADAPTER --for vllm -o DIR` writes one)")
    base, with_adapter = vllm_run(python, ctx.base, [None, adapter], ctx.prep.examples, vocab=ctx.vocab,
                                  max_lora_rank=ctx.options["max_lora_rank"], logprobs=min(ctx.options["logprobs"], ctx.vocab))
    ctx.advance(len(ctx.prep.examples))
    note = ("log-probs of vLLM's top tokens only: every figure is over the tokens both sides know; greedy answers "
            "are not asked of vLLM",)
    return StackRun(base, None, note), StackRun(with_adapter, None, note)


def _run(ctx: _Context, spec: StackSpec) -> str:
    """Run ``spec`` (and its base, in a runtime) into ``ctx.runs``; return the name of the stack its effect is from."""
    if spec.kind == "gguf":
        gbase = ctx.options["gguf_base"] or (spec.model if spec.adapter else None)
        if gbase is not None and f"gguf:{gbase}" not in ctx.runs:
            ctx.runs[f"gguf:{gbase}"] = _llama_cpp(ctx, gbase, None)
        if spec.name not in ctx.runs:
            ctx.runs[spec.name] = _llama_cpp(ctx, spec.model or "", spec.adapter)
        return f"gguf:{gbase}" if gbase is not None else "base"
    if spec.kind == "vllm":
        ctx.runs["vllm (no adapter)"], ctx.runs[spec.name] = _vllm(ctx, spec)
        return "vllm (no adapter)"
    if spec.name not in ctx.runs:
        ctx.runs[spec.name] = _transformers(ctx, spec)
    return "base"


def _stack_list(stacks: Sequence[str], reference: str | None, n_adapters: int) -> tuple[list[StackSpec], str]:
    """The base first, then the reference, then the rest as given (each once)."""
    specs = [parse_stack(s) for s in stacks]
    ref = reference or ("adapter" if n_adapters else "base")
    ordered = [parse_stack("base"), parse_stack(ref), *specs]
    if not n_adapters and any(s.kind in ("adapter", "vllm") and s.adapter is None for s in ordered):
        raise InvalidOptionError("the adapter and vllm stacks need an ADAPTER argument (or adapter:PATH, vllm:DIR)")
    if n_adapters > 1 and any(s.kind == "vllm" and s.adapter is None for s in ordered):
        raise InvalidOptionError(f"the vllm stack serves one adapter directory, and {n_adapters} ADAPTERs were "
                                 "given: give vllm:DIR (`loratools combine` them, then `export --for vllm`)")
    seen: dict[str, StackSpec] = {}
    for s in ordered:
        seen.setdefault(s.name, s)
    if reference is not None and seen[ref].kind in ("gguf", "vllm"):
        raise InvalidOptionError("`reference` must be a transformers stack (base, adapter[:PATH], merged:DIR): the "
                                 "runtimes are what is being checked")
    return list(seen.values()), ref


def _check_counts(max_examples: int | None, vllm: bool, max_lora_rank: int, vllm_logprobs: int) -> None:
    """Refuse, before any model loads, counts that would drop examples (a negative ``max_examples`` slices off
    the last ones), that vLLM refuses only after its process has started (``max_lora_rank`` < 1; vLLM 0.32.0's
    other choices are checked by vLLM itself), or that leave no log-prob to compare (``vllm_logprobs`` < 1)."""
    counts = {"max_examples": max_examples} | ({"max_lora_rank": max_lora_rank, "vllm_logprobs": vllm_logprobs}
                                               if vllm else {})
    for name, n in counts.items():
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise InvalidOptionError(f"`{name}` must be an integer ≥ 1, got {n}")


def _log_probs(run: StackRun, vocab: int) -> list[Tensor]:
    return [M.log_probs(x[:, :vocab]) for x in run.logits]


def _result(ctx: _Context, name: str, kind: str, role: str, effect_base: str | None, ref: str,
            lp: dict[str, list[Tensor]]) -> StackResult:
    run = ctx.runs[name]
    first = [x[i] if i is not None else None for x, i in zip(lp[name], ctx.prep.first)]
    greedy = (M.greedy_agreement(run.greedy, ctx.runs[ref].greedy or [])
              if run.greedy is not None and name != ref else None)
    comparison = M.compare(lp[name], lp[ref]) if name != ref else None
    eff = (M.effect(lp[name], lp[effect_base], lp[ref], lp["base"])
           if effect_base is not None and role != "base" else None)
    flags = M.flags(carries_adapter=role != "base", is_reference=role == "reference", eff=eff,
                    top1=comparison.top1 if comparison else None, greedy=greedy,
                    min_agreement=ctx.options["min_agreement"])
    return StackResult(name, kind, role, M.nll(lp[name], ctx.prep.targets), M.label_accuracy(first, ctx.prep.labels),
                       greedy, comparison, eff, effect_base, tuple(flags), run.notes)


def eval_stacks(base: PathLike, adapters: Sequence[PathLike], data: PathLike, *, stacks: Sequence[str] = (),
                reference: str | None = None, gguf_base: PathLike | None = None, vllm_python: str | None = None,
                max_lora_rank: int = 64, vllm_logprobs: int = 20, seq_len: int = 128,
                max_examples: int | None = None, greedy_tokens: int = 8, min_agreement: float = M.MIN_AGREEMENT,
                device: str = "auto", html: PathLike | None = None, force: bool = False,
                progress: Callable[..., None] | None = None) -> EvalReport:
    """Run the examples of ``data`` through the base, the reference and every stack of ``stacks``
    (:func:`~.stacks.parse_stack`), and compare each with the reference (:mod:`.metrics`).

    ``reference`` defaults to ``adapter`` (base + ``adapters`` in float32, loratools' own forward; several
    adapters add their ΔW) or ``base`` without adapters. Writes nothing but the ``html`` page (checked first).
    """
    from ..device import resolve_device
    from ..formats import read_adapter
    from ..io.paths import check_output

    if html is not None:
        check_output(Path(html), force=force, inputs=(base, data, *adapters))

    if greedy_tokens < 0 or seq_len < 2 or not 0 <= min_agreement <= 1:
        raise InvalidOptionError("`greedy_tokens` must be ≥ 0, `seq_len` ≥ 2 and `min_agreement` in [0, 1]")
    specs, ref = _stack_list(stacks, reference, len(adapters))
    _check_counts(max_examples, any(s.kind == "vllm" for s in specs), max_lora_rank, vllm_logprobs)
    read_rows(Path(data), what="eval data")  # bad data is refused before the models load
    read = [read_adapter(a) for a in adapters]
    runner = TransformersRunner(Path(base), device=resolve_device(device))
    prep = prepare(runner.tokenizer, Path(data), seq_len=seq_len, max_examples=max_examples)
    advance = progress or (lambda n=1, *, total=None: None)
    advance(0, total=len(prep.examples) * (len(specs) + sum(s.kind == "gguf" for s in specs)))
    ctx = _Context(Path(base), read, [Path(a) for a in adapters], prep, runner,
                   {"greedy": greedy_tokens if prep.prompts else 0, "gguf_base": str(gguf_base) if gguf_base else None,
                    "vllm_python": vllm_python, "max_lora_rank": max_lora_rank, "logprobs": vllm_logprobs,
                    "min_agreement": min_agreement}, advance)
    bases = {s.name: _run(ctx, s) for s in specs}
    vocab = min(int(x.shape[-1]) for r in ctx.runs.values() for x in r.logits[:1])
    lp = {name: _log_probs(r, vocab) for name, r in ctx.runs.items()}
    roles = {n: ("reference" if n == ref else "base" if n == "base" else "stack") for n in bases}
    kinds = {s.name: s.kind for s in specs}
    results = [_result(ctx, n, kinds[n], roles[n], bases[n] if n != "base" else None, ref, lp) for n in bases]
    extra = [_result(ctx, n, n.partition(":")[0].split(" ")[0], "base", None, ref, lp)
             for n in ctx.runs if n not in bases]
    notes = (f"logits compared over the first {vocab} tokens (the stacks' vocabularies differ)",) \
        if len({int(x.shape[-1]) for r in ctx.runs.values() for x in r.logits[:1]}) > 1 else ()
    report = EvalReport(str(data), len(prep.examples), sum(len(p) for _, p in prep.examples), ref,
                        tuple(results[:1] + extra + results[1:]), min_agreement, ctx.options["greedy"], notes)
    if html is not None:
        _write_html(report, Path(html), force=force, inputs=(base, data, *adapters))
    return report


def _write_html(report: EvalReport, path: Path, *, force: bool, inputs: tuple[PathLike, ...]) -> None:
    from ..io.paths import atomic_output
    from .html import render_html

    with atomic_output(path, force=force, inputs=inputs) as tmp:
        tmp.write_text(render_html(report), encoding="utf-8")
