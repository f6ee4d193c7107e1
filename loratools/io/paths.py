"""Outputs that appear whole or not at all, and the checks made before any long work."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import (CorruptFileError, InvalidOptionError, LfsPointerError, LoraToolsError, OutputBusyError,
                      OutputExistsError, UnsafePathError, WriteFailedError)
from ..validate import MAX_JSON_BYTES, load_json

__all__ = ["atomic_output", "check_output", "copy_opened", "open_regular", "output_lock", "read_json", "temporary_names",
           "temporary_path"]

#: file systems where flock is not offered (some network mounts): outputs are written unlocked and nothing is swept
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}
#: the longest name a directory entry may have on the file systems loratools writes to (ext4, xfs, btrfs, tmpfs)
NAME_MAX = 255
#: room kept after a temporary's stem for its longest suffix, ``.scratch-<pid of up to 10 digits>``
_SUFFIX_ROOM = len(".scratch-") + 10
#: a directory ``force`` may replace holds at most this many entries (loratools never writes more)
_MAX_REPLACED_ENTRIES = 100_000


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def check_output(path: str | os.PathLike[str], *, force: bool = False,
                 inputs: Sequence[str | os.PathLike[str]] = (), what: str = "output") -> None:
    """Refuse ``path`` up front, before any long work: when it is, contains or lies inside
    one of ``inputs``, when it exists and ``force`` is not given, or when ``force`` would
    replace something loratools could not have written (see :func:`check_replaceable`)."""
    dest = Path(path)
    real = dest.resolve()
    for inp in inputs:
        ri = Path(inp).resolve()
        if real == ri or ri in real.parents or real in ri.parents:
            raise InvalidOptionError(f"{what} {dest} overlaps the input {inp}; choose another path")
    if os.path.lexists(dest):
        if not force:
            raise OutputExistsError(dest)
        check_replaceable(dest)


def check_replaceable(dest: Path) -> None:
    """``force`` replaces only a regular file, or a directory of regular files and directories that is
    no mount point and holds no mount point, nor the current directory: what loratools could have written.

    Anything else (``-o /dev/null``, a FIFO, a symbolic link, ``/`` …) is refused with
    :class:`UnsafePathError`: a replaced output is renamed aside and deleted, and deleting a device
    node, a link's target folder or a mounted file system is never what ``--force`` means.
    """
    fix = "--force replaces only a regular file or a directory loratools could have written; choose another path"
    st = os.lstat(dest)
    if stat.S_ISREG(st.st_mode):
        return
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(dest, f"is a symbolic link; {fix}")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(dest, f"is a device, FIFO or socket, not a file; {fix}")
    here = Path.cwd().resolve()
    real = dest.resolve()
    if real == here or real in here.parents:
        raise UnsafePathError(dest, f"holds the current directory; {fix}")
    count = 0
    pending = [dest]
    while pending:
        folder = pending.pop()
        if os.lstat(folder).st_dev != st.st_dev or os.path.ismount(folder):
            raise UnsafePathError(dest, f"is or holds a mount point ({folder}); {fix}")
        with os.scandir(folder) as entries:
            for entry in entries:
                count += 1
                if count > _MAX_REPLACED_ENTRIES:
                    raise UnsafePathError(dest, f"holds over {_MAX_REPLACED_ENTRIES} entries; {fix}")
                if entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
                elif not entry.is_file(follow_symlinks=False):
                    raise UnsafePathError(dest, f"holds {entry.path}, which is not a regular file or a directory; "
                                                f"{fix}")


def _stem(dest: Path) -> str:
    """What the names of ``dest``'s temporaries start with: ``.NAME``, or, when a suffix would not fit in
    :data:`NAME_MAX` bytes, the first bytes of NAME, ``~`` and 16 hex of NAME's sha256."""
    name = dest.name
    if len(os.fsencode(f".{name}")) + _SUFFIX_ROOM <= NAME_MAX:
        return f".{name}"
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    room = NAME_MAX - _SUFFIX_ROOM - len(os.fsencode(f".~{digest}"))
    head = ""
    for ch in name:
        if len(os.fsencode(head + ch)) > room:
            break
        head += ch
    return f".{head}~{digest}"


def temporary_path(dest: Path, kind: str) -> Path:
    """A temporary beside ``dest``: ``kind`` is ``tmp`` or ``old`` (8 random hex follow), ``scratch``
    (this process id follows) or ``lock``. Fits in :data:`NAME_MAX` whatever ``dest``'s name."""
    tail = {"tmp": lambda: f"tmp-{uuid.uuid4().hex[:8]}", "old": lambda: f"old-{uuid.uuid4().hex[:8]}",
            "scratch": lambda: f"scratch-{os.getpid()}", "lock": lambda: "lock"}[kind]()
    return dest.parent / f"{_stem(dest)}.{tail}"


def temporary_names(dest: Path) -> re.Pattern[str]:
    """The names of the temporaries kept beside ``dest`` while it is written: ``.NAME.tmp-<8 hex>``
    (the output being written), ``.NAME.old-<8 hex>`` (the replaced output, during a ``force`` rename)
    and ``.NAME.scratch-<pid>`` (a merge record's patches). Matched whole, so ``.a.tmp-…`` of an
    output ``a`` never matches the temporaries of an output named ``a.tmp-1``. For a NAME too long
    to take a suffix, ``.NAME`` is shortened (see :func:`temporary_path`)."""
    return re.compile(rf"{re.escape(_stem(dest))}\.(?:(tmp|old)-[0-9a-f]{{8}}|scratch-[0-9]+)")


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
    lock = temporary_path(dest, "lock")
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
    """An open descriptor of ``lock`` holding its ``flock``, or -1 where the file system has no locks.

    Opened without following a link (``O_NOFOLLOW``) and without waiting for a writer
    (``O_NONBLOCK``), and only a regular file is locked: a link, FIFO or device planted at
    ``.NAME.lock`` is refused with one line, never created through or waited on.
    """
    planted = ("is not the lock file loratools makes (a link, FIFO, device or directory planted beside the "
               f"output {dest}); remove it, or choose another output")
    while True:
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                raise UnsafePathError(lock, planted) from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise UnsafePathError(lock, planted)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = os.path.samestat(os.fstat(fd), os.lstat(lock))
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
        mode = os.lstat(item).st_mode
        # only a regular file or a real directory can be an output loratools renamed aside; a link
        # (or anything else) under that name was planted: it is removed, never put back as the output
        if m.group(1) == "old" and not os.path.lexists(dest) and (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
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
    tmp = temporary_path(dest, "tmp")
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written to {tmp}")
        if os.path.lexists(dest):
            check_replaceable(dest)  # again, just before: what is at ``dest`` may have changed during the write
            old = temporary_path(dest, "old")
            os.replace(dest, old)
            try:
                os.replace(tmp, dest)
            except BaseException:
                os.replace(old, dest)  # the old output stays whole when the new one cannot take its place
                raise
            _remove(old)
        else:
            os.replace(tmp, dest)
    except BaseException as e:
        _remove(tmp)
        failed = _write_failure(e, dest)
        if failed is not None:
            raise failed from e
        raise


#: what a disk answers a write with that the user fixes (room, quota, a file size limit, the device itself)
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EBUSY, errno.EROFS}
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")  # how safetensors' Rust side reports an errno in its message


def _write_failure(e: BaseException, dest: Path) -> WriteFailedError | None:
    """The one-line error for a write the disk refused, wherever the writer put the errno: an ``OSError``'s own,
    safetensors' ``SafetensorError`` text (``… (os error 28)``), or numpy's errno-less short write (``tofile``
    in the ``gguf`` package: ``N requested and M written``, read as a full disk when ``dest``'s file system has no
    room left), at most a few causes deep. None for anything else (a bug stays loud)."""
    seen: BaseException | None = e
    for _ in range(8):
        if seen is None or isinstance(seen, LoraToolsError):
            return None
        code: int | None = None
        if isinstance(seen, OSError) and seen.errno is not None:
            code = seen.errno
        elif isinstance(seen, OSError) and "requested and" in str(seen) and "written" in str(seen):
            code = errno.ENOSPC if _full(dest) else errno.EIO
        elif type(seen).__name__ == "SafetensorError":
            m = _OS_ERROR_CODE.search(str(seen))
            code = int(m.group(1)) if m else None
        if code in _WRITE_ERRNOS:
            assert code is not None
            reason = os.strerror(code)
            return WriteFailedError(dest, code, reason[:1].lower() + reason[1:])
        seen = seen.__cause__ or seen.__context__
    return None


def _full(dest: Path) -> bool:
    """Whether the file system ``dest`` is written to has less than 1 MiB left for this user."""
    try:
        st = os.statvfs(dest.parent)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1 << 20


def open_regular(path: str | os.PathLike[str], *, follow: bool = True) -> int:
    """A read-only descriptor of the regular file ``path``; a FIFO, device, socket or directory is refused
    with :class:`CorruptFileError` (opened ``O_NONBLOCK``, so a FIFO without a writer never blocks). With
    ``follow=False`` a symbolic link is refused too (``O_NOFOLLOW``)."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO):
            raise CorruptFileError(path, "it is a symbolic link or special file, not a regular file") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CorruptFileError(path, "it is a FIFO, device, socket or directory, not a regular file")
    os.set_blocking(fd, True)
    return fd


def copy_opened(fd: int, dst: Path, *, where: object) -> None:
    """Copy the regular file open at ``fd`` into the new file ``dst`` (0666 less the umask, never through a
    link): exactly the size ``fstat`` gives when the copy starts, so a file that grows meanwhile cannot fill
    the disk; one that changed size during the copy is refused (``where`` names it)."""
    size = os.fstat(fd).st_size
    out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        pos = 0
        while pos < size:
            want = min(size - pos, 1 << 26)
            try:
                n = os.copy_file_range(fd, out, want, pos, pos)
            except OSError:
                n = -1
            if n < 0:  # not offered across these file systems: through user space
                chunk = os.pread(fd, want, pos)
                n = len(chunk)
                os.pwrite(out, chunk, pos)
            if n == 0:
                break
            pos += n
    finally:
        os.close(out)
    if pos != size or os.fstat(fd).st_size != size:
        raise CorruptFileError(where, f"it changed size while it was copied ({size} bytes when the copy began); "
                                      "try again once nothing writes it")


def read_json(path: str | os.PathLike[str], *, max_bytes: int = MAX_JSON_BYTES) -> object:
    """The JSON file ``path``, parsed with :func:`loratools.validate.load_json`'s limits (size checked before
    reading; never more than ``max_bytes`` + 1 bytes read, and only from a regular file)."""
    fd = open_regular(path)
    with open(fd, "rb") as f:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise CorruptFileError(path, f"it is {size} bytes, over the {max_bytes}-byte limit for a JSON file")
        data = f.read(max_bytes + 1)
    LfsPointerError.check(path, data)
    return load_json(data, where=path, max_bytes=max_bytes)
