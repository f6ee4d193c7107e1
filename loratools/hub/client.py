"""The Hugging Face Hub: pull and push adapters. The only module of loratools that imports ``huggingface_hub``.

- :func:`pull` downloads only an adapter's files (``adapter_config.json``,
  ``adapter_model.safetensors``, ``README.md``) into the Hub cache (``HF_HOME`` /
  ``HF_HUB_CACHE``), checks that they parse, and returns the snapshot folder (or a
  copy made atomically in ``local_dir``). ``HF_HUB_OFFLINE=1`` (or ``offline=True``)
  serves from the cache only.
- :func:`push` stages the adapter in PEFT layout in a temporary folder (any readable
  format is converted; a PEFT folder is uploaded byte for byte), checks that the staged
  files parse back to the same adapter, writes a model card (:mod:`loratools.hub.card`),
  and uploads all of it in ONE commit (``create_commit``), creating the repo if needed.

:func:`pull` trusts nothing the endpoint says (``HF_ENDPOINT`` may be a mirror): before
huggingface_hub builds a cache path from a value, the value is checked here (:class:`_Guard`,
hooked into every HTTP session the pull makes): a commit id must be 40 (or 64) hex digits, an ETag one plain
name, a revision the user gives a branch, tag or commit id (:func:`check_revision`), the repo info
and file listing the client parses are read by :meth:`_Guard.api_reply` (and reduced to the fields it
checks), sizes announced in headers must be numbers within the bounds; every
reply is bounded in bytes (``max_bytes``) and the whole pull in time (``timeout``, default
``LORATOOLS_HUB_TIMEOUT`` or one hour), so a server that trickles bytes cannot hold it forever.

Every failure of the client becomes a one-line :class:`~loratools.errors.HubError`;
messages never contain the token (it is scrubbed from them as a last guard). The
endpoint is ``endpoint=`` or ``HF_ENDPOINT``, the token ``token=`` or ``HF_TOKEN`` / the
stored login, exactly as huggingface_hub resolves them (``token=False`` sends none).

Not run as doctests (they need a Hub; tests/test_hub.py runs them against a local one):

>>> path = pull("me/my-adapter", revision="v1")                  # doctest: +SKIP
>>> push("out/adapter.safetensors", "me/my-adapter", private=True)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi, constants, set_client_factory, snapshot_download
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

from ..adapter import Adapter
from ..deltas import check_same_deltas
from ..errors import ConversionCheckError, CorruptFileError, HubError, InvalidOptionError
from ..formats import detect_format, read_adapter, write_adapter
from ..formats.peft import CONFIG_NAME, WEIGHTS_NAME
from ..inspection import InspectReport, inspect_adapter
from ..io import atomic_output, check_output
from .card import model_card

__all__ = ["ADAPTER_FILES", "PushResult", "check_revision", "parse_hf_uri", "pull", "push", "stage_upload"]

CARD_NAME = "README.md"
#: What :func:`pull` downloads; nothing else of a repo (no full models, no pickles).
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
HF_SCHEME = "hf://"

#: a revision a user names (branch, tag, ``refs/pr/N``, commit id): ``/``-separated parts of letters,
#: digits and ``._+-``, none starting with ``.`` or ``-`` (so never ``..``, never absolute)
_REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*(?:/[A-Za-z0-9_][A-Za-z0-9._+-]*)*")
#: a commit id as the Hub gives it (git's sha1; sha256 repos have 64 digits)
_COMMIT = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")
#: an ETag, once the client strips ``W/`` and quotes, names a file in the cache: one plain name
_ETAG = re.compile(r"[0-9A-Za-z_-]{8,128}")
#: the replies whose JSON ``sha`` names a cache folder (repo info, at a revision or not)
_INFO = re.compile(r"/api/(?:models|datasets|spaces)/[^/]+/[^/]+(?:/revision/[^/]+)?$")
#: one reply that is not a file (JSON held in memory) is at most this many bytes
MAX_REPLY_BYTES = 64 << 20
#: what one pull may receive in all
PULL_MAX_BYTES = 32 << 30
_TIMEOUT_ENV = os.environ.get("LORATOOLS_HUB_TIMEOUT", "")  # read once, like huggingface_hub's own variables


@dataclass(frozen=True)
class PushResult:
    """What :func:`push` committed."""

    repo_id: str
    commit_oid: str
    commit_url: str
    pr_url: str | None
    revision: str
    files: tuple[str, ...]


def parse_hf_uri(uri: str) -> tuple[str, str | None]:
    """``hf://REPO_ID[@REV]`` → ``(repo_id, rev or None)``; repo ids cannot hold ``@``, revisions may hold ``/``.

    >>> parse_hf_uri("hf://me/adapter@refs/pr/1")
    ('me/adapter', 'refs/pr/1')
    """
    rest = uri[len(HF_SCHEME):] if uri.startswith(HF_SCHEME) else uri
    repo_id, _, rev = rest.partition("@")
    repo_id = repo_id.strip("/")
    if not repo_id or repo_id.count("/") > 1 or (_ and not rev):
        raise InvalidOptionError(f"{uri!r} is not an hf:// adapter; write hf://NAMESPACE/NAME or hf://NAMESPACE/NAME@REVISION")
    return repo_id, check_revision(rev) if rev else None


def check_revision(revision: str) -> str:
    """``revision`` if it can only be a branch, tag or commit id; it becomes a file name under the cache's ``refs/``.

    >>> check_revision("refs/pr/1")
    'refs/pr/1'
    """
    if len(revision) > 255 or not _REVISION.fullmatch(revision) or ".." in revision:
        raise InvalidOptionError(f"`revision` {revision!r} is not a branch, tag or commit id (parts of letters, "
                                 "digits and ._+- separated by /, none starting with . or -); check it")
    return revision


def _pull_timeout(timeout: float | None) -> float:
    if timeout is None:
        try:
            timeout = float(_TIMEOUT_ENV) if _TIMEOUT_ENV else 3600.0
        except ValueError:
            timeout = float("nan")
        if not timeout > 0:
            raise InvalidOptionError(f"LORATOOLS_HUB_TIMEOUT={_TIMEOUT_ENV!r} is not a number of seconds > 0; fix or "
                                     "unset it")
    if not timeout > 0:
        raise InvalidOptionError(f"`timeout` must be a number of seconds > 0, not {timeout!r}")
    return timeout


# ---- pull ------------------------------------------------------------------------------------

def pull(repo_id: str, *, revision: str | None = None, local_dir: str | os.PathLike[str] | None = None,
         force: bool = False, endpoint: str | None = None, token: str | bool | None = None,
         cache_dir: str | os.PathLike[str] | None = None, offline: bool = False, progress: bool = False,
         timeout: float | None = None, max_bytes: int = PULL_MAX_BYTES) -> Path:
    """Download the adapter files of ``repo_id`` at ``revision``; return the folder holding them.

    The files go to the Hub cache (``cache_dir``, default ``HF_HUB_CACHE`` under ``HF_HOME``)
    and the snapshot folder is returned; with ``local_dir`` they are also copied there
    (written under a temporary name and renamed when complete, so a failed pull leaves no
    ``local_dir``). The adapter is read once to check it parses before anything is returned.
    The whole download may take ``timeout`` seconds (default ``LORATOOLS_HUB_TIMEOUT``, else
    3600) and receive ``max_bytes``; what the endpoint answers is checked before it names a path.
    """
    if revision is not None:
        check_revision(revision)
    seconds = _pull_timeout(timeout)
    if local_dir is not None:
        check_output(local_dir, force=force)  # before any download
    where = (endpoint or constants.ENDPOINT).rstrip("/")
    guard = _Guard(where, seconds=seconds, max_bytes=max_bytes)
    with _client(progress), _hub_errors(repo_id, revision=revision, token=token, endpoint=endpoint,
                                        action="download", offline=offline, guard=guard), _guarded(guard):
        snapshot = Path(snapshot_download(
            repo_id, revision=revision, cache_dir=None if cache_dir is None else Path(cache_dir), endpoint=endpoint,
            token=token,
            allow_patterns=list(ADAPTER_FILES), local_files_only=offline,
            library_name="loratools", library_version=_version(),
        ))
    if guard.refused is not None:  # raised inside the client, and caught there by something
        raise HubError(repo_id, guard.refused)
    _check_inside(repo_id, snapshot, Path(cache_dir or constants.HF_HUB_CACHE))
    at = f" at {revision}" if revision else ""
    if not (snapshot / CONFIG_NAME).is_file():
        raise HubError(repo_id, f"no {CONFIG_NAME}{at}: loratools pulls PEFT-layout adapters "
                                f"({CONFIG_NAME} + {WEIGHTS_NAME}) from the top of the repo")
    if not (snapshot / WEIGHTS_NAME).is_file():
        raise HubError(repo_id, f"{CONFIG_NAME} but no {WEIGHTS_NAME}{at} (loratools never loads pickled "
                                "adapter_model.bin files)")
    read_adapter(snapshot, format="peft")  # refuse what does not parse
    if local_dir is None:
        return snapshot
    with atomic_output(local_dir, force=force) as tmp:
        tmp.mkdir()
        for name in ADAPTER_FILES:
            if (snapshot / name).is_file():
                shutil.copyfile(snapshot / name, tmp / name)  # follows the cache's symlinks
    return Path(local_dir)


def _check_inside(repo_id: str, snapshot: Path, cache: Path) -> None:
    """The last guard: the snapshot and each file it holds lie inside the cache (checked values make this hold)."""
    root = cache.resolve()
    for path in (snapshot, *(snapshot / name for name in ADAPTER_FILES)):
        if os.path.lexists(path) and root not in path.resolve().parents:
            raise HubError(repo_id, f"the download put {path} outside the cache {root}; delete it, and do not "
                                    "pull from this endpoint again")


# ---- what an endpoint answers, checked before huggingface_hub uses it ------------------------

class _Refused(Exception):
    """A reply the guard refuses: raised inside the client, turned into a :class:`HubError` by :func:`_hub_errors`."""


class _Guard:
    """The checks of one pull, run by huggingface_hub's HTTP session on every request and reply.

    A request's timeouts are cut to what is left of the pull's time; a reply's commit id
    (``X-Repo-Commit``), ETag (``X-Linked-Etag`` or, for a file, ``ETag``) and repo-info
    ``sha`` must have their shapes (:data:`_COMMIT`, :data:`_ETAG`) before the client makes a
    path of them; the bytes of each reply are counted (the pull's ``max_bytes``, and
    :data:`MAX_REPLY_BYTES` for an ``/api/`` reply) and the clock read at every chunk.
    """

    def __init__(self, where: str, *, seconds: float, max_bytes: int) -> None:
        self.where, self.seconds, self.max_bytes = where, seconds, max_bytes
        self.deadline = time.monotonic() + seconds
        self.received = 0
        self.refused: str | None = None
        self._lock = threading.Lock()

    def refuse(self, why: str) -> _Refused:
        with self._lock:
            self.refused = self.refused or why
            return _Refused(self.refused)

    def left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.refuse(f"the download from {self.where} took longer than {self.seconds:g} s "
                              "(LORATOOLS_HUB_TIMEOUT); nothing was written, try again or raise it")
        return left

    def count(self, n: int, so_far: int, cap: int) -> None:
        with self._lock:
            self.received += n
            total = self.received
        if so_far > cap or total > self.max_bytes:
            raise self.refuse(f"{self.where} sent more than {min(cap, self.max_bytes)} bytes in "
                              f"{'one reply' if so_far > cap else 'all'}; nothing was written")
        self.left()

    def on_request(self, request: httpx2.Request) -> None:
        left = self.left()
        asked = dict(request.extensions.get("timeout") or {})
        cut = {k: left if asked.get(k) is None else min(asked[k], left) for k in ("connect", "read", "write", "pool")}
        # what was asked for, kept across redirects (which copy the extensions): a reply is read as that
        path = request.url.path
        asked_for = request.extensions.get(_ASKED) or (
            "info" if _INFO.search(path) else "tree" if _TREE.search(path) else "api" if "/api/" in path else "file")
        request.extensions = {**request.extensions, "timeout": cut, _ASKED: asked_for}

    def on_response(self, response: httpx2.Response) -> None:
        headers, path = response.headers, response.request.url.path
        commit = headers.get(constants.HUGGINGFACE_HEADER_X_REPO_COMMIT)
        if commit is not None and not _COMMIT.fullmatch(commit):
            raise self.refuse(f"{self.where} answered the commit id {commit[:80]!r}, which is not 40 hex digits; "
                              "nothing was written (is HF_ENDPOINT a Hub?)")
        etag = headers.get(constants.HUGGINGFACE_HEADER_X_LINKED_ETAG)
        if etag is None and "/resolve/" in path:
            etag = headers.get("ETag")
        if etag is not None and not _ETAG.fullmatch(etag.removeprefix("W/").strip('"')):
            raise self.refuse(f"{self.where} answered the ETag {etag[:80]!r}, which is not a plain hash; "
                              "nothing was written (is HF_ENDPOINT a Hub?)")
        kind = response.request.extensions.get(_ASKED, "file")
        cap = MAX_REPLY_BYTES if kind != "file" or "/api/" in path else self.max_bytes  # JSON in memory, or a file
        for name in ("Content-Length", constants.HUGGINGFACE_HEADER_X_LINKED_SIZE):  # sizes the client plans with
            size, bound = headers.get(name), min(cap, self.max_bytes)
            if size is not None and not re.fullmatch(r"[0-9]{1,19}", size):
                raise self.refuse(f"{self.where} announced {name}: {size[:80]!r}, not a number of bytes; nothing "
                                  "was written (is HF_ENDPOINT a Hub?)")
            if size is not None and int(size) > bound:
                raise self.refuse(f"{self.where} sent more than {bound} bytes in one reply ({name}: {size}); "
                                  "nothing was written")
        response.stream = _Counted(response.stream, self, cap)
        if kind in ("info", "tree") and response.status_code < 400 and not response.has_redirect_location:  # what the client parses
            response.read()
            # the client builds objects (and cache paths) from these: it gets only the fields checked here
            response._content = json.dumps(self.api_reply(kind, response.content)).encode()

    def api_reply(self, kind: str, body: bytes) -> Any:
        """The reader of the JSON a pull uses: repo info (``id``, ``sha``) or a tree listing (``type``, ``path``,
        ``oid``, ``size``, ``lfs``, ``xetHash`` of each entry), checked and reduced to those fields; else refused.
        """
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            data = _NOT_JSON
        if kind == "info":
            sha = data.get("sha") if isinstance(data, dict) else None
            if isinstance(data, dict) and sha is not None and not (isinstance(sha, str) and _COMMIT.fullmatch(sha)):
                raise self.refuse(f"{self.where} answered the commit id {str(sha)[:80]!r}, which is not 40 hex "
                                  "digits; nothing was written (is HF_ENDPOINT a Hub?)")
            if isinstance(data, dict) and isinstance(data.get("id"), str) and sha is not None:
                return {"id": data["id"], "sha": sha}
            raise self.refuse(f"{self.where} answered repo info that is not a JSON object with an id and a commit "
                              "id (sha); nothing was written (is HF_ENDPOINT a Hub?)")
        entries = data if isinstance(data, list) else []
        kept = [_tree_entry(e) for e in entries]
        if not isinstance(data, list) or any(e is None for e in kept):
            raise self.refuse(f"{self.where} answered a file listing that is not a JSON list of files and folders "
                              "(type, path, oid; size and lfs for a file); nothing was written (is HF_ENDPOINT a Hub?)")
        return kept


_NOT_JSON = object()
#: the request extension that says what a request (and each redirect of it) asked for: info, tree, api or file
_ASKED = "loratools.asked_for"
#: the replies listing a revision's files (``trees/<sha>.json`` in the cache is made of them)
_TREE = re.compile(r"/api/(?:models|datasets|spaces)/[^/]+/[^/]+/tree/")


def _is_size(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63


def _tree_entry(e: object) -> dict[str, Any] | None:
    """One entry of a tree listing with only the fields the client reads, or None when one is missing or odd."""
    if not (isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("oid"), str)
            and len(e["path"]) <= 4096 and len(e["oid"]) <= 128):
        return None
    if e.get("type") == "directory":
        return {"type": "directory", "path": e["path"], "oid": e["oid"]}
    lfs, xet = e.get("lfs"), e.get("xetHash")
    if e.get("type") != "file" or not _is_size(e.get("size")) or not (xet is None or isinstance(xet, str)):
        return None
    out = {"type": "file", "path": e["path"], "oid": e["oid"], "size": e["size"]}
    if xet is not None:
        out["xetHash"] = xet
    if lfs is not None:
        if not (isinstance(lfs, dict) and isinstance(lfs.get("oid"), str) and _ETAG.fullmatch(lfs["oid"])
                and _is_size(lfs.get("size")) and _is_size(lfs.get("pointerSize"))):
            return None
        out["lfs"] = {"oid": lfs["oid"], "size": lfs["size"], "pointerSize": lfs["pointerSize"]}
    return out


class _Counted(httpx2.SyncByteStream):
    """A reply's body, counted against the guard's bounds and clock chunk by chunk."""

    def __init__(self, inner: Any, guard: _Guard, cap: int) -> None:
        self.inner, self.guard, self.cap = inner, guard, cap

    def __iter__(self) -> Iterator[bytes]:
        seen = 0
        for chunk in self.inner:
            seen += len(chunk)
            self.guard.count(len(chunk), seen, self.cap)
            yield chunk

    def close(self) -> None:
        self.inner.close()


@contextlib.contextmanager
def _guarded(guard: _Guard) -> Iterator[None]:
    """Hook ``guard`` into every HTTP session huggingface_hub makes during the pull.

    Not only the session of the moment: the client closes its session after a connection error (a redirect
    to a closed port is enough) and makes a new one, which must be guarded as well. So the session factory is
    wrapped for the pull (the current session closed, the next made through it) and put back after."""
    from huggingface_hub.utils import _http as hf_http

    before: Callable[[], httpx2.Client] = getattr(hf_http, "_GLOBAL_CLIENT_FACTORY", hf_http.default_client_factory)

    def guarded() -> httpx2.Client:
        client = before()
        hooks = client.event_hooks
        client.event_hooks = {"request": [*hooks["request"], guard.on_request],
                              "response": [*hooks["response"], guard.on_response]}
        return client

    set_client_factory(guarded)
    try:
        yield
    finally:
        set_client_factory(before)  # closes the guarded session too


# ---- push ------------------------------------------------------------------------------------

def stage_upload(adapter_path: str | os.PathLike[str], folder: str | os.PathLike[str], *, repo_id: str,
                 base_model: str | None = None) -> InspectReport:
    """Write what :func:`push` uploads into the new folder ``folder``; return the inspect report.

    A PEFT folder's config and weights are copied as they are; any other readable format is
    converted with ``write_adapter(read_adapter(x), folder, format="peft")``. The staged
    files must read back to the same modules, ranks and factors, or nothing is uploaded.
    """
    src, dest = Path(adapter_path), Path(folder)
    fmt = detect_format(src)
    adapter = read_adapter(src, format=fmt)
    if fmt == "peft":
        d = src if src.is_dir() else src.parent
        dest.mkdir(parents=True)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            shutil.copyfile(d / name, dest / name)
    else:
        write_adapter(adapter, dest, format="peft")
    staged = read_adapter(dest, format="peft")
    _check_same(adapter, staged, src)
    report = inspect_adapter(staged, format="peft")
    training = _training_record(src if src.is_dir() else src.parent)
    recorded = report.base_model
    # a relative local path (fixtures/tiny-llama) reads like a Hub id: the card names only what is not on disk here
    card_report = replace(report, base_model=None) if recorded and Path(recorded).exists() else report
    (dest / CARD_NAME).write_text(model_card(card_report, repo_id=repo_id, base_model=base_model, training=training),
                                  encoding="utf-8")
    return report


def _training_record(folder: Path) -> dict[str, Any] | None:
    """``training_config.json`` beside the adapter (what ``loratools train`` writes), or None."""
    try:
        record = json.loads((folder / "training_config.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def preview_push(adapter_path: str | os.PathLike[str], repo_id: str, *,
                 base_model: str | None = None) -> tuple[dict[str, int], str]:
    """What :func:`push` would upload, without the network: ``({file name: bytes}, model card text)``."""
    with tempfile.TemporaryDirectory(prefix="loratools-push-") as tmp:
        folder = Path(tmp) / "adapter"
        stage_upload(adapter_path, folder, repo_id=repo_id, base_model=base_model)
        files = {p.name: p.stat().st_size for p in sorted(folder.iterdir())}
        return files, (folder / CARD_NAME).read_text(encoding="utf-8")


def push(adapter_path: str | os.PathLike[str], repo_id: str, *, private: bool = False, revision: str | None = None,
         message: str | None = None, create_pr: bool = False, base_model: str | None = None,
         endpoint: str | None = None, token: str | bool | None = None, progress: bool = False) -> PushResult:
    """Upload the adapter at ``adapter_path`` to ``repo_id`` in PEFT layout with a model card, in one commit.

    Creates the repo (``private`` if asked) and the branch ``revision`` when missing. With
    ``create_pr`` the commit opens a pull request instead of landing on the branch. The Hub
    applies a commit atomically: if the commit request fails, the repo is as it was.
    """
    with tempfile.TemporaryDirectory(prefix="loratools-push-") as tmp:
        folder = Path(tmp) / "adapter"
        report = stage_upload(adapter_path, folder, repo_id=repo_id, base_model=base_model)
        files = tuple(sorted(p.name for p in folder.iterdir()))
        title = message or f"Upload {report.method} adapter ({report.modules} modules, rank "\
                           f"{report.rank_min}–{report.rank_max}) with loratools"
        with _client(progress), _hub_errors(repo_id, revision=revision, token=token, endpoint=endpoint,
                                            action="upload"):
            api = HfApi(endpoint=endpoint, token=token, library_name="loratools", library_version=_version())
            api.create_repo(repo_id, private=True if private else None, exist_ok=True)
            if revision not in (None, constants.DEFAULT_REVISION):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]
            info = api.create_commit(repo_id, ops, commit_message=title, revision=revision, create_pr=create_pr)
    return PushResult(repo_id=repo_id, commit_oid=info.oid, commit_url=str(info.commit_url), pr_url=info.pr_url,
                      revision=revision or constants.DEFAULT_REVISION, files=files)


def _check_same(a: Adapter, b: Adapter, src: Path) -> None:
    """The staged PEFT files must hold the adapter that was read: the one ΔW check every rewrite makes
    (:func:`loratools.deltas.check_same_deltas`), named as the upload's failure."""
    try:
        check_same_deltas(a, b)
    except ConversionCheckError as e:
        raise CorruptFileError(src, f"its PEFT conversion changed {e.module}; nothing was uploaded") from None


# ---- the client's errors → one line ---------------------------------------------------------

def _version() -> str:
    from .. import __version__
    return __version__


@contextlib.contextmanager
def _client(progress: bool) -> Iterator[None]:
    """Keep the client's own logging and (unless ``progress``) its progress bars off the terminal."""
    hf_logger = logging.getLogger("huggingface_hub")
    level = hf_logger.level
    bars_were_off = are_progress_bars_disabled()
    hf_logger.setLevel(logging.ERROR)  # retries are reported as warnings; our error says what failed
    if not progress and not bars_were_off:
        disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logger.setLevel(level)
        if not progress and not bars_were_off:
            enable_progress_bars()


def _secrets(token: str | bool | None) -> list[str]:
    found: list[str | None] = [token if isinstance(token, str) else None, os.environ.get("HF_TOKEN"),
             os.environ.get("HUGGING_FACE_HUB_TOKEN")]
    with contextlib.suppress(Exception):
        from huggingface_hub import get_token
        found.append(get_token())
    return [s for s in found if s and len(s) >= 4]


def _first_line(text: object) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def _why(e: BaseException, *, revision: str | None, endpoint: str, action: str, offline: bool) -> str | None:
    """One line for a known client failure, or None."""
    rev = revision or constants.DEFAULT_REVISION
    offline = offline or constants.is_offline_mode()
    if isinstance(e, hf_errors.OfflineModeIsEnabled):
        return "offline mode is on (HF_HUB_OFFLINE=1), so nothing can be downloaded or uploaded"
    if isinstance(e, hf_errors.IncompleteSnapshotError):
        return (f"the cached copy of revision {rev} is incomplete and the Hub at {endpoint} cannot be reached; "
                "pull it again online")
    if isinstance(e, hf_errors.LocalEntryNotFoundError):
        if offline:
            return (f"revision {rev} is not in the local cache ({constants.HF_HUB_CACHE}) and offline mode is on "
                    "(HF_HUB_OFFLINE=1); pull it once online, or unset HF_HUB_OFFLINE")
        cause = e.__cause__
        if isinstance(cause, hf_errors.HfHubHTTPError):  # the Hub answered, with an error
            inner = _why(cause, revision=revision, endpoint=endpoint, action=action, offline=offline)
            return f"{inner} (and revision {rev} is not cached)"
        what = cause.__class__.__name__ if cause is not None else "no answer"
        return f"cannot reach the Hub at {endpoint} ({what}) and revision {rev} is not cached; check the network or HF_ENDPOINT"
    if isinstance(e, hf_errors.GatedRepoError):
        return "is gated: accept its conditions on the Hub, then set HF_TOKEN to a token of that account"
    if isinstance(e, hf_errors.RepositoryNotFoundError):
        status = e.response.status_code if e.response is not None else 404
        if status == 401:
            if "Invalid credentials" in str(e):
                return "the token was rejected (401 invalid credentials); set HF_TOKEN to a valid token"
            return ("not found, or private and no valid token was sent (401); set HF_TOKEN to a token "
                    "that can read it")
        return f"does not exist ({status}); check the name (NAMESPACE/NAME)"
    if isinstance(e, hf_errors.RevisionNotFoundError):
        return f"has no revision {rev!r}; check --revision (a branch, tag or commit id)"
    if isinstance(e, hf_errors.RemoteEntryNotFoundError):
        return f"a file is missing at revision {rev}: {_first_line(e.server_message or e)}"
    if isinstance(e, hf_errors.HfHubHTTPError):
        status = e.response.status_code if e.response is not None else 0
        server = _first_line(e.server_message or "")
        tail = f": {server}" if server else ""
        if status == 401:
            need = "a token with write access" if action == "upload" else "a valid token"
            return f"the Hub refused the {action} (401 unauthorized{tail}); set HF_TOKEN to {need}"
        if status == 403:
            return f"the token may not do this (403 forbidden{tail}); use a token with write access to the namespace"
        if status >= 500:
            after = "; no commit was made, try again later" if action == "upload" else "; try again later"
            return f"the Hub answered {status} (server error{tail}) during the {action}{after}"
        return f"the Hub answered {status} during the {action}{tail}"
    if isinstance(e, hf_errors.HFValidationError):
        return f"not a valid repo id ({_first_line(e)})"
    if isinstance(e, httpx2.HTTPError):
        return (f"network error during the {action} from {endpoint} ({e.__class__.__name__}); nothing was written, "
                "check the connection and try again")
    if isinstance(e, OSError) and "Consistency check failed" in str(e):
        return f"the download from {endpoint} was cut short (size mismatch); nothing was written, try again"
    if isinstance(e, ValueError) and "Invalid metadata in README.md" in str(e):
        return f"the Hub rejected the model card's metadata: {_first_line(str(e).split('README.md.', 1)[-1])}"
    return None


@contextlib.contextmanager
def _hub_errors(repo_id: str, *, revision: str | None, token: str | bool | None, endpoint: str | None, action: str,
                offline: bool = False, guard: _Guard | None = None) -> Iterator[None]:
    # an HTTP header carries printable ASCII only: say so here, not as an encoder's traceback mid-request
    if token is not False and any(not (s.isascii() and s.isprintable()) for s in _secrets(token)):
        raise HubError(repo_id, "the token (token=, HF_TOKEN, HUGGING_FACE_HUB_TOKEN or the stored login) holds "
                       "characters other than printable ASCII, which an HTTP header cannot carry; a Hub token is "
                       "hf_ and ASCII letters: set HF_TOKEN to the token as the Hub shows it")
    try:
        yield
    except HubError:
        raise
    except Exception as e:
        if guard is not None and guard.refused is not None:  # whatever the client made of the refusal
            raise HubError(repo_id, guard.refused) from None
        # the LFS uploader wraps failures in RuntimeError; look down the cause chain for the real one
        chain: list[BaseException] = []
        cur: BaseException | None = e
        while cur is not None and len(chain) < 8:
            chain.append(cur)
            cur = cur.__cause__ or cur.__context__
        where = (endpoint or constants.ENDPOINT).rstrip("/")
        for err in chain:
            why = _why(err, revision=revision, endpoint=where, action=action, offline=offline)
            if why is not None:
                for secret in _secrets(token):
                    why = why.replace(secret, "***")
                raise HubError(repo_id, why) from None
        raise
