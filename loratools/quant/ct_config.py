"""The part of a compressed-tensors ``quantization_config`` every reader of its formats checks first: the model's
``format``, and the weight settings of each config group (compressed-tensors 0.20.0 ``config/base.py``
``QuantizationConfig``: ``config_groups`` of ``QuantizationScheme`` with ``weights``, ``input_activations``…;
``infer_model_format`` writes a group's own ``format`` when the groups differ). The per-format readers
(:mod:`.fp8`, :mod:`.nvfp4`, :mod:`.intpack`) then check each group's ``weights`` fields for their format."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from ..errors import UnsupportedConfigError

__all__ = ["weight_groups"]


def weight_groups(qc: Mapping[str, Any], formats: Collection[str], reads: str) -> list[tuple[str, Any]]:
    """``(where, weights)`` of every config group that quantizes weights, ``where`` its path in config.json
    (``quantization_config.config_groups.NAME``). Refuses a model ``format`` not in ``formats`` (``reads`` says
    what the reader takes), a config without a weight group, and a group whose own ``format`` is another one
    (a mixed-precision model).

    >>> weight_groups({"format": "float-quantized", "config_groups": {"g": {"weights": {"num_bits": 8}}}},
    ...               ["float-quantized"], "float-quantized models")
    [('quantization_config.config_groups.g', {'num_bits': 8})]
    """
    fmt = qc.get("format")
    if fmt not in formats:
        raise UnsupportedConfigError("config.json", "quantization_config.format", fmt, f"this reader takes {reads}")
    groups = qc.get("config_groups")
    found = [(name, g.get("weights"), g.get("format")) for name, g in
             (groups.items() if isinstance(groups, Mapping) else ()) if isinstance(g, Mapping)
             and g.get("weights") is not None]
    if not found:
        raise UnsupportedConfigError("config.json", "quantization_config.config_groups", groups,
                                     "no group quantizes weights")
    out = []
    for name, weights, own in found:
        where = f"quantization_config.config_groups.{name}"
        if own not in (None, fmt):  # infer_model_format writes "mixed-precision" over the groups' own formats
            raise UnsupportedConfigError("config.json", f"{where}.format", own,
                                         f"loratools reads models whose every group is {fmt}")
        out.append((where, weights))
    return out
