"""Every field of peft's ``LoraConfig``/``AdaLoraConfig``, and what loratools does with it.

A PEFT adapter's meaning is its tensors *and* its config: a field that changes
ΔW (an initialisation that rewrote the base, an adapter that applies only after
some tokens, replicated layers …) and that loratools does not compute would
make every merge or conversion silently wrong. So each field of peft 0.21.2's
config dataclasses (``peft/tuners/lora/config.py``, ``peft/tuners/adalora/config.py``)
is classified here, once:

- ``implemented``: its effect on ΔW is computed by the reader (``formats/peft.py``);
- ``no_effect``: it cannot change the saved adapter's ΔW (dropout, task type,
  training schedules, which modules were *selected* — the tensors say which were);
- ``refused``: a value other than the default is refused with one line naming the
  field, why, and what to do.

A field this table does not know, with a value other than "unset"
(``None``/``False``/``{}``/``[]``), is refused too: a newer peft cannot slip a
meaning past the reader. ``tests/test_peft_fields.py`` fails when the installed
peft has a field missing from this table.

>>> check_fields({"peft_type": "LORA", "r": 8, "lora_dropout": 0.1}, where="adapter_config.json")
>>> check_fields({"init_lora_weights": "pissa"}, where="cfg")
Traceback (most recent call last):
...
loratools.errors.UnsupportedConfigError: cfg: init_lora_weights = 'pissa' is not supported: ...
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import UnsupportedConfigError

__all__ = ["FieldRule", "FIELDS", "check_fields", "unset"]

Effect = Literal["implemented", "no_effect", "refused"]


@dataclass(frozen=True)
class FieldRule:
    """What one config field means to loratools.

    ``refuse(value)`` returns why this value cannot be honoured (and what to do),
    or ``None`` when the value is fine.
    """

    effect: Effect
    note: str
    refuse: Callable[[Any], str | None] = lambda value: None


def unset(value: Any) -> bool:
    """True for the values peft uses for "this feature is off"."""
    return value is None or value is False or (isinstance(value, (dict, list, tuple, str)) and len(value) == 0)


def _refuse_when_set(why: str) -> Callable[[Any], str | None]:
    return lambda value: None if unset(value) else why


def _refuse_unless(ok: Callable[[Any], bool], why: str) -> Callable[[Any], str | None]:
    return lambda value: None if ok(value) else why


#: initialisations that rewrite the base weights (peft/tuners/lora/layer.py ``update_layer``: pissa_init,
#: corda_init, olora_init, loftq_init, lora_ga_init subtract s·B₀A₀ from, or replace, ``base_layer.weight``)
_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
#: initialisations that leave the base alone (B = 0, or B·A = 0 by construction: ``reset_lora_parameters``,
#: eva (B zeroed), orthogonal_init (orthogonal row halves), mica_init (B ⟂ W's top subspace))
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")


def _init_refusal(value: Any) -> str | None:
    if value in _PLAIN_INITS or (isinstance(value, str) and value.lower() in _PLAIN_INITS):
        return None
    name = str(value).lower()
    if name.startswith(_BASE_REWRITING_INITS):
        return ("this initialisation rewrote the base weights, and the saved factors are relative to that rewritten "
                "base; convert the adapter with peft's `path_initial_model_for_weight_conversion` (save_pretrained) "
                "first, which makes it a plain LoRA of the original base")
    return "loratools does not know this initialisation; re-save the adapter with peft as plain LoRA"


_NO = "no effect on the saved weights"
_VARIANT = ("a LoRA variant whose forward pass loratools does not compute; merge it with peft "
            "(`merge_and_unload`) instead")

FIELDS: Mapping[str, FieldRule] = {
    # --- bookkeeping and training-only settings
    "task_type": FieldRule("no_effect", _NO),
    "peft_type": FieldRule("implemented", "LORA or ADALORA selects the reader"),
    "auto_mapping": FieldRule("no_effect", _NO),
    "peft_version": FieldRule("no_effect", _NO),
    "base_model_name_or_path": FieldRule("no_effect", "kept as metadata"),
    "revision": FieldRule("no_effect", "kept as metadata"),
    "inference_mode": FieldRule("no_effect", _NO),
    "lora_dropout": FieldRule("no_effect", "dropout acts only in training"),
    "runtime_config": FieldRule("no_effect", "runtime offloading only"),
    "megatron_core": FieldRule("no_effect", "only read together with megatron_config"),
    "qalora_group_size": FieldRule("no_effect", "only read together with use_qalora"),
    # --- which modules were adapted: the saved tensors say it
    "target_modules": FieldRule("no_effect", "the saved tensors name the adapted modules"),
    "exclude_modules": FieldRule("no_effect", "the saved tensors name the adapted modules"),
    "layers_to_transform": FieldRule("no_effect", "the saved tensors name the adapted modules"),
    "layers_pattern": FieldRule("no_effect", "the saved tensors name the adapted modules"),
    # --- what loratools computes
    "r": FieldRule("implemented", "rank; checked against the tensors"),
    "lora_alpha": FieldRule("implemented", "scale α/r (α/√r with use_rslora)"),
    "use_rslora": FieldRule("implemented", "scale α/√r"),
    "rank_pattern": FieldRule("implemented", "per-module rank (LoRA) or kept-triplet masks (AdaLoRA)"),
    "alpha_pattern": FieldRule("implemented", "per-module alpha"),
    "fan_in_fan_out": FieldRule("implemented", "ΔW transposed for Conv1D-style (in, out) weights"),
    "modules_to_save": FieldRule("implemented", "full tensors that replace the base's (a tied pair is untied)"),
    "lora_bias": FieldRule("implemented", "lora_B's bias: scale · bias added to the base layer's bias"),
    "bias": FieldRule("implemented", "trained biases are saved as full tensors that replace the base's"),
    "trainable_token_indices": FieldRule("implemented", "rows of an embedding replaced by the saved rows"),
    "target_parameters": FieldRule("implemented", "LoRA per expert of MoE expert tensors, placed on the base's "
                                                  "tensors by shape (merge/experts.py)"),
    "init_lora_weights": FieldRule("implemented", "plain initialisations need nothing; base-rewriting ones refused",
                                   _init_refusal),
    # --- refused until loratools computes them
    "use_dora": FieldRule("implemented", "DoRA: each module's lora_magnitude_vector m, W′ = diag(m/‖W0 + s·BA‖)·(W0 + "
                                         "s·BA) (loratools.dora)"),
    "alora_invocation_tokens": FieldRule("implemented", "activated LoRA: kept by the peft and loratools formats; "
                                                        "`export --for llama.cpp` writes it as GGUF metadata "
                                                        "(adapter.alora.invocation_tokens); merge, kohya and "
                                                        "`convert --to gguf` refuse it (config.ALORA_WHY)"),
    "layer_replication": FieldRule("refused", "replicated layers", _refuse_when_set(
        "the adapter was trained on a model whose layers peft replicated, which loratools does not rebuild; "
        "merge it with peft")),
    "megatron_config": FieldRule("refused", "Megatron parallel layers", _refuse_when_set(
        "Megatron tensor-parallel LoRA layers are not read by loratools; gather them with peft first")),
    "loftq_config": FieldRule("refused", "LoftQ", _refuse_when_set(
        "LoftQ factors are relative to a quantized base; merge them with peft")),
    "eva_config": FieldRule("no_effect", "EVA only initialises A (B starts at 0); the base is unchanged"),
    "corda_config": FieldRule("refused", "CorDA", _refuse_when_set(
        "CorDA rewrote the base weights at initialisation; convert the adapter with peft's "
        "`path_initial_model_for_weight_conversion` first")),
    "lora_ga_config": FieldRule("refused", "LoRA-GA", _refuse_when_set(
        "LoRA-GA rewrote the base weights at initialisation; convert the adapter with peft's "
        "`path_initial_model_for_weight_conversion` first")),
    "use_qalora": FieldRule("refused", "QA-LoRA", _refuse_when_set(_VARIANT)),
    "use_bdlora": FieldRule("refused", "BD-LoRA", _refuse_when_set(_VARIANT)),
    "velora_config": FieldRule("refused", "VeLoRA", _refuse_when_set(_VARIANT)),
    "monteclora_config": FieldRule("refused", "MonteCLoRA", _refuse_when_set(_VARIANT)),
    "kasa_config": FieldRule("refused", "KaSA", _refuse_when_set(_VARIANT)),
    "arrow_config": FieldRule("refused", "Arrow routing", _refuse_when_set(_VARIANT)),
    "ensure_weight_tying": FieldRule("no_effect", "keeps tied modules_to_save tied while training; the saved "
                                                  "tensors carry the result"),
    # --- AdaLoRA (peft/tuners/adalora/config.py)
    "init_r": FieldRule("implemented", "AdaLoRA scale α/init_r"),
    "target_r": FieldRule("no_effect", "rank budget while training"),
    "tinit": FieldRule("no_effect", "schedule while training"),
    "tfinal": FieldRule("no_effect", "schedule while training"),
    "deltaT": FieldRule("no_effect", "schedule while training"),
    "beta1": FieldRule("no_effect", "importance smoothing while training"),
    "beta2": FieldRule("no_effect", "importance smoothing while training"),
    "orth_reg_weight": FieldRule("no_effect", "regulariser while training"),
    "total_step": FieldRule("no_effect", "schedule while training"),
}


def check_fields(raw: Mapping[str, Any], *, where: str, fields: Mapping[str, FieldRule] = FIELDS) -> None:
    """Raise :class:`UnsupportedConfigError` for the first field whose value loratools cannot honour.

    ``where`` names the config file in the message.
    """
    for name, value in raw.items():
        rule = fields.get(name)
        if rule is None:
            if unset(value):
                continue
            why = ("a field loratools does not know (from a newer peft?) and whose meaning it therefore cannot "
                   "compute; re-save the adapter without it, or merge it with peft")
        else:
            why = rule.refuse(value)  # type: ignore[assignment]
            if why is None:
                continue
        raise UnsupportedConfigError(where, name, value, why)
