"""loratools' own single-file format: one self-describing ``.safetensors``.

Tensors: ``<module>.lora_A``, ``<module>.lora_B`` and, for AdaLoRA,
``<module>.lora_E``; peft's ``lora_bias`` as ``<module>.lora_B.bias``; for DoRA ``<module>.lora_magnitude_vector``
((out,), every kind); full replacement tensors as ``saved::<key>``.
``__metadata__`` (all strings, as safetensors requires):

- ``format`` = ``"loratools"``, ``format_version`` = ``"1"``;
- ``config``: the :class:`~loratools.config.AdapterConfig` as JSON;
- ``modules``: ``{module: {alpha, scale, kind, fan_in_fan_out}}`` as JSON (``experts`` for an MoE module;
  ``dora_eps``, DoRA's ε in ``m / (‖V‖ + ε)``, when not 0: LyCORIS's DoRA);
- ``fingerprint``: the base fingerprint ``{shapes, sha256}`` as JSON.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import cast

from torch import Tensor

from ..adapter import Adapter, Fingerprint, Kind, Module
from ..config import AdapterConfig
from ..errors import CorruptFileError, InvalidFieldError, MissingModuleError, NotAnAdapterError, WrongBaseError
from ..io import load_safetensors, save_safetensors
from ..validate import finite_number, get_field, load_json
from .base import Format, peek_safetensors, register

__all__ = ["read_single", "write_single", "FORMAT_VERSION"]

FORMAT_VERSION = "1"
_KINDS = ("linear", "conv", "embedding", "experts")
_SAVED = "saved::"


def detect(path: Path) -> bool:
    peek = peek_safetensors(path)
    return peek is not None and peek[1].get("format") == "loratools"


def read_single(path: Path) -> Adapter:
    tensors, meta = load_safetensors(path)
    if meta.get("format") != "loratools":
        raise NotAnAdapterError(path, "no loratools metadata in the safetensors header")
    if meta.get("format_version") != FORMAT_VERSION:
        raise NotAnAdapterError(path, f"format version {meta.get('format_version')!r} is newer than this loratools "
                                      f"reads ({FORMAT_VERSION}); upgrade loratools")
    cfg = load_json(meta.get("config", "null"), where=path)
    info = load_json(meta.get("modules", "null"), where=path)
    if not isinstance(cfg, dict) or not isinstance(info, dict):
        raise InvalidFieldError(path, "config" if not isinstance(cfg, dict) else "modules",
                                cfg if not isinstance(cfg, dict) else info, "a JSON object in the metadata")
    try:
        fp = Fingerprint.from_json(load_json(meta["fingerprint"], where=path)) if "fingerprint" in meta else None
        config = AdapterConfig(**cfg)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
        raise CorruptFileError(path, f"loratools metadata is damaged ({e.__class__.__name__}: {e})") from None
    modules: dict[str, Module] = {}
    for name, m in info.items():
        try:
            A, B = tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
        except KeyError as e:
            raise MissingModuleError(str(e.args[0]), str(path), "the adapter file is incomplete") from None
        E = tensors.get(f"{name}.lora_E")
        if config.method == "adalora" and E is None:
            raise MissingModuleError(f"{name}.lora_E", str(path), "the adapter file is incomplete")
        at = f"{path} modules[{name!r}]"
        modules[name] = Module(A=A, B=B, E=E, alpha=finite_number(get_field(m, "alpha", float, where=at), where=at,
                                                                  field="alpha"),
                               scale=finite_number(get_field(m, "scale", float, where=at), where=at, field="scale"),
                               kind=cast(Kind, get_field(m, "kind", str, where=at, default="linear",
                                                         check=lambda k: k in _KINDS,
                                                         expected="linear, conv, embedding or experts")),
                               fan_in_fan_out=get_field(m, "fan_in_fan_out", bool, where=at, default=False),
                               bias=tensors.get(f"{name}.lora_B.bias"),
                               experts=get_field(m, "experts", int, where=at, default=1, check=lambda n: n >= 1,
                                                 expected="a count ≥ 1"),
                               magnitude=tensors.get(f"{name}.lora_magnitude_vector"),
                               dora_eps=finite_number(get_field(m, "dora_eps", float, where=at, default=0.0,
                                                                check=lambda e: e >= 0, expected="a number ≥ 0"),
                                                      where=at, field="dora_eps"))
    saved = {k[len(_SAVED):]: t for k, t in tensors.items() if k.startswith(_SAVED)}
    _check_listed(path, tensors, modules)
    adapter = Adapter(modules, config, saved)
    if fp is not None and fp.sha256 != adapter.fingerprint.sha256:
        raise WrongBaseError(f"{path} records base fingerprint {fp.sha256[:12]} but its factors imply "
                             f"{adapter.fingerprint.sha256[:12]}; the file was altered")
    adapter.check_finite()
    return adapter


#: the tensors of one module, after its name
_PARTS = (".lora_A", ".lora_B", ".lora_E", ".lora_B.bias", ".lora_magnitude_vector")
#: the last name component of an input embedding (a square (vocab, dim) pair is not told apart by shape)
_EMBEDDING = re.compile(r"(^|\.)(embed_tokens|embeddings?|wte|wpe|word_embeddings|tok_embeddings|embed_in|shared)$")


def _check_listed(path: Path, tensors: Mapping[str, Tensor], modules: Mapping[str, Module]) -> None:
    """Refuse a file whose ``modules`` metadata says one thing and whose tensors another: a tensor of a module
    the list leaves out (dropped silently otherwise), or ``kind: embedding`` on a square pair whose name is a
    projection's (its ΔW would be applied transposed)."""
    listed = {f"{n}{p}" for n in modules for p in _PARTS}
    stray = sorted(k for k in tensors if k not in listed and not k.startswith(_SAVED))
    if stray:
        raise CorruptFileError(path, f"it holds the tensor {stray[0]!r}, of a module its `modules` metadata does not "
                                     "list: the metadata and the tensors disagree")
    for n, m in modules.items():
        if m.kind == "embedding" and m.A.ndim == 2 and m.B.ndim == 2 and m.A.shape[1] == m.B.shape[0] \
                and not _EMBEDDING.search(n):
            raise CorruptFileError(path, f"its `modules` metadata says {n} is an embedding, but its factors "
                                         f"{tuple(m.A.shape)} and {tuple(m.B.shape)} are a square projection's "
                                         "(an embedding's ΔW is applied transposed): the metadata and the tensors "
                                         "disagree")


def write_single(adapter: Adapter, path: Path) -> None:
    tensors: dict[str, Tensor] = {}
    info: dict[str, dict[str, object]] = {}
    for name, m in adapter.items():
        tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = m.A, m.B
        if m.E is not None:
            tensors[f"{name}.lora_E"] = m.E
        if m.bias is not None:
            tensors[f"{name}.lora_B.bias"] = m.bias
        if m.magnitude is not None:
            tensors[f"{name}.lora_magnitude_vector"] = m.magnitude
        info[name] = {"alpha": m.alpha, "scale": m.scale, "kind": m.kind, "fan_in_fan_out": m.fan_in_fan_out,
                      **({"experts": m.experts} if m.kind == "experts" else {}),
                      **({"dora_eps": m.dora_eps} if m.dora_eps else {})}
    for key, t in adapter.saved.items():
        tensors[_SAVED + key] = t
    cfg = {f.name: getattr(adapter.config, f.name) for f in fields(adapter.config)}
    cfg["extra"] = dict(adapter.config.extra)
    meta = {
        "format": "loratools",
        "format_version": FORMAT_VERSION,
        "config": json.dumps(cfg, sort_keys=True),
        "modules": json.dumps(info),
        "fingerprint": json.dumps(adapter.fingerprint.to_json()),
    }
    save_safetensors(tensors, path, meta)


register(Format("loratools", "loratools single self-describing .safetensors file", ".safetensors", detect,
                reader=lambda path, base: read_single(path),
                writer=lambda adapter, path, base: write_single(adapter, path)))
