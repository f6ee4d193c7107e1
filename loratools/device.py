"""Choosing where tensor products run. ``auto`` means CUDA when present, else CPU."""

from __future__ import annotations

import torch

from .errors import InvalidOptionError

__all__ = ["resolve_device", "resolve_dtype", "configure_cpu_threads", "DTYPES"]

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → ``cuda`` if available else ``cpu``; ``"cuda"`` without a GPU is an error."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidOptionError("--device cuda was asked for but no CUDA GPU is available; use --device auto or cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise InvalidOptionError(f"unknown device {name!r}; use auto, cpu or cuda") from None


def resolve_dtype(name: str | None, *, default: torch.dtype | None = None) -> torch.dtype | None:
    """``"auto"``/None → ``default``; otherwise one of :data:`DTYPES`."""
    if name in (None, "auto"):
        return default
    if name not in DTYPES:
        raise InvalidOptionError(f"unknown dtype {name!r}; use one of: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def configure_cpu_threads(device: str = "cpu") -> None:
    """One torch intra-op thread when ``device`` resolves to the CPU; a GPU run is left alone.

    The commands' CPU work is many small ops (QR/SVD of r×r cores, thin products);
    with several OpenMP threads each op waits at a barrier for threads another
    process has descheduled. Issue "Speed": inspect/resize of a 7B-shaped rank-64
    adapter ran 5× faster with one thread on a loaded machine.
    """
    if resolve_device(device).type == "cpu":
        torch.set_num_threads(1)
