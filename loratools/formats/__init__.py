"""Adapter file formats, registered by name, detected by content.

Each format is a :class:`Format`: a ``detect(path) -> bool`` that looks at the
content (never only the file name), a ``read(path) -> Adapter`` and a
``write(adapter, path)`` that writes a file or a directory at exactly ``path``
(callers wrap it in :func:`loratools.io.atomic_output`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapter import Adapter
from ..errors import InputNotFoundError, LoraToolsError, NotAnAdapterError, UnknownFormatError
from ..io import atomic_output, read_safetensors_header

__all__ = ["Format", "FORMATS", "register", "peek_safetensors", "detect_format", "read_adapter", "write_adapter"]


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    detect: Callable[[Path], bool]
    read: Callable[[Path], Adapter]
    write: Callable[[Adapter, Path], None]
    #: "dir" when the format is a directory, else the file suffix (".safetensors", ".gguf")
    layout: str


FORMATS: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    FORMATS[fmt.name] = fmt
    return fmt


def peek_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, str]] | None:
    """The checked header and metadata of ``path`` if it is a readable safetensors file, else None
    (for ``detect`` functions: a file that is not safetensors is simply not their format)."""
    if not path.is_file():
        return None
    try:
        return read_safetensors_header(path)
    except (LoraToolsError, OSError):
        return None


def detect_format(path: str | os.PathLike[str]) -> str:
    """Name of the format of the adapter at ``path``, judged by its content."""
    p = Path(path)
    if not p.exists():
        raise InputNotFoundError(p, "adapter")
    for fmt in FORMATS.values():
        if fmt.detect(p):
            return fmt.name
    if p.is_dir():
        raise NotAnAdapterError(p, "no adapter_config.json or adapter file in this directory")
    raise NotAnAdapterError(p, f"not a format loratools reads ({', '.join(FORMATS)})")


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise UnknownFormatError(name, list(FORMATS))
    return FORMATS[name]


def read_adapter(path: str | os.PathLike[str], *, format: str | None = None) -> Adapter:
    """Read an adapter from ``path`` in any registered format (detected when ``format`` is None)."""
    name = format or detect_format(path)
    return get_format(name).read(Path(path))


def write_adapter(adapter: Adapter, path: str | os.PathLike[str], *, format: str = "peft", force: bool = False,
                  inputs: tuple[str | os.PathLike[str], ...] = ()) -> Path:
    """Write ``adapter`` to ``path`` atomically: nothing appears at ``path`` unless the write completes."""
    fmt = get_format(format)
    with atomic_output(path, force=force, inputs=inputs) as tmp:
        fmt.write(adapter, tmp)
    return Path(path)


# Registration order is detection order: the most specific formats first.
from . import single as _single  # noqa: E402,F401
from . import peft as _peft  # noqa: E402,F401
from . import kohya as _kohya  # noqa: E402,F401
from . import gguf as _gguf  # noqa: E402,F401
