"""Choosing where tensor products run (``auto`` means CUDA when present, else CPU), and how many CPU threads."""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from .errors import InvalidOptionError

__all__ = ["resolve_device", "resolve_dtype", "DTYPES", "cpu_cores", "configure_cpu_threads", "cpu_threads", "map_in_threads",
           "worker_pool"]

T = TypeVar("T")
R = TypeVar("R")

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
        device = torch.device(name)
    except RuntimeError:
        raise InvalidOptionError(f"unknown device {name!r}; use auto, cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):  # meta holds no data; mps, xla … are not supported here
        raise InvalidOptionError(f"unsupported device {name!r}; use auto, cpu or cuda")
    return device


def resolve_dtype(name: str | None, *, default: torch.dtype | None = None) -> torch.dtype | None:
    """``"auto"``/None → ``default``; otherwise one of :data:`DTYPES`."""
    if name in (None, "auto"):
        return default
    if name not in DTYPES:
        raise InvalidOptionError(f"unknown dtype {name!r}; use one of: auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def configure_cpu_threads(device: str | torch.device = "cpu", *, threads: int = 1) -> int:
    """Give torch ``threads`` intra-op threads when ``device`` resolves to the CPU; returns the previous count.

    A CPU command's tensors are small enough (adapter factors, QR/SVD of r×r
    cores, blocks of rows) that torch's thread pool costs more than it gives:
    each op waits at a barrier for threads that other work (a writer, a reader,
    another process) has descheduled. The project's issue "Speed" profiled
    ``merge``, and ``inspect``/``resize`` of a 7B-shaped rank-64 adapter (5×
    faster with one thread on a loaded 2-core machine). Parallelism comes from
    whole tensors on separate threads instead, where there is any. The CLI
    calls this once per command, before reading any adapter; a GPU run is left alone.
    """
    before = torch.get_num_threads()
    if resolve_device(device).type == "cpu" and before != threads:
        torch.set_num_threads(max(1, threads))
    return before


@contextlib.contextmanager
def cpu_threads(threads: int = 1) -> Iterator[None]:
    """``threads`` torch threads for the duration of a block (a library call leaves the setting as it was)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def map_in_threads(fn: Callable[[T], R], items: Iterable[T], *, workers: int | None = None) -> Iterator[R]:
    """``map(fn, items)`` with up to ``workers`` (default :func:`cpu_cores`) items at once on threads; results in order.

    For independent per-module linear algebra (inspect, resize) and the blocks of a GGUF tensor: torch and
    numpy release the GIL inside their kernels, so items run side by side, each on one core. torch's intra-op
    pool is held at one thread meanwhile: each worker fanning out over every core would oversubscribe them
    (the barrier waits issue "Speed" measured). With one worker or one item, ``fn`` runs in the calling
    thread. At most ``2·workers`` results are computed ahead of the consumer (memory stays a few items per
    thread); results are yielded as they are consumed, so a caller can report progress; work not yet started
    is cancelled when the caller stops early or ``fn`` raises.
    """
    todo = list(items)
    n = min(workers or cpu_cores(), len(todo))
    if n <= 1:
        yield from map(fn, todo)
        return
    with cpu_threads(1), worker_pool(n, "loratools-map") as pool:
        pending = deque(pool.submit(fn, x) for x in todo[:2 * n])
        for x in todo[2 * n:]:
            yield pending.popleft().result()
            pending.append(pool.submit(fn, x))
        while pending:
            yield pending.popleft().result()


_pool_numbers = itertools.count()


@contextlib.contextmanager
def worker_pool(workers: int, name: str) -> Iterator[ThreadPoolExecutor]:
    """A thread pool none of whose threads outlives the block, however the block is left.

    On leaving, work not yet started is cancelled and every thread is waited for. ``shutdown`` alone does not
    promise that: an exception that lands in the main thread while the pool starts a thread (Ctrl-C, or SIGTERM
    made one by :func:`loratools.cli.interrupts.interrupts`) leaves that thread running but out of the pool's list,
    which ``concurrent.futures`` (CPython 3.11, ``thread.py`` ``_adjust_thread_count``) appends to only after
    ``Thread.start`` returns; such a thread went on writing a merge's tensors into a temporary already removed. So
    each pool gets a name of its own and, after ``shutdown``, every live thread of that name is joined.
    """
    prefix = f"{name}-{next(_pool_numbers)}_"
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix=prefix[:-1])
    try:
        yield pool
    finally:
        try:
            pool.shutdown(wait=True, cancel_futures=True)
        finally:
            _join_named(prefix)


def _join_named(prefix: str, *, patience: float = 5.0) -> None:
    """Wait for every thread whose name starts with ``prefix``. One whose ``Thread.start`` the exception cut short
    may not have begun yet (``join`` refuses it): it is waited for until it has, for at most ``patience`` seconds (a
    thread cut short before the OS started it never begins, and runs nothing)."""
    deadline = time.monotonic() + patience
    while left := [t for t in threading.enumerate() if t.name.startswith(prefix)]:
        unbegun = False
        for thread in left:
            try:
                thread.join()
            except RuntimeError:  # "cannot join thread before it is started"
                unbegun = True
        if unbegun:
            if time.monotonic() > deadline:
                return
            time.sleep(0.001)