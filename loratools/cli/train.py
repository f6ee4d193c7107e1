"""``loratools train``: its options are :class:`~loratools.train.TrainConfig`'s fields, one option per field.

Each field's help, default and type are read from the dataclass (:func:`config_options`, in the manner of
transformers' ``HfArgumentParser``), so a knob is written once, in :mod:`loratools.train.config` (which imports
no torch). The other options say where to write and how to show progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import types
import typing
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import click

from ..train.config import TrainConfig
from .options import Session, force_option, output_option, pass_session

if TYPE_CHECKING:
    from rich.console import Console

    from ..train import TrainResult


def _eta(seconds: float) -> str:
    s = int(seconds + 0.5)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else (f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s")


def _log_lines(err: Console, every: int) -> Callable[[Any], None]:
    """Off a terminal (nohup, CI, ``| tee``): one plain line every ``every`` steps (0: about 20 a run) and at the
    last step — step, loss, lr, tokens/s and the ETA from the mean step time so far — plus each held-out loss."""
    import time

    start = time.perf_counter()
    first: list[int] = []

    def log(info: Any) -> None:
        if info.step == 0:  # before training: the base model's held-out loss
            err.print(f"step 0: held-out loss {info.eval_loss:.4f} (base model)", highlight=False, soft_wrap=True)
            return
        if not first:
            first.append(info.step - 1)  # a resumed run counts its own steps for the ETA
        n = every if every > 0 else max(1, info.total // 20)
        if info.step % n == 0 or info.step == info.total or info.step == first[0] + 1:
            per_step = (time.perf_counter() - start) / (info.step - first[0])
            err.print(f"step {info.step}/{info.total} · loss {info.loss:.4f} · lr {info.lr:.2e} · "
                      f"{info.tokens_per_s:,.0f} tok/s · eta {_eta(per_step * (info.total - info.step))}",
                      highlight=False, soft_wrap=True)
        if info.eval_loss is not None:
            err.print(f"step {info.step}: held-out loss {info.eval_loss:.4f}", highlight=False, soft_wrap=True)

    return log


@contextlib.contextmanager
def _progress(err: Console, total: int, *, quiet_: bool, log_every: int = 0) -> Iterator[Callable[[Any], None]]:
    """A rich bar on ``err`` with step, loss, lr, tokens/s and ETA on a terminal; progress lines off one."""
    if quiet_:
        yield lambda info: None
        return
    if not err.is_terminal:
        yield _log_lines(err, log_every)
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]} · lr {task.fields[lr]} · {task.fields[tps]} tok/s"),
                   TextColumn("eta"), TimeRemainingColumn(), console=err, transient=True)
    with bar:
        task = bar.add_task("train", total=total, loss="–", lr="–", tps="–")

        def advance(info: Any) -> None:
            if info.step == 0:
                bar.console.print(f"step 0: held-out loss {info.eval_loss:.4f} (base model)")
                return
            bar.update(task, total=info.total, completed=info.step, loss=f"{info.loss:.4f}", lr=f"{info.lr:.2e}",
                       tps=f"{info.tokens_per_s:,.0f}")
            if info.eval_loss is not None:
                bar.console.print(f"step {info.step}: held-out loss {info.eval_loss:.4f}")

        yield advance


_BACKQUOTED = re.compile(r"`([a-z0-9_]+)`")


def _flag(f: dataclasses.Field[Any]) -> str:
    return str(f.metadata.get("flag", "--" + f.name.replace("_", "-")))


def _click_type(hint: Any) -> Any:
    """The click type of a field's annotation: a Literal is a choice, ``X | None`` is X, a tuple of names is
    one comma-separated string (TrainConfig splits it)."""
    origin, args = typing.get_origin(hint), [a for a in typing.get_args(hint) if a is not type(None)]
    if origin is Literal:
        return click.Choice([str(a) for a in args])
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _click_type(args[0])
    return str if origin is tuple else hint


def config_options(cls: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """One click option per field of the dataclass ``cls``, in field order, named as the field (so the command
    receives them as ``cls``'s keyword arguments), with the field's default, type and ``metadata["help"]``
    (whose backquoted field names become flags). A default is shown unless the help already says it."""
    hints = typing.get_type_hints(cls)
    flags = {f.name: _flag(f) for f in dataclasses.fields(cls)}

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for f in reversed(dataclasses.fields(cls)):
            help_ = _BACKQUOTED.sub(lambda m: flags.get(m.group(1), m.group(0)), f.metadata["help"])
            kind = _click_type(hints[f.name])
            if kind is bool:
                decls = flags[f.name] + (f"/--no-{flags[f.name][2:]}" if f.default else "")
                command = click.option(decls, f.name, is_flag=True, default=f.default, help=help_)(command)
                continue
            default = ",".join(f.default) if isinstance(f.default, tuple) else f.default
            command = click.option(flags[f.name], f.name, type=kind, default=default, help=help_,
                                   show_default=default is not None and "default" not in help_,
                                   metavar=f.metadata.get("metavar"))(command)
        return command

    return decorate


def _config(ctx: click.Context, resume: str | None, options: dict[str, Any]) -> TrainConfig:
    """The run's TrainConfig: the options given; with ``--resume``, the checkpoint's options except those typed
    on this command line (which must then agree with it, or the library refuses to resume)."""
    if resume is None:
        return TrainConfig(**options)
    from ..train.checkpoint import resumed_config

    typed = {k: v for k, v in options.items()
             if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
    return resumed_config(resume, **typed)


def _summary(result: TrainResult, output: str) -> str:
    """The run's last line: what was written, how long it took, the losses (held-out: the last, the base's and
    the best, with where the best adapter went when it is not the last)."""
    held, h = "", result.held_out
    if result.evals:
        held = f" · held-out loss {result.evals[-1]['eval_loss']:.4f}"
    if h.eval_loss_start is not None and h.eval_loss_best is not None:
        where = f", in {result.best_dir}" if result.best_dir is not None else ""
        held += f" (base {h.eval_loss_start:.4f}, best {h.eval_loss_best:.4f} at step {h.best_step}{where})"
    return (f"wrote {output}: {result.adapter.method} · {len(result.adapter.modules)} modules · "
            f"{result.trainable_parameters:,} trainable parameters · {result.steps} steps in "
            f"{result.seconds:.1f}s · train loss {result.train_loss:.4f}{held}")


@click.command()
@click.argument("base", type=click.Path())
@click.argument("data", type=click.Path())
@output_option
@force_option
@config_options(TrainConfig)
@click.option("--log-every", type=int, default=0,
              help="Off a terminal, a progress line every N steps (default: about 20 a run).")
@click.option("--checkpoint-dir", type=click.Path(), default=None,
              help="Where checkpoints go [default: OUT.checkpoints].")
@click.option("--resume", type=click.Path(), default=None,
              help="Continue from a checkpoint directory, bit for bit, with the options it was made with.")
@click.option("--base-model", default=None, metavar="HUB_ID",
              help="Hub id stored as base_model_name_or_path [default: the base's _name_or_path, else its "
                   "absolute path].")
@pass_session
def train(session: Session, /, base: str, data: str, output: str, force: bool, log_every: int,
          checkpoint_dir: str | None, resume: str | None, base_model: str | None, **options: Any) -> None:
    """Train a LoRA, DoRA or AdaLoRA adapter on a local causal LM and write it as a PEFT directory.

    BASE is a Hugging Face causal-LM directory (loaded offline with transformers:
    pip install 'loratools[train]'). DATA is .txt (packed into --seq-len blocks) or
    .jsonl (or .json: JSON Lines or one array) with {"text"} or {"prompt", "completion"}
    rows (loss on completions only)
    or chat rows {"messages": [{"role", "content"}, …]} rendered with the tokenizer's
    chat template (loss on the assistant turns only).
    Short runs: the defaults (r 8, lr 1e-3) suit a few hundred steps; AdaLoRA needs
    5–10× LoRA's learning rate (--lr 5e-3 to 1e-2). The held-out loss is measured
    before the first step (the base's) and --eval-every steps; the adapter with the
    lowest one is also written to OUT/best when that is not the last.
    OUT gets adapter_config.json + adapter_model.safetensors, training_config.json,
    loss_curve.json and loss.png (with matplotlib). Under torchrun it trains with DDP;
    the global batch is batch-size × grad-accum × processes.

    \b
    Examples:
      loratools train fixtures/tiny-llama fixtures/corpus.txt -o out/lora --steps 50 --lr 1e-3
      loratools train BASE data.jsonl -o out/ada --method adalora --init-rank 12 --target-rank 4
      loratools train BASE data.txt -o out/dora --dora --rank 8
      torchrun --nproc-per-node 2 -m loratools train BASE data.txt -o out/ddp --batch-size 2
    """
    import os

    from ..train import train_adapter

    config = _config(click.get_current_context(), resume, options)
    with _progress(session.err, config.steps or 0, quiet_=session.quiet, log_every=log_every) as on_step:
        result = train_adapter(base, data, output, config, force=force, resume=resume, checkpoint_dir=checkpoint_dir,
                               on_step=on_step, base_model=base_model)
    if session.quiet or int(os.environ.get("RANK", "0")) != 0:
        return
    if result.rank_pattern:
        from .render import allocation_table

        kept = sum(sum(b) for b in result.rank_pattern.values())
        full = sum(len(b) for b in result.rank_pattern.values())
        session.out.print(allocation_table(result.rank_pattern))
        session.out.print(f"AdaLoRA's final allocation: {kept} of {full} triplets kept "
                          f"(average rank {kept / max(1, len(result.rank_pattern)):.2f})", highlight=False)
    session.out.print(_summary(result, output))
