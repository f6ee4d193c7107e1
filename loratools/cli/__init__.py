"""The ``loratools`` command line: parse, call one library function, render.

This package is the single boundary where errors become messages: a
:class:`~loratools.errors.LoraToolsError` prints as one line on stderr, its
backquoted parameter names written as the running command's flags
(:func:`with_flags`), and exits with code 2; anything else is a bug and keeps
its traceback. Set ``LORATOOLS_DEBUG=1`` to see tracebacks for user errors too.

Start-up stays light: at module level this package and the command modules
import click and :mod:`loratools.errors` only; torch, the library and rich are
imported inside the commands that use them, so ``loratools --help`` and every
``loratools COMMAND --help`` run without torch (tests/test_cli.py checks).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import sys
from collections.abc import Iterator

import click

from .. import __version__
from ..errors import LoraToolsError
from .combine import combine
from .convert import convert
from .eval import eval_
from .extract import extract
from .hub import pull, push
from .inspect import inspect
from .interrupts import Interrupted, interrupts
from .merge import merge, unmerge, verify
from .options import Session
from .prune import prune
from .resize import resize
from .serve import check, export
from .train import train

__all__ = ["main", "cli", "with_flags"]

#: OS errors a user causes and fixes (full disk, read-only or missing directory, a name too long …)
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENAMETOOLONG,
                errno.ENOTDIR, errno.EISDIR, errno.ENOENT, errno.EEXIST, errno.EXDEV, errno.EMFILE, errno.EFBIG}

_BACKQUOTED = re.compile(r"`([A-Za-z_][A-Za-z0-9_-]*)`")


def with_flags(message: str, command: click.Command | None) -> str:
    """Write each backquoted parameter of ``command`` in ``message`` the way the command line spells it.

    Library messages name parameters in backquotes (see :mod:`loratools.errors`):
    ``"`max_rank` must be ≥ 1"`` becomes ``"--max-rank must be ≥ 1"``. An option
    becomes its first long flag, an argument its metavar (``BASE``). A name
    matches an option's ``name`` or its long flag without dashes (``format`` for
    ``--format``, whose name is ``fmt``), reading ``-`` and ``_`` alike. Other
    backquoted text is left as it is.
    """
    if command is None:
        return message
    spelling: dict[str, str] = {}
    for p in command.params:
        if isinstance(p, click.Option):
            longs = [o for o in p.opts if o.startswith("--")]
            shown = longs[0] if longs else p.opts[0]
            spelling.update({o[2:].replace("-", "_"): shown for o in longs})
        else:
            shown = p.human_readable_name
        if p.name:
            spelling[p.name.replace("-", "_")] = shown  # the parameter's own name wins over another's flag

    def flag(m: re.Match[str]) -> str:
        return spelling.get(m.group(1).replace("-", "_"), m.group(0))

    return _BACKQUOTED.sub(flag, message)


def _debug() -> bool:
    return os.environ.get("LORATOOLS_DEBUG", "") not in ("", "0")


class _UserError(click.ClickException):
    """A LoraToolsError on its way out: one line on stderr, exit code 2."""

    exit_code = 2

    def show(self, file: object = None) -> None:
        click.echo(f"loratools: error: {self.message}", err=True)


def _interrupt(signum: int) -> click.ClickException:
    """A command stopped by a signal (SIGINT, SIGTERM, SIGHUP): one line, exit code 128 + its number.

    Raised here rather than left to click, which would print a blank line first (for a terminal's ``^C``).
    A class per signal: click declares ``exit_code`` on the class (a ``ClassVar``), not per exception.
    """

    class _Interrupt(click.ClickException):
        exit_code = 128 + signum

        def show(self, file: object = None) -> None:
            click.echo(f"loratools: {self.message}", err=True)

    return _Interrupt(f"interrupted ({signal.Signals(signum).name}); nothing was written")


class _Group(click.Group):
    """Lists commands in the order they were added; turns a user error into its one line."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except Interrupted as e:
            raise _interrupt(e.signum) from e
        except LoraToolsError as e:
            if _debug():
                raise
            # ctx.invoked_subcommand is set before the subcommand parses its arguments (an hf:// pull may fail there);
            # an error whose fix is another command names that command's parameters (e.command)
            raise _UserError(with_flags(str(e), self.commands.get(e.command or ctx.invoked_subcommand or ""))) from e
        except OSError as e:  # the disk or file system refused (full, read-only, a name too long): one line
            if e.errno not in _USER_ERRNOS or _debug():
                raise
            where = f" ({e.filename})" if e.filename else ""
            raise _UserError(f"{e.strerror or e}{where}; nothing was written") from e
        except (MemoryError, RuntimeError) as e:  # out of memory: the outputs were removed on the way out
            if not _out_of_memory(e) or _debug():
                raise
            raise _UserError(f"out of memory in `{ctx.invoked_subcommand}`; nothing was written. Try "
                             f"{_OOM_ADVICE.get(ctx.invoked_subcommand or '', _OOM_ADVICE[''])}") from e


#: what to try when a command runs out of memory
_OOM_ADVICE = {
    "train": "--quantize nf4 or int8 (a quantized base), --gradient-checkpointing, a smaller --batch-size or "
             "--seq-len; on CPU also MALLOC_MMAP_THRESHOLD_=131072 in the environment",
    "merge": "--device cpu (a GPU's memory is smaller)",
    "eval": "a smaller --seq-len or --max-examples, or fewer --stack",
    "prune": "a smaller --max-examples (its calibration runs the base forward and backward), or --device cpu",
    "extract": "--device cpu (a GPU's memory is smaller), or fewer modules at a time with --targets",
    "unmerge": "--device cpu (a GPU's memory is smaller)",
    "verify": "--device cpu (a GPU's memory is smaller)",
    "": "--device cpu, or a machine with more memory",
}


def _out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` says an allocation failed: Python's MemoryError, torch's ``OutOfMemoryError`` (a
    RuntimeError) or its CPU allocator's "can't allocate memory" RuntimeError."""
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    text = str(e)
    return "can't allocate memory" in text or "out of memory" in text.lower()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="loratools")
@click.option("-q", "--quiet", is_flag=True, help="Print only results and errors: no progress, no summaries.")
@click.pass_context
def cli(ctx: click.Context, quiet: bool) -> None:
    """Inspect, merge, unmerge, compress, convert, train and share LoRA/AdaLoRA adapters.

    An ADAPTER is a PEFT directory (adapter_config.json + adapter_model.safetensors),
    a loratools single .safetensors file, or any other format `loratools convert`
    lists; the format is detected from the content. A BASE model is a Hugging Face
    model directory (single or sharded safetensors) or one .safetensors file.

    \b
    Examples:
      loratools inspect fixtures/adapters/lora
      loratools inspect adapter.safetensors --json
    """
    ctx.obj = Session(quiet=quiet)


for _command in (inspect, merge, unmerge, verify, combine, extract, resize, prune, convert, check, export, eval_, train,
                 pull, push):
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> None:
    """Run ``loratools ARGV`` (default ``sys.argv[1:]``); return on success, else raise ``SystemExit``.

    Exit codes: 2 for a user error (one line on stderr) or a usage error, 128 + the
    signal's number when interrupted (130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP:
    see :mod:`.interrupts`; the outputs being written are removed first), 1 on a
    broken pipe. Nothing outlives a call: each gets a fresh
    click context and :class:`~loratools.cli.options.Session`, whose consoles bind
    to ``sys.stdout``/``sys.stderr`` as they are during the call, and torch's
    thread count (commands set one thread on the CPU) is put back, so tests can
    run the CLI in-process.
    """
    with _torch_threads_kept(), interrupts():
        code = _run(argv)
    if isinstance(code, int) and code:
        sys.exit(code)


def entry() -> None:
    """The ``loratools`` script and ``python -m loratools``: :func:`main`, then leave without the interpreter's teardown.

    Every output is complete, closed and renamed by the time a command returns; what
    remains of a normal exit is freeing torch's modules and memory, which costs
    ~0.35 s of wall time here (``python -c "import torch"``: 1.40 s, 1.06 s with
    ``os._exit``). Streams are flushed and logging shut down first. A traceback (a bug)
    exits normally.
    """
    try:
        main()
        code: object = 0
    except SystemExit as e:
        code = e.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # as Python itself does for sys.exit("message")
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        code = code or 1
    import logging
    logging.shutdown()
    os._exit(code or 0)


def _run(argv: list[str] | None) -> object:
    try:
        # the exit code of --help/--version (0) or of a ctx.exit(n), else the command's None
        return cli.main(args=argv, prog_name="loratools", standalone_mode=False)
    except click.UsageError as e:  # click's own three lines (usage, hint, blank line, error) made one
        _usage_line(e)
        return e.exit_code
    except click.ClickException as e:  # _UserError included
        e.show()
        return e.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt) as e:  # interrupted outside a command (click's Abort wraps it)
        signum = getattr(e, "signum", getattr(e.__cause__, "signum", signal.SIGINT))
        interrupt = _interrupt(signum)
        interrupt.show()
        return interrupt.exit_code
    except BrokenPipeError:
        return 1


def _usage_line(e: click.UsageError) -> None:
    """``loratools COMMAND: <what click says> (see loratools COMMAND --help)`` on stderr, one line."""
    path = e.ctx.command_path if e.ctx is not None else "loratools"
    message = " ".join(e.format_message().split())
    click.echo(f"{path}: {message} (see {path} --help)", err=True)


@contextlib.contextmanager
def _torch_threads_kept() -> Iterator[None]:
    torch = sys.modules.get("torch")  # never imported here: a process without torch has nothing to keep
    threads = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        if torch is not None and threads is not None:
            torch.set_num_threads(threads)


if __name__ == "__main__":
    entry()
