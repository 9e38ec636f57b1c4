"""A small Hugging Face Hub-protocol server for tests (stdlib only).

It speaks the HTTP protocol that the real ``huggingface_hub`` client (1.33) uses, so ``HfApi``,
``hf_hub_download`` and ``snapshot_download`` run unchanged against it. It stands in for the Hub in
tests: no Hub server that accepts uploads can be installed here. State lives in memory.

Scope: model repos only, plain HTTP + legacy git-LFS transfers (clients must run with
``HF_HUB_DISABLE_XET=1``; see ``tests/hub/conftest.py`` for the client constants to patch).

Endpoints (``{repo}`` is ``namespace/name``, ``{rev}`` a branch, tag or commit sha, URL-quoted):

===========================================================  =================================================
``GET    /api/whoami-v2``                                     ``HfApi.whoami``
``POST   /api/repos/create``                                  ``HfApi.create_repo`` (409 if it exists)
``DELETE /api/repos/delete``                                  ``HfApi.delete_repo``
``POST   /api/validate-yaml``                                 README.md metadata check done by ``create_commit``
``GET    /api/models/{repo}[/revision/{rev}]``                ``repo_info`` / ``model_info`` / ``*_exists``
``GET    /api/models/{repo}/tree/{rev}[/{path}]``             ``list_repo_tree`` / ``list_repo_files``
``POST   /api/models/{repo}/paths-info/{rev}``                ``get_paths_info``
``GET    /api/models/{repo}/refs``                            ``list_repo_refs``
``GET    /api/models/{repo}/commits/{rev}``                   ``list_repo_commits``
``POST   /api/models/{repo}/preupload/{rev}``                 upload mode (regular vs LFS) of each file
``POST   /api/models/{repo}/commit/{rev}``                    NDJSON commit (``header``/``file``/``lfsFile``/
                                                              ``deletedFile``/``deletedFolder`` lines)
``POST|DELETE /api/models/{repo}/branch/{name}``              ``create_branch`` / ``delete_branch``
``POST   /api/models/{repo}/tag/{rev}``, ``DELETE .../{tag}`` ``create_tag`` / ``delete_tag``
``PUT    /api/models/{repo}/settings``                        ``update_repo_settings`` (visibility)
``POST   /{repo}.git/info/lfs/objects/batch``                 git-LFS batch API (``upload`` operation, basic)
``POST   /{repo}.git/info/lfs/objects/verify``                git-LFS verify action
``PUT    /_hub_test_server/lfs/{ticket}``                     LFS object upload (the batch ``href``; like a
                                                              pre-signed S3 URL it needs no Authorization)
``GET|HEAD /{repo}/resolve/{rev}/{path}``                     ``hf_hub_download`` (``Range`` supported)
===========================================================  =================================================

Behaviour that mirrors the Hub:

* Auth: ``Authorization: Bearer <token>``. An unknown token gets 401
  ``{"error": "Invalid credentials in Authorization header"}`` on every endpoint; writes need a token
  (401 without one) of a member of the repo's namespace (403 otherwise, or for read-only tokens).
  Private repos, missing repos: 404 with ``X-Error-Code: RepoNotFound``. Missing revision: 404
  ``RevisionNotFound``. Missing file: 404 ``EntryNotFound``. Error bodies are ``{"error": msg}`` and
  the message is repeated in ``X-Error-Message``.
* Upload mode: LFS for files of at least ``lfs_threshold`` bytes (1 MiB), with a weights-like suffix
  (``.safetensors``, ``.bin``, ...) or with a NUL byte in the 512-byte sample; regular otherwise.
* LFS uploads are checked: the PUT body's size and sha256 must match the announced oid (400
  otherwise). A commit whose ``lfsFile`` was never uploaded is rejected (400) and changes nothing.
* Commits are atomic: the tree is rebuilt from the branch head and validated completely under one
  lock, and only then is the branch moved. ``parentCommit`` that is not the head gives 412.
* ``resolve`` answers with ``X-Repo-Commit``, ``ETag`` (git blob sha1, or sha256 for LFS files),
  ``X-Linked-Etag``/``X-Linked-Size`` for LFS files, ``Content-Length``, ``Accept-Ranges``. LFS files are
  served directly (no redirect to a CDN host).
* New repos get an ``initial commit`` holding a ``.gitattributes`` file (``gitattributes=False`` to
  start empty instead).

Test hooks: :meth:`HubServer.fail_next_lfs_uploads` (drop the connection in the middle of the next
LFS PUT bodies), :meth:`HubServer.tamper` (corrupt stored bytes behind a manifest entry),
:meth:`HubServer.refs`, :meth:`HubServer.files`, :meth:`HubServer.commit_ids`,
:meth:`HubServer.seed_repo` and :attr:`HubServer.request_log`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
import socket
import struct
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["HubServer", "LoggedRequest", "git_blob_sha1", "lfs_pointer"]

LFS_THRESHOLD = 1024 * 1024
LFS_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".onnx",
    ".gguf",
    ".npy",
    ".npz",
    ".pkl",
)
GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.ckpt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.h5 filter=lfs diff=lfs merge=lfs -text\n"
    b"*.msgpack filter=lfs diff=lfs merge=lfs -text\n"
    b"*.onnx filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pth filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)

_REPO_SUBPATHS = frozenset(
    {"revision", "tree", "refs", "commits", "commit", "preupload", "paths-info", "branch", "tag", "settings"}
)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_HEX_RE = re.compile(r"^[0-9a-f]+$")
_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)
_UPLOAD_PREFIX = "/_hub_test_server/lfs/"
_JSON = "application/json; charset=utf-8"
_LFS_JSON = "application/vnd.git-lfs+json"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of ``data`` stored as a blob (what the Hub calls a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    """The git-LFS pointer file committed in place of an LFS object."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


def _now() -> str:
    """Current time in the Hub's ``%Y-%m-%dT%H:%M:%S.%fZ`` (milliseconds) format."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _wants_lfs(path: str, size: int, sample: bytes, threshold: int) -> bool:
    """The upload mode rule: big, weights-like or binary files go to LFS (empty files never do)."""
    if size == 0:
        return False
    return size >= threshold or path.lower().endswith(LFS_SUFFIXES) or b"\0" in sample


class HubError(Exception):
    """An HTTP error answered the way the Hub does: JSON ``{"error": ...}`` plus ``X-Error-*`` headers."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})  # more fields of the JSON body


def _repo_not_found() -> HubError:
    return HubError(404, "Repository not found", "RepoNotFound")


def _revision_not_found(revision: str) -> HubError:
    return HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


@dataclass(frozen=True)
class _Entry:
    """One file of a commit tree. LFS files are keyed by sha256 in the object store, others by git oid."""

    size: int
    git_oid: str
    lfs_oid: str | None = None

    @property
    def key(self) -> str:
        return self.lfs_oid or self.git_oid

    @property
    def etag(self) -> str:
        return self.lfs_oid or self.git_oid

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.lfs_oid, self.size)) if self.lfs_oid else 0


@dataclass(frozen=True)
class _Commit:
    sha: str
    parents: tuple[str, ...]
    tree: Mapping[str, _Entry]
    title: str
    message: str
    author: str
    date: str


@dataclass
class _Repo:
    repo_id: str
    private: bool
    created_at: str
    uid: str = field(default_factory=lambda: secrets.token_hex(12))
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    objects: dict[str, bytes] = field(default_factory=dict)  # served bytes, by _Entry.key
    lfs_sizes: dict[str, int] = field(default_factory=dict)  # verified LFS uploads: sha256 -> size

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/", 1)[0]

    def resolve(self, revision: str) -> str | None:
        """Commit sha of a branch, tag, ``refs/heads|tags/...`` name, full sha or unique sha prefix (>= 7)."""
        if revision.startswith("refs/heads/"):
            return self.branches.get(revision[len("refs/heads/") :])
        if revision.startswith("refs/tags/"):
            return self.tags.get(revision[len("refs/tags/") :])
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.tags:
            return self.tags[revision]
        if revision in self.commits:
            return revision
        if 7 <= len(revision) < 40 and _HEX_RE.match(revision):
            matches = [sha for sha in self.commits if sha.startswith(revision)]
            if len(matches) == 1:
                return matches[0]
        return None

    def commit_at(self, revision: str) -> _Commit:
        sha = self.resolve(revision)
        if sha is None:
            raise _revision_not_found(revision)
        return self.commits[sha]


@dataclass(frozen=True)
class _Caller:
    user: str
    write: bool


@dataclass(frozen=True)
class _Ticket:
    """A pending LFS upload, addressed by the unguessable URL handed out by the batch API."""

    repo_id: str
    oid: str
    size: int


@dataclass(frozen=True)
class LoggedRequest:
    """One request seen by the server. ``status`` is 0 when the connection was dropped on purpose."""

    method: str
    path: str
    status: int


@dataclass
class _Response:
    status: int
    body: bytes = b""
    content_type: str = _JSON
    headers: dict[str, str] = field(default_factory=dict)


def _json_response(status: int, payload: Any, content_type: str = _JSON) -> _Response:
    return _Response(status, json.dumps(payload).encode(), content_type)


class HubServer:
    """In-memory Hub on ``127.0.0.1`` (free port), served by a daemon thread.

    Args:
        tokens: valid tokens mapped to their user name.
        read_only_tokens: tokens (keys of ``tokens``) that may read but not write.
        orgs: organisation name mapped to its members; members may read and write the org's repos.
        lfs_threshold: files of at least this many bytes are uploaded through LFS.
        gitattributes: give new repos an initial commit with a ``.gitattributes`` file, as the Hub does.

    Use as a context manager (or call :meth:`start` / :meth:`stop`).
    """

    def __init__(
        self,
        tokens: Mapping[str, str] | None = None,
        *,
        read_only_tokens: Iterable[str] = (),
        orgs: Mapping[str, Iterable[str]] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        lfs_threshold: int = LFS_THRESHOLD,
        gitattributes: bool = True,
    ) -> None:
        self.tokens: dict[str, str] = dict(tokens or {})
        self.read_only_tokens = frozenset(read_only_tokens)
        self.orgs: dict[str, frozenset[str]] = {name: frozenset(members) for name, members in (orgs or {}).items()}
        self.lfs_threshold = lfs_threshold
        self.gitattributes = gitattributes
        self._host = host
        self._port = port
        self._lock = threading.RLock()
        self._repos: dict[str, _Repo] = {}
        self._tickets: dict[str, _Ticket] = {}
        self._fail_lfs_uploads = 0
        self._commit_counter = 0
        self._log: list[LoggedRequest] = []
        self._connections: set[socket.socket] = set()
        self._httpd: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> HubServer:
        """Bind and serve in a daemon thread. Returns ``self``."""
        if self._httpd is not None:
            raise RuntimeError("HubServer already started")
        self._httpd = _HubHTTPServer((self._host, self._port), self)
        self._port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and cut any kept-alive client connections."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL to use as ``HF_ENDPOINT``, e.g. ``http://127.0.0.1:41234``."""
        return f"http://{self._host}:{self._port}"

    # ------------------------------------------------------------------ test hooks

    def fail_next_lfs_uploads(self, n: int = 1) -> None:
        """Make the next ``n`` LFS PUT uploads drop the connection mid-body (no response is sent)."""
        with self._lock:
            self._fail_lfs_uploads += n

    def tamper(self, repo_id: str, revision: str, path: str, new_bytes: bytes) -> None:
        """Replace the stored bytes behind ``path`` at ``revision``, leaving every manifest untouched.

        Downloads then serve ``new_bytes`` while ETag / X-Linked-Etag / X-Linked-Size, tree listings and
        repo info keep describing the original content. The stored object is replaced, so every commit
        and path of this repo that shares the same content is affected. A client cache that already
        holds the blob (same etag) will not download it again.
        """
        with self._lock:
            repo = self._repo(repo_id)
            entry = repo.commit_at(revision).tree.get(path)
            if entry is None:
                raise KeyError(f"{path!r} not in {repo_id}@{revision}")
            repo.objects[entry.key] = bytes(new_bytes)

    def refs(self, repo_id: str) -> dict[str, dict[str, str]]:
        """``{"branches": {name: sha}, "tags": {name: sha}}``."""
        with self._lock:
            repo = self._repo(repo_id)
            return {"branches": dict(repo.branches), "tags": dict(repo.tags)}

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The bytes the server would serve for every file of ``revision``."""
        with self._lock:
            repo = self._repo(repo_id)
            return {path: repo.objects[e.key] for path, e in repo.commit_at(revision).tree.items()}

    def commit_ids(self, repo_id: str, revision: str = "main") -> list[str]:
        """Commit shas reachable from ``revision`` by first parents, newest first."""
        with self._lock:
            repo = self._repo(repo_id)
            return [c.sha for c in self._history(repo, repo.commit_at(revision).sha)]

    def seed_repo(
        self, repo_id: str, files: Mapping[str, bytes], *, private: bool = False, message: str = "Seed files"
    ) -> str:
        """Create ``repo_id`` if needed and commit ``files`` to ``main`` without the client. Returns the sha."""
        with self._lock:
            repo = self._repos.get(repo_id) or self._create_repo(repo_id, private=private)
            head = repo.commits[repo.branches["main"]]
            tree = dict(head.tree)
            for path, data in files.items():
                tree[path] = self._store(repo, path, bytes(data))
            return self._add_commit(repo, "main", tree, message, "", repo.namespace).sha

    @property
    def request_log(self) -> list[LoggedRequest]:
        """Copy of the requests served so far, oldest first."""
        with self._lock:
            return list(self._log)

    # ------------------------------------------------------------------ state helpers (hold the lock)

    def _repo(self, repo_id: str) -> _Repo:
        repo = self._repos.get(repo_id)
        if repo is None:
            raise KeyError(f"no repo {repo_id!r}")
        return repo

    def _is_member(self, user: str, namespace: str) -> bool:
        return user == namespace or user in self.orgs.get(namespace, frozenset())

    def _readable_repo(self, repo_id: str, caller: _Caller | None) -> _Repo:
        repo = self._repos.get(repo_id)
        if repo is None or (repo.private and (caller is None or not self._is_member(caller.user, repo.namespace))):
            raise _repo_not_found()
        return repo

    def _writable_repo(self, repo_id: str, caller: _Caller | None) -> _Repo:
        caller = _require_token(caller)
        repo = self._readable_repo(repo_id, caller)
        _require_write(caller, repo.namespace, self)
        return repo

    def _create_repo(self, repo_id: str, *, private: bool) -> _Repo:
        repo = _Repo(repo_id=repo_id, private=private, created_at=_now())
        self._repos[repo_id] = repo
        tree = {".gitattributes": self._store(repo, ".gitattributes", GITATTRIBUTES)} if self.gitattributes else {}
        self._add_commit(repo, "main", tree, "initial commit", "", "system")
        return repo

    def _store(self, repo: _Repo, path: str, data: bytes) -> _Entry:
        """Store ``data`` in ``repo`` and return its tree entry (LFS or regular, by the upload-mode rule)."""
        if _wants_lfs(path, len(data), data[:512], self.lfs_threshold):
            oid = hashlib.sha256(data).hexdigest()
            repo.lfs_sizes[oid] = len(data)
            repo.objects[oid] = data
            return _Entry(len(data), git_blob_sha1(lfs_pointer(oid, len(data))), oid)
        entry = _Entry(len(data), git_blob_sha1(data))
        repo.objects[entry.key] = data
        return entry

    def _add_commit(
        self, repo: _Repo, branch: str, tree: Mapping[str, _Entry], title: str, message: str, author: str
    ) -> _Commit:
        parent = repo.branches.get(branch)
        self._commit_counter += 1
        date = _now()
        listing = sorted((p, e.git_oid) for p, e in tree.items())
        seed = json.dumps([parent, listing, title, message, author, date, self._commit_counter])
        sha = hashlib.sha1(seed.encode()).hexdigest()
        commit = _Commit(sha, (parent,) if parent else (), dict(tree), title, message, author, date)
        repo.commits[sha] = commit
        repo.branches[branch] = sha
        return commit

    @staticmethod
    def _history(repo: _Repo, sha: str) -> list[_Commit]:
        out: list[_Commit] = []
        current: str | None = sha
        while current is not None:
            commit = repo.commits[current]
            out.append(commit)
            current = commit.parents[0] if commit.parents else None
        return out

    def _take_lfs_failure(self) -> bool:
        with self._lock:
            if self._fail_lfs_uploads > 0:
                self._fail_lfs_uploads -= 1
                return True
            return False

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self._log.append(LoggedRequest(method, path, status))


def _require_token(caller: _Caller | None) -> _Caller:
    if caller is None:
        raise HubError(401, "You must be authenticated to perform this action (no token was sent)")
    return caller


def _require_write(caller: _Caller, namespace: str, hub: HubServer) -> None:
    if not hub._is_member(caller.user, namespace):
        raise HubError(403, f'You don\'t have the rights to write to the namespace "{namespace}"')
    if not caller.write:
        raise HubError(403, "This token has read-only access; a write token is required")


def _validate_path(path: Any) -> str:
    if not isinstance(path, str) or not path or path.startswith("/") or path.endswith("/"):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts) or parts[0] == ".git":
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


def _tree_items(commit: _Commit, base: str, recursive: bool) -> list[dict[str, Any]]:
    """Tree listing of ``base`` ('' for the root) in the Hub's ``/tree`` JSON format."""
    prefix = f"{base}/" if base else ""
    files = {p: e for p, e in commit.tree.items() if p.startswith(prefix)}
    if base and not files:
        raise HubError(404, f"{base} does not exist on this revision", "EntryNotFound")
    dirs: dict[str, list[str]] = {}
    for path in files:
        parts = path[len(prefix) :].split("/")[:-1]
        for i in range(len(parts)):
            dirs.setdefault(prefix + "/".join(parts[: i + 1]), []).append(path)
    items: list[dict[str, Any]] = []
    for d in sorted(dirs):
        if recursive or "/" not in d[len(prefix) :]:
            oid = hashlib.sha1("\n".join(f"{p} {files[p].git_oid}" for p in sorted(dirs[d])).encode()).hexdigest()
            items.append({"type": "directory", "oid": oid, "size": 0, "path": d})
    for path in sorted(files):
        if recursive or "/" not in path[len(prefix) :]:
            items.append(_file_item(path, files[path]))
    return items


def _file_item(path: str, entry: _Entry) -> dict[str, Any]:
    item: dict[str, Any] = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": path}
    if entry.lfs_oid:
        item["lfs"] = {"oid": entry.lfs_oid, "size": entry.size, "pointerSize": entry.pointer_size}
    return item


def _byte_range(header: str | None, total: int) -> tuple[int, int] | None:
    """Inclusive ``(start, end)`` for a single-range ``Range`` header, None to serve everything."""
    if not header or "," in header:
        return None
    match = _RANGE_RE.match(header)
    if match is None:
        return None
    first, last = match.groups()
    if first:
        start, end = int(first), (int(last) if last else total - 1)
    elif last:
        start, end = max(0, total - int(last)), total - 1
    else:
        return None
    end = min(end, total - 1)
    if start >= total or start > end:
        raise HubError(416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{total}"})
    return start, end


class _HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], hub: HubServer) -> None:
        self.hub = hub
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    """Parses one HTTP request, routes it to an endpoint method and writes the JSON/bytes answer."""

    protocol_version = "HTTP/1.1"
    server: _HubHTTPServer

    # ------------------------------------------------------------------ plumbing

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def setup(self) -> None:
        super().setup()
        with self.hub._lock:
            self.hub._connections.add(self.connection)

    def finish(self) -> None:
        with self.hub._lock:
            self.hub._connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default stderr access log (see :attr:`HubServer.request_log`)."""

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        self._body: bytes | None = None
        try:
            response = self._dispatch(method)
        except HubError as err:
            response = _json_response(err.status, {**err.extra, "error": err.message})
            response.headers.update(err.headers)
            response.headers["X-Error-Message"] = err.message
            if err.code:
                response.headers["X-Error-Code"] = err.code
        except Exception as err:  # pragma: no cover - a bug in this server; report it to the client
            response = _json_response(500, {"error": f"Internal test-server error: {err!r}"})
        if response is None:  # connection dropped on purpose
            self.hub._record(method, self.path, 0)
            return
        if self._body is None:
            self._read_body()  # keep the kept-alive connection in sync
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("X-Request-Id", secrets.token_hex(8))
        for name, value in response.headers.items():
            self.send_header(name, value)
        if "Content-Length" not in response.headers:
            self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(response.body)
        self.hub._record(method, self.path, response.status)

    def _read_body(self) -> bytes:
        """The request body (``Content-Length`` or chunked), read once."""
        if self._body is not None:
            return self._body
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline(65537).split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)
            self._body = b"".join(chunks)
        else:
            length = int(self.headers.get("Content-Length") or 0)
            self._body = self.rfile.read(length) if length > 0 else b""
        return self._body

    def _json_body(self) -> Any:
        raw = self._read_body()
        if not raw.strip():
            return {}
        try:
            return json.loads(raw)
        except ValueError as err:
            raise HubError(400, f"Invalid JSON body: {err}") from err

    def _caller(self) -> _Caller | None:
        """The authenticated user, None when anonymous; 401 for an unknown token (as the Hub does)."""
        header = self.headers.get("Authorization")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        user = self.hub.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return _Caller(user, token.strip() not in self.hub.read_only_tokens)

    def _drop_connection(self) -> None:
        """Read part of the body, then reset the connection without answering (fault injection)."""
        length = int(self.headers.get("Content-Length") or 0)
        if length > 0:
            self.rfile.read(min(65536, max(1, length // 2)))
        else:
            self.rfile.readline(65537)
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    # ------------------------------------------------------------------ routing

    def _dispatch(self, method: str) -> _Response | None:
        parts = urlsplit(self.path)
        raw = parts.path
        query = parse_qs(parts.query)
        segs = [unquote(s) for s in raw.split("/")[1:]]
        if raw.startswith(_UPLOAD_PREFIX) and method == "PUT":
            return self._lfs_put(segs[-1])
        caller = self._caller()
        if segs[0] == "api" and len(segs) >= 2:
            if segs[1:] == ["whoami-v2"] and method == "GET":
                return self._whoami(caller)
            if segs[1:] == ["repos", "create"] and method == "POST":
                return self._create_repo(caller)
            if segs[1:] == ["repos", "delete"] and method == "DELETE":
                return self._delete_repo(caller)
            if segs[1:] == ["validate-yaml"] and method == "POST":
                return _json_response(200, {"errors": [], "warnings": []})
            if segs[1] in ("datasets", "spaces", "kernels"):
                raise _repo_not_found()
            if segs[1] == "models" and len(segs) >= 3:
                rest = segs[2:]
                if len(rest) >= 2 and rest[1] not in _REPO_SUBPATHS:
                    repo_id, tail = f"{rest[0]}/{rest[1]}", rest[2:]
                else:
                    repo_id, tail = rest[0], rest[1:]
                return self._repo_api(method, repo_id, tail, query, caller)
        for i in (0, 1):  # /{repo}.git/info/lfs/objects/{batch,verify}
            if len(segs) == i + 5 and segs[i].endswith(".git") and segs[i + 1 : i + 4] == ["info", "lfs", "objects"]:
                repo_id = "/".join(segs[: i + 1])[: -len(".git")]
                if method == "POST" and segs[-1] == "batch":
                    return self._lfs_batch(repo_id, caller)
                if method == "POST" and segs[-1] == "verify":
                    return self._lfs_verify(repo_id, caller)
        if segs[0] in ("datasets", "spaces", "kernels") and "resolve" in segs[2:4]:
            raise _repo_not_found()
        for i in (1, 2):  # /{repo}/resolve/{rev}/{path}
            if len(segs) > i + 2 and segs[i] == "resolve" and method in ("GET", "HEAD"):
                return self._resolve("/".join(segs[:i]), segs[i + 1], "/".join(segs[i + 2 :]), caller)
        raise HubError(404, "Sorry, we can't find the page you are looking for.")

    def _repo_api(
        self, method: str, repo_id: str, tail: list[str], query: dict[str, list[str]], caller: _Caller | None
    ) -> _Response:
        # HEAD answers like GET without a body (mirrors such as olah probe repos with HEAD)
        route = ("GET" if method == "HEAD" else method, tail[0] if tail else "")
        arg = "/".join(tail[1:2])
        if route == ("GET", ""):
            return self._info(repo_id, "main", query, caller)
        if route == ("GET", "revision") and arg:
            return self._info(repo_id, "/".join(tail[1:]), query, caller)
        if route == ("GET", "tree") and arg:
            return self._tree(repo_id, arg, "/".join(tail[2:]), query, caller)
        if route == ("POST", "paths-info") and arg:
            return self._paths_info(repo_id, arg, caller)
        if route == ("GET", "refs"):
            return self._refs(repo_id, query, caller)
        if route == ("GET", "commits") and arg:
            return self._commits(repo_id, arg, caller)
        if route == ("POST", "preupload") and arg:
            return self._preupload(repo_id, arg, query, caller)
        if route == ("POST", "commit") and arg:
            return self._commit(repo_id, arg, query, caller)
        if route == ("POST", "branch") and arg:
            return self._create_branch(repo_id, arg, caller)
        if route == ("DELETE", "branch") and arg:
            return self._delete_branch(repo_id, arg, caller)
        if route == ("POST", "tag") and arg:
            return self._create_tag(repo_id, arg, caller)
        if route == ("DELETE", "tag") and arg:
            return self._delete_tag(repo_id, arg, caller)
        if route == ("PUT", "settings"):
            return self._settings(repo_id, caller)
        raise HubError(404, "Sorry, we can't find the page you are looking for.")

    # ------------------------------------------------------------------ account / repo endpoints

    def _whoami(self, caller: _Caller | None) -> _Response:
        """``GET /api/whoami-v2``: the token's user, its orgs and the token role."""
        caller = _require_token(caller)
        orgs = [{"type": "org", "name": n, "fullname": n} for n, m in sorted(self.hub.orgs.items()) if caller.user in m]
        return _json_response(
            200,
            {
                "type": "user",
                "id": hashlib.sha1(caller.user.encode()).hexdigest()[:24],
                "name": caller.user,
                "fullname": caller.user,
                "email": f"{caller.user}@example.invalid",
                "emailVerified": True,
                "isPro": False,
                "canPay": False,
                "orgs": orgs,
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "test-token", "role": "write" if caller.write else "read"},
                },
            },
        )

    def _create_repo(self, caller: _Caller | None) -> _Response:
        """``POST /api/repos/create`` with ``{"name", "organization", "visibility"|"private", "type"}``."""
        caller = _require_token(caller)
        body = self._json_body()
        name, namespace = body.get("name"), body.get("organization") or caller.user
        if body.get("type", "model") not in (None, "model"):
            raise HubError(400, "This test server only hosts model repos")
        if not isinstance(name, str) or not _NAME_RE.match(name) or "--" in name or ".." in name:
            raise HubError(400, f"Invalid repo name: {name!r}")
        _require_write(caller, namespace, self.hub)
        repo_id = f"{namespace}/{name}"
        private = body.get("visibility") == "private" or body.get("private") is True
        with self.hub._lock:
            if repo_id in self.hub._repos:
                # The Hub's 409 body carries the repo url: create_repo(exist_ok=True) returns it.
                raise HubError(409, "You already created this model repo", extra={"url": f"{self.hub.url}/{repo_id}"})
            self.hub._create_repo(repo_id, private=private)
        return _json_response(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _delete_repo(self, caller: _Caller | None) -> _Response:
        """``DELETE /api/repos/delete`` with ``{"name", "organization", "type"}``."""
        caller = _require_token(caller)
        body = self._json_body()
        repo_id = f"{body.get('organization') or caller.user}/{body.get('name')}"
        with self.hub._lock:
            self.hub._writable_repo(repo_id, caller)
            del self.hub._repos[repo_id]
        return _json_response(200, {})

    def _settings(self, repo_id: str, caller: _Caller | None) -> _Response:
        """``PUT /api/models/{repo}/settings``: only ``visibility`` / ``private`` are honoured."""
        body = self._json_body()
        with self.hub._lock:
            repo = self.hub._writable_repo(repo_id, caller)
            if "visibility" in body:
                repo.private = body["visibility"] == "private"
            if "private" in body:
                repo.private = bool(body["private"])
        return _json_response(200, {})

    def _info(self, repo_id: str, revision: str, query: dict[str, list[str]], caller: _Caller | None) -> _Response:
        """``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}`` (``?blobs=true`` for sizes)."""
        blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
        with self.hub._lock:
            repo = self.hub._readable_repo(repo_id, caller)
            commit = repo.commit_at(revision)
        siblings: list[dict[str, Any]] = []
        for path, entry in sorted(commit.tree.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=entry.size, blobId=entry.git_oid)
                if entry.lfs_oid:
                    sibling["lfs"] = {"size": entry.size, "sha256": entry.lfs_oid, "pointerSize": entry.pointer_size}
            siblings.append(sibling)
        return _json_response(
            200,
            {
                "_id": repo.uid,
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": repo.namespace,
                "sha": commit.sha,
                "lastModified": commit.date,
                "createdAt": repo.created_at,
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
                "spaces": [],
                "usedStorage": sum(e.size for e in commit.tree.values()),
            },
        )

    def _tree(
        self, repo_id: str, revision: str, path: str, query: dict[str, list[str]], caller: _Caller | None
    ) -> _Response:
        """``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=...`` (one page, no ``Link`` header)."""
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        with self.hub._lock:
            commit = self.hub._readable_repo(repo_id, caller).commit_at(revision)
        return _json_response(200, _tree_items(commit, path.strip("/"), recursive))

    def _paths_info(self, repo_id: str, revision: str, caller: _Caller | None) -> _Response:
        """``POST /api/models/{repo}/paths-info/{rev}`` (form or JSON ``paths``); unknown paths are skipped."""
        raw = self._read_body()
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = self._json_body().get("paths", [])
        else:
            paths = parse_qs(raw.decode()).get("paths", [])
        with self.hub._lock:
            commit = self.hub._readable_repo(repo_id, caller).commit_at(revision)
        items: list[dict[str, Any]] = []
        for path in paths if isinstance(paths, list) else [paths]:
            path = str(path).strip("/")
            if path in commit.tree:
                items.append(_file_item(path, commit.tree[path]))
            elif any(p.startswith(path + "/") for p in commit.tree):
                oid = hashlib.sha1(f"dir:{commit.sha}:{path}".encode()).hexdigest()
                items.append({"type": "directory", "oid": oid, "size": 0, "path": path})
        return _json_response(200, items)

    def _refs(self, repo_id: str, query: dict[str, list[str]], caller: _Caller | None) -> _Response:
        """``GET /api/models/{repo}/refs[?include_prs=1]``: branches, tags, converts (and pull requests)."""
        with self.hub._lock:
            repo = self.hub._readable_repo(repo_id, caller)
            heads = sorted(repo.branches.items())
            branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": s} for n, s in heads]
            tags = [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": s} for n, s in sorted(repo.tags.items())]
        payload: dict[str, Any] = {"branches": branches, "converts": [], "tags": tags}
        if query.get("include_prs"):
            payload["pullRequests"] = []
        return _json_response(200, payload)

    def _commits(self, repo_id: str, revision: str, caller: _Caller | None) -> _Response:
        """``GET /api/models/{repo}/commits/{rev}``: first-parent history, newest first (one page)."""
        with self.hub._lock:
            repo = self.hub._readable_repo(repo_id, caller)
            history = self.hub._history(repo, repo.commit_at(revision).sha)
        return _json_response(
            200,
            [
                {
                    "id": c.sha,
                    "authors": [{"user": c.author, "avatar": ""}],
                    "date": c.date,
                    "title": c.title,
                    "message": c.message,
                }
                for c in history
            ],
        )

    def _create_branch(self, repo_id: str, branch: str, caller: _Caller | None) -> _Response:
        """``POST /api/models/{repo}/branch/{name}`` with optional ``{"startingPoint": rev}`` (default: main)."""
        body = self._json_body()
        if not _NAME_RE.match(branch.replace("/", "-")) or branch.startswith("refs/"):
            raise HubError(400, f"Invalid branch name: {branch!r}")
        with self.hub._lock:
            repo = self.hub._writable_repo(repo_id, caller)
            if branch in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            repo.branches[branch] = repo.commit_at(body.get("startingPoint") or "main").sha
        return _json_response(200, {})

    def _delete_branch(self, repo_id: str, branch: str, caller: _Caller | None) -> _Response:
        """``DELETE /api/models/{repo}/branch/{name}`` (``main`` cannot be deleted)."""
        with self.hub._lock:
            repo = self.hub._writable_repo(repo_id, caller)
            if branch not in repo.branches:
                raise _revision_not_found(branch)
            if branch == "main":
                raise HubError(403, "The default branch cannot be deleted")
            del repo.branches[branch]
        return _json_response(200, {})

    def _create_tag(self, repo_id: str, revision: str, caller: _Caller | None) -> _Response:
        """``POST /api/models/{repo}/tag/{rev}`` with ``{"tag": name, "message"?}``."""
        tag = self._json_body().get("tag")
        if not isinstance(tag, str) or not _NAME_RE.match(tag.replace("/", "-")) or tag.startswith("refs/"):
            raise HubError(400, f"Invalid tag name: {tag!r}")
        with self.hub._lock:
            repo = self.hub._writable_repo(repo_id, caller)
            if tag in repo.tags:
                raise HubError(409, f"Reference already exists: refs/tags/{tag}")
            repo.tags[tag] = repo.commit_at(revision).sha
        return _json_response(200, {})

    def _delete_tag(self, repo_id: str, tag: str, caller: _Caller | None) -> _Response:
        """``DELETE /api/models/{repo}/tag/{tag}``."""
        with self.hub._lock:
            repo = self.hub._writable_repo(repo_id, caller)
            if tag not in repo.tags:
                raise _revision_not_found(tag)
            del repo.tags[tag]
        return _json_response(200, {})

    # ------------------------------------------------------------------ upload endpoints

    def _preupload(self, repo_id: str, revision: str, query: dict[str, list[str]], caller: _Caller | None) -> _Response:
        """``POST /api/models/{repo}/preupload/{rev}`` with ``{"files": [{"path", "sample", "size"}]}``.

        Answers ``uploadMode`` (``lfs``/``regular``), ``shouldIgnore`` and the remote ``oid`` of a file
        already at that path (sha256 for LFS, git blob sha1 otherwise) so the client can skip no-ops.
        """
        _reject_pull_requests(query)
        files = self._json_body().get("files")
        if not isinstance(files, list):
            raise HubError(400, "Expected a 'files' list")
        with self.hub._lock:
            commit = self.hub._writable_repo(repo_id, caller).commit_at(revision)
        answers = []
        for item in files:
            path = _validate_path(item.get("path"))
            try:
                sample = base64.b64decode(item.get("sample") or "")
            except binascii.Error as err:
                raise HubError(400, f"Invalid base64 sample for {path!r}") from err
            size = item.get("size")
            if not isinstance(size, int) or size < 0:
                raise HubError(400, f"Invalid size for {path!r}")
            lfs = _wants_lfs(path, size, sample, self.hub.lfs_threshold)
            existing = commit.tree.get(path)
            oid = None if existing is None else (existing.lfs_oid if lfs else existing.git_oid)
            answers.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        return _json_response(200, {"files": answers, "commitOid": commit.sha})

    def _lfs_batch(self, repo_id: str, caller: _Caller | None) -> _Response:
        """``POST /{repo}.git/info/lfs/objects/batch`` (git-LFS batch API, ``upload``, ``basic`` transfer).

        Objects already stored get no ``actions``; the others get an ``upload`` href (no auth needed,
        like a pre-signed URL) and a ``verify`` href.
        """
        body = self._json_body()
        if body.get("operation") != "upload":
            raise HubError(400, "Only the 'upload' operation is supported by this test server")
        if body.get("hash_algo", "sha256") != "sha256":
            raise HubError(400, "Only sha256 is supported")
        objects = body.get("objects")
        if not isinstance(objects, list):
            raise HubError(400, "Expected an 'objects' list")
        answers: list[dict[str, Any]] = []
        with self.hub._lock:
            repo = self.hub._writable_repo(repo_id, caller)
            for obj in objects:
                oid, size = obj.get("oid"), obj.get("size")
                if not isinstance(oid, str) or not _SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
                    answers.append(
                        {
                            "oid": str(oid),
                            "size": size if isinstance(size, int) else 0,
                            "error": {"code": 422, "message": "Invalid oid or size"},
                        }
                    )
                    continue
                if repo.lfs_sizes.get(oid) == size:
                    answers.append({"oid": oid, "size": size})
                    continue
                ticket = secrets.token_urlsafe(16)
                self.hub._tickets[ticket] = _Ticket(repo.repo_id, oid, size)
                answers.append(
                    {
                        "oid": oid,
                        "size": size,
                        "authenticated": True,
                        "actions": {
                            "upload": {"href": f"{self.hub.url}{_UPLOAD_PREFIX}{ticket}", "expires_in": 86400},
                            "verify": {"href": f"{self.hub.url}/{repo.repo_id}.git/info/lfs/objects/verify"},
                        },
                    }
                )
        return _json_response(200, {"transfer": "basic", "objects": answers}, _LFS_JSON)

    def _lfs_put(self, ticket_id: str) -> _Response | None:
        """``PUT /_hub_test_server/lfs/{ticket}``: the LFS object bytes; size and sha256 must match the oid.

        Honours :meth:`HubServer.fail_next_lfs_uploads` by resetting the connection mid-body.
        """
        with self.hub._lock:
            ticket = self.hub._tickets.get(ticket_id)
        if ticket is None:
            raise HubError(403, "Upload URL is invalid or expired")
        if self.hub._take_lfs_failure():
            self._drop_connection()
            return None
        data = self._read_body()
        if len(data) != ticket.size:
            raise HubError(400, f"Size mismatch: expected {ticket.size} bytes, received {len(data)}")
        digest = hashlib.sha256(data).hexdigest()
        if digest != ticket.oid:
            raise HubError(400, f"Content sha256 {digest} does not match the announced oid {ticket.oid}")
        with self.hub._lock:
            repo = self.hub._repos.get(ticket.repo_id)
            if repo is None:
                raise _repo_not_found()
            repo.objects.setdefault(ticket.oid, data)
            repo.lfs_sizes[ticket.oid] = ticket.size
        return _Response(200, b"", "text/plain", {"ETag": f'"{hashlib.md5(data).hexdigest()}"'})

    def _lfs_verify(self, repo_id: str, caller: _Caller | None) -> _Response:
        """``POST /{repo}.git/info/lfs/objects/verify`` with ``{"oid", "size"}``: 404 unless it was uploaded."""
        body = self._json_body()
        with self.hub._lock:
            repo = self.hub._writable_repo(repo_id, caller)
            if repo.lfs_sizes.get(str(body.get("oid"))) != body.get("size"):
                raise HubError(404, f"LFS object {body.get('oid')} was not uploaded", "EntryNotFound")
        return _json_response(200, {"success": True}, _LFS_JSON)

    def _commit(self, repo_id: str, revision: str, query: dict[str, list[str]], caller: _Caller | None) -> _Response:
        """``POST /api/models/{repo}/commit/{branch}``: NDJSON ``header`` then one operation per line.

        Operations: ``file`` (base64 content), ``lfsFile`` (``oid``/``size`` of an uploaded object),
        ``deletedFile``, ``deletedFolder``. All-or-nothing: any error leaves the branch untouched.
        """
        _reject_pull_requests(query)
        lines = []
        for number, line in enumerate(self._read_body().splitlines(), 1):
            if line.strip():
                try:
                    lines.append(json.loads(line))
                except ValueError as err:
                    raise HubError(400, f"Invalid NDJSON at line {number}: {err}") from err
        if not lines or lines[0].get("key") != "header" or not isinstance(lines[0].get("value"), dict):
            raise HubError(400, "The first NDJSON line must be the commit header")
        header = lines[0]["value"]
        summary = header.get("summary")
        if not isinstance(summary, str) or not summary.strip():
            raise HubError(400, "Commit summary is required")
        with self.hub._lock:
            repo = self.hub._writable_repo(repo_id, caller)
            if revision not in repo.branches:
                if repo.resolve(revision) is None:
                    raise _revision_not_found(revision)
                raise HubError(400, f"Can only commit to a branch, and {revision!r} is not one")
            head = repo.commits[repo.branches[revision]]
            parent = header.get("parentCommit")
            if parent and not (isinstance(parent, str) and len(parent) >= 7 and head.sha.startswith(parent)):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(head.tree)
            staged: dict[str, bytes] = {}
            missing: list[str] = []
            for op in lines[1:]:
                self._apply(repo, tree, staged, missing, op.get("key"), op.get("value") or {})
            if missing:
                raise HubError(
                    400,
                    "Your push was rejected because an LFS pointer pointed to a file that does not exist: "
                    + ", ".join(missing),
                )
            repo.objects.update(staged)
            description = str(header.get("description") or "")
            author = caller.user if caller else ""
            commit = self.hub._add_commit(repo, revision, tree, summary.strip(), description, author)
        return _json_response(
            200,
            {
                "success": True,
                "commitOid": commit.sha,
                "commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{commit.sha}",
                "hookOutput": "",
                "pullRequestUrl": None,
            },
        )

    @staticmethod
    def _apply(
        repo: _Repo, tree: dict[str, _Entry], staged: dict[str, bytes], missing: list[str], key: Any, value: dict
    ) -> None:
        """Apply one commit operation to the working ``tree`` (nothing is stored until the commit succeeds)."""
        if key == "file":
            path = _validate_path(value.get("path"))
            content = value.get("content", "")
            if value.get("encoding", "base64") == "base64":
                try:
                    data = base64.b64decode(content, validate=True)
                except binascii.Error as err:
                    raise HubError(400, f"Invalid base64 content for {path!r}") from err
            else:
                data = str(content).encode()
            entry = _Entry(len(data), git_blob_sha1(data))
            staged[entry.key] = data
            tree[path] = entry
        elif key == "lfsFile":
            path = _validate_path(value.get("path"))
            oid = value.get("oid")
            if value.get("algo", "sha256") != "sha256" or not isinstance(oid, str) or not _SHA256_RE.match(oid):
                raise HubError(400, f"Invalid LFS oid for {path!r}")
            size = repo.lfs_sizes.get(oid)
            if size is None or value.get("size", size) != size:
                missing.append(oid)
                return
            tree[path] = _Entry(size, git_blob_sha1(lfs_pointer(oid, size)), oid)
        elif key == "deletedFile":
            path = str(value.get("path"))
            if tree.pop(path, None) is None:
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        elif key == "deletedFolder":
            prefix = str(value.get("path")).rstrip("/") + "/"
            doomed = [p for p in tree if p.startswith(prefix)]
            if not doomed:
                raise HubError(404, f"A folder with this name doesn't exist: {prefix}", "EntryNotFound")
            for path in doomed:
                del tree[path]
        else:
            raise HubError(400, f"Unsupported commit operation: {key!r}")

    # ------------------------------------------------------------------ download endpoint

    def _resolve(self, repo_id: str, revision: str, path: str, caller: _Caller | None) -> _Response:
        """``GET|HEAD /{repo}/resolve/{rev}/{path}``: file bytes (or a ``Range`` of them) with Hub headers."""
        with self.hub._lock:
            repo = self.hub._readable_repo(repo_id, caller)
            commit = repo.commit_at(revision)
            entry = commit.tree.get(path)
            if entry is None:
                raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
            data = repo.objects[entry.key]
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{entry.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"',
        }
        if entry.lfs_oid:
            headers["X-Linked-Etag"] = f'"{entry.lfs_oid}"'
            headers["X-Linked-Size"] = str(entry.size)
        try:
            byte_range = _byte_range(self.headers.get("Range"), len(data))
        except HubError as err:
            err.headers.update(headers)
            raise
        status = 200
        if byte_range is not None:
            start, end = byte_range
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        return _Response(status, data, "application/octet-stream", headers)


def _reject_pull_requests(query: dict[str, list[str]]) -> None:
    if query.get("create_pr", ["0"])[0] not in ("", "0", "false"):
        raise HubError(400, "Pull requests are not supported by this test server")
