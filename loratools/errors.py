"""The one error tree of loratools.

Every error a user can cause is a :class:`LoraToolsError`. Each subclass also
inherits the matching builtin (``FileNotFoundError``, ``ValueError`` …) so that
callers who do not know loratools can still catch it the usual way. ``str(err)``
is always one line that names the offending value and says what to do; the CLI
prints exactly that line and exits with code 2. Anything that is *not* a
``LoraToolsError`` is a bug and stays loud.

Library messages name *parameters*, never CLI flags: a parameter is written in
backquotes as the keyword the library function takes (```rank` must be ≥ 1``,
```max_rank```). The CLI's error boundary rewrites each backquoted name that is
a parameter of the command being run into its flag (``--rank``, ``--max-rank``),
so one message serves both audiences.
"""

from __future__ import annotations

__all__ = [
    "LoraToolsError",
    "RuntimeFailedError",
    "InputNotFoundError",
    "NotAnAdapterError",
    "UnknownFormatError",
    "CorruptFileError",
    "LfsPointerError",
    "InvalidFieldError",
    "UnsupportedDataError",
    "ShapeMismatchError",
    "MissingModuleError",
    "NonFiniteError",
    "WrongBaseError",
    "OutputExistsError",
    "OutputBusyError",
    "WriteFailedError",
    "UnsafePathError",
    "UnsupportedModuleError",
    "UnsupportedConfigError",
    "MissingDependencyError",
    "InvalidOptionError",
    "DoraError",
    "HubError",
    "VerificationError", "ConversionCheckError", "LossyMergeError"]


class LoraToolsError(Exception):
    """Base of every error a user can cause; its message is one line.

    ``command``: the loratools command whose parameters the message's backquoted names are, when its fix is
    another command (a DoRA refusal names ``convert``'s `base` and `as_lora`); None: the command being run.
    """

    command: str | None = None

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class InputNotFoundError(LoraToolsError, FileNotFoundError):
    def __init__(self, path: object, what: str = "input") -> None:
        self.path = str(path)
        super().__init__(f"{what} not found: {self.path} (check the path)")


class NotAnAdapterError(LoraToolsError, ValueError):
    def __init__(self, path: object, why: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path} is not a LoRA/AdaLoRA adapter: {why}")


class UnknownFormatError(LoraToolsError, ValueError):
    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        super().__init__(f"unknown format {name!r}; choose one of: {', '.join(known)}")


class CorruptFileError(LoraToolsError, ValueError):
    def __init__(self, path: object, why: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path} is damaged or not a valid file: {why}")


class LfsPointerError(LoraToolsError, ValueError):
    """A Git LFS pointer where a file should be (a clone made without git-lfs): the file is not damaged,
    it is not there yet."""

    #: how every pointer file starts (https://github.com/git-lfs/git-lfs/blob/main/docs/spec.md)
    MAGIC = b"version https://git-lfs.github.com/spec/v1"

    def __init__(self, path: object) -> None:
        self.path = str(path)
        super().__init__(f"{self.path} is a Git LFS pointer, not the file: run `git lfs pull` (or download it)")

    @classmethod
    def check(cls, path: object, head: bytes) -> None:
        """Raise for ``path`` when ``head`` (its first bytes) begins a pointer file."""
        if head.startswith(cls.MAGIC):
            raise cls(path)


class InvalidFieldError(CorruptFileError):
    """A value read from a file that is not what the field needs (see :mod:`loratools.validate`)."""

    def __init__(self, where: object, field: str, value: object, expected: str) -> None:
        self.where, self.field, self.value, self.expected = str(where), field, value, expected
        shown = "missing" if repr(value) == "MISSING" else f"= {_shown(value)}"
        super().__init__(where, f"{field} {shown} is not valid: expected {expected}")


def _shown(value: object) -> str:
    try:
        text = repr(value)
    except (RecursionError, ValueError):
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


class UnsupportedDataError(LoraToolsError, ValueError):
    """A data file that parses but holds rows of a schema loratools does not read (not a damaged file)."""

    def __init__(self, path: object, line: int, found: str, expected: str) -> None:
        self.path = path
        where = f"{path} line {line}" if line else f"{path}"
        super().__init__(f"{where}: unsupported row schema, {found}; loratools reads {expected}")


class ShapeMismatchError(LoraToolsError, ValueError):
    def __init__(self, module: str, expected: object, got: object, hint: str = "") -> None:
        self.module, self.expected, self.got = module, expected, got
        tail = f" ({hint})" if hint else ""
        super().__init__(f"shape mismatch in {module}: expected {expected}, got {got}{tail}")


class MissingModuleError(LoraToolsError, KeyError):
    def __init__(self, module: str, where: str, hint: str = "") -> None:
        self.module, self.where = module, where
        tail = f" ({hint})" if hint else ""
        super().__init__(f"{module} is missing from {where}{tail}")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class NonFiniteError(LoraToolsError, ValueError):
    def __init__(self, module: str, where: str = "") -> None:
        self.module = module
        loc = f" in {where}" if where else ""
        super().__init__(f"{module}{loc} holds NaN or Inf values; the file is unusable as it is")


class WrongBaseError(LoraToolsError, ValueError):
    def __init__(self, why: str) -> None:
        super().__init__(f"this adapter was not made for this base model: {why}")


class OutputExistsError(LoraToolsError, FileExistsError):
    def __init__(self, path: object) -> None:
        self.path = str(path)
        super().__init__(f"{self.path} already exists; pass --force to replace it")


class OutputBusyError(LoraToolsError, OSError):
    """Another live process holds the lock of this output (see :func:`loratools.io.paths.output_lock`)."""

    def __init__(self, path: object) -> None:
        self.path = str(path)
        super().__init__(f"{self.path} is being written by another loratools run; wait for it to finish "
                         "or choose another output")


class WriteFailedError(LoraToolsError, OSError):
    """The disk refused an output while it was written (full, a quota, a file too large, an I/O error, busy):
    the output's temporaries are removed (see :func:`loratools.io.paths.atomic_output`)."""

    def __init__(self, path: object, code: int, reason: str) -> None:
        self.path, self.code = str(path), code
        super().__init__(f"{reason} while writing {self.path}; nothing was written")
        self.errno = code


class UnsafePathError(LoraToolsError, PermissionError):
    """A path loratools will not write through, replace or copy: a link, a device, a FIFO, a mount point,
    or a name planted beside an output (see docs/reliability.md, "Hostile files and servers")."""

    def __init__(self, path: object, why: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path} {why}")


class UnsupportedModuleError(LoraToolsError, ValueError):
    def __init__(self, fmt: str, modules: list[str], why: str) -> None:
        self.format, self.modules = fmt, list(modules)
        shown = ", ".join(self.modules[:3]) + (f" and {len(self.modules) - 3} more" if len(self.modules) > 3 else "")
        super().__init__(
            f"{fmt} cannot hold {shown}: {why}; pass --drop-unsupported to leave them out"
        )


class UnsupportedConfigError(LoraToolsError, ValueError):
    """A config field whose meaning loratools does not compute, so any result would be wrong."""

    def __init__(self, where: object, field: str, value: object, why: str) -> None:
        self.where, self.field, self.value = str(where), field, value
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        super().__init__(f"{self.where}: {field} = {shown} is not supported: {why}")


class MissingDependencyError(LoraToolsError, ImportError):
    def __init__(self, package: str, extra: str) -> None:
        self.package, self.extra = package, extra
        super().__init__(f"this needs the {package!r} package: pip install 'loratools[{extra}]'")


class DoraError(LoraToolsError, ValueError):
    """An operation that treats ΔW as a low-rank update was given a DoRA adapter (see :mod:`loratools.dora`)."""

    command = "convert"  # the fix: flatten it with `convert`'s `base` and `as_lora`

    def __init__(self, what: str, fix: str) -> None:
        super().__init__(f"{what}: this is a DoRA adapter, whose update diag(m/‖W0 + s·BA‖)·(W0 + s·BA) − W0 depends "
                         f"on the base weights and is not low-rank; {fix}")


class InvalidOptionError(LoraToolsError, ValueError):
    """A value given by the user (an option, a budget, a weight) that cannot work.

    Name the parameter in backquotes (```budget` must lie in …``): the CLI shows it as its flag.
    """


class HubError(LoraToolsError, OSError):
    def __init__(self, repo_id: str, why: str) -> None:
        self.repo_id = repo_id
        super().__init__(f"Hub repository {repo_id}: {why}")


class VerificationError(LoraToolsError, ValueError):
    """A merged model that is not its base plus its adapters (``loratools verify``)."""

    def __init__(self, why: str) -> None:
        super().__init__(f"verify failed: {why}")


class ConversionCheckError(LoraToolsError, ValueError):
    """The written file does not reproduce a module's ΔW: nothing is left at the output."""

    def __init__(self, module: str, why: str) -> None:
        self.module = module
        super().__init__(f"conversion check failed for {module}: {why}; nothing was written")


class LossyMergeError(LoraToolsError, ValueError):
    """A quantized merge whose written model would carry too little of the adapters' update ΔW (its
    requantization rounds it away): refused before anything is put in place, unless ``allow_lossy``."""

    def __init__(self, rel_error: float, kept: float, what: str, fix: str) -> None:
        self.rel_error, self.kept = rel_error, kept
        super().__init__(f"the merged model {what}: its requantization rounds the update away; {fix}, or serve "
                         "the adapter unmerged, or pass `allow_lossy` to write it anyway; nothing was written")


class RuntimeFailedError(LoraToolsError, RuntimeError):
    """A runtime process (node-llama-cpp, vLLM's worker) exited with an error: its last line is the message."""

    def __init__(self, runtime: str, detail: str) -> None:
        super().__init__(f"{runtime} failed: {detail}")
