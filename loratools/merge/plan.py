"""What a merge will do, decided before a byte is written: pure checks over shapes and adapters.

:func:`plan_merge` checks every adapter against the base's ``{key: (dtype code,
shape)}`` once and returns a :class:`TensorPlan` for each tensor that changes;
everything else here (inputs, precision, output dtype codes, the provenance
stamp) is what the jobs agree on before streaming.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..adapter import Adapter, Module
from ..errors import InvalidOptionError, MissingModuleError, ShapeMismatchError, WrongBaseError
from ..dtypes import CODE_DTYPES, DTYPE_CODES
from ..validate import finite_number, get_field, load_json

__all__ = ["content_sha256", "StampEntry", "stamp_entries", "AdapterInput", "TensorPlan", "METADATA_KEY", "FLOAT_CODES", "adapter_inputs", "plan_merge",
           "saved_base_key", "resolve_precision", "out_code", "stamp"]

#: the metadata key of a merged model (and of a record) that says which adapters went in
METADATA_KEY = "loratools.merge"
#: the stored dtypes a merge can add to (and a dtype change applies to)
FLOAT_CODES = ("F32", "F16", "BF16", "F64")


@dataclass(frozen=True)
class AdapterInput:
    """One adapter to merge, with its weight wᵢ and a label (its path) for the output's metadata."""

    adapter: Adapter
    weight: float = 1.0
    label: str = ""

    def describe(self) -> dict[str, Any]:
        return {"source": self.label, "weight": self.weight, "method": self.adapter.method,
                "fingerprint": self.adapter.fingerprint.sha256, "content": content_sha256(self.adapter)}


def content_sha256(adapter: Adapter) -> str:
    """sha256 of everything that makes an adapter's ΔW: each module's name and every field of its
    :class:`Module` (factor bytes as stored with dtype and shape, scale, kind, layout), and each full
    tensor it replaces.

    Two adapters with the same shapes but other factors or scales hash apart, so a merged model's
    stamp says which adapter went in, not only which shapes.
    """
    h = hashlib.sha256()

    def put(label: str, t: Tensor | None) -> None:
        if t is None:
            h.update(f"{label}:none;".encode())
            return
        c = t.detach().to("cpu").contiguous()
        h.update(f"{label}:{str(c.dtype)}:{tuple(c.shape)};".encode())
        h.update(memoryview(c.reshape(-1).view(torch.uint8).numpy()))

    for name in sorted(adapter.modules):
        m = adapter.modules[name]
        h.update(f"module:{name};".encode())
        for f in dataclasses.fields(m):  # every field, so one added later (a DoRA magnitude) is hashed too
            v = getattr(m, f.name)
            if isinstance(v, Tensor) or v is None:
                put(f.name, v)
            else:
                h.update(f"{f.name}={float(v).hex() if isinstance(v, float) else repr(v)};".encode())
    for key in sorted(adapter.saved):
        put(f"saved:{key}", adapter.saved[key])
    return h.hexdigest()


def adapter_inputs(adapters: Sequence[AdapterInput | tuple[Adapter, float] | Adapter]) -> list[AdapterInput]:
    """Each adapter as an :class:`AdapterInput` (weight 1 unless given)."""
    out = []
    for a in adapters:
        if isinstance(a, AdapterInput):
            out.append(a)
        elif isinstance(a, Adapter):
            out.append(AdapterInput(a))
        else:
            out.append(AdapterInput(a[0], float(a[1])))
    if not out:
        raise InvalidOptionError("`adapters` is empty; give at least one adapter")
    return out


def resolve_precision(name: str | torch.dtype) -> torch.dtype:
    p = {"float32": torch.float32, "float64": torch.float64}.get(name, name) if isinstance(name, str) else name
    if p not in (torch.float32, torch.float64):
        raise InvalidOptionError(f"`precision` {name!r} is not float32 or float64")
    return p  # type: ignore[return-value]


def out_code(code: str, dtype: torch.dtype | None) -> str:
    """The stored dtype code of a tensor stored as ``code`` in an output asked for in ``dtype`` (None: kept)."""
    return code if dtype is None or code not in FLOAT_CODES else DTYPE_CODES[dtype]


def stamp(op: str, inputs: Sequence[AdapterInput], precision: torch.dtype, device: torch.device,
          **extra: Any) -> dict[str, str]:
    """The metadata a merged (or un-merged) model carries: which adapters, weights, precision."""
    info = {"op": op, "adapters": [i.describe() for i in inputs], "precision": str(precision).replace("torch.", ""),
            "device": device.type, **extra}
    return {METADATA_KEY: json.dumps(info)}


@dataclass(frozen=True)
class StampEntry:
    """One adapter a stamp says went in: its shapes' fingerprint, content hash (None in old stamps), weight."""

    fingerprint: str
    content: str | None
    weight: float


def stamp_entries(text: str, *, where: object) -> list[StampEntry] | None:
    """The adapters a merge stamp lists, validated; None when the stamp is not a merge's (an un-merge's)."""
    info = load_json(text, where=where)
    if get_field(info, "op", str, where=where) != "merge":
        return None
    out = []
    for n, e in enumerate(get_field(info, "adapters", list, where=where)):
        at = f"{where} adapters[{n}]"
        sha = lambda v: isinstance(v, str) and len(v) == 64  # noqa: E731
        out.append(StampEntry(get_field(e, "fingerprint", str, where=at, check=sha, expected="a sha256"),
                              get_field(e, "content", str, where=at, check=sha, expected="a sha256", default=None),
                              finite_number(get_field(e, "weight", float, where=at), where=at, field="weight")))
    return out


def saved_base_key(key: str) -> str:
    """The base weight a PEFT ``modules_to_save`` tensor replaces.

    peft 0.21.2 saves ``base_model.model.lm_head.weight``; older files carry
    ``…lm_head.modules_to_save.default.weight``. Both map to ``lm_head.weight``.
    """
    key = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
    return re.sub(r"\.modules_to_save\.[^.]+(?=\.)", "", key)


@dataclass(frozen=True)
class TensorPlan:
    """What happens to one base tensor: replaced by a saved tensor, and/or Σ wᵢ·ΔWᵢ added."""

    key: str
    deltas: tuple[tuple[Module, float], ...] = ()
    replace: Tensor | None = None


def plan_merge(shapes: Mapping[str, tuple[str, tuple[int, ...]]], adapters: Sequence[AdapterInput]) -> dict[str, TensorPlan]:
    """Check every adapter against the base's ``{key: (dtype code, shape)}`` and plan each changed tensor.

    Each adapter's factors are checked for NaN/Inf once (a read adapter was
    checked when it was read). Raises, naming the first offending module:
    :class:`WrongBaseError` when none of an adapter's modules is in the base,
    :class:`MissingModuleError`, :class:`ShapeMismatchError`, :class:`NonFiniteError`.
    """
    deltas: dict[str, list[tuple[Module, float]]] = {}
    replace: dict[str, Tensor] = {}
    for inp in adapters:
        ad = follow_peft_layout(inp.adapter, shapes)
        ad.check_finite()
        if not math.isfinite(inp.weight):
            raise InvalidOptionError(f"`weight` {inp.weight} for {inp.label or 'an adapter'} is not a finite number")
        names = list(ad.modules)
        if names and not any(f"{n}.weight" in shapes for n in names):
            raise WrongBaseError(f"none of its {len(names)} modules is in the base (first: {names[0]}.weight); "
                                 "check that BASE is the model the adapter was trained on")
        for name, m in ad.items():
            key = f"{name}.weight"
            _check_module(key, m, shapes)
            if m.rank > 0:  # a rank-0 AdaLoRA module adds exactly nothing: leave that tensor byte for byte
                deltas.setdefault(key, []).append((m, inp.weight))
        for skey, t in ad.saved.items():
            key = saved_base_key(skey)
            _check_saved(key, skey, t, shapes)
            if inp.weight != 1.0:
                raise InvalidOptionError(f"{inp.label or 'the adapter'} replaces {key} (modules_to_save), "
                                         "which cannot be weighted; give it `weight` 1")
            if key in replace:
                raise InvalidOptionError(f"two adapters both replace {key} (modules_to_save); merge them one at a time")
            replace[key] = t
    for key, parts in deltas.items():
        _check_dora(key, parts, key in replace)
    return {k: TensorPlan(k, tuple(deltas.get(k, ())), replace.get(k)) for k in sorted(set(deltas) | set(replace))}


def _check_dora(key: str, parts: Sequence[tuple[Module, float]], replaced: bool) -> None:
    """DoRA merges one adapter per tensor, unweighted: W′ = diag(m/‖V‖)·V is not an update that adds or scales.

    Well defined: DoRA and LoRA adapters on disjoint tensors (each tensor gets its
    own rule). Refused: a DoRA module sharing its tensor with any other adapter
    (the result would depend on the order: peft merges them in turn), a weight
    other than 1, or a tensor that a saved full tensor replaces.
    """
    if not any(m.is_dora for m, _ in parts):
        return
    if len(parts) > 1:
        raise InvalidOptionError(f"{key} is adapted by a DoRA adapter and {len(parts) - 1} other adapter(s): a DoRA "
                                 "merge rescales each row of W0 + ΔW to its magnitude, so it is not a sum with other "
                                 "updates; merge them one at a time, in the order you mean")
    if parts[0][1] != 1.0:
        raise InvalidOptionError(f"a DoRA adapter on {key} has `weight` {parts[0][1]}: its merge rescales each row of "
                                 "W0 + ΔW to the magnitude m, so a weighted DoRA update has no meaning; give it `weight` 1")
    if replaced:
        raise InvalidOptionError(f"{key} is replaced by a saved full tensor and adapted by DoRA; merge them one at a time")


def follow_peft_layout(ad: Adapter, shapes: Mapping[str, tuple[str, tuple[int, ...]]]) -> Adapter:
    """``fan_in_fan_out`` as peft applies it: honoured for GPT-2's ``Conv1D`` (weight stored (in, out)),
    ignored for ``nn.Linear`` (weight (out, in)).

    peft 0.21.2 ``tuners/lora/layer.py`` ``dispatch_default``: for a ``torch.nn.Linear`` target it warns
    and sets ``fan_in_fan_out = False``; for ``Conv1D`` it sets it True. The adapter file does not say
    which class a module was, the base's shapes do: a non-square weight stored (out, in) is an
    ``nn.Linear``, one stored (in, out) a ``Conv1D``. A model's adapted layers are all one or the
    other, so a square weight follows the adapter's non-square ones; when every one is square, GPT-2's
    ``c_*`` names mean ``Conv1D`` and anything else is refused rather than guessed.
    """
    fifo = {n: m for n, m in ad.items() if m.fan_in_fan_out and m.kind == "linear"}
    if not fifo:
        return ad
    votes = set()
    for n, m in fifo.items():
        shape = tuple(shapes.get(f"{n}.weight", ("", ()))[1])
        out_f, in_f = int(m.B.shape[0]), int(m.A.shape[1])
        if out_f != in_f and shape in ((in_f, out_f), (out_f, in_f)):
            votes.add("conv1d" if shape == (in_f, out_f) else "linear")
    if not votes:
        leaves = {n.rsplit(".", 1)[-1] for n in fifo}
        if all(leaf.startswith("c_") for leaf in leaves):
            votes.add("conv1d")
        else:
            raise InvalidOptionError(f"the adapter sets fan_in_fan_out and every weight it adapts is square "
                                     f"(first: {next(iter(fifo))}); peft honours the flag for GPT-2's Conv1D and "
                                     "ignores it for nn.Linear, and the shapes cannot tell which this base uses")
    if votes == {"conv1d"}:
        return ad
    if votes == {"linear"}:
        warnings.warn("fan_in_fan_out is set but the base's adapted weights are nn.Linear (out, in): ignored, "
                      "as peft 0.21.2 does", stacklevel=2)
        return ad.with_modules({n: (m.with_factors(fan_in_fan_out=False) if n in fifo else m)
                                for n, m in ad.items()})
    raise InvalidOptionError("the adapter sets fan_in_fan_out, and the base stores some adapted weights as "
                             "(in, out) and others as (out, in); check that BASE is the adapter's model")


def _check_module(key: str, m: Module, shapes: Mapping[str, tuple[str, tuple[int, ...]]]) -> None:
    if key not in shapes:
        raise MissingModuleError(key, "the base model", "wrong base model, or a different architecture")
    code, shape = shapes[key]
    if tuple(shape) != tuple(m.weight_shape):
        raise ShapeMismatchError(key[:-len(".weight")], f"the base's {tuple(shape)}",
                                 f"{tuple(m.weight_shape)} from the adapter", "wrong base model (a different size?)")
    if CODE_DTYPES.get(code) not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise InvalidOptionError(f"{key} is stored as {code}; only float tensors can be merged into")


def _check_saved(key: str, skey: str, t: Tensor, shapes: Mapping[str, tuple[str, tuple[int, ...]]]) -> None:
    if key not in shapes:
        raise MissingModuleError(key, "the base model", f"the adapter's full tensor {skey} replaces it")
    if tuple(shapes[key][1]) != tuple(t.shape):
        raise ShapeMismatchError(key, f"the base's {tuple(shapes[key][1])}", f"{tuple(t.shape)} in {skey}")
