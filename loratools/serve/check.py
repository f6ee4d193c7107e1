"""What a serving runtime will do with an adapter: the checks behind ``loratools check``.

Pure functions over an :class:`Adapter` (and, for PEFT files, the raw
``adapter_config.json`` it was read from, kept in ``adapter.config.extra``).
:func:`check_adapter` finds, for every rule of a runtime's table
(:mod:`loratools.serve.runtimes`), the modules that break it. :func:`runtime_view`
is the runtime's own arithmetic applied to a file's factors — the scale it
computes for each module — so that ``export`` can state the error the runtime
will see.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..adapter import Adapter, Module, as_lora
from ..config import lora_scale
from ..errors import InvalidOptionError
from ..formats import BaseModel, check_base_shapes, read_with_base
from ..formats.gguf import GGUFBase, gguf_base as gguf_of, gguf_unsupported
from ..formats.peft import PREFIX
from .runtimes import Rule, Runtime, get_runtime, is_vision_module, version_tuple

__all__ = ["Finding", "CheckReport", "FullTensor", "check_file", "check_adapter", "refuse_dora_for", "read_source",
           "full_tensors", "runtime_view", "global_scale", "smallest_max_lora_rank", "check_max_lora_rank",
           "BASE_FIELDS", "refused_features", "missing_stacked", "stacked_zeros", "without_magnitudes",
           "lora_ga_unconverted", "ALORA_FIELD", "declared_ranks"]

#: raw PEFT config fields that make an adapter mean more than a low-rank ΔW (vLLM refuses them)
BASE_FIELDS = {"lora_bias": "LoRA bias", "alora_invocation_tokens": "activated LoRA (aLoRA)",
               "layer_replication": "layer replication", "use_bdlora": "block-diagonal LoRA", "use_qalora": "QA-LoRA"}
_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")  # vLLM accepts gaussian, eva, orthogonal, mica, lora_ga
#: the label :func:`refused_features` gives an activated LoRA (a runtime with ``activated_lora`` keeps it)
ALORA_FIELD = BASE_FIELDS["alora_invocation_tokens"]


@dataclass(frozen=True)
class FullTensor:
    """A tensor stored whole in the adapter file: ``kind`` is ``weight`` (replaces the base weight of
    ``module``: modules_to_save), ``base-copy`` (PEFT's copy of the base embedding, ``.base_layer.weight``),
    ``bias`` or ``other``."""

    key: str
    module: str
    kind: str


def full_tensors(adapter: Adapter) -> list[FullTensor]:
    """Classify ``adapter.saved`` by key: ``…<m>.weight`` and peft < 0.13's ``…<m>.modules_to_save.default.weight``
    replace ``<m>``'s weight; ``…<m>.base_layer.weight`` is peft's copy of the base embedding."""
    out = []
    for key in adapter.saved:
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if name.endswith(".base_layer.weight"):
            out.append(FullTensor(key, name[: -len(".base_layer.weight")], "base-copy"))
        elif name.endswith(".bias"):
            out.append(FullTensor(key, name[: -len(".bias")], "bias"))
        elif name.endswith(".weight"):
            out.append(FullTensor(key, name[: -len(".weight")].replace(".modules_to_save.default", ""), "weight"))
        else:
            out.append(FullTensor(key, name, "other"))
    return out


def loaded_whole(t: FullTensor, runtime: Runtime) -> bool:
    """True when ``runtime`` loads the full tensor ``t`` as it is (vLLM: a classifier's ``score.weight``)."""
    return t.kind == "weight" and t.module.rsplit(".", 1)[-1] in runtime.whole_heads


@dataclass(frozen=True)
class Finding:
    """A rule the adapter breaks: the modules (or tensor keys) concerned and a detail.
    ``counts`` is False for a rule that holds only in versions older than the one asked about."""

    rule: Rule
    modules: tuple[str, ...]
    detail: str
    counts: bool = True


@dataclass(frozen=True)
class CheckReport:
    runtime: Runtime
    findings: tuple[Finding, ...]
    notes: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True when the runtime loads the adapter and computes the same ΔW for every module."""
        return not any(f.counts for f in self.findings)

    def to_json(self) -> dict[str, Any]:
        return {"runtime": self.runtime.name, "version_read": self.runtime.version, "ok": self.ok,
                "findings": [{"rule": f.rule.id, "counts": f.counts, "modules": list(f.modules), "detail": f.detail,
                              "why": f.rule.why, "export_does": f.rule.fix, "source": f.rule.source,
                              "until": f.rule.until} for f in self.findings],
                "notes": list(self.notes)}


def refuse_dora_for(adapter: Adapter, runtime: Runtime, why: str) -> None:
    """Refuse a DoRA adapter that export cannot fold (``why``: what is missing), naming export's own
    parameters (an :class:`InvalidOptionError`, so that the CLI writes them as this command's flags)."""
    if adapter.is_dora:
        raise InvalidOptionError(f"this is a DoRA adapter, whose update diag(m/‖W0 + s·BA‖)·(W0 + s·BA) − W0 is not "
                                 f"low-rank, and {runtime.title} has no DoRA: export folds it into plain LoRA "
                                 f"with the base's weights, {why}")


def without_magnitudes(adapter: Adapter) -> Adapter:
    """The adapter with DoRA's magnitude vectors left out: its plain LoRA factors (not DoRA's update; for the
    rules that read ranks and names only)."""
    if not adapter.is_dora:
        return adapter
    return adapter.with_modules({n: m.with_factors(magnitude=None) if m.is_dora else m for n, m in adapter.items()})


def lora_ga_unconverted(raw: Mapping[str, Any]) -> bool:
    """True for a PEFT config of a LoRA-GA adapter saved without peft's weight conversion
    (``init_lora_weights: "lora_ga"``): its factors are relative to a base that peft rewrote."""
    init = raw.get("init_lora_weights")
    return isinstance(init, str) and init.lower().startswith("lora_ga")


def smallest_max_lora_rank(rank: int, runtime: Runtime) -> int | None:
    """The smallest allowed ``--max-lora-rank`` that holds ``rank`` (None when none does)."""
    if runtime.max_lora_ranks is None:
        return rank
    return next((r for r in runtime.max_lora_ranks if r >= rank), None)


def check_max_lora_rank(max_lora_rank: int | None, runtime: Runtime) -> None:
    if max_lora_rank is None:
        return
    if isinstance(max_lora_rank, bool) or not isinstance(max_lora_rank, int) or max_lora_rank < 1:
        raise InvalidOptionError(f"`max_lora_rank` must be an integer ≥ 1, got {max_lora_rank}")
    if runtime.max_lora_ranks is not None and max_lora_rank not in runtime.max_lora_ranks:
        raise InvalidOptionError(f"`max_lora_rank` must be one of {', '.join(map(str, runtime.max_lora_ranks))} "
                                 f"for {runtime.title}, got {max_lora_rank}")


def global_scale(raw: Mapping[str, Any], runtime: Runtime) -> float:
    """The one scale a runtime that reads one scale (``runtime.scales == "one"``: vLLM ≤ 0.31, SGLang) gives every
    module of a PEFT config: ``lora_alpha / r``, or ``lora_alpha / √r`` with use_rslora where the runtime reads it
    (``runtime.reads_rslora``: vLLM; SGLang ignores it). ``{"r": 16, "lora_alpha": 32}`` → 2.0."""
    r = int(raw.get("r", 8))
    alpha = float(raw.get("lora_alpha", r))
    return lora_scale(alpha, r, rslora=bool(raw.get("use_rslora")) and runtime.reads_rslora)


def runtime_view(adapter: Adapter, raw: Mapping[str, Any] | None, runtime: Runtime) -> dict[str, Adapter]:
    """The adapter as each reading of ``runtime`` computes it, by label.

    ``adapter`` is a file read back by loratools (PEFT's meaning, which is vLLM
    0.32+'s: it reads the patterns as PEFT does; GGUF's meaning, alpha/rank per
    tensor, which is llama.cpp's). A runtime that reads one scale gives every
    module the :func:`global_scale` of ``raw``: every version of it (SGLang), or
    those up to ``runtime.one_scale_until`` (vLLM ≤ 0.31.0: two readings,
    ``"vllm > 0.31.0"`` and ``"vllm ≤ 0.31.0"``).
    """
    if runtime.scales != "one" or raw is None:
        return {runtime.name: adapter}
    g = global_scale(raw, runtime)
    flat = adapter.with_modules({n: m.with_factors(scale=g) for n, m in adapter.items()})
    until = runtime.one_scale_until
    if until is not None:
        return {f"{runtime.name} > {until}": adapter, f"{runtime.name} ≤ {until}": flat}
    return {runtime.name: flat}


# --- the detectors: one per rule id, each returning (offending modules, detail) or None ----------------------------

@dataclass(frozen=True)
class _Ctx:
    adapter: Adapter
    lora: Adapter
    runtime: Runtime
    raw: Mapping[str, Any] | None  # the PEFT config, when the source is a PEFT directory
    source_format: str | None
    max_lora_rank: int | None
    gguf_base: GGUFBase | None


Detected = tuple[Sequence[str], str] | None


_FILE_KINDS = {"peft": "a PEFT directory", "gguf": "a GGUF adapter"}


#: the fields vLLM 0.32.0's ``PEFTHelper.from_dict`` requires ("Missing required configuration fields")
_REQUIRED = ("r", "lora_alpha", "target_modules")


def _wrong_format(ctx: _Ctx) -> Detected:
    want = ctx.runtime.writes
    if ctx.source_format is None or ctx.source_format == want:
        missing = [f for f in _REQUIRED if ctx.raw is not None and ctx.runtime.strict_config and f not in ctx.raw]
        return ((), f"adapter_config.json lacks {', '.join(missing)}, which {ctx.runtime.title} requires "
                    "(loratools reads peft's defaults)") if missing else None
    return (), f"this adapter is a {ctx.source_format} file, not {_FILE_KINDS.get(want, want)}"


def _adalora(ctx: _Ctx) -> Detected:
    if ctx.adapter.method != "adalora":
        return None
    return tuple(ctx.adapter.modules), "an AdaLoRA adapter (lora_A/lora_B/lora_E keys, peft_type ADALORA)"


def _full(ctx: _Ctx) -> Detected:
    bad = [t.key for t in full_tensors(ctx.adapter)
           if t.kind != "base-copy" and not loaded_whole(t, ctx.runtime)]
    return (bad, f"{len(bad)} full tensor(s) (modules_to_save or biases)") if bad else None


def _dora(ctx: _Ctx) -> Detected:
    mods = [n for n, m in ctx.adapter.items() if m.is_dora]
    return (mods, f"{len(mods)} DoRA module(s) (lora_magnitude_vector)") if mods else None


def _lora_ga(ctx: _Ctx) -> Detected:
    if ctx.raw is None or not lora_ga_unconverted(ctx.raw):
        return None
    return (), "init_lora_weights is 'lora_ga' and the adapter was not converted"


def _alora(ctx: _Ctx) -> Detected:
    tokens = ctx.adapter.config.extra.get("alora_invocation_tokens")
    return ((), f"activated LoRA, invocation tokens {list(tokens)}") if tokens else None


def _experts(ctx: _Ctx) -> Detected:
    bad = [n for n, m in ctx.lora.items() if m.kind == "experts"]
    return (bad, "LoRA on mixture-of-experts expert tensors (peft target_parameters)") if bad else None


def refused_features(raw: Mapping[str, Any]) -> list[str]:
    """The fields of a PEFT config that make the adapter more than a low-rank ΔW on the base (vLLM refuses
    each; no plain LoRA file expresses them): lora_bias, a base-rewriting init, aLoRA, … and `bias` ≠ none."""
    out = [label for key, label in BASE_FIELDS.items() if raw.get(key)]
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_REWRITING_INITS):
        out.append(f"init_lora_weights={init!r} (the adapter is relative to a base PEFT rewrites)")
    if str(raw.get("bias", "none") or "none") != "none":
        out.append(f"bias={raw.get('bias')!r}")
    return out


def _peft_features(ctx: _Ctx) -> Detected:
    found = refused_features(ctx.raw) if ctx.raw is not None else []
    if ctx.raw is not None and ctx.runtime.strict_config and "bias" in ctx.raw and ctx.raw["bias"] is None:
        found.append(f"bias=None (not 'none': {ctx.runtime.title} refuses it)")
    return ((), "the config sets " + ", ".join(found)) if found else None


def declared_ranks(raw: Mapping[str, Any] | None, runtime: Runtime) -> dict[str, int]:
    """The ranks ``runtime`` reads from a LoRA config for its ``--max-lora-rank`` check (``runtime.config_ranks``),
    by label: ``{"r": 16, "rank_pattern": {"q_proj": 8}}`` → ``{"r": 16, "rank_pattern q_proj": 8}`` for vLLM,
    whose ``PEFTHelper.validate_legal`` (0.32.0, ``vllm/lora/peft_helper.py``) compares ``max(r,
    *rank_pattern.values())``, a pattern that matches no module included. Empty without a config."""
    if raw is None or str(raw.get("peft_type", "LORA")).upper() != "LORA":
        return {}
    out: dict[str, int] = {}
    for key in runtime.config_ranks:
        value = raw.get(key)
        items = value.items() if isinstance(value, Mapping) else [("", value)]
        out |= {f"{key} {k}".strip(): v for k, v in items if isinstance(v, int) and not isinstance(v, bool)}
    return out


def _max_rank(ctx: _Ctx) -> Detected:
    ranks = {n: m.rank for n, m in ctx.lora.items()}
    if not ranks:
        return None
    declared = {f"{k} = {r} (adapter_config.json)": r for k, r in declared_ranks(ctx.raw, ctx.runtime).items()}
    ranks |= {k: r for k, r in declared.items() if r > max(ranks.values())}
    if ctx.max_lora_rank is not None:
        over = [n for n, r in ranks.items() if r > ctx.max_lora_rank]
        if not over:
            return None
        return over, f"ranks up to {max(ranks[n] for n in over)} > --max-lora-rank {ctx.max_lora_rank}"
    top = max(ranks.values())
    if smallest_max_lora_rank(top, ctx.runtime) is None:
        largest = ctx.runtime.max_lora_ranks[-1]  # type: ignore[index]
        return [n for n, r in ranks.items() if r > largest], f"rank {top} is above the largest --max-lora-rank {largest}"
    return None


def _scales(ctx: _Ctx) -> Detected:
    mods = ctx.lora.modules
    if not mods:
        return None
    if ctx.raw is not None and ctx.adapter.method == "lora":
        g = global_scale(ctx.raw, ctx.runtime)
        bad = [n for n, m in mods.items() if not math.isclose(m.scale, g, rel_tol=1e-6)]
        return (bad, f"the global rule gives {g:g}; these modules' own scales differ") if bad else None
    common = Counter(m.scale for m in mods.values()).most_common(1)[0][0]
    bad = [n for n, m in mods.items() if not math.isclose(m.scale, common, rel_tol=1e-6)]
    return (bad, "the modules' scales differ: one global scale cannot describe them") if bad else None


def _one_alpha(ctx: _Ctx) -> Detected:
    if ctx.source_format == "gguf" or not ctx.lora.modules:
        return None
    products = Counter(m.scale * m.rank for m in ctx.lora.modules.values())
    common = products.most_common(1)[0][0]
    bad = [n for n, m in ctx.lora.items() if not math.isclose(m.scale * m.rank, common, rel_tol=1e-6)]
    return (bad, f"scale·rank differs from the most common {common:g}: alpha/rank mis-scales them") if bad else None


def _uniform_rank(ctx: _Ctx) -> Detected:
    if not ctx.lora.modules:
        return None
    if ctx.raw is not None and ctx.adapter.method == "lora":
        r = int(ctx.raw.get("r", 8))
    else:
        r = Counter(m.rank for m in ctx.lora.modules.values()).most_common(1)[0][0]
    bad = [n for n, m in ctx.lora.items() if m.rank != r]
    return (bad, f"ranks differ from r = {r}") if bad else None


def _conv(ctx: _Ctx) -> Detected:
    bad = [n for n, m in ctx.lora.items() if m.kind == "conv" and not is_vision_module(n)]
    return (bad, "convolution modules") if bad else None


def _targets(ctx: _Ctx) -> Detected:
    targets = ctx.runtime.targets
    bad = [n for n, m in ctx.lora.items() if not is_vision_module(n)
           and ((targets is not None and n.rsplit(".", 1)[-1] not in targets) or m.kind == "conv")]
    tm = ctx.raw.get("target_modules") if ctx.raw is not None else None
    detail = f"module types {ctx.runtime.title} has no LoRA layer for"
    if ctx.runtime.target_list and isinstance(tm, str) and tm not in ("all-linear", "all"):
        detail += f"; target_modules is the pattern {tm!r}, which {ctx.runtime.title} refuses"
        return bad, detail
    return (bad, detail) if bad else None


def missing_stacked(names: Sequence[str]) -> dict[str, list[str]]:
    """SGLang's stacking (q with k and v, gate with up) per parent module: the members that must be added
    (``{"model.layers.0.self_attn": ["v_proj"]}``) for the layer to load."""
    groups: dict[str, set[str]] = {}
    for n in names:
        parent, _, leaf = n.rpartition(".")
        groups.setdefault(parent, set()).add(leaf)
    out: dict[str, list[str]] = {}
    for parent, leaves in groups.items():
        need = []
        if leaves & {"q_proj", "k_proj", "v_proj"}:
            need += [x for x in ("q_proj", "v_proj") if x not in leaves]
        if "up_proj" in leaves and "gate_proj" not in leaves:
            need.append("gate_proj")
        if need:
            out[parent] = need
    return out


def _stacked(ctx: _Ctx) -> Detected:
    miss = missing_stacked([n for n in ctx.lora.modules if not is_vision_module(n)])
    names = [f"{p}.{leaf}" for p, leaves in miss.items() for leaf in leaves]
    return (names, "missing from layers that adapt their stacked siblings") if names else None


def _vision(ctx: _Ctx) -> Detected:
    bad = [n for n in ctx.adapter.modules if is_vision_module(n)]
    return (bad, "vision/audio tower or connector modules") if bad else None


def _tensor_exists(ctx: _Ctx) -> Detected:
    if ctx.gguf_base is not None and ctx.gguf_base.arch != "llama":
        arch = ctx.gguf_base.arch
        return tuple(ctx.lora.modules), f"loratools maps llama.cpp's llama architecture only, not {arch!r}"
    bad = gguf_unsupported(Adapter(ctx.lora.modules, ctx.lora.config), ctx.gguf_base)
    return (list(bad), "; ".join(dict.fromkeys(bad.values()))) if bad else None


def _ollama_import(ctx: _Ctx) -> Detected:
    if ctx.source_format in (None, "gguf"):
        return None
    return (), "a safetensors adapter would be converted by Ollama's own importer"


_DETECTORS: dict[str, Callable[[_Ctx], Detected]] = {
    "peft-directory": _wrong_format, "gguf-file": _wrong_format, "plain-lora-keys": _adalora, "full-tensors": _full,
    "peft-features": _peft_features, "max-lora-rank": _max_rank, "one-scale": _scales, "one-alpha": _one_alpha,
    "uniform-rank": _uniform_rank, "linear-modules": _conv, "target-modules": _targets,
    "stacked-qkv": _stacked, "vision-tower": _vision, "tensor-exists": _tensor_exists,
    "safetensors-import": _ollama_import, "modelfile": lambda ctx: None, "dora": _dora,
    "lora-ga-not-converted": _lora_ga, "activated-lora": _alora, "moe-experts": _experts,
}
#: rules that say how the runtime serves what the adapter is, not that it refuses it or computes another ΔW
_INFORMATIVE = frozenset({"activated-lora"})


def check_adapter(adapter: Adapter, runtime: str | Runtime, *, max_lora_rank: int | None = None,
                  source_format: str | None = None, gguf_base: GGUFBase | None = None,
                  runtime_version: str | None = None) -> CheckReport:
    """Every rule of ``runtime``'s table that ``adapter`` breaks, with the modules concerned.

    ``source_format`` is the format the adapter was read from (``peft``,
    ``gguf`` …): a runtime loads its own format only, and for a PEFT
    directory the raw config in ``adapter.config.extra`` is what vLLM and
    SGLang read. ``gguf_base`` (architecture, tied embeddings) lets the
    llama.cpp rules see the base. ``runtime_version``: rules that stopped
    holding before it are listed but do not count.
    """
    rt = get_runtime(runtime) if isinstance(runtime, str) else runtime
    check_max_lora_rank(max_lora_rank, rt)
    raw = adapter.config.extra if source_format == "peft" else None
    ctx = _Ctx(adapter, as_lora(without_magnitudes(adapter)), rt, raw, source_format, max_lora_rank, gguf_base)
    return CheckReport(rt, tuple(_findings(ctx, runtime_version)), tuple(_notes(ctx)))


def _findings(ctx: _Ctx, runtime_version: str | None) -> list[Finding]:
    findings = []
    for rule in ctx.runtime.rules:
        found = _DETECTORS[rule.id](ctx)
        if found is None:
            continue
        modules, detail = found
        counts = rule.id not in _INFORMATIVE and (rule.until is None or runtime_version is None
                                                  or version_tuple(runtime_version) <= version_tuple(rule.until))
        findings.append(Finding(rule, tuple(modules), detail, counts))
    return findings


def _notes(ctx: _Ctx) -> list[str]:
    notes = []
    copies = [t.key for t in full_tensors(ctx.adapter) if t.kind == "base-copy"]
    if copies:
        notes.append(f"{', '.join(copies)}: PEFT's copy of the base weight; the runtime does not read it (export "
                     "drops it, after checking it against `base` when given)")
    ranks = [m.rank for m in ctx.lora.modules.values()]
    declared = max(declared_ranks(ctx.raw, ctx.runtime).values(), default=0)
    if ranks and ctx.runtime.rank_flag:
        need = smallest_max_lora_rank(max(*ranks, declared), ctx.runtime)
        said = f"; adapter_config.json declares {declared}" if declared > max(ranks) else ""
        if ctx.max_lora_rank is None and need is not None:
            notes.append(f"serve with --max-lora-rank {need} (the adapter's largest rank is {max(ranks)}{said})")
        elif ctx.max_lora_rank is not None and need is not None and need < ctx.max_lora_rank:
            notes.append(f"--max-lora-rank {ctx.max_lora_rank} over-allocates: {need} holds every module "
                         f"(largest rank {max(ranks)})")
    if ctx.adapter.is_dora:
        notes.append("export folds DoRA into plain LoRA: `loratools export ADAPTER --for "
                     f"{ctx.runtime.name} --base BASE --error E -o OUT` (or --max-lora-rank) reports each module's error")
    if ctx.adapter.method == "adalora" and len(ctx.lora.modules) < len(ctx.adapter.modules):
        notes.append(f"{len(ctx.adapter.modules) - len(ctx.lora.modules)} AdaLoRA module(s) have rank 0 "
                     "(they add nothing)")
    return notes


def _weight_shape(parent: str, leaf: str, modules: Mapping[str, Module], base: BaseModel | None) -> tuple[int, int]:
    """(out, in) of ``parent.leaf``'s base weight: from the base, or from its stacked siblings."""
    name = f"{parent}.{leaf}"
    if base is not None and base.shapes and len(base.shapes.get(name, ())) == 2:
        return tuple(base.shapes[name])  # type: ignore[return-value]
    sib = {x: modules[f"{parent}.{x}"].weight_shape for x in ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj")
           if f"{parent}.{x}" in modules}
    if leaf == "v_proj" and "k_proj" in sib:
        return sib["k_proj"]  # type: ignore[return-value]
    if leaf == "gate_proj" and "up_proj" in sib:
        return sib["up_proj"]  # type: ignore[return-value]
    hp = base.hparams if base is not None else None
    hidden = next((s[1] for x, s in sib.items() if x != "o_proj"), None)
    if leaf == "q_proj" and "o_proj" in sib and hidden is not None:
        return sib["o_proj"][1], hidden
    if hp and hidden is not None and hp.get("num_attention_heads"):
        heads = int(hp["num_attention_heads"])
        head_dim = int(hp.get("head_dim") or int(hp["hidden_size"]) // heads)
        n = heads if leaf == "q_proj" else int(hp.get("num_key_value_heads") or heads)
        return n * head_dim, hidden
    raise InvalidOptionError(f"q/k/v are stacked: a (zero) LoRA on {name} is needed, and its shape is unknown: "
                             "pass `base` (a model directory with config.json)")


def stacked_zeros(modules: Mapping[str, Module], base: BaseModel | None) -> dict[str, Module]:
    """Zero modules for the q/v/gate that stacked siblings need (ΔW = 0), for a runtime that stacks them."""
    out = {}
    for parent, leaves in missing_stacked(list(modules)).items():
        like = next(m for n, m in modules.items() if n.rpartition(".")[0] == parent)
        for leaf in leaves:
            o, i = _weight_shape(parent, leaf, modules, base)
            out[f"{parent}.{leaf}"] = Module(A=torch.zeros(1, i, dtype=like.A.dtype),
                                             B=torch.zeros(o, 1, dtype=like.B.dtype), alpha=like.scale,
                                             scale=like.scale)
    return out


def read_source(src: Path, base: str | os.PathLike[str] | None,
                rt: Runtime) -> tuple[Adapter, BaseModel | None, GGUFBase | None, str]:
    """The source adapter read as ``convert`` reads it (:func:`~loratools.formats.read_with_base`), the base
    model when ``base`` is given (refused as ``convert`` refuses it where its shapes are not the adapter's:
    :func:`~loratools.formats.base.check_base_shapes`), the GGUF architecture and heads when the source is GGUF
    or the runtime maps modules to the base's GGUF tensors (from ``base``, else from what a GGUF source records),
    and the format."""
    adapter, known, fmt = read_with_base(src, base)
    if base is not None and known is not None:  # as `convert`: another model's head counts would permute q/k wrongly
        check_base_shapes(adapter, known)
    gguf_base = gguf_of(known) if known is not None and (rt.base_tensors or fmt == "gguf") else None
    return adapter, (known if base is not None else None), gguf_base, fmt


def check_file(src: str | os.PathLike[str], runtime: str, *, max_lora_rank: int | None = None,
               base: str | os.PathLike[str] | None = None, runtime_version: str | None = None) -> CheckReport:
    """:func:`check_adapter` on the adapter at ``src`` (any format; ``base`` as for ``convert``); the one call
    of ``loratools check``. A directory that ``export --for ollama`` wrote is read through its ``adapter.gguf``.

    >>> check_file("fixtures/adapters/lora", "vllm").ok  # doctest: +SKIP
    True
    """
    rt = get_runtime(runtime)
    src_p = Path(src)
    if (src_p / "Modelfile").is_file() and (src_p / "adapter.gguf").is_file():
        src_p = src_p / "adapter.gguf"
    early = _config_only(src_p, rt, max_lora_rank)
    if early is not None:
        return early
    adapter, _, gguf_base, fmt = read_source(src_p, base, rt)
    return check_adapter(adapter, rt, max_lora_rank=max_lora_rank, source_format=fmt, gguf_base=gguf_base,
                         runtime_version=runtime_version)


def _config_only(src: Path, rt: Runtime, max_lora_rank: int | None) -> CheckReport | None:
    """The report for a PEFT directory whose config alone decides (an unconverted LoRA-GA adapter, which
    loratools' reader refuses and vLLM 0.34 loads), when ``rt`` has a rule that detects it; else None."""
    cfg = src / "adapter_config.json"
    if not cfg.is_file():
        return None
    try:
        raw = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None  # the reader says what is wrong with it
    if not isinstance(raw, dict) or not lora_ga_unconverted(raw) \
            or not any(r.id == "lora-ga-not-converted" for r in rt.rules):
        return None
    check_max_lora_rank(max_lora_rank, rt)
    ctx = _Ctx(Adapter({}), Adapter({}), rt, raw, "peft", max_lora_rank, None)
    note = "the factors were not read: loratools refuses an unconverted LoRA-GA adapter"
    return CheckReport(rt, tuple(_findings(ctx, None)), (note,))
