"""``loratools train``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import click

from .options import Session, device_option, force_option, output_option, pass_session

if TYPE_CHECKING:
    from rich.console import Console


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


#: TrainConfig fields whose CLI option has another name
_OPTION_OF = {"orth_reg_weight": "orth_reg"}


def _config(ctx: click.Context, resume: str | None, cls: Any, **values: Any) -> Any:
    """The run's TrainConfig: the options given; with ``--resume``, the checkpoint's options except those typed
    on this command line (which must then agree with it, or the library refuses to resume)."""
    if resume is None:
        return cls(**values)
    from ..train.checkpoint import read_state

    old = read_state(resume)["config"]
    typed = {name for name in ctx.params
             if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    merged = {k: (v if _OPTION_OF.get(k, k) in typed or k not in old else old[k]) for k, v in values.items()}
    return cls.from_json({**old, **merged})


@click.command()
@click.argument("base", type=click.Path())
@click.argument("data", type=click.Path())
@output_option
@force_option
@click.option("--method", type=click.Choice(["lora", "adalora"]), default="lora", show_default=True)
@click.option("--rank", type=int, default=8, show_default=True, help="LoRA rank r.")
@click.option("--alpha", type=float, default=16.0, show_default=True, help="Scale numerator: s = alpha/r (LoRA).")
@click.option("--targets", default="q_proj,v_proj", show_default=True,
              help="Comma-separated module names to adapt (matched on the last name components), "
                   "or all-linear: every linear layer but the output head.")
@click.option("--rslora", is_flag=True, help="Scale by alpha/√r instead of alpha/r.")
@click.option("--dropout", type=float, default=0.0, show_default=True, help="Dropout on the adapter input.")
@click.option("--dora", is_flag=True, help="Train DoRA: LoRA plus a magnitude per output row (peft's use_dora).")
@click.option("--init-rank", type=int, default=12, show_default=True, help="AdaLoRA: initial triplets per layer.")
@click.option("--target-rank", type=int, default=4, show_default=True, help="AdaLoRA: final average rank per layer.")
@click.option("--orth-reg", type=float, default=0.5, show_default=True, help="AdaLoRA: orthogonal regulariser weight γ.")
@click.option("--orth-form", type=click.Choice(["peft", "paper"]), default="peft", show_default=True,
              help="AdaLoRA regulariser: peft = mean of ‖·‖_F; paper = Σ ‖·‖²_F.")
@click.option("--tinit", type=int, default=None, help="AdaLoRA: steps before pruning starts [default: 10% of the steps].")
@click.option("--tfinal", type=int, default=None,
              help="AdaLoRA: last steps trained at the final allocation [default: 30% of the steps].")
@click.option("--delta-t", type=int, default=None, help="AdaLoRA: steps between allocations [default: 2% of the steps].")
@click.option("--beta1", type=float, default=0.85, show_default=True, help="AdaLoRA: EMA factor of the sensitivity.")
@click.option("--beta2", type=float, default=0.85, show_default=True, help="AdaLoRA: EMA factor of the uncertainty.")
@click.option("--steps", type=int, default=None, help="Optimizer steps (default: one epoch).")
@click.option("--epochs", type=float, default=None, help="Epochs over the training split (instead of --steps).")
@click.option("--lr", type=float, default=1e-3, show_default=True,
              help="Peak learning rate; for a short LoRA run 1e-3. AdaLoRA needs 5–10× LoRA's (5e-3 to 1e-2).")
@click.option("--warmup", type=int, default=0, show_default=True, help="Linear warm-up steps (then cosine to lr/10).")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Sequences per process and micro-batch.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--seq-len", type=int, default=128, show_default=True)
@click.option("--eval-split", type=float, default=0.1, show_default=True, help="Fraction held out for eval loss.")
@click.option("--eval-file", type=click.Path(), default=None,
              help="Held-out data file (same formats as DATA); then all of DATA trains and --eval-split is unused.")
@click.option("--eval-every", type=int, default=0, help="Held-out loss every N steps (default: 5 times a run).")
@click.option("--log-every", type=int, default=0,
              help="Off a terminal, a progress line every N steps (default: about 20 a run).")
@click.option("--save-every", type=int, default=0, help="Write a checkpoint every N steps (0: none).")
@click.option("--checkpoint-dir", type=click.Path(), default=None, help="Where checkpoints go [default: OUT.checkpoints].")
@click.option("--resume", type=click.Path(), default=None,
              help="Continue from a checkpoint directory, bit for bit, with the options it was made with.")
@click.option("--gradient-checkpointing", is_flag=True,
              help="Recompute activations in the backward pass: less memory, about a third more time.")
@click.option("--seed", type=int, default=0, show_default=True)
@device_option
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "bfloat16"]),
              help="Base weights' dtype; auto = float32 on CPU, bfloat16 + autocast on CUDA.")
@click.option("--base-model", default=None, metavar="HUB_ID",
              help="Hub id stored as base_model_name_or_path [default: the base's _name_or_path, else its absolute path].")
@click.option("--save-as", type=click.Choice(["auto", "lora"]), default="auto", show_default=True,
              help="lora writes an AdaLoRA result as plain LoRA (same ΔW).")
@pass_session
def train(session: Session, base: str, data: str, output: str, force: bool, method: str, rank: int, alpha: float,
          targets: str, rslora: bool, dora: bool, dropout: float, init_rank: int, target_rank: int, orth_reg: float,
          orth_form: str, tinit: int | None, tfinal: int | None, delta_t: int | None, beta1: float, beta2: float,
          steps: int | None, epochs: float | None, lr: float, warmup: int, batch_size: int, grad_accum: int,
          seq_len: int, eval_split: float, eval_file: str | None, eval_every: int, log_every: int, save_every: int,
          checkpoint_dir: str | None, resume: str | None, gradient_checkpointing: bool, seed: int, device: str,
          dtype: str, base_model: str | None, save_as: str) -> None:
    """Train a LoRA, DoRA or AdaLoRA adapter on a local causal LM and write it as a PEFT directory.

    BASE is a Hugging Face causal-LM directory (loaded offline with transformers:
    pip install 'loratools[train]'). DATA is .txt (packed into --seq-len blocks) or
    .jsonl with {"text"} or {"prompt", "completion"} rows (loss on completions only)
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
    from ..train.config import TrainConfig
    from ..train import train_adapter

    config = _config(click.get_current_context(), resume, TrainConfig,
                     method=method, rank=rank, alpha=alpha, targets=tuple(t for t in targets.split(",") if t),
                     init_rank=init_rank, target_rank=target_rank, rslora=rslora, dropout=dropout, steps=steps,
                     epochs=epochs, lr=lr, warmup=warmup, batch_size=batch_size, grad_accum=grad_accum,
                     seq_len=seq_len, eval_split=eval_split, eval_file=eval_file, eval_every=eval_every,
                     save_every=save_every, seed=seed, device=device, dtype=dtype, orth_reg_weight=orth_reg,
                     orth_form=orth_form, save_as=save_as, tinit=tinit, tfinal=tfinal, delta_t=delta_t,
                     beta1=beta1, beta2=beta2, gradient_checkpointing=gradient_checkpointing, dora=dora)
    steps = config.steps
    total_hint = steps or 0
    with _progress(session.err, total_hint, quiet_=session.quiet, log_every=log_every) as advance:
        def on_step(info: Any) -> None:
            advance(info)

        result = train_adapter(base, data, output, config, force=force, resume=resume, checkpoint_dir=checkpoint_dir,
                              on_step=on_step, base_model=base_model)
    import os

    if session.quiet or int(os.environ.get("RANK", "0")) != 0:
        return
    last = result.losses[-1]["loss"] if result.losses else float("nan")
    held = f" · held-out loss {result.evals[-1]['eval_loss']:.4f}" if result.evals else ""
    start = [e["eval_loss"] for e in result.evals if e["step"] == 0]
    trained = [e for e in result.evals if e["step"] > 0]
    if start and trained:
        best = min(trained, key=lambda e: e["eval_loss"])
        held += f" (base {start[0]:.4f}, best {best['eval_loss']:.4f} at step {best['step']}"
        held += f", in {output}/best)" if best["step"] != result.steps else ")"
    if result.rank_pattern:
        from .render import allocation_table

        kept = sum(sum(b) for b in result.rank_pattern.values())
        full = sum(len(b) for b in result.rank_pattern.values())
        session.out.print(allocation_table(result.rank_pattern))
        session.out.print(f"AdaLoRA's final allocation: {kept} of {full} triplets kept "
                          f"(average rank {kept / max(1, len(result.rank_pattern)):.2f})", highlight=False)
    session.out.print(f"wrote {output}: {result.adapter.method} · {len(result.adapter.modules)} modules · "
                      f"{result.trainable_parameters:,} trainable parameters · {result.steps} steps in "
                      f"{result.seconds:.1f}s · train loss {last:.4f}{held}")
