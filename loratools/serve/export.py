"""``loratools export``: rewrite an adapter so that a serving runtime loads it and computes the same ΔW.

:func:`plan_export` is pure: from an :class:`Adapter` it builds the adapter to
write, step by step, each step one rule of the runtime's table
(:mod:`loratools.serve.runtimes`):

0. DoRA → plain LoRA (no runtime here has DoRA): each module's full update ``D = W′ − W0`` (from the
   base's weights) factored by a truncated SVD at ``error`` and/or ``max_lora_rank``
   (:func:`loratools.dora.flatten_dora_modules`, what ``convert --as-lora`` does), its error measured;
1. AdaLoRA → plain LoRA (:func:`as_lora`: same ΔW);
2. vision-tower modules dropped (listed); modules the runtime has no layer for
   refused, or dropped with ``drop_unsupported``;
3. full tensors (``modules_to_save``): ``W_saved − W_base`` factored by a
   truncated SVD at relative error ``error`` into a LoRA on that module
   (needs the base's weights), or dropped with ``drop_unsupported``; PEFT's
   ``.base_layer.weight`` copies of the base are dropped;
4. ranks over ``max_lora_rank`` or a parameter ``budget``: every module's rank
   chosen together for the least ``Σᵢ ‖ΔWᵢ − ΔWᵢ′‖²_F``
   (:func:`loratools.compress.ranks.allocate_ranks` over the exact spectra from the
   factors), each module truncated to its top triplets (Eckart–Young);
5. a runtime that stacks q/k/v (SGLang): zero modules for q/v/gate missing
   beside stacked siblings;
6. every module's exact scale folded into its ``lora_B`` so that the runtime's
   one global scale (``lora_alpha / r``) reproduces it (GGUF: the writer folds
   per tensor, ``alpha/rank``); a runtime of one rank (SGLang): zero padding.

Each step reads a field of the runtime's row (:class:`~loratools.serve.runtimes.Runtime`),
never its name.

:func:`export_adapter` reads, plans, writes under a temporary name, reads the
file back, applies the runtime's own arithmetic (:func:`loratools.serve.check.runtime_view`),
checks that it is exactly the planned adapter (:func:`loratools.deltas.check_same_deltas`)
and reports each module's error against the source as the runtime computes it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..adapter import Adapter, Module, as_lora, fold_scales, pad_rank
from ..deltas import check_same_deltas, delta_error
from ..errors import InvalidOptionError, MissingModuleError, ShapeMismatchError, UnsupportedModuleError
from ..formats import BaseModel, get_format, read_adapter
from ..formats.gguf import GGUFBase, base_of_adapter, gguf_unsupported, read_gguf, write_gguf
from ..io import ModelReader, atomic_output, check_output
from ..linalg import RankRule, truncated_svd
from ..adapter import module_from_svd
from ..compress.ranks import Allocation, resize_together
from ..dora import flatten_dora_modules
from .runtimes import Runtime, get_runtime, is_vision_module
from .check import (ALORA_FIELD, check_max_lora_rank, full_tensors, loaded_whole, read_source, refuse_dora_for,
                    refused_features, runtime_view, smallest_max_lora_rank, stacked_zeros)

__all__ = ["ExportPlan", "ExportLayer", "ExportResult", "plan_export", "export_adapter", "full_to_lora"]

TensorSource = ModelReader | Mapping[str, Tensor]
_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embeddings")


@dataclass(frozen=True)
class ExportLayer:
    """One module of the output: its rank before and after, its relative error ‖ΔW − ΔW′‖_F/‖ΔW‖_F and what changed."""

    name: str
    rank_before: int
    rank: int
    rel_error: float
    change: str = ""


@dataclass(frozen=True)
class ExportPlan:
    """The adapter to write; what each source module became; what was dropped (name → why); the steps taken."""

    adapter: Adapter
    layers: tuple[ExportLayer, ...]
    dropped: Mapping[str, str]
    changes: tuple[str, ...]
    allocation: Allocation | None
    reference: Mapping[str, Module | Tensor] = field(default_factory=dict)  # the source ΔW of each written module
    #: DoRA modules folded into plain LoRA: name → (the fold's relative error ‖D − B′A′‖_F/‖D‖_F, ‖D‖_F), with
    #: D = W′ − W0 DoRA's full update; their ``reference`` is the folded module
    folded: Mapping[str, tuple[float, float]] = field(default_factory=dict)


def _drop(adapter: Adapter, names: Mapping[str, str]) -> Adapter:
    return Adapter({n: m for n, m in adapter.items() if n not in names}, adapter.config,
                   {k: t for k, t in adapter.saved.items() if k not in names})


def _unsupported(lora: Adapter, rt: Runtime, gguf_base: GGUFBase | None) -> dict[str, str]:
    """Modules (not full tensors) the runtime has no layer for."""
    mods = Adapter(lora.modules, lora.config)
    if rt.base_tensors:
        return gguf_unsupported(mods, gguf_base)
    out = {n: f"{rt.title} has no LoRA layer for this module type" for n in mods.modules
           if rt.targets is not None and n.rsplit(".", 1)[-1] not in rt.targets}
    if not rt.expert_lora:
        out |= {n: f"LoRA on expert tensors: loratools has not checked {rt.title}'s layout for them (moe-experts)"
                for n, m in mods.items() if m.kind == "experts"}
    return out | {n: f"{rt.title} has no convolution LoRA layer" for n, m in mods.items()
                  if m.kind == "conv" and n not in out}


def _base_tensor(base: TensorSource | None, module: str) -> Tensor:
    if base is None:
        raise InvalidOptionError(f"{module} is stored as a full tensor: turning it into a LoRA needs the base's "
                                 "weights (`base`: a model directory or .safetensors), or pass `drop_unsupported`")
    key = f"{module}.weight"
    if key not in (base.keys() if isinstance(base, ModelReader) else base):
        raise MissingModuleError(key, "the base model", "is `base` the model this adapter was trained on?")
    return base.get(key) if isinstance(base, ModelReader) else base[key]


def full_to_lora(module: str, saved: Tensor, w0: Tensor, *, error: float, max_rank: int | None,
                 dtype: torch.dtype) -> tuple[Module | None, Tensor, float]:
    """A LoRA module for ``W_saved − W_base`` at relative error ≤ ``error`` (capped at ``max_rank``), the dense
    difference (matrix layout) and the factors' measured relative error. None when the difference is zero."""
    if saved.shape != w0.shape:
        raise ShapeMismatchError(module, f"the base's {tuple(w0.shape)}", f"{tuple(saved.shape)} in the adapter",
                                 "a resized vocabulary cannot be written as a LoRA")
    D = saved.float() - w0.float()
    embedding = module.rsplit(".", 1)[-1] in _EMBEDDINGS
    M = D.T if embedding else D  # PEFT's embedding LoRA: ΔW (vocab, dim) = (B A)ᵀ with A (r, vocab)
    if float(M.norm()) == 0.0:
        return None, M, 0.0
    U, S, Vh, _ = truncated_svd(M, error=error, max_rank=max_rank)
    like = Module(A=torch.zeros(1, M.shape[1], dtype=dtype), B=torch.zeros(M.shape[0], 1, dtype=dtype), alpha=1.0,
                  scale=1.0, kind="embedding" if embedding else "linear")
    m = module_from_svd(like, U, S, Vh, dtype=dtype)
    B, A = m.factors()
    return m, M, float((M - B @ A).norm() / M.norm())


def _full_tensors(lora: Adapter, rt: Runtime, base_weights: TensorSource | None, error: float | None,
                  max_rank: int | None, drop: bool,
                  ) -> tuple[dict[str, Module], dict[str, Tensor], dict[str, str], list[str]]:
    """Full tensors → (new LoRA modules, their dense references, dropped keys → why, notes)."""
    modules: dict[str, Module] = {}
    refs: dict[str, Tensor] = {}
    dropped: dict[str, str] = {}
    notes: list[str] = []
    for t in full_tensors(lora):
        if loaded_whole(t, rt):
            continue  # a classification head the runtime loads whole (vLLM)
        if t.kind in ("bias", "other"):
            if not drop:
                raise UnsupportedModuleError(rt.title, [t.key], f"a {t.kind} tensor cannot be written as a LoRA")
            dropped[t.key] = f"a {t.kind} tensor: no LoRA can hold it"
            continue
        if t.kind == "base-copy" and base_weights is None:
            dropped[t.key] = "PEFT's copy of the base weight (not compared with a base: pass `base` to check it)"
            continue
        if drop and (base_weights is None or error is None):
            dropped[t.key] = "a full tensor (modules_to_save); pass `base` and `error` to turn it into a LoRA"
            continue
        w0 = _base_tensor(base_weights, t.module)
        if t.kind == "base-copy" and torch.equal(lora.saved[t.key].to(w0.dtype), w0):
            dropped[t.key] = "PEFT's copy of the base weight: equal to the base's"
            continue
        if error is None:
            raise InvalidOptionError(f"{t.module} is stored as a full tensor: pass `error` (the relative error of "
                                     "its LoRA) or `drop_unsupported`")
        m, M, rel = full_to_lora(t.module, lora.saved[t.key], w0, error=error, max_rank=max_rank,
                                 dtype=torch.float32)
        if m is None:
            notes.append(f"{t.key} equals the base's weight: nothing to apply")
            continue
        if t.module in lora.modules:
            raise UnsupportedModuleError(rt.title, [t.module], "it has both a LoRA and a full replacement weight")
        modules[t.module], refs[t.module] = m, M
        notes.append(f"{t.key} → LoRA rank {m.rank} on {t.module} (relative error {rel:.3g})")
    return modules, refs, dropped, notes


def _fold_dora(adapter: Adapter, rt: Runtime, base_weights: TensorSource | None, error: float | None,
               max_rank: int | None) -> tuple[Adapter, dict[str, tuple[float, float]], list[str]]:
    """Every DoRA module as plain LoRA factors of its full update D = W′ − W0 (:func:`~loratools.dora.flatten_dora_modules`,
    rank by ``error`` (capped at ``max_rank``) or ``max_rank`` alone), with W0 from ``base_weights``; returns the
    adapter, each folded module's (relative error, ‖D‖_F) and a note."""
    if not adapter.is_dora:
        return adapter, {}, []
    if base_weights is None:
        refuse_dora_for(adapter, rt, "so pass `base` (the model directory, with its safetensors weights)")
    if error is None and max_rank is None:
        refuse_dora_for(adapter, rt, "at a rank chosen by `error` (each module's relative error) and/or "
                                     "`max_lora_rank`: pass one")
    assert base_weights is not None
    rule = RankRule(error=error, max_rank=max_rank) if error is not None else RankRule(rank=max_rank)
    plain, folded = flatten_dora_modules(adapter, lambda name: _base_tensor(base_weights, name), rule)
    worst = max(e for e, _ in folded.values())
    note = (f"DoRA folded into plain LoRA with the base's weights: {len(folded)} module(s), W′ − W0 factored by a "
            f"truncated SVD (largest relative error {worst:.3g})")
    return plain, folded, [note]


def _validate(rt: Runtime, adapter: Adapter, max_lora_rank: int | None, budget: int | None,
              error: float | None) -> None:
    check_max_lora_rank(max_lora_rank, rt)
    if budget is not None and not (isinstance(budget, int) and budget >= 1):
        raise InvalidOptionError(f"`budget` is a number of parameters ≥ 1, got {budget}")
    if error is not None:
        RankRule(error=error, max_rank=max_lora_rank)  # validates `error`
    refused = [f for f in refused_features(adapter.config.extra) if not (rt.activated_lora and f == ALORA_FIELD)]
    if refused:
        raise UnsupportedModuleError(rt.title, ["this adapter"], f"its config sets {', '.join(refused)}, which no "
                                     "plain LoRA file can express")


def plan_export(adapter: Adapter, runtime: str | Runtime, *, max_lora_rank: int | None = None,
                budget: int | None = None, error: float | None = None, base: BaseModel | None = None,
                base_weights: TensorSource | None = None, gguf_base: GGUFBase | None = None,
                drop_unsupported: bool = False) -> ExportPlan:
    """The adapter ``runtime`` will load with the same ΔW (or, under ``max_lora_rank``/``budget``, the least
    total error); see the module docstring for the steps. ``base`` gives shapes and config, ``base_weights``
    the weights that full tensors are differenced against, ``gguf_base`` llama.cpp's architecture."""
    rt = get_runtime(runtime) if isinstance(runtime, str) else runtime
    _validate(rt, adapter, max_lora_rank, budget, error)
    source = adapter
    adapter, folded, changes = _fold_dora(adapter, rt, base_weights, error, max_lora_rank)
    lora = as_lora(adapter)
    nonzero = set(lora.modules)  # AdaLoRA modules of rank 0 add nothing
    dropped = {n: "AdaLoRA kept rank 0: it adds nothing" for n in adapter.modules if n not in lora.modules}
    dropped |= {n: "its DoRA update is zero" for n in folded if n not in adapter.modules}
    if adapter.method == "adalora":
        changes.append("AdaLoRA → plain LoRA with the same ΔW (A′ = (A⊙E)[kept], scale carried per module)")
    dropped |= {n: "vision/audio tower module: text runtimes do not apply it" for n in lora.modules
                if is_vision_module(n)}
    bad = {n: why for n, why in _unsupported(_drop(lora, dropped), rt, gguf_base).items() if n not in dropped}
    if bad and not drop_unsupported:
        raise UnsupportedModuleError(rt.title, sorted(bad), "; ".join(dict.fromkeys(bad.values())))
    dropped |= bad
    lora = _drop(lora, dropped)
    new, dense_refs, gone, notes = _full_tensors(lora, rt, base_weights, error, max_lora_rank, drop_unsupported)
    dropped |= gone
    changes += notes
    modules = {**lora.modules, **new}
    modules, predicted, alloc = resize_together(modules, cap=max_lora_rank, budget=budget)
    dropped |= {n: "rank 0 under the budget" for n in {**lora.modules, **new} if n not in modules}
    if alloc is not None and not modules and alloc.parameters_before:
        raise InvalidOptionError(f"a `budget` of {budget:,} parameters keeps no module: the smallest rank-1 module "
                                 f"needs {min(sum(m.matrix_shape) for m in {**lora.modules, **new}.values()):,}")
    if alloc is not None:
        changes.append(f"ranks chosen together ({alloc.method}) under "
                       + " and ".join(x for x in (f"max rank {max_lora_rank}" if max_lora_rank else "",
                                                  f"{budget:,} parameters" if budget else "") if x))
    modules, added, padded, steps = _for_runtime(modules, rt, base)
    changes += steps
    if not modules:
        raise UnsupportedModuleError(rt.title, sorted(dropped), "no module would be left")
    top = max(m.rank for m in modules.values())
    if rt.max_lora_ranks is not None and smallest_max_lora_rank(top, rt) is None:
        raise InvalidOptionError(f"a rank of {top} is above {rt.title}'s largest --max-lora-rank "
                                 f"{rt.max_lora_ranks[-1]}: pass `max_lora_rank` or `budget` to reduce it")
    out = _output(lora, modules, rt, bool(dropped or added or new))
    # every source module with a ΔW, the dropped ones included (the runtime computes 0 for them)
    refs: dict[str, Module | Tensor] = {n: m for n, m in as_lora(adapter).items() if n in modules or n in dropped}
    refs |= dense_refs
    labels = {**{n: f"rank {k} + zero padding" for n, k in padded.items()}, **{n: "from a full tensor" for n in new},
              **{n: "zero (added)" for n in added}}
    labels |= {n: "; ".join(x for x in ("DoRA folded", labels.get(n)) if x) for n in folded}
    layers = tuple(_layer(n, source.modules.get(n), out.modules.get(n), predicted.get(n, 0.0),
                          n in nonzero or n in new, labels.get(n, "")) for n in {**source.modules, **out.modules})
    return ExportPlan(out, layers, dropped, tuple(changes), alloc, refs, folded)


def _for_runtime(modules: dict[str, Module], rt: Runtime,
                 base: BaseModel | None) -> tuple[dict[str, Module], set[str], dict[str, int], list[str]]:
    """The last, ΔW-keeping steps: zero modules for a runtime that stacks q/k/v, one scale for a runtime that
    reads one (folded into lora_B), zero padding for a runtime of one rank. Returns the modules, the added and
    padded ones, the steps."""
    steps: list[str] = []
    added: dict[str, Module] = stacked_zeros(modules, base) if rt.stacks_qkv else {}
    if added:
        steps.append(f"zero LoRA added on {', '.join(sorted(added))} ({rt.title} stacks q/k/v and gate/up)")
        modules = {**modules, **added}
    padded: dict[str, int] = {}  # module → the rank it keeps under the zero padding
    if rt.scales == "alpha/rank":  # the GGUF writer folds each module's scale for alpha/rank
        if len({m.scale * m.rank for m in modules.values()}) > 1:
            steps.append(f"each module's scale folded into its lora_b for {rt.title}'s alpha/rank")
        return modules, set(added), padded, steps
    folded, c = fold_scales(modules)
    moved = [n for n in modules if folded[n] is not modules[n]]
    if moved:
        steps.append(f"the scales of {len(moved)} module(s) folded into lora_B: one scale {c:g} for all (lora_alpha/r)")
    if rt.one_rank and folded:
        top = max(m.rank for m in folded.values())
        padded = {n: m.rank for n, m in folded.items() if m.rank < top}
        if padded:
            steps.append(f"{len(padded)} module(s) padded with zeros to {rt.title}'s one rank {top}")
        folded = {n: pad_rank(m, top) for n, m in folded.items()}
    return folded, set(added), padded, steps


def _layer(name: str, src: Module | None, m: Module | None, err: float, nonzero: bool, what: str) -> ExportLayer:
    before = src.rank if src is not None else 0
    if m is None:  # all of its ΔW is lost, unless it had none (an AdaLoRA module of rank 0)
        return ExportLayer(name, before, 0, 1.0 if nonzero else 0.0, "dropped")
    return ExportLayer(name, before, m.rank, err, what)


def _output(lora: Adapter, modules: Mapping[str, Module], rt: Runtime, renamed: bool) -> Adapter:
    saved = {t.key: lora.saved[t.key] for t in full_tensors(lora) if loaded_whole(t, rt)}
    extra = dict(lora.config.extra)
    extra.update(modules_to_save=sorted({t.module.rsplit(".", 1)[-1] for t in full_tensors(lora) if t.key in saved})
                 or None, use_dora=False)
    if "bias" in extra and extra["bias"] is None:  # no bias tensor is left (refused_features): peft's own default
        extra["bias"] = "none"
    target = lora.config.target_modules
    if renamed or (rt.target_list and isinstance(target, str)):
        target = None  # the module names, one by one
    cfg = replace(lora.config, method="lora", use_rslora=False, init_r=None, target_r=None, target_modules=target,
                  extra=extra)
    return Adapter(modules, cfg, saved)


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_adapter` wrote: per module the error the runtime will compute (measured on the
    written file under the runtime's arithmetic), the whole adapter's, and the write check's largest deviation."""

    output: Path
    runtime: str
    source_format: str
    layers: tuple[ExportLayer, ...]
    dropped: Mapping[str, str]
    changes: tuple[str, ...]
    allocation: Allocation | None
    total_error: float
    check_error: float
    parameters: int
    serve_hint: str
    modelfile: Path | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``export --json`` object: the fields above (``serve_hint`` as ``serve``), paths as strings."""
        alloc = self.allocation
        return {"output": str(self.output), "runtime": self.runtime, "source_format": self.source_format,
                "parameters": self.parameters, "total_error": self.total_error, "check_error": self.check_error,
                "serve": self.serve_hint, "modelfile": str(self.modelfile) if self.modelfile else None,
                "changes": list(self.changes), "dropped": dict(self.dropped),
                "allocation": asdict(alloc) if alloc is not None else None,
                "layers": [asdict(layer) for layer in self.layers]}


def _measure(plan: ExportPlan, view: Adapter) -> tuple[dict[str, float], float]:
    """Each module's relative error against its source ΔW as ``view`` computes it (1 for a dropped module),
    and the whole adapter's: √(Σᵢ‖ΔWᵢ − ΔWᵢ′‖²_F / Σᵢ‖ΔWᵢ‖²_F) over every source module with a ΔW."""
    rel, lost, total = {}, 0.0, 0.0
    for n, ref in plan.reference.items():
        got = view.modules.get(n)
        if got is None:  # dropped
            norm, err = float(ref.double().norm() if isinstance(ref, Tensor) else ref.singular_values().norm()), 1.0
        elif isinstance(ref, Tensor):
            B, A = got.factors(dtype=torch.float64)
            norm = float(ref.double().norm())
            err = float((ref.double() - B @ A).norm()) / norm
        else:
            norm = float(ref.singular_values().norm())
            err = delta_error(ref, got)
        if n in plan.folded:  # against DoRA's D: D − B′A′ is orthogonal to the folded module's row and column
            fold, d_norm = plan.folded[n]  # spaces, where any truncation of it lies, so the squares add
            err = 1.0 if got is None else math.sqrt((fold * d_norm) ** 2 + (err * norm) ** 2) / d_norm
            norm = d_norm
        rel[n] = err
        lost, total = lost + (err * norm) ** 2, total + norm**2
    return rel, math.sqrt(lost / total) if total > 0 else 0.0


def _modelfile(base: str | os.PathLike[str] | None, adapter: Adapter) -> str:
    src = Path(base).resolve() if base is not None else adapter.config.base_model
    if src is None:
        raise InvalidOptionError("an Ollama Modelfile needs the base model for its FROM line: pass `base`")
    text = str(src)
    # a Modelfile holds one directive a line: a line break (or another control character) would add directives
    if any(ch < " " or ch == "\x7f" for ch in text) or text != text.strip() or text.startswith('"'):
        raise InvalidOptionError(f"the base model {text!r} cannot be written on a Modelfile's FROM line (a line "
                                 "break, a control character, a leading quote or edge spaces); rename it")
    return (f"# written by loratools export --for ollama: the base model, then the adapter (GGUF, llama.cpp's rules)\n"
            f"FROM {src}\nADAPTER ./adapter.gguf\n")


WriteBack = Callable[[Adapter, Path, Runtime, GGUFBase | None], dict[str, Adapter]]


def _peft_back(adapter: Adapter, path: Path, rt: Runtime, gguf_base: GGUFBase | None) -> dict[str, Adapter]:
    get_format("peft").write(adapter, path)
    back = read_adapter(path, format="peft")
    return runtime_view(back, back.config.extra, rt)


def _gguf_back(adapter: Adapter, path: Path, rt: Runtime, gguf_base: GGUFBase | None) -> dict[str, Adapter]:
    write_gguf(adapter, path, base=gguf_base)
    return runtime_view(read_gguf(path, base=gguf_base), None, rt)


#: ``Runtime.writes`` → write the planned adapter at a path, read it back as the runtime computes it (by reading)
_WRITE_BACK: dict[str, WriteBack] = {"peft": _peft_back, "gguf": _gguf_back}


def export_adapter(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, runtime: str,
                   max_lora_rank: int | None = None, budget: int | None = None, error: float | None = None,
                   base: str | os.PathLike[str] | None = None, drop_unsupported: bool = False,
                   force: bool = False) -> ExportResult:
    """Write the adapter at ``src`` for ``runtime`` at ``dst`` (a PEFT directory for vLLM/SGLang, a ``.gguf``
    for llama.cpp, a directory with ``adapter.gguf`` and a ``Modelfile`` for Ollama), read it back, check it
    and measure what the runtime will compute (see the module docstring)."""
    rt = get_runtime(runtime)
    src_p, dst_p = Path(src), Path(dst)
    check_output(dst_p, force=force, inputs=(src_p,))
    adapter, base_m, gguf_base, fmt = read_source(src_p, base, rt)
    if rt.base_tensors and gguf_base is None:
        gguf_base = base_of_adapter(adapter)
    weights = ModelReader(base) if base is not None and (adapter.saved or adapter.is_dora) and base_m is not None \
        and "gguf" not in base_m.facts and base_m.shapes is not None else None
    if adapter.is_dora and weights is None:
        refuse_dora_for(adapter, rt, "so pass `base`: the transformers model directory (or .safetensors) with its "
                                     "weights" + (", not a .gguf" if base is not None else ""))
    try:
        plan = plan_export(adapter, rt, max_lora_rank=max_lora_rank, budget=budget, error=error, base=base_m,
                           base_weights=weights, gguf_base=gguf_base, drop_unsupported=drop_unsupported)
    finally:
        if weights is not None:
            weights.close()
    with atomic_output(dst_p, force=force, inputs=(src_p,)) as tmp:
        path = tmp
        if rt.modelfile:
            tmp.mkdir()
            path = tmp / "adapter.gguf"
            (tmp / "Modelfile").write_text(_modelfile(base, adapter))
        views = _WRITE_BACK[rt.writes](plan.adapter, path, rt, gguf_base)
        check = max(check_same_deltas(plan.adapter, v) for v in views.values())
        measured = [_measure(plan, v) for v in views.values()]
    rel = {n: max(m[0][n] for m in measured) for n in plan.reference}
    layers = tuple(replace(layer, rel_error=rel.get(layer.name, layer.rel_error)) for layer in plan.layers)
    top = max(m.rank for m in plan.adapter.modules.values())
    hint = rt.serve_hint.format(rank=smallest_max_lora_rank(top, rt), output=dst_p)
    return ExportResult(dst_p, rt.name, fmt, layers, plan.dropped, plan.changes, plan.allocation,
                        max(m[1] for m in measured), check, plan.adapter.parameters, hint,
                        dst_p / "Modelfile" if rt.modelfile else None)
