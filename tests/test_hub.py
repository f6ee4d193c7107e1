"""``loratools pull`` / ``push`` against a loopback Hub (tests/hub_server.py) driven by the real huggingface_hub client.

No internet: every test points the client at the fake hub, in process with ``endpoint=``
and in subprocesses with ``HF_ENDPOINT`` (read when huggingface_hub is imported). The
CLI tests run with their own ``HF_HOME`` so the cache and any token file are theirs.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import run_cli_subprocess  # noqa: E402
from hub_server import FakeHub  # noqa: E402

from loratools.hub import client as lthub  # noqa: E402
from loratools.errors import HubError, InvalidOptionError, LoraToolsError, OutputExistsError  # noqa: E402
from loratools.formats import read_adapter, write_adapter  # noqa: E402
from loratools.inspection import inspect_adapter  # noqa: E402
from loratools.adapter import Adapter  # noqa: E402
from loratools.config import AdapterConfig  # noqa: E402
from loratools.config import hub_model_id
from loratools.hub.card import model_card  # noqa: E402

TOKEN = "hf_loratoolsTestToken1234567890"  # the test hub's write token for user "tester"
OTHER = "hf_someoneElseToken0987654321"
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    """A fresh in-memory Hub on 127.0.0.1, stopped at teardown. Files are committed inline ("regular")."""
    with FakeHub(tokens={TOKEN: "tester", OTHER: "someone"}, lfs_suffixes=()) as h:
        yield h


@pytest.fixture
def lfs_hub() -> Iterator[FakeHub]:
    """Same, but *.safetensors go through git-LFS (batch + PUT)."""
    with FakeHub(tokens={TOKEN: "tester"}, lfs_suffixes=(".safetensors",)) as h:
        yield h


@pytest.fixture
def cli():
    """``loratools`` in a fresh process: huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE when imported."""
    return run_cli_subprocess


@pytest.fixture
def no_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)


def env_for(hub: FakeHub, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    env |= {"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1"}
    return env | extra


def seed(hub: FakeHub, repo_id: str, adapter_dir: Path, *, private: bool = False) -> None:
    hub.create(repo_id, private=private)
    hub.commit(repo_id, {n: (adapter_dir / n).read_bytes() for n in PEFT_FILES})


def assert_one_line_error(proc, *needles: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loratools: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in proc.stderr and TOKEN not in proc.stderr + proc.stdout


def same_factors(a, b) -> None:
    assert sorted(a.modules) == sorted(b.modules)
    for name, m in a.modules.items():
        for x, y in zip(m.factors(), b.modules[name].factors()):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


# ---- round trips ------------------------------------------------------------------------------

def test_push_then_pull_round_trip_inline(hub: FakeHub, adapters: Path, tmp_path: Path) -> None:
    result = lthub.push(adapters / "lora", "tester/tiny-lora", endpoint=hub.url, token=TOKEN)
    assert result.files == ("README.md", *PEFT_FILES)
    assert hub.calls("POST", "commit/main") and not hub.calls("POST", "lfs/objects/batch")
    history = hub.repos["tester/tiny-lora"].history()
    assert len(history) == 2 and history[0].oid == result.commit_oid  # initial commit + ONE upload commit
    for name in PEFT_FILES:  # a PEFT folder goes up byte for byte
        assert hub.file("tester/tiny-lora", name) == (adapters / "lora" / name).read_bytes()

    path = lthub.pull("tester/tiny-lora", endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "cache",
                      local_dir=tmp_path / "out")
    assert path == tmp_path / "out" and sorted(p.name for p in path.iterdir()) == sorted(result.files)
    for name in PEFT_FILES:
        assert (path / name).read_bytes() == (adapters / "lora" / name).read_bytes()
    assert (path / "README.md").read_bytes() == hub.file("tester/tiny-lora", "README.md")
    # only the adapter files were fetched, even though the repo holds more
    assert not any("gitattributes" in p for _, p in hub.calls("GET", "/resolve/"))


def test_pushing_the_same_adapter_twice_makes_no_new_commit(hub: FakeHub, adapters: Path) -> None:
    first = lthub.push(adapters / "lora", "tester/twice", endpoint=hub.url, token=TOKEN)
    again = lthub.push(adapters / "lora", "tester/twice", endpoint=hub.url, token=TOKEN)
    assert again.commit_oid == first.commit_oid and len(hub.repos["tester/twice"].history()) == 2


@pytest.mark.slow
def test_push_then_pull_round_trip_lfs_cli(lfs_hub: FakeHub, adapters: Path, tmp_path: Path, cli) -> None:
    env = env_for(lfs_hub, tmp_path / "hf")
    pushed = cli("push", adapters / "adalora", "tester/tiny-adalora", env=env)
    assert pushed.returncode == 0, pushed.stderr
    assert pushed.stdout.strip().splitlines()[-1].startswith(f"{lfs_hub.url}/tester/tiny-adalora/commit/")
    # the weights took the git-LFS path: batch, then PUT of the bytes; the commit carries an lfsFile line
    assert lfs_hub.calls("POST", "tester/tiny-adalora.git/info/lfs/objects/batch")
    assert lfs_hub.calls("PUT", "/lfs-objects/")
    assert lfs_hub.repos["tester/tiny-adalora"].resolve("main").files["adapter_model.safetensors"].lfs
    weights = (adapters / "adalora" / "adapter_model.safetensors").read_bytes()
    assert lfs_hub.file("tester/tiny-adalora", "adapter_model.safetensors") == weights

    pulled = cli("pull", "tester/tiny-adalora", "-o", tmp_path / "out", env=env)
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.strip().splitlines()[-1] == str(tmp_path / "out")
    n = len(read_adapter(adapters / "adalora").modules)
    assert "adalora" in pulled.stdout and f"{n} modules" in pulled.stdout  # the inspect summary
    for name in PEFT_FILES:
        assert (tmp_path / "out" / name).read_bytes() == (adapters / "adalora" / name).read_bytes()
    # HF_HOME is honoured: the cache is under it
    assert (tmp_path / "hf" / "hub" / "models--tester--tiny-adalora" / "snapshots").is_dir()
    assert TOKEN not in pushed.stdout + pushed.stderr + pulled.stdout + pulled.stderr


def test_push_converts_other_formats_to_peft(hub: FakeHub, adapters: Path, tmp_path: Path) -> None:
    lthub.push(adapters / "lora.safetensors", "tester/from-single", endpoint=hub.url, token=TOKEN)
    tree = hub.repos["tester/from-single"].resolve("main").files
    assert {"README.md", *PEFT_FILES} <= set(tree)
    path = lthub.pull("tester/from-single", endpoint=hub.url, token=TOKEN, cache_dir=tmp_path)
    same_factors(read_adapter(adapters / "lora.safetensors"), read_adapter(path))


@pytest.mark.slow
def test_push_refuses_files_that_do_not_parse(hub: FakeHub, adapters: Path, tmp_path: Path, cli) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8')  # cut short
    (bad / "adapter_model.safetensors").write_bytes((adapters / "lora" / "adapter_model.safetensors").read_bytes())
    proc = cli("push", bad, "tester/bad", env=env_for(hub, tmp_path / "hf"))
    assert_one_line_error(proc, "adapter_config.json")
    assert "tester/bad" not in hub.repos and not hub.calls("POST")


# ---- the model card -----------------------------------------------------------------------------

@pytest.mark.parametrize("name, method_tag", [("lora", "lora"), ("adalora", "adalora")])
def test_model_card_on_the_hub(hub: FakeHub, adapters: Path, name: str, method_tag: str,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(adapters.parent.parent)
    # the fixtures name their base by a relative local path: the card must not pass it off as a Hub id
    assert read_adapter(adapters / name).config.base_model == "fixtures/tiny-llama"
    lthub.push(adapters / name, f"tester/card-{name}-local", endpoint=hub.url, token=TOKEN)
    card = ModelCard(hub.file(f"tester/card-{name}-local", "README.md").decode())
    assert card.data.base_model is None and not any(t.startswith("base_model:") for t in card.data.tags)
    base = "HuggingFaceTB/SmolLM2-135M"
    lthub.push(adapters / name, f"tester/card-{name}", endpoint=hub.url, token=TOKEN, base_model=base)
    card = ModelCard(hub.file(f"tester/card-{name}", "README.md").decode())
    assert card.data.library_name == "peft"
    assert card.data.base_model == base
    assert method_tag in card.data.tags and f"base_model:adapter:{base}" in card.data.tags
    # the table: one row per module with its rank and parameter count, as inspect reports them
    report = inspect_adapter(read_adapter(adapters / name))
    rows = {line.split("|")[1].strip(" `"): line.split("|") for line in card.text.splitlines()
            if line.startswith("| `")}
    assert len(rows) == report.modules
    for layer in report.layers:
        assert int(rows[layer.name][3]) == layer.rank
        assert int(rows[layer.name][6].replace(",", "")) == layer.parameters


def test_model_card_of_a_qlora_adapter_names_its_base_as_peft_does() -> None:
    """A card pushed for an adapter trained with ``--quantize`` carries peft's bitsandbytes block, so ``merge`` of
    the pulled adapter knows its base (quants_of_card reads what peft 0.21.2's own card code writes)."""
    from loratools.quant.qlora import quants_of_card

    report = inspect_adapter(Adapter({}, AdapterConfig()))
    card = model_card(report, repo_id="me/x", training={"method": "lora", "quantize": "nf4-dq", "rank": 8})
    assert quants_of_card(card) == ("nf4-dq",) and "| quantize | nf4-dq |" in card
    plain = model_card(report, repo_id="me/x", training={"method": "lora", "quantize": "none", "rank": 8})
    assert quants_of_card(plain) == () and "quantize" not in plain


def test_model_card_base_model_override_and_local_paths() -> None:
    report = inspect_adapter(Adapter({}, AdapterConfig(base_model="/home/me/models/llama")))
    meta = ModelCard(model_card(report, repo_id="me/x")).data
    assert meta.library_name == "peft" and meta.base_model is None  # a local path is not a Hub id
    assert not any(t.startswith("base_model:") for t in meta.tags)
    meta = ModelCard(model_card(report, repo_id="me/x", base_model="HuggingFaceTB/SmolLM2-135M")).data
    assert meta.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert "base_model:adapter:HuggingFaceTB/SmolLM2-135M" in meta.tags
    # a bare name is refused: it is far more often a local folder (`base`) than a legacy Hub id
    assert [hub_model_id(x) for x in ("gpt2", "a/b", "./a", "a/b/c", "a--b/c")] == [None, "a/b", None, None, None]


# ---- revisions and pull requests --------------------------------------------------------------------

def test_push_to_branch_and_pull_request(hub: FakeHub, adapters: Path, tmp_path: Path) -> None:
    first = lthub.push(adapters / "lora", "tester/branchy", endpoint=hub.url, token=TOKEN)
    dev = lthub.push(adapters / "rslora", "tester/branchy", revision="dev", message="rslora on dev",
                     endpoint=hub.url, token=TOKEN)
    repo = hub.repos["tester/branchy"]
    assert repo.refs["main"] == first.commit_oid and repo.refs["dev"] == dev.commit_oid
    assert repo.resolve("dev").title == "rslora on dev"
    pr = lthub.push(adapters / "adalora", "tester/branchy", create_pr=True, endpoint=hub.url, token=TOKEN)
    assert pr.pr_url and pr.pr_url.endswith("/discussions/1") and repo.refs["main"] == first.commit_oid
    path = lthub.pull("tester/branchy", revision="refs/pr/1", token=TOKEN, endpoint=hub.url, cache_dir=tmp_path)
    assert read_adapter(path).method == "adalora"
    path = lthub.pull("tester/branchy", revision="dev", token=TOKEN, endpoint=hub.url, cache_dir=tmp_path)
    assert read_adapter(path).config.use_rslora


# ---- failures: one line, exit 2, nothing half-done ----------------------------------------------------

@pytest.mark.slow
def test_private_repo_needs_a_token(hub: FakeHub, adapters: Path, tmp_path: Path, no_token, cli) -> None:
    seed(hub, "tester/secret", adapters / "lora", private=True)
    with pytest.raises(HubError, match="private.*HF_TOKEN") as e:
        lthub.pull("tester/secret", endpoint=hub.url, token=False, cache_dir=tmp_path / "c1",
                   local_dir=tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    assert lthub.pull("tester/secret", endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "c2").is_dir()
    # the CLI without HF_TOKEN: refused, one line; pushing without a token is refused too
    env = env_for(hub, tmp_path / "hf")
    del env["HF_TOKEN"]
    assert_one_line_error(cli("pull", "tester/secret", env=env), "401", "HF_TOKEN")
    assert_one_line_error(cli("push", adapters / "lora", "tester/new", "--private", env=env), "401", "HF_TOKEN")
    assert "tester/new" not in hub.repos


def test_wrong_namespace_is_forbidden_and_token_not_shown(hub: FakeHub, adapters: Path, tmp_path: Path) -> None:
    with pytest.raises(HubError, match="403") as e:
        lthub.push(adapters / "lora", "someone-else/x", endpoint=hub.url, token=TOKEN)
    assert TOKEN not in str(e.value)


@pytest.mark.slow
def test_server_error_on_commit_leaves_no_commit(hub: FakeHub, adapters: Path, tmp_path: Path, cli) -> None:
    seed(hub, "tester/stable", adapters / "lora")
    before = [c.oid for c in hub.repos["tester/stable"].history()]
    hub.faults["commit"] = 500
    proc = cli("push", adapters / "adalora", "tester/stable", env=env_for(hub, tmp_path / "hf"))
    assert_one_line_error(proc, "500", "no commit was made")
    assert hub.calls("POST", "/commit/main")  # it did get as far as the commit
    assert [c.oid for c in hub.repos["tester/stable"].history()] == before


def test_failed_lfs_upload_makes_no_commit(lfs_hub: FakeHub, adapters: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The weights' PUT fails (the client wraps that in a RuntimeError): one line, and the commit is never sent."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # what HF_HUB_DISABLE_XET=1 sets at import
    lfs_hub.faults["lfs_put"] = 400
    with pytest.raises(HubError, match="400 during the upload") as e:
        lthub.push(adapters / "lora", "tester/half", endpoint=lfs_hub.url, token=TOKEN)
    assert "\n" not in str(e.value) and TOKEN not in str(e.value)
    assert lfs_hub.calls("PUT", "/lfs-objects/") and not lfs_hub.calls("POST", "/commit/")
    assert len(lfs_hub.repos["tester/half"].history()) == 1  # just the repo's initial commit


@pytest.mark.slow
def test_missing_repo_and_revision(hub: FakeHub, adapters: Path, tmp_path: Path, cli) -> None:
    proc = cli("pull", "tester/nope", env=env_for(hub, tmp_path / "hf"))
    assert_one_line_error(proc, "tester/nope", "does not exist")
    seed(hub, "tester/there", adapters / "lora")
    with pytest.raises(HubError, match="no revision 'v9'"):
        lthub.pull("tester/there", revision="v9", token=TOKEN, endpoint=hub.url, cache_dir=tmp_path)


def test_server_error_on_pull(hub: FakeHub, adapters: Path, tmp_path: Path) -> None:
    seed(hub, "tester/down", adapters / "lora")
    hub.faults["info"] = 503
    with pytest.raises(HubError, match="503.*not cached"):
        lthub.pull("tester/down", token=TOKEN, endpoint=hub.url, cache_dir=tmp_path)


def test_repo_without_adapter_is_refused(hub: FakeHub, tmp_path: Path) -> None:
    hub.create("tester/model")
    hub.commit("tester/model", {"config.json": b"{}", "model.safetensors": b"not here"})
    with pytest.raises(HubError, match="no adapter_config.json"):
        lthub.pull("tester/model", token=TOKEN, endpoint=hub.url, cache_dir=tmp_path)
    assert not hub.calls("GET", "model.safetensors")  # a full model's weights are never fetched


def test_pulled_files_must_parse(hub: FakeHub, adapters: Path, tmp_path: Path) -> None:
    hub.create("tester/broken")
    weights = (adapters / "lora" / "adapter_model.safetensors").read_bytes()
    hub.commit("tester/broken", {"adapter_config.json": (adapters / "lora" / "adapter_config.json").read_bytes(),
                                 "adapter_model.safetensors": weights[: len(weights) // 2]})  # truncated
    with pytest.raises(LoraToolsError) as e:
        lthub.pull("tester/broken", token=TOKEN, endpoint=hub.url, cache_dir=tmp_path / "cache", local_dir=tmp_path / "out")
    assert "adapter_model.safetensors" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_connection_dropped_mid_download(hub: FakeHub, adapters: Path, tmp_path: Path) -> None:
    """Half of the weights arrive, then the server drops the connection (and every resumed request)."""
    seed(hub, "tester/flaky", adapters / "lora")
    hub.faults["resolve"] = "drop"
    out = tmp_path / "out"
    with pytest.raises(HubError, match="network error") as e:
        lthub.pull("tester/flaky", token=TOKEN, endpoint=hub.url, cache_dir=tmp_path / "cache", local_dir=out)
    assert "\n" not in str(e.value)
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # no partial output
    assert len(hub.calls("GET", "/adapter_model.safetensors")) > 1  # the client did try to resume


@pytest.mark.slow
def test_offline_mode_serves_from_cache(hub: FakeHub, adapters: Path, tmp_path: Path, cli) -> None:
    seed(hub, "tester/cached", adapters / "lora")
    env = env_for(hub, tmp_path / "hf")
    online = lthub.pull("tester/cached", token=TOKEN, endpoint=hub.url, cache_dir=tmp_path / "hf" / "hub")  # = $HF_HOME/hub
    n = len(hub.log)
    offline = cli("-q", "pull", "tester/cached", env=env | {"HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout.strip() == str(online) and len(hub.log) == n  # same snapshot, no request at all
    missing = cli("pull", "tester/never-pulled", env=env | {"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(missing, "not in the local cache", "HF_HUB_OFFLINE")
    # in process, offline=True does the same
    with pytest.raises(HubError, match="not in the local cache"):
        lthub.pull("tester/cached", token=TOKEN, endpoint=hub.url, cache_dir=tmp_path / "empty", offline=True)


def test_pull_output_exists(hub: FakeHub, adapters: Path, tmp_path: Path) -> None:
    seed(hub, "tester/o", adapters / "lora")
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError):
        lthub.pull("tester/o", token=TOKEN, endpoint=hub.url, cache_dir=tmp_path, local_dir=tmp_path / "out")
    assert not hub.calls("GET")  # refused before any download
    lthub.pull("tester/o", token=TOKEN, endpoint=hub.url, cache_dir=tmp_path, local_dir=tmp_path / "out", force=True)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


# ---- hf:// adapters ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_hf_uri_adapter_argument(hub: FakeHub, adapters: Path, tmp_path: Path, cli) -> None:
    seed(hub, "tester/remote", adapters / "rslora")
    proc = cli("inspect", "hf://tester/remote@main", "--json", env=env_for(hub, tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr
    import json

    report = json.loads(proc.stdout)
    assert report["use_rslora"] and report["modules"] == len(read_adapter(adapters / "rslora").modules)
    proc = cli("inspect", "hf://tester/absent", env=env_for(hub, tmp_path / "hf"))
    assert_one_line_error(proc, "tester/absent", "does not exist")


def test_parse_hf_uri() -> None:
    assert lthub.parse_hf_uri("hf://me/a") == ("me/a", None)
    assert lthub.parse_hf_uri("hf://me/a@v1") == ("me/a", "v1")
    assert lthub.parse_hf_uri("hf://me/a@refs/pr/3") == ("me/a", "refs/pr/3")
    for bad in ("hf://", "hf://a/b/c", "hf://me/a@"):
        with pytest.raises(InvalidOptionError):
            lthub.parse_hf_uri(bad)


def test_stage_upload_converts_and_checks(adapters: Path, tmp_path: Path) -> None:
    single = tmp_path / "a.safetensors"
    write_adapter(read_adapter(adapters / "adalora"), single, format="loratools")
    report = lthub.stage_upload(single, tmp_path / "staged", repo_id="me/x")
    assert sorted(p.name for p in (tmp_path / "staged").iterdir()) == ["README.md", *PEFT_FILES]
    assert report.method == "adalora"
    same_factors(read_adapter(adapters / "adalora"), read_adapter(tmp_path / "staged"))


# ---- layering and help ------------------------------------------------------------------------------

def test_only_hub_module_imports_huggingface_hub() -> None:
    import ast

    package = Path(lthub.__file__).resolve().parent.parent
    importers = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] in ("huggingface_hub", "httpx2", "requests") for n in names):
                importers.add(path.relative_to(package).as_posix())
    assert importers == {"hub/client.py"}


@pytest.mark.parametrize("command", ["pull", "push"])
def test_help_and_readme(command: str) -> None:
    from click.testing import CliRunner

    from loratools.cli import cli as group

    result = CliRunner().invoke(group, [command, "--help"])
    assert result.exit_code == 0 and "Examples:" in result.output
    root = Path(lthub.__file__).resolve().parents[2]
    assert f"[`loratools {command}`](docs/cli.md#{command})" in (root / "README.md").read_text()
    assert f"\n## {command}\n" in (root / "docs" / "cli.md").read_text()


def test_push_dry_run_shows_card_and_files_and_never_says_base_model_base(adapters: Path, tmp_path: Path,
                                                                          cli) -> None:
    """Issue "The practitioner's workflow", 5: a relative base path never becomes `base_model: base`."""
    import shutil

    (tmp_path / "base").mkdir()
    folder = tmp_path / "adapter"
    shutil.copytree(adapters / "lora", folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "base/tiny"}))
    (tmp_path / "base" / "tiny").mkdir()
    (folder / "training_config.json").write_text(json.dumps({"method": "lora", "rank": 8, "lr": 0.001,
                                                             "targets": ["q_proj", "v_proj"], "total_steps": 95}))
    res = cli("push", folder, "me/x", "--dry-run", cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr
    assert "adapter_model.safetensors" in res.stdout and "README.md" in res.stdout
    card = res.stdout.split("--- README.md ---\n", 1)[1]
    meta = ModelCard(card).data
    assert meta.base_model is None and meta.library_name == "peft"
    assert "| lr | 0.001 |" in card and "| targets | q_proj, v_proj |" in card and "| total_steps | 95 |" in card
    res = cli("push", folder, "me/x", "--dry-run", "--base-model", "HuggingFaceTB/SmolLM2-135M", cwd=tmp_path)
    assert ModelCard(res.stdout.split("--- README.md ---\n", 1)[1]).data.base_model == "HuggingFaceTB/SmolLM2-135M"
