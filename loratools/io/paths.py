"""Outputs that appear whole or not at all, and the checks made before any long work."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import CorruptFileError, InvalidOptionError, OutputExistsError
from ..validate import MAX_JSON_BYTES, load_json

__all__ = ["atomic_output", "check_output", "read_json"]


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


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, force: bool = False, inputs: tuple[str | os.PathLike[str], ...] = ()) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` on success.

    The caller writes a file or a directory at the yielded path. On any error
    the temporary is removed and ``path`` is untouched. ``path`` may not be one
    of ``inputs`` (nor inside one), and an existing ``path`` needs ``force``.
    """
    dest = Path(path)
    check_output(dest, force=force, inputs=inputs)
    dest.parent.mkdir(parents=True, exist_ok=True)
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
