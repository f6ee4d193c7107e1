"""The model's ``config.json`` as a merge writes it back.

A merge reads the config (:func:`loratools.io.read_config`) for the architecture (MoE experts, tied
embeddings) and edits it when the weights change dtype or the output head is untied; :mod:`loratools.io`
applies the edit (``rewrite_model``'s ``side_edits``) while the rest of the model is copied.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["config_dtype_edit", "untie_edit", "dequantized_edit", "config_edits"]


def config_dtype_edit(dtype: torch.dtype) -> Callable[[bytes], bytes]:
    """An edit of ``config.json`` that names ``dtype`` as the weights' dtype.

    transformers 5.23 loads a model in the dtype its config's ``dtype`` names (``torch_dtype`` in
    older files; sub-configs such as ``text_config`` carry their own), so a merge that casts the
    weights must say so there, or the bfloat16 weights come back as float32. A diffusers model's config
    (``_diffusers_version`` or ``_class_name``) gets no new ``dtype`` key: diffusers 0.42.1 passes every config
    key to the model's ``__init__`` (``UNet2DConditionModel`` refuses an unknown one) and loads in the dtype asked.
    """
    name = str(dtype).replace("torch.", "")

    def fix(node: Any) -> None:
        if isinstance(node, dict):
            for key in ("dtype", "torch_dtype"):
                if key in node:
                    node[key] = name
            for value in node.values():
                fix(value)

    def edit(raw: bytes) -> bytes:
        config = json.loads(raw)
        fix(config)
        if not {"_diffusers_version", "_class_name"} & set(config):
            config.setdefault("dtype", name)
        return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()

    return edit


def untie_edit(raw: bytes) -> bytes:
    """config.json with ``tie_word_embeddings: false``: the merge wrote the output head as its own tensor."""
    return (json.dumps({**json.loads(raw), "tie_word_embeddings": False}, indent=2, sort_keys=True) + "\n").encode()


def dequantized_edit(raw: bytes) -> bytes:
    """config.json without ``quantization_config``: the merge wrote a quantized model's weights unquantized."""
    config = json.loads(raw)
    config.pop("quantization_config", None)
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def config_edits(dtype: torch.dtype | None, *, untie: bool = False,
                 dequantized: bool = False) -> dict[str, Callable[[bytes], bytes]] | None:
    """The one ``config.json`` edit a merge makes (``rewrite_model``'s ``side_edits``): the new ``dtype``
    (:func:`config_dtype_edit`), untied embeddings and/or no ``quantization_config``, composed; None when the
    config is copied as it is."""
    steps = (([config_dtype_edit(dtype)] if dtype is not None else []) + ([untie_edit] if untie else [])
             + ([dequantized_edit] if dequantized else []))
    if not steps:
        return None

    def edit(raw: bytes) -> bytes:
        for step in steps:
            raw = step(raw)
        return raw

    return {"config.json": edit}
