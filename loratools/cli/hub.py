"""``loratools pull`` and ``loratools push``: the Hugging Face Hub."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from .options import ADAPTER, Session, force_option, pass_session

if TYPE_CHECKING:
    from ..inspection import InspectReport


def _summary(report: InspectReport) -> str:
    return (f"{report.method} · base {report.base_model or 'unknown'} · {report.modules} modules · "
            f"{report.parameters:,} parameters · rank {report.rank_min}–{report.rank_max} "
            f"(total {report.rank_total}) · fingerprint {report.fingerprint[:12]}")


@click.command()
@click.argument("repo_id")
@click.option("-o", "--output", "output", type=click.Path(file_okay=False), default=None,
              help="Also copy the adapter files into this new directory (written whole or not at all).")
@click.option("--revision", default=None, help="Branch, tag or commit id (default: main).")
@force_option
@pass_session
def pull(session: Session, repo_id: str, output: str | None, revision: str | None, force: bool) -> None:
    """Download an adapter from the Hugging Face Hub and show what it holds.

    Only the adapter files are fetched (adapter_config.json, adapter_model.safetensors,
    README.md), into the Hub cache (HF_HOME); they must parse before the command
    succeeds. It prints the adapter's layers and, last, the local folder (alone with -q). HF_ENDPOINT, HF_TOKEN and
    HF_HUB_OFFLINE=1 (serve from the cache only) work as for any Hub tool.
    Elsewhere, any ADAPTER argument may be hf://REPO_ID[@REV], which pulls it first.

    \b
    Examples:
      loratools pull me/my-adapter
      loratools pull me/my-adapter --revision v2 -o my-adapter
      loratools inspect hf://me/my-adapter@v2
    """
    from ..hub.client import pull as hub_pull

    q = session.quiet
    path = hub_pull(repo_id, revision=revision, local_dir=output, force=force,
                    progress=not q and session.err.is_terminal)
    if not q:
        from ..device import configure_cpu_threads
        from ..formats import read_adapter
        from ..inspection import inspect_adapter
        from .render import inspect_table

        configure_cpu_threads()
        report = inspect_adapter(read_adapter(path, format="peft"), format="peft")
        session.out.print(f"[bold]{repo_id}[/]{'@' + revision if revision else ''}  {_summary(report)}",
                          highlight=False)
        session.out.print(inspect_table(report))
    click.echo(str(path))


@click.command()
@click.argument("adapter", type=ADAPTER)
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", default=None, metavar="BRANCH", help="Branch to commit to, created if missing (default: main).")
@click.option("--message", "-m", default=None, help="Commit message (default: a summary of the adapter).")
@click.option("--create-pr", is_flag=True, help="Open a pull request with the commit instead of committing to the branch.")
@click.option("--base-model", default=None, help="Hub id of the base model for the model card (default: from the config).")
@click.option("--dry-run", is_flag=True, help="Print the files and the model card that would be uploaded; upload nothing.")
@pass_session
def push(session: Session, adapter: str, repo_id: str, private: bool, revision: str | None, message: str | None,
         create_pr: bool, base_model: str | None, dry_run: bool) -> None:
    """Upload an adapter to the Hugging Face Hub in PEFT layout, with a model card, in one commit.

    Any format loratools reads is converted to PEFT layout first (a PEFT folder is
    uploaded byte for byte) and must read back identically; files that do not parse are
    refused. The model card (README.md) says library_name: peft, the base_model and the
    tags lora/adalora and base_model:adapter:<base>, with a table of ranks and parameters,
    and the training settings when the folder holds loratools' training_config.json.
    base_model appears only when it is a Hub id (namespace/name); a local path never does.
    --dry-run prints the files and the card and contacts nobody. The repo is created if needed. The token comes from HF_TOKEN or `hf auth login`
    and is never printed.

    \b
    Examples:
      loratools push fixtures/adapters/lora me/tiny-lora --private
      loratools push adapter.safetensors me/tiny-lora --revision dev -m "rank 4"
      loratools push adapter.safetensors me/tiny-lora --create-pr
      loratools push out/lora me/lora --base-model HuggingFaceTB/SmolLM2-135M --dry-run
    """
    from ..device import configure_cpu_threads
    from ..hub.client import preview_push
    from ..hub.client import push as hub_push

    configure_cpu_threads()
    if dry_run:
        files, card = preview_push(adapter, repo_id, base_model=base_model)
        click.echo(f"would commit to {repo_id}@{revision or 'main'} (dry run: nothing uploaded):")
        for name, nbytes in files.items():
            click.echo(f"  {name}  {nbytes:,} bytes")
        click.echo(f"--- {'README.md'} ---")
        click.echo(card)
        return
    result = hub_push(adapter, repo_id, private=private, revision=revision, message=message, create_pr=create_pr,
                      base_model=base_model, progress=not session.quiet and session.err.is_terminal)
    if not session.quiet:
        session.out.print(f"committed {', '.join(result.files)} to {result.repo_id}@{result.revision} "
                          f"({result.commit_oid[:12]})", highlight=False)
    click.echo(result.pr_url or result.commit_url)
