"""Adapter-level configuration and the scaling rules.

The per-module facts (rank, alpha, scale) live on :class:`loratools.adapter.Module`;
this is what holds for the whole adapter. ``extra`` keeps every field of a PEFT
``adapter_config.json`` that loratools does not interpret, so rewriting a file
never loses them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, TypeVar

from .errors import InvalidOptionError

__all__ = ["AdapterConfig", "Method", "lora_scale", "alpha_for_scale", "adalora_scale", "pattern_value",
           "target_matches", "experts_targets", "stores_in_out", "fixed_delta_refusal", "undeclared_bias_note", "ALORA_WHY", "FAN_IN_FAN_OUT_MODELS", "ADALORA_EPS",
           "hub_model_id"]

Method = Literal["lora", "adalora"]

#: PEFT divides AdaLoRA's update by ``ranknum + 1e-5``; we do the same so that
#: our ΔW equals peft's to the last bit that float32 keeps.
ADALORA_EPS = 1e-5

T = TypeVar("T")


def lora_scale(alpha: float, r: int, *, rslora: bool = False) -> float:
    """LoRA's multiplier of ``B @ A``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA.

    >>> lora_scale(16, 8), lora_scale(16, 4, rslora=True)
    (2.0, 8.0)
    """
    if r <= 0:
        raise InvalidOptionError(f"a LoRA rank `r` must be ≥ 1, got {r}")
    return alpha / math.sqrt(r) if rslora else alpha / r


def alpha_for_scale(scale: float, r: int, *, rslora: bool = False, keep: float | None = None) -> float:
    """The alpha whose :func:`lora_scale` at rank ``r`` is ``scale``: ``scale · r``, or ``scale · √r`` with rsLoRA.

    How a scale that the file format cannot state directly (AdaLoRA's, rsLoRA's in a format
    without rsLoRA, a per-module one) is carried by alpha. ``keep`` is the module's own alpha:
    it is returned as it is when it already gives exactly ``scale``, so rewriting a file keeps
    its alpha bit for bit.

    >>> alpha_for_scale(2.0, 8), alpha_for_scale(2.0, 4, rslora=True), alpha_for_scale(2.0, 8, keep=16.0)
    (16.0, 4.0, 16.0)
    """
    if keep is not None and r > 0 and lora_scale(keep, r, rslora=rslora) == scale:
        return keep
    return scale * math.sqrt(r) if rslora else scale * r


def adalora_scale(alpha: float, init_r: int) -> float:
    """AdaLoRA's multiplier of ``B @ (A * E)``: ``alpha / (init_r + 1e-5)``.

    PEFT keeps ``ranknum = init_r`` even after pruning and after loading a
    truncated file, so the scale does not depend on the rank a module kept.
    """
    return alpha / (init_r + ADALORA_EPS)


def pattern_value(name: str, patterns: Mapping[str, T], default: T) -> T:
    """PEFT's lookup of ``rank_pattern``/``alpha_pattern``: the first key ``K``
    (in dict order) for which ``(.*\\.)?K$`` matches the module name wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def target_matches(name: str, targets: str | Iterable[str]) -> bool:
    """PEFT's ``target_modules`` rule: a string is a regular expression the whole module
    name must match; a list matches a name equal to an entry or ending in ``"." + entry``.

    >>> target_matches("model.layers.0.self_attn.q_proj", ["q_proj"]), target_matches("x.xq_proj", ["q_proj"])
    (True, False)
    """
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def experts_targets(name: str, target_parameters: Any) -> list[str]:
    """The ``target_parameters`` entries that may be the parameter a LoRA module named ``name`` adapts.

    peft 0.21.2 wraps each targeted parameter in a ``ParamWrapper``; several on one module nest, and
    the file names them by module only (``…experts.lora_A.weight``, ``…experts.base_layer.lora_A.weight``),
    in the order of the module's own parameters (``tuners_utils.py`` ``_inject_parameters``), which only
    the base model knows: :func:`loratools.merge.experts.resolve_experts` tells them apart by shape.

    >>> experts_targets("model.layers.0.mlp.experts.base_layer", ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    ['mlp.experts.gate_up_proj', 'mlp.experts.down_proj']
    """
    path = re.sub(r"(\.base_layer)+$", "", name)
    entries = [str(t) for t in (target_parameters or [])]
    return [t for t in entries if path == t.rpartition(".")[0] or path.endswith("." + t.rpartition(".")[0])]


#: why an activated LoRA (peft's ``alora_invocation_tokens``) has no ΔW of its own
ALORA_WHY = ("an activated LoRA applies only after its invocation tokens, so it has no fixed ΔW to merge or to "
             "write where only ΔW counts (peft refuses to merge it too); keep it as a peft or loratools file and "
             "serve it with a runtime that supports aLoRA")


def fixed_delta_refusal(config: AdapterConfig) -> tuple[str, Any] | None:
    """``(field, value)`` of a config whose adapter does not add one fixed ΔW (aLoRA), else None: merging it,
    or writing it in a format that holds only ΔW (kohya, GGUF), would be silently wrong."""
    tokens = config.extra.get("alora_invocation_tokens")
    return ("alora_invocation_tokens", tokens) if tokens else None


def undeclared_bias_note(config: AdapterConfig, biased: int) -> str | None:
    """What to say of a peft adapter whose file holds ``lora_B.bias`` on ``biased`` modules while its
    adapter_config.json does not set ``lora_bias`` (mergekit 0.1.5 writes them so): peft 0.21.2 builds ``lora_B``
    without a bias and drops those tensors when it loads the file, silently; loratools applies them, as the file
    holds them. None when there is nothing to say (no such module, ``lora_bias`` set, not a peft config)."""
    if not biased or "peft_type" not in config.extra or config.extra.get("lora_bias"):
        return None
    return (f"{biased} module(s) hold lora_B.bias but adapter_config.json does not set lora_bias: loratools applies "
            "them (s·b added to the layer's bias); peft 0.21.2 drops them when it loads the adapter")


#: transformers model types whose projections are ``Conv1D`` layers storing their weight (in, out) (GPT-2 style)
FAN_IN_FAN_OUT_MODELS = frozenset({"gpt2", "gpt_bigcode", "openai-gpt"})


def stores_in_out(hparams: Mapping[str, Any] | None) -> bool:
    """True when a model's config.json says its projections store weights (in, out) (GPT-2's ``Conv1D``).

    >>> stores_in_out({"model_type": "gpt2"}), stores_in_out({"model_type": "llama"}), stores_in_out(None)
    (True, False, False)
    """
    return str((hparams or {}).get("model_type", "")) in FAN_IN_FAN_OUT_MODELS


def _frozen(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class AdapterConfig:
    """What holds for the whole adapter.

    ``method`` is ``"lora"`` or ``"adalora"``; ``use_rslora`` selects LoRA's
    ``alpha/sqrt(r)`` rule; ``init_r``/``target_r`` are AdaLoRA's budget;
    ``base_model`` is the base model's name or path when known; ``extra`` holds
    the remaining PEFT config fields, kept verbatim.
    """

    method: Method = "lora"
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    base_model: str | None = None
    task_type: str | None = None
    init_r: int | None = None
    target_r: int | None = None
    target_modules: tuple[str, ...] | str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in ("lora", "adalora"):
            raise InvalidOptionError(f"`method` must be 'lora' or 'adalora', got {self.method!r}")
        if self.method == "adalora" and (self.init_r is None or self.init_r <= 0):
            raise InvalidOptionError(f"an AdaLoRA config needs `init_r` ≥ 1, got {self.init_r}")
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        object.__setattr__(self, "extra", _frozen(self.extra))


# A Hub model id: "namespace/name" of letters, digits, "-", "_", "." (no "--", no ".."). A bare "name" is
# refused: the Hub's legacy un-namespaced ids redirect to namespaced ones (gpt2 → openai-community/gpt2),
# and a bare word is far more often a local folder typed on the command line (`base`).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def hub_model_id(name: str | None) -> str | None:
    """``name`` if it can be a Hub model id ``namespace/name``, else None (a local path such as
    ``/data/llama``, ``./base`` or a bare folder name ``base``).

    >>> hub_model_id("HuggingFaceTB/SmolLM2-135M"), hub_model_id("base"), hub_model_id("/data/llama")
    ('HuggingFaceTB/SmolLM2-135M', None, None)
    """
    if not name or name.startswith((".", "/", "~")) or "\\" in name or "--" in name or ".." in name:
        return None
    return name if _HUB_ID.match(name) and not name.endswith(".") else None
