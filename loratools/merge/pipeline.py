"""Merge pipeline LoRA files into a diffusers pipeline folder: each part into its own model.

A diffusers pipeline folder (``model_index.json`` and one folder per part, as ``DiffusionPipeline.save_pretrained``
writes it: ``unet/``, ``transformer/``, ``text_encoder/``, ``text_encoder_2/``, ``vae/``, ``scheduler/``,
``tokenizer/`` …) holds several models; a pipeline LoRA file (diffusers' ``save_lora_weights``, a kohya Stable
Diffusion file) holds a LoRA for some of them. :func:`merge_pipeline` writes a whole pipeline folder in which
every model the file(s) have a LoRA for is merged by :func:`~loratools.merge.jobs.merge_model` (each part read
against its own model, as diffusers' ``load_lora_weights`` applies it), and everything else (``model_index.json``,
the scheduler, the tokenizers, the models no LoRA touches) is copied as it is. The output appears whole or not at
all: every part is written inside one temporary folder, renamed into place once all of them succeeded.

A part the pipeline has no model for (a ``text_encoder_2`` LoRA and an SD 1.5 pipeline) is refused unless
``partial`` is given; ``only`` restricts the merge to the models it names. Either way the report lists each
part that was left out, and why.

Picking one model of a pipeline (``component``, for ``merge``/``unmerge``/``verify`` of one model) is here too:
:func:`read_inputs` and :func:`left_out_notes`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidOptionError
from ..formats import BaseModel, held_models, load_base, read_adapter
from ..formats.diffusers import load_component, other_components, pipeline_models
from ..io import Progress, atomic_output, copy_entries
from .jobs import check_merge, merge_model
from .plan import AdapterInput
from .report import MergeReport

__all__ = ["NOT_ASKED", "NOT_IN_BASE", "ComponentMerge", "LeftOut", "Part", "PipelineMergeReport", "left_out_notes",
           "merge_pipeline", "plan_parts", "read_inputs", "weighted"]

PathLike = str | os.PathLike[str]
#: why a part was not merged: the pipeline has no model of that name, or ``only`` did not name it
NOT_IN_BASE, NOT_ASKED = "not in BASE", "not asked"


@dataclass(frozen=True)
class Part:
    """The LoRA of one model (``component``) in one adapter file (``source``): ``modules`` modules."""

    source: str
    component: str
    modules: int


@dataclass(frozen=True)
class LeftOut:
    """A part that was not merged, and why (:data:`NOT_IN_BASE` or :data:`NOT_ASKED`)."""

    part: Part
    reason: str

    def describe(self) -> str:
        why = "the pipeline has no such model" if self.reason == NOT_IN_BASE else "not among the models asked for"
        return f"{self.part.source}'s {self.part.component} LoRA ({self.part.modules} modules): {why}"


@dataclass(frozen=True)
class ComponentMerge:
    """One model of the pipeline, merged: its folder in the output, the parts merged into it, the merge's report."""

    component: str
    parts: tuple[Part, ...]
    report: MergeReport

    @property
    def modules(self) -> int:
        return sum(p.modules for p in self.parts)


@dataclass(frozen=True)
class PipelineMergeReport:
    """What :func:`merge_pipeline` wrote: the models merged (each with its own :class:`MergeReport`), the entries
    of the pipeline folder copied as they are, and the parts left out (empty unless the merge was partial)."""

    pipeline: Path
    output: Path
    merged: tuple[ComponentMerge, ...]
    copied: tuple[str, ...]
    left_out: tuple[LeftOut, ...] = ()
    #: what the user should know about the pipeline as a whole (a `dtype` the copied models do not have)
    remarks: tuple[str, ...] = ()

    @property
    def partial(self) -> bool:
        return bool(self.left_out)

    @property
    def notes(self) -> tuple[str, ...]:
        """The merges' notes, each naming its model, then one per part left out."""
        own = tuple(f"{c.component}: {n}" for c in self.merged for n in c.report.notes)
        return own + self.remarks + tuple(f"not merged: {x.describe()}" for x in self.left_out)

    def to_json(self) -> dict[str, Any]:
        return {"op": "merge", "pipeline": str(self.pipeline), "output": str(self.output), "partial": self.partial,
                "components": [{"component": c.component, "folder": str(self.output / c.component),
                                "modules": c.modules, "parts": [vars(p) for p in c.parts],
                                "report": c.report.to_json()} for c in self.merged],
                "copied": list(self.copied),
                "left_out": [{**vars(x.part), "reason": x.reason} for x in self.left_out],
                "notes": list(self.notes)}


# --------------------------------------------------------------------------- what goes where (pure)

def plan_parts(models: Sequence[str], held: Sequence[tuple[str, dict[str, int] | None]], *,
               only: Sequence[str] | None = None, partial: bool = False) -> tuple[dict[str, list[int]], list[LeftOut]]:
    """Which adapters go into which model: ``{model: [adapter index, …]}`` in the pipeline's order, and the parts
    left out.

    ``models`` are the pipeline's models; ``held[i]`` is adapter i's source and its parts (model → module count),
    or None for a one-model adapter, which goes into the one model ``only`` names. A part whose model the pipeline
    lacks is refused unless ``partial``; a part ``only`` leaves out is left out (asked for).

    >>> plan_parts(["text_encoder", "unet"], [("a", {"unet": 3, "text_encoder_2": 2})], partial=True)[0]
    {'unet': [0]}
    """
    asked = list(dict.fromkeys(only)) if only else None
    for name in asked or ():
        if name not in models:
            raise InvalidOptionError(f"`only` {name!r}: the pipeline has no model {name}/ with safetensors weights; "
                                     f"its models are {', '.join(models) or 'none'}")
    where: dict[str, list[int]] = {}
    left: list[LeftOut] = []
    for i, (source, parts) in enumerate(held):
        if parts is None:
            if asked is None or len(asked) != 1:
                raise InvalidOptionError(f"{source} holds the adapter of one model and does not say which: name its "
                                         f"model with `only` (one of {', '.join(models)}) or `component`")
            parts = {asked[0]: 0}  # its modules are counted once it is read against that model
        for comp, n in parts.items():
            if comp not in models:
                left.append(LeftOut(Part(source, comp, n), NOT_IN_BASE))
            elif asked is not None and comp not in asked:
                left.append(LeftOut(Part(source, comp, n), NOT_ASKED))
            else:
                where.setdefault(comp, []).append(i)
    missing = [x for x in left if x.reason == NOT_IN_BASE]
    if missing and not partial:
        x = missing[0]
        raise InvalidOptionError(f"{x.part.source} holds a {x.part.component} LoRA, but the pipeline has no "
                                 f"{x.part.component}/ model (its models: {', '.join(models)}): merge the other "
                                 "parts with `partial` (the report lists what is left out), or use the pipeline "
                                 "the LoRA was made for")
    for name in asked or ():
        if name not in where:
            raise InvalidOptionError(f"`only` {name!r}: no adapter holds a LoRA of {name}")
    if not where:
        raise InvalidOptionError("no adapter holds a LoRA of any model of the pipeline "
                                 f"({', '.join(models)}): nothing to merge")
    return {m: where[m] for m in models if m in where}, left


# --------------------------------------------------------------------------- reading the inputs

def read_inputs(model: PathLike, paths: Sequence[str], weights: Sequence[float] = (), *,
                component: str | None = None) -> tuple[BaseModel, list[AdapterInput]]:
    """The model (a base, or a merged model), read once, and the adapters read against it as ``convert --base``
    reads them (kohya names mapped back, GGUF rows un-permuted). With ``component``, the model is that folder of the
    diffusers pipeline ``model``, and a file holding several models' LoRAs gives that one's; a pipeline folder
    without ``component`` is refused naming its models."""
    pairs = weighted(paths, weights)
    held = pipeline_models(Path(model)) if component is None else None
    if held is not None:
        folders = ", ".join(str(Path(model) / m) for m in held) or "none has safetensors weights"
        raise InvalidOptionError(f"{model} is a diffusers pipeline folder: give the folder of one of its models "
                                 f"({folders})")
    base = load_component(Path(model), component) if component is not None else load_base(model)
    return base, [AdapterInput(read_adapter(p, base=base), w, p) for p, w in pairs]


def weighted(paths: Sequence[str], weights: Sequence[float] = ()) -> list[tuple[str, float]]:
    """Each adapter path with its weight wᵢ: ``weights`` in order, one per path, or none (1 each)."""
    if weights and len(weights) != len(paths):
        raise InvalidOptionError(f"{len(weights)} `weight` values for {len(paths)} adapters; give one per adapter "
                                 "or none")
    return list(zip(paths, weights or [1.0] * len(paths)))


def left_out_notes(paths: Sequence[str], base: BaseModel) -> tuple[str, ...]:
    """What a merge into one model of a pipeline (``base``, named after its component) leaves of each pipeline
    file: its other models' LoRAs."""
    notes = []
    for p in paths:
        rest = other_components(p, base.path.name)
        if rest:
            notes.append(f"merged {p}'s {base.path.name} LoRA only; its {', '.join(rest)} LoRAs are not in this "
                         "model (merge the whole pipeline, or each with `component` NAME)")
    return tuple(notes)


# --------------------------------------------------------------------------- the job

def merge_pipeline(pipeline: PathLike, adapters: Sequence[PathLike | tuple[PathLike, float]], out: PathLike, *,
                   only: Sequence[str] | None = None, partial: bool = False, dtype: torch.dtype | None = None,
                   device: str | torch.device = "auto", precision: str | torch.dtype = torch.float32,
                   verify: bool = False, force: bool = False, allow_lossy: bool = False,
                   progress: Progress | None = None) -> PipelineMergeReport:
    """Write ``out``, a diffusers pipeline folder: ``pipeline`` with each part of the adapter files merged into
    its own model, W = cast(W0 + Σ wᵢ·ΔWᵢ) per weight (:func:`~loratools.merge.jobs.merge_model`, one model at a
    time), and every other entry of ``pipeline`` copied as it is.

    ``adapters`` are paths, or (path, weight wᵢ) pairs. Parts are assigned by :func:`plan_parts`: a part whose
    model ``pipeline`` lacks is refused unless ``partial``; ``only`` merges the models it names and leaves the
    other parts out. Untouched models are copied, never linked: a link would let a later write to the output reach
    the input (and cannot cross file systems); the copy goes through ``copy_file_range``, which a copy-on-write file
    system (btrfs, XFS) may serve by sharing blocks. With ``verify``, each model is checked as it is written. Nothing
    is at ``out`` unless every part succeeded (an interrupt included).
    """
    root = Path(pipeline)
    models = pipeline_models(root)
    if models is None:
        raise InvalidOptionError(f"{root} is not a diffusers pipeline folder (no model_index.json); merge into a "
                                 "model with plain `merge`")
    pairs = [(str(a), 1.0) if isinstance(a, str | os.PathLike) else (str(a[0]), float(a[1])) for a in adapters]
    where, left = plan_parts(models, [(p, held_models(p)) for p, _ in pairs], only=only, partial=partial)
    for x in left:
        if x.reason == NOT_IN_BASE and (root / x.part.component).is_dir():  # there, but not as safetensors
            raise InvalidOptionError(f"{root / x.part.component} holds no safetensors weights, which loratools needs "
                                     f"to merge {x.part.source}'s {x.part.component} LoRA; save that model with "
                                     "safetensors (diffusers' save_pretrained does by default)")
    bases = {comp: load_component(root, comp) for comp in where}  # read before writing: a bad model fails first
    inputs = {comp: [AdapterInput(read_adapter(pairs[i][0], base=bases[comp]), pairs[i][1], pairs[i][0])
                     for i in idx] for comp, idx in where.items()}
    for comp, ins in inputs.items():  # every part checked against its model before the first is written
        check_merge(bases[comp], ins, device=device, precision=precision)
    merged: list[ComponentMerge] = []
    with atomic_output(out, force=force, inputs=(root, *(p for p, _ in pairs))) as tmp:
        tmp.mkdir()
        copied = copy_entries(root, tmp, skip=set(where))  # first: a link out of the pipeline is refused before work
        for comp, ins in inputs.items():
            report = merge_model(bases[comp], ins, tmp / comp, dtype=dtype, device=device, precision=precision,
                                 verify=verify, progress=progress, allow_lossy=allow_lossy)
            parts = tuple(Part(i.label, comp, len(i.adapter.modules)) for i in ins)
            merged.append(ComponentMerge(comp, parts, replace(report, output=Path(out) / comp)))
    kept = [c for c in copied if c in models]
    remarks = (f"`dtype` {str(dtype).removeprefix('torch.')} applies to the merged models; {', '.join(kept)} "
               "are copied in their own dtype",) if dtype is not None and kept else ()
    return PipelineMergeReport(root, Path(out), tuple(merged), copied, tuple(left), remarks)
