"""What a GGUF file (or a ``config.json``) says of the base model a GGUF adapter is for.

llama.cpp needs an adapter's architecture, head counts (q/k rows are permuted per head) and expert
count; they come from the base's ``config.json``, from a base ``.gguf``, or from the keys loratools
records in its own adapter files. Kept apart from :mod:`loratools.formats.gguf` (the adapter format)
because the GGUF model merge (:mod:`loratools.merge.gguf`) and ``export`` read them too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapter import Adapter
from ..errors import CorruptFileError, InvalidOptionError, WrongBaseError
from ..gguf.arch import ARCHITECTURES, arch_of_hparams
from ..gguf.quants import require_gguf
from .base import BaseModel

__all__ = ["GGUFBase", "base_from_hparams", "base_from_gguf", "gguf_model_info", "base_of_adapter", "gguf_base",
           "gguf_field", "open_gguf"]


@dataclass(frozen=True)
class GGUFBase:
    """What a GGUF adapter needs of its base: llama.cpp's architecture, head and expert counts."""

    arch: str
    n_head: int | None = None
    n_head_kv: int | None = None
    tied_embeddings: bool = False
    n_expert: int | None = None


def base_from_hparams(hparams: Mapping[str, Any], *, where: str = "config.json") -> GGUFBase:
    """From a Hugging Face ``config.json`` dict."""
    arch = arch_of_hparams(hparams)
    if arch is None:
        names = list(hparams.get("architectures") or []) + [str(hparams.get("model_type", ""))]
        raise WrongBaseError(f"{where} describes {names[0] if names[0] else 'an unknown model'}; GGUF conversion "
                             f"maps {', '.join(sorted(set(ARCHITECTURES.values())))} "
                             f"({', '.join(n for n in ARCHITECTURES if n[0].isupper())})")
    n = hparams.get("num_attention_heads")
    kv = hparams.get("num_key_value_heads") or n
    e = hparams.get("num_local_experts") or hparams.get("num_experts")
    return GGUFBase(arch, int(n) if n else None, int(kv) if kv else None, bool(hparams.get("tie_word_embeddings")),
                    int(e) if e else None)


def gguf_field(reader: Any, key: str) -> Any:
    f = reader.get_field(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:  # a damaged value: treat as absent, the caller says what is missing
        return None


def open_gguf(path: Path) -> Any:
    gguf = require_gguf()
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises bare ValueError/struct errors on damaged files
        raise CorruptFileError(path, f"not a readable GGUF file ({e.__class__.__name__}: {e})") from None


def base_from_gguf(path: Path) -> GGUFBase:
    """From a llama.cpp ``.gguf``: the base model itself, or an adapter that records its head counts."""
    return gguf_model_info(path)[0]


def gguf_model_info(path: Path) -> tuple[GGUFBase, list[str]]:
    """``(base, tensor names)`` of a ``.gguf``, parsed once (a model's vocabulary takes seconds to parse)."""
    r = open_gguf(path)
    arch = gguf_field(r, "general.architecture")
    if not arch:
        raise CorruptFileError(path, "no general.architecture")
    n, kv = gguf_field(r, f"{arch}.attention.head_count"), gguf_field(r, f"{arch}.attention.head_count_kv")
    e = gguf_field(r, f"{arch}.expert_count")
    names = [t.name for t in r.tensors]
    # a model file without output.weight ties lm_head to token_embd (adapter files carry no such hint)
    tied = gguf_field(r, "general.type") != "adapter" and "output.weight" not in names
    return GGUFBase(str(arch), int(n) if n else None, int(kv) if kv else (int(n) if n else None), tied,
                    int(e) if e else None), names


def base_of_adapter(adapter: Adapter) -> GGUFBase:
    """From the adapter's own ``base_model`` when that is a local directory with config.json."""
    bm = adapter.config.base_model
    cfg = Path(bm) / "config.json" if bm else None
    if cfg is not None and cfg.is_file():
        try:
            return base_from_hparams(json.loads(cfg.read_text()), where=str(cfg))
        except json.JSONDecodeError:
            raise CorruptFileError(cfg, "not valid JSON") from None
    raise InvalidOptionError("a GGUF adapter needs its base model's architecture: pass --base (a model directory "
                             "with config.json, or the base .gguf)")


def gguf_base(base: BaseModel) -> GGUFBase:
    """llama.cpp's architecture and head counts of ``base``: from a base ``.gguf`` or its config.json."""
    known = base.facts.get("gguf")
    if known is not None:
        return known
    if base.hparams is not None:
        return base_from_hparams(base.hparams, where=str(base.path))
    raise InvalidOptionError(f"`base` {base.path} has no config.json: GGUF needs the base's architecture and "
                             "head counts (give the model directory or its .gguf)")
