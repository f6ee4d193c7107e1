"""``loratools inspect``'s one call: read an adapter file (and, for DoRA, its base) and inspect it.

:mod:`loratools.inspection` is the pure part (figures from the factors, the typed
:class:`~loratools.inspection.InspectReport`); this module is its file edge.
"""

from __future__ import annotations

import os

from .device import map_in_threads
from .formats import detect_format, load_base, read_adapter
from .inspection import InspectReport, inspect_adapter
from .io import ModelReader

__all__ = ["inspect_file"]


def inspect_file(src: str | os.PathLike[str], *, base: str | os.PathLike[str] | None = None) -> InspectReport:
    """The :func:`~loratools.inspection.inspect_adapter` report of the adapter at ``src`` (any format, detected
    from the content). ``base`` (a model directory or ``.safetensors``) is read only for a DoRA adapter: its
    weights W0 give each module's magnitude change and the spectrum of the full update W′ − W0. Without a base,
    the modules are spread over threads.

    >>> inspect_file("fixtures/adapters/lora").to_json()["format"]  # doctest: +SKIP
    'peft'
    """
    fmt = detect_format(src)
    adapter = read_adapter(src, format=fmt)
    if base is not None and adapter.is_dora:
        # the one base reader (its config.json checked like every other command's), its weights' headers kept
        with load_base(base).weights or ModelReader(base) as model:
            return inspect_adapter(adapter, format=fmt, base=lambda name: model.get(f"{name}.weight"))
    return inspect_adapter(adapter, format=fmt, mapper=map_in_threads)
