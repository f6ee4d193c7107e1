"""A small loopback stand-in for the Hugging Face Hub, driven by the real ``huggingface_hub`` client.

It speaks only the part of the Hub's HTTP API that ``loratools pull`` / ``push`` use (as
huggingface_hub 2.4.0 calls it), keeps repositories in memory (commits with files) and
runs in a thread on 127.0.0.1. Routes:

=======================================================  ===========================================
``GET  /api/agent-harnesses``                            404 (the client asks once per process)
``POST /api/repos/create``                               create a repo (409 + ``url`` if it exists)
``POST /api/validate-yaml``                              parse the README's YAML header (400 if bad)
``GET  /api/models/{repo}[/revision/{rev}]``             repo info: ``sha``, ``private``, ``siblings``
``GET  /api/models/{repo}/tree/{rev}[/{path}]``          file listing (``oid``, ``size``, ``lfs``)
``POST /api/models/{repo}/preupload/{rev}``              ``uploadMode`` regular / lfs, ``oid`` if known
``POST /api/models/{repo}/commit/{rev}[?create_pr=1]``   NDJSON ``header`` / ``file`` / ``lfsFile`` /
                                                         ``deletedFile`` lines → one atomic commit
``POST /api/models/{repo}/branch/{branch}``              create a branch
``POST /{repo}.git/info/lfs/objects/batch``              git-LFS batch: ``upload`` action with an href
``PUT  /lfs-objects/{sha256}``                           the LFS upload itself (checks sha256 + size)
``HEAD|GET /{repo}/resolve/{rev}/{path}``                the file, with ``X-Repo-Commit``, ``ETag``,
                                                         ``X-Linked-Etag`` / ``X-Linked-Size`` (LFS)
=======================================================  ===========================================

Auth: ``Authorization: Bearer <token>`` where ``tokens`` maps tokens to user names. Reads of
public repos need no token; private repos answer 401 without a valid one (as the Hub does);
writes need a token whose user owns the namespace. Faults for tests: ``hub.faults[route] =
status`` answers that status instead (``route`` is ``"commit"``, ``"preupload"``,
``"resolve"`` …), and ``hub.faults["resolve"] = "drop"`` sends half of a file and then drops
the connection (and drops every resumed request at once); ``hub.faults["resolve"] = "trickle"``
sends a file's headers, then one byte every ``hub.trickle_s`` seconds. A hostile endpoint, for the
security tests: ``hub.hostile["etag"]`` / ``["commit"]`` replace the ``ETag`` (and ``X-Linked-Etag``)
/ ``X-Repo-Commit`` of every file reply, ``["sha"]`` is answered as the head commit's id (and
resolves to it), ``["any_revision"]`` resolves any unknown revision to main. For fuzzing,
``hub.mangle = fn(route, method, status, headers, body)`` sees every reply before it is sent and
may return ``(status, [(name, value), …], body)`` as bytes, written raw (any header bytes, a
lying or missing ``Content-Length``, a cut body; the connection then closes), or None to send
it unchanged. Xet is not spoken: the preupload
answers ``regular`` for every file unless its suffix is in ``lfs_suffixes``, and LFS tests
run the client with ``HF_HUB_DISABLE_XET=1``. Bounded: request bodies over ``max_body``
and stores over ``max_bytes`` get 413.
"""

from __future__ import annotations

import base64
import collections
import datetime as dt
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

__all__ = ["FakeHub", "Blob", "Commit", "Repo"]

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.gguf filter=lfs diff=lfs merge=lfs -text\n"


def git_oid(data: bytes) -> str:
    """Git's blob id: sha1 over ``b"blob <len>\\0" + data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Blob:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n".encode()

    @property
    def git_oid(self) -> str:
        # an LFS file is stored in git as its pointer file
        return git_oid(self.pointer if self.lfs else self.data)

    @property
    def etag(self) -> str:
        # the Hub's ETag is the sha256 for LFS files and the git blob id for regular ones
        return self.sha256 if self.lfs else self.git_oid


@dataclass(frozen=True)
class Commit:
    oid: str
    parent: str | None
    title: str
    files: dict[str, Blob]
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N → commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    prs: int = 0

    def resolve(self, rev: str) -> Commit | None:
        oid = self.refs.get(rev, rev)
        return self.commits.get(oid)

    def history(self, ref: str = "main") -> list[Commit]:
        out, oid = [], self.refs.get(ref)
        while oid is not None:
            out.append(self.commits[oid])
            oid = self.commits[oid].parent
        return out


class _HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class FakeHub:
    """In-memory Hub on ``127.0.0.1:<free port>``; use as a context manager or ``start()`` / ``stop()``."""

    def __init__(self, *, tokens: dict[str, str] | None = None, lfs_suffixes: tuple[str, ...] = (".safetensors",),
                 max_body: int = 32 << 20, max_bytes: int = 128 << 20) -> None:
        self.tokens = dict(tokens or {})
        self.lfs_suffixes = lfs_suffixes
        self.max_body, self.max_bytes = max_body, max_bytes
        self.repos: dict[str, Repo] = {}
        self.lfs_store: dict[str, bytes] = {}
        self.faults: dict[str, int | str] = {}
        self.hostile: dict[str, str] = {}
        self.trickle_s = 0.5
        self.mangle: Any = None  # see the module docstring
        self.log: collections.deque[tuple[str, str]] = collections.deque(maxlen=2000)
        self._lock = threading.RLock()
        self._counter = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self._server is not None, "start() the hub first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            assert self._thread is not None
            self._thread.join(timeout=5)
            self._server = self._thread = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- state helpers for tests --------------------------------------------------------------
    def _new_oid(self, seed: str) -> str:
        self._counter += 1
        return hashlib.sha1(f"{seed}:{self._counter}".encode()).hexdigest()

    def _stored_bytes(self) -> int:
        unique = {b.sha256: len(b.data) for r in self.repos.values() for c in r.commits.values()
                  for b in c.files.values()}
        return sum(unique.values()) + sum(len(v) for v in self.lfs_store.values())

    def create(self, repo_id: str, *, private: bool = False) -> Repo:
        with self._lock:
            repo = Repo(repo_id, private)
            first = Commit(self._new_oid(repo_id), None, "initial commit",
                           {".gitattributes": Blob(GITATTRIBUTES, lfs=False)}, _now())
            repo.commits[first.oid] = first
            repo.refs["main"] = first.oid
            self.repos[repo_id] = repo
            return repo

    def commit(self, repo_id: str, files: dict[str, bytes], *, ref: str = "main", title: str = "seed",
               deleted: tuple[str, ...] = ()) -> Commit:
        """Add a commit on ``ref`` (made from ``ref``'s head, or main's for a new ref)."""
        with self._lock:
            repo = self.repos[repo_id]
            parent = repo.commits[repo.refs.get(ref, repo.refs["main"])]
            tree = {p: b for p, b in parent.files.items() if p not in deleted}
            for path, data in files.items():
                tree[path] = Blob(data, lfs=path.endswith(self.lfs_suffixes))
            if self._stored_bytes() + sum(len(d) for d in files.values()) > self.max_bytes:
                raise _HttpError(413, "the test hub's store is full")
            c = Commit(self._new_oid(repo_id), parent.oid, title, tree, _now())
            repo.commits[c.oid] = c
            repo.refs[ref] = c.oid
            return c

    def file(self, repo_id: str, path: str, rev: str = "main") -> bytes:
        commit = self.repos[repo_id].resolve(rev)
        assert commit is not None, f"no revision {rev}"
        return commit.files[path].data

    def calls(self, method: str | None = None, contains: str = "") -> list[tuple[str, str]]:
        return [(m, p) for m, p in list(self.log) if (method is None or m == method) and contains in p]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


# The path grammar of the routes above; groups are still percent-encoded.
_REPO = r"([^/]+/[^/]+)"
_ROUTES: list[tuple[str, str, re.Pattern[str]]] = [
    ("GET", "harnesses", re.compile(r"^/api/agent-harnesses$")),
    ("POST", "create", re.compile(r"^/api/repos/create$")),
    ("POST", "validate_yaml", re.compile(r"^/api/validate-yaml$")),
    ("GET", "tree", re.compile(rf"^/api/models/{_REPO}/tree/([^/]+)(?:/(.*))?$")),
    ("GET", "info", re.compile(rf"^/api/models/{_REPO}(?:/revision/([^/]+))?$")),
    ("POST", "preupload", re.compile(rf"^/api/models/{_REPO}/preupload/([^/]+)$")),
    ("POST", "commit", re.compile(rf"^/api/models/{_REPO}/commit/([^/]+)$")),
    ("POST", "branch", re.compile(rf"^/api/models/{_REPO}/branch/([^/]+)$")),
    ("POST", "lfs_batch", re.compile(rf"^/{_REPO}\.git/info/lfs/objects/batch$")),
    ("PUT", "lfs_put", re.compile(r"^/lfs-objects/([0-9a-f]{64})$")),
    ("HEAD", "resolve", re.compile(rf"^/{_REPO}/resolve/([^/]+)/(.+)$")),
    ("GET", "resolve", re.compile(rf"^/{_REPO}/resolve/([^/]+)/(.+)$")),
]


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    server_version = "fake-hub/1"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    # ---- plumbing ----------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.route = ""
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.hub.log.append((method, url.path))
        try:
            for m, name, pattern in _ROUTES:
                match = pattern.match(url.path)
                if m == method and match:
                    self.route = name
                    fault = self.hub.faults.get(name)
                    if isinstance(fault, int):
                        raise _HttpError(fault, f"injected fault on {name}")
                    getattr(self, f"route_{name}")(*[unquote(g) if g else g for g in match.groups()])
                    return
            raise _HttpError(404, f"no route for {method} {url.path}")
        except _HttpError as e:
            self._send_json({"error": e.message}, status=e.status,
                            headers={"X-Error-Code": e.code} if e.code else None, head=method == "HEAD")
        except ConnectionError:
            pass
        except Exception as e:  # a request this stand-in does not understand: say so (400, never retried)
            self._send_json({"error": f"the test hub could not handle this request: {e!r}"}, status=400,
                            head=method == "HEAD")

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(out)
                if len(out) + size > self.hub.max_body:
                    raise _HttpError(413, "request body too large for the test hub")
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.hub.max_body:
            raise _HttpError(413, "request body too large for the test hub")
        return self.rfile.read(length)

    def _json(self) -> Any:
        try:
            return json.loads(self._body() or b"{}")
        except json.JSONDecodeError as e:
            raise _HttpError(400, f"bad JSON: {e}") from None

    def _send(self, status: int, body: bytes, *, headers: dict[str, str] | None = None,
              content_type: str = "application/json", head: bool = False) -> None:
        if self.hub.mangle is not None:
            mangled = self.hub.mangle(self.route, self.command, status,
                                      {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})},
                                      b"" if head else body)
            if mangled is not None:
                self._send_raw(*mangled)
                return
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _send_raw(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """A reply written byte for byte, as a hostile server may (the connection closes after it)."""
        self.close_connection = True
        lines = b"".join(k + b": " + v + b"\r\n" for k, v in headers)
        try:
            self.wfile.write(b"HTTP/1.1 %d Fuzzed\r\n%b\r\n%b" % (status, lines, body))
            self.wfile.flush()
        except OSError:  # the client gave up
            pass

    def _send_json(self, data: Any, *, status: int = 200, headers: dict[str, str] | None = None,
                   head: bool = False) -> None:
        self._send(status, json.dumps(data).encode(), headers=headers, head=head)

    def _user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if not auth:
            return None
        user = self.hub.tokens.get(auth.removeprefix("Bearer ").strip())
        if user is None:
            raise _HttpError(401, "Invalid credentials in Authorization header")
        return user

    def _repo(self, repo_id: str, *, write: bool = False) -> Repo:
        user = self._user()
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            raise _HttpError(404, "Repository not found", "RepoNotFound")
        if repo.private and user != repo_id.split("/")[0]:
            # the Hub hides private repos behind 401, as if they did not exist
            raise _HttpError(401, "Repository not found", "RepoNotFound")
        if write and user != repo_id.split("/")[0]:
            raise _HttpError(401 if user is None else 403, "You don't have the rights to write to this repo")
        return repo

    def _commit_at(self, repo: Repo, rev: str) -> Commit:
        hostile = self.hub.hostile
        if rev == hostile.get("sha") or (hostile.get("any_revision") and repo.resolve(rev) is None):
            rev = "main"
        commit = repo.resolve(rev)
        if commit is None:
            raise _HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    # ---- routes ------------------------------------------------------------------------------
    def route_harnesses(self) -> None:
        raise _HttpError(404, "not served here")

    def route_create(self) -> None:
        body = self._json()
        user = self._user()
        if user is None:
            raise _HttpError(401, "You must be authenticated to create a repo")
        namespace = body.get("organization") or user
        if namespace != user:
            raise _HttpError(403, f"You don't have the rights to create a repo under {namespace}")
        if body.get("type", "model") != "model":
            raise _HttpError(400, "the test hub only holds model repos")
        repo_id = f"{namespace}/{body['name']}"
        url = f"{self.hub.url}/{repo_id}"
        with self.hub._lock:
            if repo_id in self.hub.repos:
                self._send_json({"error": "You already created this model repo", "url": url}, status=409)
                return
            self.hub.create(repo_id, private=body.get("visibility") == "private" or bool(body.get("private")))
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def route_validate_yaml(self) -> None:
        content = str(self._json().get("content", ""))
        errors = []
        if content.startswith("---"):
            header = content.split("\n---", 1)[0].removeprefix("---")
            try:
                meta = yaml.safe_load(header)
                if meta is not None and not isinstance(meta, dict):
                    errors.append({"message": "metadata must be a mapping"})
            except yaml.YAMLError as e:
                errors.append({"message": f"invalid YAML: {e}"})
        self._send_json({"errors": errors, "warnings": []}, status=400 if errors else 200)

    def route_info(self, repo_id: str, rev: str | None) -> None:
        repo = self._repo(repo_id)
        commit = self._commit_at(repo, rev or "main")
        self._send_json({
            "_id": repo_id, "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
            "sha": self.hub.hostile.get("sha", commit.oid), "lastModified": commit.date, "createdAt": repo.history()[-1].date,
            "private": repo.private, "disabled": False, "gated": False, "tags": [],
            "siblings": [{"rfilename": p} for p in sorted(commit.files)],
        })

    def route_tree(self, repo_id: str, rev: str, sub: str | None) -> None:
        repo = self._repo(repo_id)
        commit = self._commit_at(repo, rev)
        prefix = f"{sub.rstrip('/')}/" if sub else ""
        recursive = self.query.get("recursive", "false").lower() in ("1", "true")
        entries: list[dict[str, Any]] = []
        folders: set[str] = set()
        for path in sorted(commit.files):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            blob = commit.files[path]
            entry: dict[str, Any] = {"type": "file", "oid": blob.git_oid, "size": len(blob.data), "path": path}
            if blob.lfs:
                entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(blob.pointer)}
            entries.append(entry)
        entries += [{"type": "directory", "oid": git_oid(f.encode()), "size": 0, "path": f} for f in sorted(folders)]
        if not entries and prefix:
            raise _HttpError(404, f"{sub} does not exist", "EntryNotFound")
        self._send_json(entries)

    def route_preupload(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id, write=True)
        body = self._json()
        head = repo.resolve(rev) or repo.resolve("main")
        assert head is not None
        files = []
        for f in body.get("files", []):
            path = f["path"]
            lfs = path.endswith(self.hub.lfs_suffixes) and int(f.get("size", 0)) > 0
            known = head.files.get(path)
            oid = None if known is None or known.lfs != lfs else (known.sha256 if lfs else known.git_oid)
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self._send_json({"files": files, "commitOid": head.oid})

    def route_branch(self, repo_id: str, branch: str) -> None:
        repo = self._repo(repo_id, write=True)
        start = self._json().get("startingPoint") or "main"
        with self.hub._lock:
            if branch in repo.refs:
                raise _HttpError(409, f"Reference already exists: {branch}")
            repo.refs[branch] = self._commit_at(repo, start).oid
        self._send_json({})

    def route_commit(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id, write=True)
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HttpError(400, "the first NDJSON line must be the header")
        header = lines[0]["value"]
        files: dict[str, bytes] = {}
        deleted: list[str] = []
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                data = self.hub.lfs_store.get(value["oid"])
                if data is None:
                    raise _HttpError(422, f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = data
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                raise _HttpError(400, f"unknown NDJSON key {key!r}")
        with self.hub._lock:
            base = self._commit_at(repo, rev)
            parent = header.get("parentCommit")
            if parent is not None and parent != base.oid:
                raise _HttpError(412, f"A commit has happened since {parent}")
            ref = rev
            if self.query.get("create_pr") == "1":
                repo.prs += 1
                ref = f"refs/pr/{repo.prs}"
                repo.refs[ref] = base.oid
            elif rev not in repo.refs:
                raise _HttpError(400, "commits go to a branch, not a commit id")
            commit = self.hub.commit(repo_id, files, ref=ref, title=header.get("summary", ""), deleted=tuple(deleted))
        reply = {"success": True, "commitOid": commit.oid, "commitUrl": f"{self.hub.url}/{repo_id}/commit/{commit.oid}"}
        if ref.startswith("refs/pr/"):
            reply["pullRequestUrl"] = f"{self.hub.url}/{repo_id}/discussions/{repo.prs}"
        self._send_json(reply)

    def route_lfs_batch(self, repo_id: str) -> None:
        self._repo(repo_id, write=True)
        body = self._json()
        if body.get("operation") != "upload":
            raise _HttpError(400, "the test hub only takes LFS uploads")
        objects = []
        for obj in body.get("objects", []):
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.lfs_store:  # no actions = already uploaded
                entry["actions"] = {"upload": {"href": f"{self.hub.url}/lfs-objects/{obj['oid']}", "header": {}}}
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def route_lfs_put(self, oid: str) -> None:
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            raise _HttpError(400, "uploaded content does not match its sha256")
        with self.hub._lock:
            if self.hub._stored_bytes() + len(data) > self.hub.max_bytes:
                raise _HttpError(413, "the test hub's store is full")
            self.hub.lfs_store[oid] = data
        self._send(200, b"", content_type="text/plain")

    def route_resolve(self, repo_id: str, rev: str, path: str) -> None:
        head = self.command == "HEAD"
        repo = self._repo(repo_id)
        commit = self._commit_at(repo, rev)
        blob = commit.files.get(path)
        if blob is None:
            raise _HttpError(404, f"{path} does not exist at {rev}", "EntryNotFound")
        hostile = self.hub.hostile
        commit_id = hostile.get("commit", hostile.get("sha", commit.oid))
        headers = {"X-Repo-Commit": commit_id, "ETag": f'"{blob.etag}"', "Accept-Ranges": "bytes"}
        if blob.lfs:
            headers |= {"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.data))}
        if "etag" in hostile:
            headers |= {"ETag": f'"{hostile["etag"]}"'} | ({"X-Linked-Etag": f'"{hostile["etag"]}"'} if blob.lfs else {})
        if not head and self.hub.faults.get("resolve") == "drop":
            self._drop(blob.data, headers, resumed="Range" in self.headers)
            return
        if not head and self.hub.faults.get("resolve") == "trickle":
            self._trickle(blob.data, headers)
            return
        self._send(200, blob.data, headers=headers, content_type="application/octet-stream", head=head)

    def _trickle(self, data: bytes, headers: dict[str, str]) -> None:
        """A server that never stalls long enough for a read timeout, and never finishes: a byte at a time."""
        import time

        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.close_connection = True
        for i in range(len(data)):
            if self.hub._server is None:
                return
            try:
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
            except OSError:  # the client gave up
                return
            time.sleep(self.hub.trickle_s)

    def _drop(self, data: bytes, headers: dict[str, str], *, resumed: bool) -> None:
        """A network failure mid-download: half the body, then the connection goes away."""
        if not resumed:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> None:
    """Serve a fake hub until killed or ``--lifetime`` seconds pass (used by scripts/demo.sh)."""
    import argparse
    import time

    p = argparse.ArgumentParser(description="A loopback stand-in for the Hugging Face Hub (tests and demo only).")
    p.add_argument("--token", required=True, help="the one valid token")
    p.add_argument("--user", default="demo", help="the user that token belongs to")
    p.add_argument("--url-file", required=True, help="write the base URL here once serving")
    p.add_argument("--lifetime", type=float, default=600.0, help="stop after this many seconds")
    args = p.parse_args(argv)
    with FakeHub(tokens={args.token: args.user}) as hub:
        with open(args.url_file + ".tmp", "w") as f:
            f.write(hub.url)
        import os

        os.replace(args.url_file + ".tmp", args.url_file)
        time.sleep(args.lifetime)


if __name__ == "__main__":
    main()
