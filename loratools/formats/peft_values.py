"""The values of an ``adapter_config.json`` that loratools computes with, checked for type and range.

:mod:`.peft_fields` decides which fields loratools understands; this module
checks that the ones it reads hold what peft 0.21.2's ``LoraConfig``/
``AdaLoraConfig`` declare (``r: int``, ``lora_alpha: int``, ``rank_pattern:
dict``, regular expressions as pattern keys …), so ``r: "eight"`` or
``lora_alpha: null`` is one line naming the file, the field, the value and what
was expected, never a traceback or a silent default.
"""

from __future__ import annotations

import math
import re
from typing import Any

from ..errors import InvalidFieldError
from ..validate import get_field

__all__ = ["check_peft_values"]


def _regex(key: Any) -> bool:
    try:
        re.compile(rf"(.*\.)?({key})$")
    except (re.error, TypeError, RecursionError, OverflowError):
        return False
    return isinstance(key, str)


def _finite(v: Any) -> bool:
    return math.isfinite(float(v))


def _pattern(raw: dict[str, Any], field: str, kind: type, where: str) -> None:
    """A ``rank_pattern``/``alpha_pattern``: regular-expression keys, values of ``kind`` (AdaLoRA's
    ``rank_pattern`` holds each module's mask, a list of booleans, in peft 0.21.2 ``tuners/adalora``)."""
    table = get_field(raw, field, dict, where=where, default={}, nullable=True) or {}
    for key in table:
        if not _regex(key):
            raise InvalidFieldError(where, f"{field} key", key, "a valid regular expression")
        if kind is list:
            get_field(table, key, list, where=where, check=lambda v: all(isinstance(x, bool) for x in v),
                      expected="a list of true/false (AdaLoRA's mask)")
        else:
            get_field(table, key, kind, where=where, check=lambda v: _finite(v) and v >= (1 if kind is int else -math.inf),
                      expected="an integer ≥ 1" if kind is int else "a finite number")


def _ints(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)


def _strings(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _token_indices(v: Any) -> bool:
    """peft 0.21.2 ``trainable_token_indices``: a list of token ids, or ``{module name: list of token ids}``."""
    return _ints(v) or (isinstance(v, dict) and all(isinstance(k, str) and _ints(x) for k, x in v.items()))


def _features(raw: dict[str, Any], where: str) -> None:
    """The fields whose meaning the reader computes beyond rank and scale (see :mod:`.peft_fields`)."""
    for flag in ("use_dora", "lora_bias"):
        get_field(raw, flag, bool, where=where, default=False, nullable=True)
    get_field(raw, "bias", str, where=where, default="none", nullable=True,
              check=lambda v: v in ("none", "all", "lora_only"), expected="none, all or lora_only")
    for name in ("modules_to_save", "target_parameters"):
        get_field(raw, name, list, where=where, default=None, nullable=True, check=_strings,
                  expected="a list of names")
    get_field(raw, "alora_invocation_tokens", list, where=where, default=None, nullable=True, check=_ints,
              expected="a list of token ids")
    get_field(raw, "trainable_token_indices", (list, dict), where=where, default=None, nullable=True,
              check=_token_indices, expected="a list of token ids, or {module: list of token ids}")


def check_peft_values(raw: dict[str, Any], *, where: str, adalora: bool) -> None:
    """Raise :class:`InvalidFieldError` for the first field loratools reads whose value has the wrong type or range."""
    get_field(raw, "r", int, where=where, default=8, check=lambda v: v >= 1, expected="an integer ≥ 1")
    get_field(raw, "lora_alpha", float, where=where, default=8, check=_finite, expected="a finite number")
    for flag in ("use_rslora", "fan_in_fan_out"):
        get_field(raw, flag, bool, where=where, default=False)
    for name in ("base_model_name_or_path", "task_type"):
        get_field(raw, name, str, where=where, default=None, nullable=True)
    targets = get_field(raw, "target_modules", (str, list), where=where, default=None, nullable=True,
                        check=lambda t: _regex(t) if isinstance(t, str) else all(isinstance(x, str) for x in t),
                        expected="a regular expression or a list of module names")
    del targets
    _features(raw, where)
    _pattern(raw, "rank_pattern", list if adalora else int, where)
    _pattern(raw, "alpha_pattern", float, where)
    if adalora:
        init_r = get_field(raw, "init_r", int, where=where, check=lambda v: v >= 1, expected="an integer ≥ 1")
        get_field(raw, "target_r", int, where=where, default=None, nullable=True,
                  check=lambda v: 1 <= v <= init_r, expected=f"an integer between 1 and init_r ({init_r})")
