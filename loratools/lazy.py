"""Names of a package loaded on first use (PEP 562), the one home of the pattern the package faces share.

A face lists where each public name is defined (``homes``: name → module relative to the package) and calls
:func:`attach`; ``import loratools`` (or ``loratools.train``) then costs no torch, and each name is imported
the first time it is read. Type checkers read the face's ``if TYPE_CHECKING:`` imports instead.

>>> getattr_, dir_ = attach("loratools", {"RankRule": "linalg"})
>>> getattr_("RankRule").__name__, "RankRule" in dir_()
('RankRule', True)
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping

__all__ = ["attach"]


def attach(package: str, homes: Mapping[str, str], *, submodules: bool = False,
           ) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: a name of ``homes`` is imported from its module on first use
    and kept in the package's namespace, so later reads skip the hook. With ``submodules``, a name that is a
    submodule not imported yet is imported too (``loratools.compress``), as an eagerly imported package has it."""

    def getattr_(name: str) -> object:
        home = homes.get(name)
        if home is None:
            if submodules and not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
                return importlib.import_module(f".{name}", package)
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{home}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    def dir_() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(homes))

    return getattr_, dir_
