"""``loratools train``."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import click

from .options import Session, device_option, force_option, output_option, pass_session

if TYPE_CHECKING:
    from rich.console import Console


@contextlib.contextmanager
def _progress(err: Console, total: int, *, quiet_: bool) -> Iterator[Callable[[Any], None]]:
    """A rich bar on ``err`` with step, loss, lr, tokens/s and ETA — on a terminal only."""
    if quiet_ or not err.is_terminal:
        yield lambda info: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]} · lr {task.fields[lr]} · {task.fields[tps]} tok/s"),
                   TextColumn("eta"), TimeRemainingColumn(), console=err, transient=True)
    with bar:
        task = bar.add_task("train", total=total, loss="–", lr="–", tps="–")

        def advance(info: Any) -> None:
            bar.update(task, total=info.total, completed=info.step, loss=f"{info.loss:.4f}", lr=f"{info.lr:.2e}",
                       tps=f"{info.tokens_per_s:,.0f}")
            if info.eval_loss is not None:
                bar.console.print(f"step {info.step}: held-out loss {info.eval_loss:.4f}")

        yield advance


@click.command()
@click.argument("base", type=click.Path())
@click.argument("data", type=click.Path())
@output_option
@force_option
@click.option("--method", type=click.Choice(["lora", "adalora"]), default="lora", show_default=True)
@click.option("--rank", type=int, default=8, show_default=True, help="LoRA rank r.")
@click.option("--alpha", type=float, default=16.0, show_default=True, help="Scale numerator: s = alpha/r (LoRA).")
@click.option("--targets", default="q_proj,v_proj", show_default=True,
              help="Comma-separated nn.Linear/Conv1D module names to adapt (matched on the last name components); "
                   "embeddings and names matching no layer are refused.")
@click.option("--rslora", is_flag=True, help="Scale by alpha/√r instead of alpha/r.")
@click.option("--dropout", type=float, default=0.0, show_default=True, help="Dropout on the adapter input.")
@click.option("--init-rank", type=int, default=12, show_default=True, help="AdaLoRA: initial triplets per layer.")
@click.option("--target-rank", type=int, default=4, show_default=True, help="AdaLoRA: final average rank per layer.")
@click.option("--orth-reg", type=float, default=0.5, show_default=True, help="AdaLoRA: orthogonal regulariser weight γ.")
@click.option("--orth-form", type=click.Choice(["peft", "paper"]), default="peft", show_default=True,
              help="AdaLoRA regulariser: peft = mean of ‖·‖_F; paper = Σ ‖·‖²_F.")
@click.option("--steps", type=int, default=None, help="Optimizer steps (default: one epoch).")
@click.option("--epochs", type=float, default=None, help="Epochs over the training split (instead of --steps).")
@click.option("--lr", type=float, default=2e-4, show_default=True)
@click.option("--warmup", type=int, default=0, show_default=True, help="Linear warm-up steps (then cosine to lr/10).")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Sequences per process and micro-batch.")
@click.option("--grad-accum", type=int, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--seq-len", type=int, default=128, show_default=True)
@click.option("--eval-split", type=float, default=0.1, show_default=True, help="Fraction held out for eval loss.")
@click.option("--eval-every", type=int, default=0, help="Held-out loss every N steps (default: 5 times a run).")
@click.option("--save-every", type=int, default=0, help="Write a checkpoint every N steps (0: none).")
@click.option("--checkpoint-dir", type=click.Path(), default=None, help="Where checkpoints go [default: OUT.checkpoints].")
@click.option("--resume", type=click.Path(), default=None, help="Continue from a checkpoint directory, bit for bit.")
@click.option("--seed", type=int, default=0, show_default=True)
@device_option
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "bfloat16"]),
              help="Base weights' dtype; auto = float32 on CPU, bfloat16 + autocast on CUDA.")
@click.option("--save-as", type=click.Choice(["auto", "lora"]), default="auto", show_default=True,
              help="lora writes an AdaLoRA result as plain LoRA (same ΔW).")
@pass_session
def train(session: Session, base: str, data: str, output: str, force: bool, method: str, rank: int, alpha: float,
          targets: str, rslora: bool, dropout: float, init_rank: int, target_rank: int, orth_reg: float, orth_form: str,
          steps: int | None, epochs: float | None, lr: float, warmup: int, batch_size: int, grad_accum: int,
          seq_len: int, eval_split: float, eval_every: int, save_every: int, checkpoint_dir: str | None,
          resume: str | None, seed: int, device: str, dtype: str, save_as: str) -> None:
    """Train a LoRA or AdaLoRA adapter on a local causal LM and write it as a PEFT directory.

    BASE is a Hugging Face causal-LM directory (loaded offline with transformers:
    pip install 'loratools[train]'). DATA is .txt (packed into --seq-len blocks) or
    .jsonl with {"text"} or {"prompt", "completion"} rows (loss on completions only).
    OUT gets adapter_config.json + adapter_model.safetensors, training_config.json,
    loss_curve.json and loss.png (with matplotlib). Under torchrun it trains with DDP;
    the global batch is batch-size × grad-accum × processes.

    \b
    Examples:
      loratools train fixtures/tiny-llama fixtures/corpus.txt -o out/lora --steps 50 --lr 1e-3
      loratools train BASE data.jsonl -o out/ada --method adalora --init-rank 12 --target-rank 4
      torchrun --nproc-per-node 2 -m loratools train BASE data.txt -o out/ddp --batch-size 2
    """
    from ..train import TrainConfig
    from ..train import train as run_training

    config = TrainConfig(method=method, rank=rank, alpha=alpha, targets=tuple(t for t in targets.split(",") if t),
                         init_rank=init_rank, target_rank=target_rank, rslora=rslora, dropout=dropout, steps=steps,
                         epochs=epochs, lr=lr, warmup=warmup, batch_size=batch_size, grad_accum=grad_accum,
                         seq_len=seq_len, eval_split=eval_split, eval_every=eval_every, save_every=save_every,
                         seed=seed, device=device, dtype=dtype, orth_reg_weight=orth_reg,
                         orth_form=orth_form, save_as=save_as)  # type: ignore[arg-type]
    total_hint = steps or 0
    with _progress(session.err, total_hint, quiet_=session.quiet) as advance:
        def on_step(info: Any) -> None:
            advance(info)

        result = run_training(base, data, output, config, force=force, resume=resume, checkpoint_dir=checkpoint_dir,
                              on_step=on_step)
    import os

    if session.quiet or int(os.environ.get("RANK", "0")) != 0:
        return
    last = result.losses[-1]["loss"] if result.losses else float("nan")
    held = f" · held-out loss {result.evals[-1]['eval_loss']:.4f}" if result.evals else ""
    session.out.print(f"wrote {output}: {result.adapter.method} · {len(result.adapter.modules)} modules · "
                      f"{result.trainable_parameters:,} trainable parameters · {result.steps} steps in "
                      f"{result.seconds:.1f}s · train loss {last:.4f}{held}")
