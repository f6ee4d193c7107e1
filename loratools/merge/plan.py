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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..adapter import TOKENS_SUFFIX, Adapter, Module, token_rows
from ..config import ALORA_WHY, fixed_delta_refusal, undeclared_bias_note
from ..errors import InvalidOptionError, MissingModuleError, ShapeMismatchError, UnsupportedConfigError, WrongBaseError
from ..dtypes import CODE_DTYPES, DTYPE_CODES
from ..validate import finite_number, get_field, load_json
from .layout import Tie, follow_peft_layout

__all__ = ["content_sha256", "StampEntry", "stamp_entries", "AdapterInput", "TensorPlan", "METADATA_KEY",
           "FLOAT_CODES", "adapter_inputs", "plan_merge", "tie_notes", "saved_base_key", "is_base_copy",
           "resolve_precision", "out_code", "stamp", "check_bias"]

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
    cached = adapter.__dict__.get("_content_sha256")  # an Adapter is never changed: hashed once (a merge asks twice)
    if cached is not None:
        return cached
    h = hashlib.sha256()

    def put(label: str, t: Tensor | None) -> None:
        if t is None:
            h.update(f"{label}:none;".encode())
            return
        c = t.detach().to("cpu").contiguous()
        h.update(f"{label}:{str(c.dtype)}:{tuple(c.shape)};".encode())
        h.update(c.reshape(-1).view(torch.uint8).numpy().data)

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
    object.__setattr__(adapter, "_content_sha256", h.hexdigest())
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
    """The base tensor a full tensor saved in a PEFT adapter replaces.

    peft 0.21.2 saves ``modules_to_save`` as ``base_model.model.lm_head.weight`` (older files
    ``…lm_head.modules_to_save.default.weight``), an embedding LoRA's own copy of the embedding as
    ``…embed_tokens.base_layer.weight`` (``save_embedding_layers``), and trained biases (``bias="all"``/
    ``"lora_only"``) as ``…k_proj.bias`` or ``…q_proj.base_layer.bias``. All map to the base's own name.

    >>> saved_base_key("base_model.model.model.embed_tokens.base_layer.weight")
    'model.embed_tokens.weight'
    """
    key = key[len("base_model.model."):] if key.startswith("base_model.model.") else key
    key = re.sub(r"\.base_layer(?=\.(weight|bias)$)", "", key)
    return re.sub(r"\.modules_to_save\.[^.]+(?=\.)", "", key)


def is_base_copy(key: str) -> bool:
    """True for an embedding's own weight that peft saved beside its LoRA (``….base_layer.weight``):
    the base layer as peft had it, usually the base's own tensor."""
    return key.endswith(".base_layer.weight")


@dataclass(frozen=True)
class TensorPlan:
    """What happens to one tensor: replaced by a saved tensor, and/or Σ wᵢ·ΔWᵢ added.

    ``source`` names the base tensor to start from when ``key`` is new in the output (the output
    head of an untied embedding pair). ``restore`` (un-merge only): ``replace`` is the base tensor
    itself (a ``base_layer`` copy the adapter saved), so it is the un-merged tensor.
    """

    key: str
    deltas: tuple[tuple[Module, float], ...] = ()
    replace: Tensor | None = None
    source: str | None = None
    restore: bool = False
    #: peft's trainable tokens: (row indices, new rows) copied in last (``index_copy``)
    rows: tuple[Tensor, Tensor] | None = None

    def apply_rows(self, w: Tensor) -> Tensor:
        """``w`` with the trainable-token rows copied in (cast to ``w``'s dtype), or ``w`` itself without them."""
        if self.rows is None:
            return w
        idx, values = self.rows
        return w.index_copy(0, idx.to(w.device), values.to(device=w.device, dtype=w.dtype))


Shapes = Mapping[str, tuple[str, tuple[int, ...]]]


@dataclass
class _Ops:
    """What the adapters do, by base key, before the tie is resolved."""

    deltas: dict[str, list[tuple[Module, float]]] = field(default_factory=dict)
    #: (base key, file key, tensor, input) of each full tensor; ``copy``: a ``base_layer`` copy
    saved: list[tuple[bool, str, str, Tensor, AdapterInput]] = field(default_factory=list)
    #: trainable tokens: (base key, indices, rows, input)
    rows: list[tuple[str, tuple[int, ...], Tensor, AdapterInput]] = field(default_factory=list)


def plan_merge(shapes: Shapes, adapters: Sequence[AdapterInput], *, tie: Tie | None = None,
               same_as_base: Callable[[str, Tensor], bool] | None = None,
               unmerge: bool = False) -> dict[str, TensorPlan]:
    """Check every adapter against the base's ``{key: (dtype code, shape)}`` and plan each changed tensor.

    Each adapter's factors are checked for NaN/Inf once (a read adapter was
    checked when it was read). With ``tie`` (:func:`.layout.find_tie`), changes to the output head
    go to the input embedding they share, as in peft, unless a ``modules_to_save`` tensor
    replaces either: then peft unties them (``tuners_utils.py`` ``_unload_and_optionally_merge``)
    and the plan holds the head as a new tensor (``source`` = the embedding). A ``base_layer``
    copy for which ``same_as_base(key, tensor)`` is true changes nothing; on ``unmerge`` it is
    the answer (``restore``). Raises, naming the first offending module:
    :class:`WrongBaseError` when none of an adapter's modules is in the base,
    :class:`MissingModuleError`, :class:`ShapeMismatchError`, :class:`NonFiniteError`.
    """
    adapters = [dataclasses.replace(inp, adapter=follow_peft_layout(inp.adapter, shapes)) for inp in adapters]
    ops = _collect(adapters)
    untied = tie is not None and any(not copy and k in (tie.head, tie.embed) for copy, k, *_ in ops.saved)
    full = dict(shapes)
    if tie is not None and untied:
        full[tie.head] = shapes[tie.embed]

    def target(key: str) -> str:
        return tie.embed if tie is not None and not untied and key == tie.head else key

    _check_against_base(full, adapters, target)
    deltas: dict[str, list[tuple[Module, float]]] = {}
    for key, parts in ops.deltas.items():
        deltas.setdefault(target(key), []).extend(parts)
    replace: dict[str, Tensor] = {}
    restore: set[str] = set()
    for copy, key, skey, t, inp in ops.saved:
        tkey = target(key)
        _check_saved(tkey, skey, t, full)
        if copy and unmerge:
            restore.add(tkey)
        elif copy and same_as_base is not None and same_as_base(tkey, t):
            continue  # the adapter's copy of the base layer is the base's own tensor: nothing to replace
        elif inp.weight != 1.0:
            raise InvalidOptionError(f"{inp.label or 'the adapter'} replaces {tkey} (modules_to_save), "
                                     "which cannot be weighted; give it `weight` 1")
        if tkey in replace:
            raise InvalidOptionError(f"two adapters both replace {tkey} (modules_to_save); merge them one at a time")
        replace[tkey] = t
    for key, parts in deltas.items():
        _check_dora(key, parts, key in replace)
    rows = _plan_rows(ops, full, target, deltas, replace)
    keys = set(deltas) | set(replace) | set(rows) | ({tie.head} if tie is not None and untied else set())
    source = {tie.head: tie.embed} if tie is not None and untied else {}
    return {k: TensorPlan(k, tuple(deltas.get(k, ())), replace.get(k), source.get(k), k in restore, rows.get(k))
            for k in sorted(keys)}


def _plan_rows(ops: _Ops, shapes: Shapes, target: Callable[[str], str], deltas: Mapping[str, object],
               replace: Mapping[str, object]) -> dict[str, tuple[Tensor, Tensor]]:
    """Trainable-token rows by tensor, checked: in range, one set per tensor, nothing else changing it."""
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for key, idx, values, inp in ops.rows:
        key = target(key)
        if key not in shapes:
            raise MissingModuleError(key, "the base model", "the adapter's trainable tokens (trainable_token_indices) "
                                                            "replace rows of it")
        shape = tuple(shapes[key][1])
        if len(shape) != 2 or values.shape[1] != shape[1] or not all(0 <= i < shape[0] for i in idx):
            raise ShapeMismatchError(key, f"rows < {shape[0]} of width {shape[1:]}",
                                     f"indices {min(idx)}…{max(idx)} of width {tuple(values.shape[1:])}")
        if inp.weight != 1.0:
            raise InvalidOptionError(f"{inp.label or 'the adapter'} replaces rows of {key} (trainable_token_indices), "
                                     "which cannot be weighted; give it `weight` 1")
        if key in out or key in deltas or key in replace:
            raise InvalidOptionError(f"{key} gets trainable-token rows and another change from the adapters; merge "
                                     "them one at a time")
        out[key] = (torch.tensor(idx, dtype=torch.int64), values)
    return out


def _collect(adapters: Sequence[AdapterInput]) -> _Ops:
    ops = _Ops()
    for inp in adapters:
        ad = inp.adapter
        ad.check_finite()
        refused = fixed_delta_refusal(ad.config)
        if refused is not None:
            raise UnsupportedConfigError(inp.label or "the adapter", *refused, ALORA_WHY)
        if not math.isfinite(inp.weight):
            raise InvalidOptionError(f"`weight` {inp.weight} for {inp.label or 'an adapter'} is not a finite number")
        for name, m in ad.items():
            if m.rank > 0:  # a rank-0 AdaLoRA module adds exactly nothing: leave that tensor byte for byte
                ops.deltas.setdefault(weight_key(name, m), []).append((m, inp.weight))
            bias = m.bias_delta()
            if bias is not None:
                ops.deltas.setdefault(f"{name}.bias", []).append((bias, inp.weight))
        tokens = token_rows(ad)
        ops.rows.extend((f"{name}.weight", idx, rows, inp) for name, (idx, rows) in tokens.items())
        for skey, t in ad.saved.items():
            if not skey.endswith(TOKENS_SUFFIX):
                ops.saved.append((is_base_copy(skey), saved_base_key(skey), skey, t, inp))
    return ops


def _check_against_base(shapes: Shapes, adapters: Sequence[AdapterInput], target: Callable[[str], str]) -> None:
    for inp in adapters:
        keys = [weight_key(n, m) for n, m in inp.adapter.items()]
        if keys and not any(target(k) in shapes for k in keys):
            raise WrongBaseError(f"none of its {len(keys)} modules is in the base (first: {keys[0]}); "
                                 "check that BASE is the model the adapter was trained on")
        for name, m in inp.adapter.items():
            _check_module(target(weight_key(name, m)), m, shapes)
            if m.bias is not None:
                check_bias(target(f"{name}.bias"), m, shapes)


def weight_key(name: str, m: Module) -> str:
    """The base tensor a module adapts: ``<name>.weight``, or the expert parameter ``<name>`` itself."""
    return name if m.kind == "experts" else f"{name}.weight"


def check_bias(key: str, m: Module, shapes: Shapes) -> None:
    """Refuse a ``lora_bias`` whose base layer has no bias ``key`` (peft cannot merge it either) or one of
    another length: the one check, for safetensors (base keys) and GGUF models (``blk.N.attn_q.bias``)."""
    if key not in shapes:
        raise MissingModuleError(key, "the base model", "the adapter has a LoRA bias (lora_bias) but the base layer "
                                                        "has no bias, which peft cannot merge either")
    if tuple(shapes[key][1]) != (int(m.B.shape[0]),):
        raise ShapeMismatchError(key, f"the base's {tuple(shapes[key][1])}", f"({int(m.B.shape[0])},) from lora_B.bias")


def bias_notes(inputs: Sequence[AdapterInput]) -> list[str]:
    """Each adapter's ``lora_B.bias`` that its peft config does not declare: applied, and said so
    (:func:`~loratools.config.undeclared_bias_note`)."""
    out = []
    for i in inputs:
        note = undeclared_bias_note(i.adapter.config, sum(m.bias is not None for m in i.adapter.modules.values()))
        if note:
            out.append(f"{i.label}: {note}" if i.label else note)
    return out


def tie_notes(plan: Mapping[str, TensorPlan], tie: Tie | None) -> list[str]:
    """What a merge does to a tied embedding pair, said as peft says it (it warns in both cases)."""
    if tie is None:
        return []
    if tie.head in plan:
        return [f"{tie.embed} and {tie.head} were tied and the adapter replaces one of them (modules_to_save): "
                f"untied as peft's merge_and_unload does — {tie.head} is written as its own tensor and config.json "
                "gets tie_word_embeddings: false"]
    if tie.embed in plan:
        return [f"{tie.embed} is tied to {tie.head}: the adapter's change to it changes the output head too, "
                "as in peft (which warns about adapters on tied embeddings)"]
    return []


def _check_dora(key: str, parts: Sequence[tuple[Module, float]], replaced: bool) -> None:
    """DoRA merges one adapter per tensor, unweighted: W′ = diag(m/‖V‖)·V is not an update that adds or scales.

    Well defined: DoRA and LoRA adapters on disjoint tensors (each tensor gets its
    own rule). Refused: a DoRA module sharing its tensor with any other adapter
    (the result would depend on the order: peft merges them in turn), a weight
    other than 1, or a tensor that a saved full tensor replaces.
    """
    if not any(m.is_dora for m, _ in parts):
        return
    if any(m.kind == "experts" for m, _ in parts):
        raise UnsupportedConfigError(key, "use_dora", True, "peft 0.21.2 has no DoRA for MoE experts parameters "
                                     "(target_parameters, ParamWrapper), so there is no merge to match")
    if len(parts) > 1:
        raise InvalidOptionError(f"{key} is adapted by a DoRA adapter and {len(parts) - 1} other adapter(s): a DoRA "
                                 "merge rescales each row of W0 + ΔW to its magnitude, so it is not a sum with other "
                                 "updates; merge them one at a time, in the order you mean")
    if parts[0][1] != 1.0:
        raise InvalidOptionError(f"a DoRA adapter on {key} has `weight` {parts[0][1]}: its merge rescales each row of "
                                 "W0 + ΔW to the magnitude m, so a weighted DoRA update has no meaning; give it `weight` 1")
    if replaced:
        raise InvalidOptionError(f"{key} is replaced by a saved full tensor and adapted by DoRA; merge them one at a time")


def _check_module(key: str, m: Module, shapes: Shapes) -> None:
    if key not in shapes:
        hint = ("an MoE experts module whose parameter the base does not hold" if m.kind == "experts" else
                "wrong base model, or a different architecture")
        raise MissingModuleError(key, "the base model", hint)
    code, shape = shapes[key]
    want = m.weight_shape[1:] if m.kind == "experts" and m.experts == 1 and len(shape) == 2 else m.weight_shape
    if tuple(shape) != tuple(want):
        raise ShapeMismatchError(key.removesuffix(".weight"), f"the base's {tuple(shape)}",
                                 f"{tuple(m.weight_shape)} from the adapter", "wrong base model (a different size?)")
    if CODE_DTYPES.get(code) not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise InvalidOptionError(f"{key} is stored as {code}; only float tensors can be merged into")


def _check_saved(key: str, skey: str, t: Tensor, shapes: Shapes) -> None:
    if key not in shapes:
        raise MissingModuleError(key, "the base model", f"the adapter's full tensor {skey} replaces it")
    if tuple(shapes[key][1]) != tuple(t.shape):
        raise ShapeMismatchError(key, f"the base's {tuple(shapes[key][1])}", f"{tuple(t.shape)} in {skey}")
