"""LoRA on mixture-of-experts parameters (peft's ``target_parameters``) placed on a base model's tensors.

peft 0.21.2 (``lora/layer.py`` ``ParamWrapper``) adapts a 3-D expert parameter (n experts) with one
``lora_A`` (r·n, in) and ``lora_B`` (out, r·n); expert e's update is ``s·B_e A_e`` (see
:class:`~loratools.adapter.Module`, kind ``experts``). Its file names the *module* only, so which
parameter a pair adapts, and how the base stores it, is decided here against the base's tensors:

- a 3-D tensor ``<module>.<parameter>`` of shape (n, out, in), or (n, in, out) for transformers'
  ``is_transposed`` experts (gpt-oss): one ``experts`` module on that tensor;
- per-expert 2-D weights, as transformers 5.23 saves fused experts (``conversion_mapping.py``:
  ``qwen2_moe`` and the models mapped to it, ``<module>.<e>.gate_proj``/``up_proj``/``down_proj``;
  ``mixtral``, ``<…>.block_sparse_moe.experts.<e>.w1``/``w3``/``w2``): one ``linear`` module per expert
  and weight, ``gate_up_proj``'s rows split between gate and up in that order (``Concatenate(dim=1)``).

Anything else is refused by name rather than guessed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..adapter import Adapter, Module
from ..config import experts_targets
from ..errors import InvalidOptionError, MissingModuleError

__all__ = ["resolve_experts", "TRANSPOSED_EXPERTS"]

Shapes = Mapping[str, tuple[str, tuple[int, ...]]]

#: transformers 5.23 model types whose expert tensors are stored (n, in, out)
#: (``@use_experts_implementation(is_transposed=True)``: gpt_oss, aria, openai_privacy_filter)
TRANSPOSED_EXPERTS = frozenset({"gpt_oss", "aria", "aria_text", "openai_privacy_filter"})
#: fused parameter → the per-expert weights whose rows it concatenates, by naming family
_PER_EXPERT: dict[str, tuple[tuple[str, ...], ...]] = {
    "gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")),
    "down_proj": (("down_proj",), ("w2",)),
}


def resolve_experts(adapter: Adapter, shapes: Shapes, hparams: Mapping[str, Any] | None = None) -> Adapter:
    """``adapter`` with every ``experts`` module placed on the base's tensors (see the module docstring).

    ``shapes`` is the base's ``{key: (dtype code, shape)}``; ``hparams`` its config.json (its
    ``model_type`` tells the orientation of square expert tensors). Raises :class:`MissingModuleError`
    when no base tensor fits, :class:`InvalidOptionError` when several do.
    """
    if not any(m.kind == "experts" for m in adapter.modules.values()):
        return adapter
    transposed = str((hparams or {}).get("model_type", "")) in TRANSPOSED_EXPERTS
    targets = adapter.config.extra.get("target_parameters")
    out = {n: m for n, m in adapter.items() if m.kind != "experts"}
    placed: dict[str, str] = {}
    for name, m in adapter.items():
        if m.kind != "experts":
            continue
        if name in shapes:  # placed already (a resolved adapter, given again)
            out[name] = m
            continue
        path = name.replace(".base_layer", "")
        params = sorted({t.rpartition(".")[2] for t in experts_targets(name, targets)})
        fits = {p: f for p in params if (f := _fit(f"{path}.{p}", p, m, shapes, transposed)) is not None}
        if not fits:
            raise MissingModuleError(f"{path}.{'|'.join(params)}", "the base model",
                                     f"target_parameters: no tensor there fits {m.experts} expert(s) of "
                                     f"{m.matrix_shape}; loratools maps 3-D expert tensors and transformers' "
                                     "per-expert qwen2_moe/mixtral weights")
        if len(fits) > 1:
            raise InvalidOptionError(f"{name} fits {' and '.join(sorted(fits))} alike; peft's file does not say which "
                                     "parameter it adapts, so loratools cannot merge it")
        param, modules = next(iter(fits.items()))
        if f"{path}.{param}" in placed:
            raise InvalidOptionError(f"{name} and {placed[f'{path}.{param}']} both fit {path}.{param}; peft's file "
                                     "does not say which parameter each adapts")
        placed[f"{path}.{param}"] = name
        out.update(modules)
    return adapter.with_modules(out)


def _fit(key: str, param: str, m: Module, shapes: Shapes, transposed: bool) -> dict[str, Module] | None:
    """The modules that put ``m`` on ``key`` (a 3-D tensor) or on its per-expert weights, or None."""
    n, (out_f, in_f) = m.experts, m.matrix_shape
    if key in shapes:
        shape = tuple(shapes[key][1])
        plain, swapped = shape == (n, out_f, in_f), shape == (n, in_f, out_f)
        if plain and swapped:
            plain, swapped = not transposed, transposed
        if plain or swapped:
            return {key: replace(m, fan_in_fan_out=swapped)}
        if n == 1 and shape == (out_f, in_f):  # a 2-D parameter: peft's ParamWrapper with one "expert"
            return {key: m}
        return None
    path = key.rpartition(".")[0]
    for where in dict.fromkeys((path, path.replace(".mlp.", ".block_sparse_moe."))):
        for subs in _PER_EXPERT.get(param, ()):
            found = _per_expert(where, subs, m, shapes)
            if found is not None:
                return found
    return None


def _per_expert(path: str, subs: tuple[str, ...], m: Module, shapes: Shapes) -> dict[str, Module] | None:
    """One linear module per expert and weight ``<path>.<e>.<sub>``, ``B``'s rows split among ``subs``."""
    rows = []
    for sub in subs:
        shape = shapes.get(f"{path}.0.{sub}.weight", (None, ()))[1]
        if len(shape) != 2 or shape[1] != m.matrix_shape[1]:
            return None
        rows.append(int(shape[0]))
    if sum(rows) != m.matrix_shape[0]:
        return None
    modules: dict[str, Module] = {}
    for e in range(m.experts):
        one, start = m.expert(e), 0
        for sub, count in zip(subs, rows):
            key = f"{path}.{e}.{sub}.weight"
            if tuple(shapes.get(key, (None, ()))[1]) != (count, m.matrix_shape[1]):
                return None
            modules[key[: -len(".weight")]] = replace(one, B=one.B[start:start + count])
            start += count
    return modules
