"""Checking values read from files, once, at the reader: bounded JSON, typed fields, plain file names.

Every value a file gives (a config field, a metadata string, a shard name in an
index) is untrusted. A reader turns it into a typed value here or fails with
one :class:`~loratools.errors.InvalidFieldError` line that names the file, the
field, the value and what was expected::

    >>> get_field({"r": "eight"}, "r", int, where="adapter_config.json")   # doctest: +SKIP
    InvalidFieldError: adapter_config.json: r = 'eight' is not valid: expected an integer

JSON is parsed with limits (:data:`MAX_JSON_BYTES`, :data:`MAX_JSON_DEPTH`) so a
crafted header costs bounded time and memory and never a ``RecursionError``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, Literal, TypeVar, overload

from .errors import CorruptFileError, InvalidFieldError

__all__ = ["MAX_JSON_BYTES", "MAX_JSON_DEPTH", "load_json", "get_field", "plain_name",
           "finite_number", "MISSING"]

#: the largest JSON text (a config, a header, a metadata value) read; safetensors' own reader allows 100 MB headers
MAX_JSON_BYTES = 100 * 1024 * 1024
#: the deepest nesting accepted; every legitimate file here nests fewer than 6 levels
MAX_JSON_DEPTH = 64

T = TypeVar("T")
D = TypeVar("D")


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


def _depth(obj: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value, walked without recursion; stops past ``limit``."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            deepest = max(deepest, d)
            if deepest > limit:
                return deepest
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


def load_json(raw: str | bytes, *, where: object, max_bytes: int = MAX_JSON_BYTES,
              max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse ``raw`` as JSON within limits, or raise :class:`CorruptFileError` naming ``where``.

    Refuses non-UTF-8 bytes, texts over ``max_bytes``, nesting deeper than
    ``max_depth`` (before Python's recursion limit is reached), numbers too long
    to convert, and anything that is not JSON.
    """
    if len(raw) > max_bytes:
        raise CorruptFileError(where, f"its JSON is {len(raw)} bytes, over the {max_bytes}-byte limit")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptFileError(where, "its JSON is not UTF-8 text") from None
    try:
        value = json.loads(raw)
    except RecursionError:
        raise CorruptFileError(where, f"its JSON nests deeper than {max_depth} levels") from None
    except ValueError as e:  # JSONDecodeError, and int() of a number over Python's digit limit
        raise CorruptFileError(where, f"not valid JSON ({str(e).splitlines()[0][:80]})") from None
    if _depth(value, max_depth) > max_depth:
        raise CorruptFileError(where, f"its JSON nests deeper than {max_depth} levels")
    return value


_EXPECTED = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             list: "a list", dict: "an object"}


def _is(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


# The overloads give the type a caller gets: ``kind``'s, or ``default``'s when the key may be missing, or None
# when ``nullable``; a tuple of kinds gives Any (the caller tells them apart with isinstance).
@overload
def get_field(obj: Any, key: str, kind: type[T], *, where: object, check: Callable[[Any], bool] | None = None,
              expected: str = "", nullable: Literal[False] = False) -> T: ...
@overload
def get_field(obj: Any, key: str, kind: type[T], *, where: object, default: D,
              check: Callable[[Any], bool] | None = None, expected: str = "", nullable: Literal[False] = False,
              ) -> T | D: ...
@overload
def get_field(obj: Any, key: str, kind: type[T], *, where: object, default: D,
              check: Callable[[Any], bool] | None = None, expected: str = "", nullable: bool) -> T | D | None: ...
@overload
def get_field(obj: Any, key: str, kind: type[T], *, where: object, check: Callable[[Any], bool] | None = None,
              expected: str = "", nullable: bool) -> T | None: ...
@overload
def get_field(obj: Any, key: str, kind: tuple[type, ...], *, where: object, default: Any = MISSING,
              check: Callable[[Any], bool] | None = None, expected: str = "", nullable: bool = False) -> Any: ...
def get_field(obj: Any, key: str, kind: type | tuple[type, ...], *, where: object, default: Any = MISSING,
              check: Callable[[Any], bool] | None = None, expected: str = "", nullable: bool = False) -> Any:
    """``obj[key]`` checked to be of ``kind`` (and to pass ``check``), else one line naming all four.

    ``int`` excludes ``bool``; ``float`` accepts integers (returned as ``float``).
    A missing key gives ``default`` (an error when there is none); ``None`` is
    accepted only when ``nullable``.
    """
    if not isinstance(obj, dict):
        raise InvalidFieldError(where, "(top level)", obj, "a JSON object")
    kinds = kind if isinstance(kind, tuple) else (kind,)
    what = expected or " or ".join(_EXPECTED.get(k, k.__name__) for k in kinds)
    if key not in obj:
        if default is MISSING:
            raise InvalidFieldError(where, key, MISSING, what)
        return default
    value = obj[key]
    if value is None and nullable:
        return None
    if not any(_is(value, k) for k in kinds) or (check is not None and not check(value)):
        raise InvalidFieldError(where, key, value, what)
    if kinds == (float,):
        value = float(value)
    return value


def finite_number(value: Any, *, where: object, field: str, positive: bool = False) -> float:
    """``value`` as a finite float (``> 0`` when ``positive``), else one line naming the field."""
    ok = _is(value, float) and math.isfinite(float(value)) and (not positive or float(value) > 0)
    if not ok:
        raise InvalidFieldError(where, field, value, "a finite number" + (" > 0" if positive else ""))
    return float(value)


def plain_name(value: Any, *, where: object, field: str) -> str:
    """``value`` checked to be a plain file name that stays inside its directory.

    Refuses anything but a non-empty string, ``.``/``..``, separators (``/``,
    ``\\``), absolute paths, NUL and names over 255 bytes: a name read from a
    file (a shard in an index, a file in a record) can then be joined to its
    directory without reaching outside it.
    """
    ok = (isinstance(value, str) and value not in ("", ".", "..") and "/" not in value and "\\" not in value
          and "\0" not in value and len(value.encode("utf-8", "surrogatepass")) <= 255)
    if not ok:
        raise InvalidFieldError(where, field, value, "a plain file name inside its directory")
    return value  # type: ignore[no-any-return]
