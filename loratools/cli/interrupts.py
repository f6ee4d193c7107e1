"""SIGTERM and SIGHUP end a command the way Ctrl-C does: by an exception in the main thread.

Python turns SIGINT into ``KeyboardInterrupt``, which unwinds through every
``with`` and ``finally``: :func:`loratools.io.atomic_output` removes its
temporary, the merge's worker threads are cancelled and waited for
(:func:`loratools.io.model.rewrite_model`), a record's scratch is removed. SIGTERM
(``kill``, a job scheduler, a container stopping) and SIGHUP (the terminal
closing) would kill the process where it stands and leave a model-sized
``.OUT.tmp-*`` behind. :func:`interrupts` makes all three raise
:class:`Interrupted`, so the same cleanup runs, and the CLI exits with
128 + the signal's number, as a shell reports a process killed by it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

__all__ = ["Interrupted", "interrupts", "SIGNALS"]

#: the signals that interrupt a command; each is taken over only while it has its default action
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A command stopped by ``signum``; a ``KeyboardInterrupt``, so whatever cleans up after Ctrl-C runs."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


@contextlib.contextmanager
def interrupts() -> Iterator[None]:
    """While inside, SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` in the main thread, once.

    Only the first signal raises; later ones are ignored until the cleanup it started is over (a
    second exception would cut the cleanup short: the files closed and the temporary removed while
    a worker thread still writes, or a descriptor number reused under it). SIGKILL cannot be caught:
    what it leaves is swept by the next run to the same output (:func:`loratools.io.output_lock`).
    A signal set to be ignored (``nohup`` ignores SIGHUP) or handled by the embedding program keeps
    its handler; handlers are installed from the main thread only (Python's rule) and put back on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal fired
        if not fired:
            fired = True
            raise Interrupted(signum)

    saved = {}
    for sig in SIGNALS:
        if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
            saved[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)
