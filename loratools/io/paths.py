"""Outputs that appear whole or not at all, and the checks made before any long work."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import CorruptFileError, InvalidOptionError, OutputBusyError, OutputExistsError
from ..validate import MAX_JSON_BYTES, load_json

__all__ = ["atomic_output", "check_output", "output_lock", "read_json", "temporary_names"]

#: file systems where flock is not offered (some network mounts): outputs are written unlocked and nothing is swept
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def check_output(path: str | os.PathLike[str], *, force: bool = False,
                 inputs: Sequence[str | os.PathLike[str]] = (), what: str = "output") -> None:
    """Refuse ``path`` up front, before any long work: when it is, contains or lies inside
    one of ``inputs``, or when it exists and ``force`` is not given."""
    dest = Path(path)
    real = dest.resolve()
    for inp in inputs:
        ri = Path(inp).resolve()
        if real == ri or ri in real.parents or real in ri.parents:
            raise InvalidOptionError(f"{what} {dest} overlaps the input {inp}; choose another path")
    if dest.exists() and not force:
        raise OutputExistsError(dest)


def temporary_names(dest: Path) -> re.Pattern[str]:
    """The names of the temporaries kept beside ``dest`` while it is written: ``.NAME.tmp-<8 hex>``
    (the output being written), ``.NAME.old-<8 hex>`` (the replaced output, during a ``force`` rename)
    and ``.NAME.scratch-<pid>`` (a merge record's patches). Matched whole, so ``.a.tmp-…`` of an
    output ``a`` never matches the temporaries of an output named ``a.tmp-1``."""
    return re.compile(rf"\.{re.escape(dest.name)}\.(?:(tmp|old)-[0-9a-f]{{8}}|scratch-[0-9]+)")


@contextlib.contextmanager
def output_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the lock of the output ``path`` (``flock`` on ``.NAME.lock`` beside it), then sweep what dead runs left.

    Non-blocking: when another live process holds it, :class:`OutputBusyError` at once. A lock dies
    with its process (even on SIGKILL), so once it is held, the temporaries named by
    :func:`temporary_names` are a killed run's: each is removed, except a replaced output
    (``.old-``) while ``path`` is missing, which a run killed between its two renames left as the
    only copy: it is put back at ``path``. The sweep is silent: it removes only loratools' own
    temporaries of this very output, and puts back what the killed run took away.

    The lock file is unlinked before it is unlocked, so none is left behind; a process that opened
    it before the unlink then locks an orphan inode, which is why each acquisition checks that the
    name still leads to the inode it locked (``fstat`` vs ``stat``) and else tries again. A file
    system without ``flock`` writes unlocked and sweeps nothing (a live run's temporary could not be told apart).
    """
    dest = Path(path)
    lock = dest.parent / f".{dest.name}.lock"
    fd = _acquire(lock, dest)
    try:
        if fd >= 0:
            _sweep(dest)
        yield
    finally:
        if fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
            os.close(fd)


def _acquire(lock: Path, dest: Path) -> int:
    """An open descriptor of ``lock`` holding its ``flock``, or -1 where the file system has no locks."""
    while True:
        fd = os.open(lock, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = os.path.samestat(os.fstat(fd), os.stat(lock))
        except BlockingIOError:
            os.close(fd)
            raise OutputBusyError(dest) from None
        except FileNotFoundError:
            held = False  # unlinked by the run that held it, after we opened it
        except OSError as e:
            os.close(fd)
            if e.errno in _NO_LOCKS:
                return -1
            raise
        except BaseException:
            os.close(fd)
            raise
        if held:
            return fd
        os.close(fd)  # an orphan inode, no longer at ``lock``: lock the file the name leads to now


def _sweep(dest: Path) -> None:
    """Remove the temporaries of ``dest`` left by dead runs (the caller holds its lock); put a lost output back."""
    names = temporary_names(dest)
    for item in sorted(dest.parent.iterdir()):
        m = names.fullmatch(item.name)
        if m is None:
            continue
        if m.group(1) == "old" and not os.path.lexists(dest):
            os.replace(item, dest)
        else:
            _remove(item)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, force: bool = False, inputs: tuple[str | os.PathLike[str], ...] = ()) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` on success.

    The caller writes a file or a directory at the yielded path. On any error
    (an interrupt included) the temporary is removed and ``path`` is untouched.
    ``path`` may not be one of ``inputs`` (nor inside one), and an existing
    ``path`` needs ``force``. The whole run holds ``path``'s :func:`output_lock`:
    a second run to the same ``path`` fails at once, and what killed runs left
    beside it is swept first. Files and directories are created with the
    usual modes (0666/0777 less the umask).
    """
    dest = Path(path)
    check_output(dest, force=force, inputs=inputs)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(dest):
        check_output(dest, force=force, inputs=inputs)  # a run that finished meanwhile, or an output the sweep put back
        yield from _replace_when_written(dest)


def _replace_when_written(dest: Path) -> Iterator[Path]:
    """The body of :func:`atomic_output`, under its lock: yield the temporary, rename it into place."""
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written to {tmp}")
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(dest, old)
            try:
                os.replace(tmp, dest)
            except BaseException:
                os.replace(old, dest)  # the old output stays whole when the new one cannot take its place
                raise
            _remove(old)
        else:
            os.replace(tmp, dest)
    except BaseException:
        _remove(tmp)
        raise


def read_json(path: str | os.PathLike[str], *, max_bytes: int = MAX_JSON_BYTES) -> object:
    """The JSON file ``path``, parsed with :func:`loratools.validate.load_json`'s limits (size checked before reading)."""
    size = os.stat(path).st_size
    if size > max_bytes:
        raise CorruptFileError(path, f"it is {size} bytes, over the {max_bytes}-byte limit for a JSON file")
    with open(path, "rb") as f:
        return load_json(f.read(), where=path, max_bytes=max_bytes)
