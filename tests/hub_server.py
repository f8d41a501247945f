"""A Hub-compatible HTTP server on 127.0.0.1 for tests, standard library only.

The real ``huggingface_hub`` client (and ``peft`` / ``transformers`` loading through it) talks to it over HTTP:
repos, commits (regular files inline, large and binary files through the LFS batch API), branches, tags, refs,
commit history, model info, tree listings and ``resolve`` downloads. State lives in memory; tests assert on it
through :class:`HubServer`'s inspection methods and can make the next request to a route fail with
:meth:`HubServer.fail_next` (an HTTP error status) or :meth:`HubServer.drop_next` (the connection closed without an
answer, at once or after a silence longer than the client's timeout).

Client configuration (huggingface_hub 2.4.0):

* ``HF_ENDPOINT``, ``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_HUB_DISABLE_TELEMETRY`` and ``HF_HUB_DISABLE_XET`` are read
  once, when ``huggingface_hub.constants`` is imported, and ``transformers`` imports it, so in a pytest process they
  are fixed before any test runs. In process, pass ``endpoint=hub.endpoint`` and ``token=`` explicitly
  (``HfApi(endpoint=..., token=...)``, ``hf_hub_download(..., endpoint=..., cache_dir=..., token=...)``) and
  ``cache_dir=`` for downloads. Code that cannot take an endpoint (``PeftModel.from_pretrained``,
  ``from_pretrained`` of transformers) must run in a subprocess whose environment comes from
  :meth:`HubServer.client_env`.
* Xet: with ``hf_xet`` installed the client sends every file that preupload marks ``"lfs"`` through Xet (no
  fallback), which this server does not speak. ``is_xet_available()`` reads ``constants.HF_HUB_DISABLE_XET`` on
  every call, so in process set that attribute to ``True`` (``monkeypatch.setattr``); in a subprocess set
  ``HF_HUB_DISABLE_XET=1``. Alternatively ``HubServer(lfs=False)`` answers ``"regular"`` for every file, which a
  Xet-enabled client uploads inline.
* ``HF_HUB_DISABLE_TELEMETRY=1`` also stops the client fetching ``{HF_ENDPOINT}/api/agent-harnesses`` (this server
  answers it with an empty registry anyway).
* ``HF_TOKEN`` is read on every request (unlike the variables above). Pass the server's token explicitly in
  process; a token the client finds by itself (``HF_TOKEN``, a login stored under ``HF_HOME``) that differs from
  it gets 401 even on public reads, as on the real Hub.

Upload mode rule (preupload): a file is ``"lfs"`` when it is larger than ``lfs_threshold`` (1 MiB by default), when
its path matches a ``filter=lfs`` pattern of the revision's ``.gitattributes`` (the default one of a new repo lists
``*.safetensors``, ``*.bin``, ``*.pt``, ...), or when its first 512 bytes hold a NUL byte; otherwise ``"regular"``.

Differences from the real Hub: one user owns every namespace; ``parentCommit`` that is not the branch head gets 409;
LFS uploads go to ``/lfs-upload/{ticket}`` on this server; no Xet, no gated repos, no discussions beyond the
``refs/pr/N`` ref a ``create_pr`` commit makes; ``cardData``/``tags`` of model info come from a minimal parse of
the README front matter (top-level scalars and lists only); listings are never paginated.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import MappingProxyType, TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_BRANCH = "main"
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"

_LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gguf", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
    "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl",
    "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm",
    "*.xz", "*.zip", "*.zst", "*tfevents*",
)
DEFAULT_GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in _LFS_PATTERNS)

_URL_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space", "kernels": "kernel", None: "model"}
_URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/", "kernel": "kernels/"}


@dataclass(frozen=True)
class Commit:
    """One commit of a repo: its metadata and the full file snapshot after it.

    ``title``/``message`` are the client's ``commit_message``/``commit_description``; ``date`` is ISO 8601 UTC;
    ``files`` maps every path in the repo at this commit to its bytes; ``lfs_files`` names those stored as LFS.
    """

    id: str
    parent: str | None
    title: str
    message: str
    date: str
    authors: tuple[str, ...]
    files: Mapping[str, bytes] = field(hash=False)
    lfs_files: frozenset[str] = frozenset()


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pull_requests: dict[int, str] = field(default_factory=dict)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        """The commit a branch, tag, ``refs/pr/N``, ``refs/heads/X``, ``refs/tags/X`` or commit id points to."""
        for name in (revision, revision.removeprefix("refs/heads/")):
            if name in self.branches:
                return self.commits[self.branches[name]]
        if (tag := revision.removeprefix("refs/tags/")) in self.tags:
            return self.commits[self.tags[tag]]
        if (pr := _pr_number(revision)) is not None and pr in self.pull_requests:
            return self.commits[self.pull_requests[pr]]
        return self.commits.get(revision)

    def history(self, commit: Commit) -> list[Commit]:
        """``commit`` and its ancestors, newest first."""
        chain = [commit]
        while chain[-1].parent is not None:
            chain.append(self.commits[chain[-1].parent])
        return chain


@dataclass
class _Fault:
    status: int
    message: str


@dataclass
class _Drop:
    after: bool  # apply the request first: the change is made, only the answer is lost
    silence: float  # seconds without a byte before the connection is closed


class _Dropped(Exception):
    """Raised by :meth:`HubServer._dispatch` to make the handler close the connection without answering."""

    def __init__(self, drop: _Drop) -> None:
        super().__init__("dropped")
        self.drop = drop


@dataclass
class _Upload:
    repo_key: tuple[str, str]
    oid: str
    size: int


@dataclass
class _Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Mapping[str, str]
    body: bytes
    params: dict[str, str | None] = field(default_factory=dict)
    authenticated: bool = False

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"{}")
        except ValueError as error:
            raise HubError(400, f"Malformed JSON body: {error}") from error

    @property
    def repo_key(self) -> tuple[str, str]:
        return _URL_TYPES[self.params.get("type")], str(self.params["repo"])


@dataclass
class _Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


class HubError(Exception):
    """An HTTP error answered the way the Hub does: JSON ``{"error"}`` plus ``X-Error-Code``/``X-Error-Message``."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}

    def response(self) -> _Response:
        # Header values must be latin-1; keep non-ASCII paths readable instead of crashing the response.
        headers = {"X-Error-Message": self.message.encode("ascii", "backslashreplace").decode(), **self.headers}
        if self.code is not None:
            headers["X-Error-Code"] = self.code
        return _json({"error": self.message}, self.status, headers)


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> _Response:
    return _Response(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob holding ``data`` (the ``oid``/``ETag`` of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    """The git LFS pointer file that stands for ``data`` in git."""
    oid = hashlib.sha256(data).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n".encode()


def _pr_number(revision: str) -> int | None:
    match = re.fullmatch(r"refs/pr/(\d+)", revision)
    return int(match.group(1)) if match else None


def _front_matter(readme: bytes) -> dict[str, Any]:
    """Top-level scalars and lists of a model card's YAML front matter (no YAML library here)."""
    lines = readme.decode("utf-8", "replace").splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    data: dict[str, Any] = {}
    key = None
    for line in lines[1:]:
        if line.strip() == "---":
            break
        if match := re.match(r"^([\w-]+):\s*(.*)$", line):
            key, value = match.groups()
            data[key] = value.strip().strip("'\"") if value.strip() else []
        elif (match := re.match(r"^\s*-\s+(.*)$", line)) and key is not None and isinstance(data[key], list):
            data[key].append(match.group(1).strip().strip("'\""))
    return data


def _lfs_patterns(gitattributes: bytes) -> list[str]:
    return [line.split()[0] for line in gitattributes.decode("utf-8", "replace").splitlines()
            if "filter=lfs" in line.split()[1:]]


def _matches(path: str, pattern: str) -> bool:
    # gitattributes semantics, roughly: a pattern without a slash matches the file name in any folder.
    target = path if "/" in pattern else path.rsplit("/", 1)[-1]
    return fnmatch.fnmatchcase(target, pattern)


def _folders(paths: list[str]) -> set[str]:
    return {path.rsplit("/", i)[0] for path in paths for i in range(1, path.count("/") + 1)}


_Handler = Callable[["HubServer", _Request], _Response]
_API = r"/api/(?P<type>models|datasets|spaces|kernels)/(?P<repo>[^/]+/[^/]+)"
_GIT = r"/(?:(?P<type>datasets|spaces|kernels)/)?(?P<repo>[^/]+/[^/]+?)\.git/info/lfs/objects"
_RESOLVE = r"/(?:(?P<type>datasets|spaces|kernels)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)"


class HubServer:
    """An in-memory Hugging Face Hub on 127.0.0.1, driven by the real client over HTTP.

    Use it as a context manager::

        with HubServer(token="hf_test_token", user="tester") as hub:
            api = HfApi(endpoint=hub.endpoint, token=hub.token)
            ...
            assert hub.commits("tester/repo")[0].title == "Upload folder using huggingface_hub"

    Args:
        token: the only token accepted for writes, ``whoami`` and private repos.
        user: the user name ``whoami`` reports, the default namespace and the author of every commit.
        lfs: when false, preupload answers ``"regular"`` for every file (no LFS batch/upload round trips).
        lfs_threshold: files larger than this many bytes go through LFS.
        port: listen on this port (0: any free port). A fixed port lets a test session point
            ``HF_ENDPOINT`` at the server before ``huggingface_hub`` is imported.
    """

    def __init__(self, token: str = "hf_test_token", user: str = "tester", *, lfs: bool = True,
                 lfs_threshold: int = 1 << 20, port: int = 0) -> None:
        self.port = port
        self.token = token
        self.user = user
        self.lfs = lfs
        self.lfs_threshold = lfs_threshold
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._faults: dict[str, list[_Fault]] = {}
        self._drops: dict[str, list[_Drop]] = {}
        self._stopping = threading.Event()  # ends the silences of dropped requests when the server stops
        self._uploads: dict[str, _Upload] = {}
        self._requests: list[tuple[str, str]] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------------

    def start(self) -> HubServer:
        """Listen on a free port of 127.0.0.1 and serve from a daemon thread."""
        if self._server is not None:
            raise RuntimeError("the server is already running")
        self._stopping.clear()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler_class(self))
        self._server.daemon_threads = True
        # A short poll interval keeps stop() (which waits for the serving loop) fast in fixture teardown.
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and free the port; the in-memory state stays readable."""
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:PORT``, the value for ``endpoint=`` and ``HF_ENDPOINT``."""
        if self._server is None:
            raise RuntimeError("the server is not running")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def client_env(self, home: str | os.PathLike[str]) -> dict[str, str]:
        """Environment variables that point a *new* process's huggingface_hub at this server (merge into
        ``os.environ``). ``home`` becomes ``HF_HOME`` and holds the download cache."""
        return {
            "HF_ENDPOINT": self.endpoint,
            "HF_HOME": str(home),
            "HF_HUB_CACHE": os.path.join(home, "hub"),
            "HF_TOKEN": self.token,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
        }

    # -- fault injection and request log -----------------------------------------------------------------------

    def fail_next(self, route: str, status: int = 500, message: str = "Injected failure", times: int = 1) -> None:
        """Make the next ``times`` requests to ``route`` (a name in :data:`ROUTES`, e.g. ``"commit"``, ``"tag"``)
        fail with ``status`` before they change anything.

        Mind the client's retries: preupload, LFS and download calls go through ``http_backoff``, which retries
        429/5xx up to 5 times (waiting 1 s, 2 s, ...); ``commit``, ``tag``, ``branch`` and ``create_repo`` are not
        retried.
        """
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; expected one of {sorted(ROUTES)}")
        with self._lock:
            self._faults.setdefault(route, []).extend(_Fault(status, message) for _ in range(times))

    def drop_next(self, route: str, times: int = 1, *, after: bool = False, silence: float = 0.0) -> None:
        """Make the next ``times`` requests to ``route`` end with the connection closed and no answer at all: the
        client sees ``RemoteProtocolError`` ("Server disconnected without sending a response"), or its own read
        timeout when ``silence`` (seconds the server waits, saying nothing, before closing; bounded, and cut short
        when the server stops) is longer than the client's timeout.

        ``after=False`` drops the request before it changes anything; ``after=True`` carries it out and drops
        only the answer (a commit made whose client never heard of it). Retries as in :meth:`fail_next`:
        ``http_backoff`` routes retry connection errors and timeouts too.
        """
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; expected one of {sorted(ROUTES)}")
        if not 0 <= silence <= 600:
            raise ValueError(f"silence must be between 0 and 600 seconds, got {silence}")
        with self._lock:
            self._drops.setdefault(route, []).extend(_Drop(after, silence) for _ in range(times))

    @property
    def requests(self) -> list[tuple[str, str]]:
        """Every request received so far as ``(method, raw URL path without the query)``, oldest first."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        """Forget the request log (e.g. before the step a test wants to observe)."""
        with self._lock:
            self._requests.clear()

    # -- inspection ---------------------------------------------------------------------------------------------

    def repo_ids(self, repo_type: str = "model") -> list[str]:
        """Ids of the repos of ``repo_type`` that exist, sorted."""
        with self._lock:
            return sorted(repo_id for kind, repo_id in self._repos if kind == repo_type)

    def is_private(self, repo_id: str, *, repo_type: str = "model") -> bool:
        """Whether the repo is private."""
        with self._lock:
            return self._get_repo(repo_id, repo_type).private

    def commits(self, repo_id: str, branch: str = DEFAULT_BRANCH, *, repo_type: str = "model") -> list[Commit]:
        """The history of ``branch`` (or any revision), newest first; the last one is the repo's initial commit."""
        with self._lock:
            repo = self._get_repo(repo_id, repo_type)
            return repo.history(self._get_commit(repo, branch))

    def head(self, repo_id: str, branch: str = DEFAULT_BRANCH, *, repo_type: str = "model") -> str:
        """The commit id ``branch`` (or any revision) points to."""
        with self._lock:
            repo = self._get_repo(repo_id, repo_type)
            return self._get_commit(repo, branch).id

    def branches(self, repo_id: str, *, repo_type: str = "model") -> dict[str, str]:
        """``{branch name: commit id}``."""
        with self._lock:
            return dict(self._get_repo(repo_id, repo_type).branches)

    def tags(self, repo_id: str, *, repo_type: str = "model") -> dict[str, str]:
        """``{tag name: commit id}``."""
        with self._lock:
            return dict(self._get_repo(repo_id, repo_type).tags)

    def pull_requests(self, repo_id: str, *, repo_type: str = "model") -> dict[int, str]:
        """``{PR number: head commit id}`` for the ``refs/pr/N`` refs that ``create_pr=True`` commits opened."""
        with self._lock:
            return dict(self._get_repo(repo_id, repo_type).pull_requests)

    def files(self, repo_id: str, revision: str = DEFAULT_BRANCH, *, repo_type: str = "model") -> list[str]:
        """Sorted paths of the files at ``revision`` (branch, tag, ``refs/pr/N`` or commit id)."""
        with self._lock:
            repo = self._get_repo(repo_id, repo_type)
            return sorted(self._get_commit(repo, revision).files)

    def file(self, repo_id: str, revision: str, path: str, *, repo_type: str = "model") -> bytes:
        """The content of ``path`` at ``revision``; ``KeyError`` if it is not there."""
        with self._lock:
            repo = self._get_repo(repo_id, repo_type)
            files = self._get_commit(repo, revision).files
            if path not in files:
                raise KeyError(f"{path!r} is not in {repo_id}@{revision}")
            return files[path]

    def lfs_files(self, repo_id: str, revision: str = DEFAULT_BRANCH, *, repo_type: str = "model") -> list[str]:
        """Sorted paths of the files at ``revision`` that were committed as LFS objects."""
        with self._lock:
            repo = self._get_repo(repo_id, repo_type)
            return sorted(self._get_commit(repo, revision).lfs_files)

    def lfs_objects(self, repo_id: str, *, repo_type: str = "model") -> set[str]:
        """sha256 of every LFS object uploaded to the repo, committed or not."""
        with self._lock:
            return set(self._get_repo(repo_id, repo_type).lfs_objects)

    def seed_repo(self, repo_id: str, files: Mapping[str, bytes] | None = None, *, private: bool = False,
                  repo_type: str = "model", title: str = "Seed files") -> str:
        """Create a repo directly (no HTTP), with ``files`` committed on ``main`` after the initial commit when
        given; returns the head commit id. For tests that only read from the Hub."""
        with self._lock:
            repo = self._create_repo(repo_type, repo_id, private)
            if files:
                head = repo.commits[repo.branches[DEFAULT_BRANCH]]
                patterns = _lfs_patterns(head.files[".gitattributes"])
                lfs = {path for path, data in files.items() if self._upload_mode(path, len(data), data[:512], patterns)
                       == "lfs"}
                repo.lfs_objects.update({hashlib.sha256(files[path]).hexdigest(): files[path] for path in lfs})
                commit = self._add_commit(repo, head, title, "", {**head.files, **files}, head.lfs_files | lfs)
                repo.branches[DEFAULT_BRANCH] = commit.id
            return repo.branches[DEFAULT_BRANCH]

    def _get_repo(self, repo_id: str, repo_type: str) -> _Repo:
        if (repo := self._repos.get((repo_type, repo_id))) is None:
            raise KeyError(f"no {repo_type} repo {repo_id!r} on the server")
        return repo

    @staticmethod
    def _get_commit(repo: _Repo, revision: str) -> Commit:
        if (commit := repo.resolve(revision)) is None:
            raise KeyError(f"no revision {revision!r} in {repo.repo_id}")
        return commit

    # -- state changes ------------------------------------------------------------------------------------------

    def _create_repo(self, repo_type: str, repo_id: str, private: bool) -> _Repo:
        repo = _Repo(repo_type, repo_id, private, _now())
        initial = self._add_commit(repo, None, "initial commit", "", {".gitattributes": DEFAULT_GITATTRIBUTES.encode()},
                                   frozenset())
        repo.branches[DEFAULT_BRANCH] = initial.id
        self._repos[(repo_type, repo_id)] = repo
        return repo

    def _add_commit(self, repo: _Repo, parent: Commit | None, title: str, message: str, files: Mapping[str, bytes],
                    lfs_files: frozenset[str]) -> Commit:
        seed = f"{repo.repo_id}\n{parent and parent.id}\n{title}\n{uuid.uuid4()}"
        commit_id = hashlib.sha1(seed.encode()).hexdigest()
        commit = Commit(commit_id, parent.id if parent else None, title, message, _now(), (self.user,),
                        MappingProxyType(dict(files)), lfs_files & set(files))
        repo.commits[commit_id] = commit
        return commit

    # -- request handling ---------------------------------------------------------------------------------------

    def _dispatch(self, request: _Request) -> _Response:
        with self._lock:
            self._requests.append((request.method, request.path))
        route = _match_route(request)
        if route is None:
            return HubError(404, f"No route for {request.method} {request.path}").response()
        name, handler = route
        with self._lock:
            drop = self._drops[name].pop(0) if self._drops.get(name) else None
        if drop is not None and not drop.after:
            raise _Dropped(drop)
        try:
            self._take_fault(name)
            request.authenticated = self._authenticate(request.headers)
            with self._lock:
                response = handler(self, request)
        except HubError as error:
            response = error.response()
        if drop is not None:
            raise _Dropped(drop)
        return response

    def _take_fault(self, route: str) -> None:
        with self._lock:
            if queue := self._faults.get(route):
                fault = queue.pop(0)
                raise HubError(fault.status, fault.message)

    def _authenticate(self, headers: Mapping[str, str]) -> bool:
        """Whether the request carries the server's token; any other token is rejected outright, as on the Hub."""
        authorization = headers.get("Authorization")
        if authorization is None:
            return False
        if authorization != f"Bearer {self.token}":
            raise HubError(401, INVALID_CREDENTIALS)
        return True

    def _repo_for(self, request: _Request, write: bool = False) -> _Repo:
        repo_type, repo_id = request.repo_key
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not request.authenticated):
            # Like the Hub: a private repo is indistinguishable from a missing one without the token.
            status = 404 if request.authenticated else 401
            raise HubError(status, "Repository not found", "RepoNotFound")
        if write and not request.authenticated:
            raise HubError(401, "You must be authenticated to write to this repo")
        return repo

    @staticmethod
    def _commit_for(repo: _Repo, revision: str | None, headers: dict[str, str] | None = None) -> Commit:
        commit = repo.resolve(revision or DEFAULT_BRANCH)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound", headers)
        return commit

    def _repo_url(self, repo: _Repo) -> str:
        return f"{self.endpoint}/{_URL_PREFIXES[repo.repo_type]}{repo.repo_id}"

    # -- account and repos ----------------------------------------------------------------------------------------

    def _whoami(self, request: _Request) -> _Response:
        if not request.authenticated:
            raise HubError(401, INVALID_CREDENTIALS)
        return _json({
            "type": "user", "id": hashlib.sha1(self.user.encode()).hexdigest()[:24], "name": self.user,
            "fullname": self.user, "email": f"{self.user}@example.com", "emailVerified": True, "isPro": False,
            "orgs": [], "auth": {"type": "access_token", "accessToken": {"displayName": "hub-server", "role": "write"}},
        })

    def _create_repo_route(self, request: _Request) -> _Response:
        if not request.authenticated:
            raise HubError(401, INVALID_CREDENTIALS)
        body = request.json()
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization') or self.user}/{body['name']}"
        if (repo_type, repo_id) in self._repos:
            url = self._repo_url(self._repos[(repo_type, repo_id)])
            return _json({"error": "You already created this repo", "url": url}, 409)
        private = bool(body.get("private")) or body.get("visibility") == "private"
        return _json({"url": self._repo_url(self._create_repo(repo_type, repo_id, private)), "name": repo_id})

    def _delete_repo(self, request: _Request) -> _Response:
        body = request.json()
        url_types = {kind: url for url, kind in _URL_TYPES.items() if url is not None}
        request.params.update(type=url_types[body.get("type") or "model"],
                              repo=f"{body.get('organization') or self.user}/{body['name']}")
        repo = self._repo_for(request, write=True)
        del self._repos[(repo.repo_type, repo.repo_id)]
        return _json({})

    def _settings(self, request: _Request) -> _Response:
        repo = self._repo_for(request, write=True)
        body = request.json()
        if "private" in body:
            repo.private = bool(body["private"])
        if "visibility" in body:
            repo.private = body["visibility"] == "private"
        return _json({})

    def _validate_yaml(self, request: _Request) -> _Response:
        return _json({"errors": [], "warnings": []})

    def _agent_harnesses(self, request: _Request) -> _Response:
        return _json({"standardEnvVars": [], "harnesses": {}})

    # -- uploads --------------------------------------------------------------------------------------------------

    def _preupload(self, request: _Request) -> _Response:
        repo = self._repo_for(request, write=True)
        commit = self._commit_for(repo, request.params["rev"])
        patterns = _lfs_patterns(commit.files.get(".gitattributes", DEFAULT_GITATTRIBUTES.encode()))
        answers = []
        for entry in request.json().get("files", []):
            path = entry["path"]
            mode = self._upload_mode(path, int(entry["size"]), base64.b64decode(entry.get("sample", "")), patterns)
            answer = {"path": path, "uploadMode": mode, "shouldIgnore": False}
            if path in commit.files:
                # The client skips files whose local oid equals this one (no-op commits).
                data = commit.files[path]
                answer["oid"] = hashlib.sha256(data).hexdigest() if path in commit.lfs_files else git_blob_sha1(data)
            answers.append(answer)
        return _json({"files": answers, "commitOid": commit.id})

    def _upload_mode(self, path: str, size: int, sample: bytes, patterns: list[str]) -> str:
        if not self.lfs:
            return "regular"
        if size > self.lfs_threshold or b"\0" in sample or any(_matches(path, p) for p in patterns):
            return "lfs"
        return "regular"

    def _lfs_batch(self, request: _Request) -> _Response:
        repo = self._repo_for(request, write=True)
        body = request.json()
        if body.get("operation") != "upload":
            raise HubError(400, "Only the upload operation is supported")
        verify_href = f"{self._repo_url(repo)}.git/info/lfs/objects/verify"
        objects = []
        for entry in body.get("objects", []):
            oid, size = str(entry["oid"]), int(entry["size"])
            answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in repo.lfs_objects:
                ticket = uuid.uuid4().hex
                self._uploads[ticket] = _Upload((repo.repo_type, repo.repo_id), oid, size)
                answer["actions"] = {"upload": {"href": f"{self.endpoint}/lfs-upload/{ticket}"},
                                     "verify": {"href": verify_href}}
            objects.append(answer)
        return _Response(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                         {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_upload(self, request: _Request) -> _Response:
        # Like a pre-signed storage URL: the ticket in the path is the credential, the client sends no token.
        upload = self._uploads.get(str(request.params["ticket"]))
        if upload is None:
            raise HubError(404, "Unknown or used upload ticket")
        if len(request.body) != upload.size or hashlib.sha256(request.body).hexdigest() != upload.oid:
            raise HubError(400, f"Uploaded bytes do not match oid {upload.oid} and size {upload.size}")
        repo = self._repos[upload.repo_key]
        repo.lfs_objects[upload.oid] = request.body
        del self._uploads[str(request.params["ticket"])]
        return _Response(200)

    def _lfs_verify(self, request: _Request) -> _Response:
        repo = self._repo_for(request, write=True)
        body = request.json()
        data = repo.lfs_objects.get(str(body.get("oid")))
        if data is None or len(data) != body.get("size"):
            raise HubError(404, f"LFS object {body.get('oid')} was not uploaded")
        return _json({"message": "Verified"})

    # -- commits and refs -----------------------------------------------------------------------------------------

    def _commit(self, request: _Request) -> _Response:
        repo = self._repo_for(request, write=True)
        try:
            lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        except ValueError as error:
            raise HubError(400, f"Malformed NDJSON commit payload: {error}") from error
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first NDJSON line must be the commit header")
        header = lines[0]["value"]
        revision = str(request.params["rev"])
        create_pr = request.query.get("create_pr", ["0"])[0] in ("1", "true", "True")
        base = self._commit_base(repo, revision, header.get("parentCommit"), create_pr)
        files, lfs_files = self._apply_operations(repo, base, lines[1:])
        commit = self._add_commit(repo, base, header.get("summary") or "Commit", header.get("description") or "",
                                  files, lfs_files)
        answer = {"commitUrl": f"{self._repo_url(repo)}/commit/{commit.id}", "commitOid": commit.id,
                  "commitMessage": commit.title, "hookOutput": "", "success": True, "pullRequestUrl": None}
        if create_pr:
            number = max(repo.pull_requests, default=0) + 1
            repo.pull_requests[number] = commit.id
            answer["pullRequestUrl"] = f"{self._repo_url(repo)}/discussions/{number}"
        elif (pr := _pr_number(revision)) is not None:
            repo.pull_requests[pr] = commit.id
        else:
            repo.branches[revision.removeprefix("refs/heads/")] = commit.id
        return _json(answer)

    def _commit_base(self, repo: _Repo, revision: str, parent: str | None, create_pr: bool) -> Commit:
        """The commit a new commit goes on top of; enforces that plain commits target a branch and ``parent``."""
        if create_pr:
            return self._commit_for(repo, parent or revision)
        branch = revision.removeprefix("refs/heads/")
        is_pr = _pr_number(revision) in repo.pull_requests
        if branch not in repo.branches and not is_pr:
            if repo.resolve(revision) is not None:
                raise HubError(400, f"Invalid rev id: {revision} is not a branch")
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        head = self._commit_for(repo, revision)
        if parent is not None and parent != head.id:
            raise HubError(409, f"A commit has happened since: parent commit {parent} is not the head of "
                                f"{revision} ({head.id}). Please refresh and try again.")
        return head

    @staticmethod
    def _apply_operations(repo: _Repo, base: Commit, operations: list[dict[str, Any]],
                          ) -> tuple[dict[str, bytes], frozenset[str]]:
        files, lfs_files = dict(base.files), set(base.lfs_files)
        for operation in operations:
            key, value = operation.get("key"), operation.get("value", {})
            path = str(value.get("path", "")).strip("/")
            if key == "file":
                files[path] = base64.b64decode(value["content"])
                lfs_files.discard(path)
            elif key == "lfsFile":
                if (data := repo.lfs_objects.get(value.get("oid", ""))) is None:
                    raise HubError(422, f"LFS object {value.get('oid')} for {path} was never uploaded")
                files[path] = data
                lfs_files.add(path)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                inside = [name for name in files if name.startswith(path + "/")]
                if not inside:
                    raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for name in inside:
                    del files[name]
            else:
                raise HubError(400, f"Unsupported commit operation {key!r}")
        return files, frozenset(lfs_files)

    def _create_tag(self, request: _Request) -> _Response:
        repo = self._repo_for(request, write=True)
        commit = self._commit_for(repo, request.params["rev"])
        tag = str(request.json().get("tag", ""))
        if not tag:
            raise HubError(400, "Missing tag name")
        if tag in repo.tags:
            raise HubError(409, f"Tag {tag} already exists")
        repo.tags[tag] = commit.id
        return _json({})

    def _delete_tag(self, request: _Request) -> _Response:
        repo = self._repo_for(request, write=True)
        if repo.tags.pop(str(request.params["name"]), None) is None:
            raise HubError(404, f"Tag {request.params['name']} not found", "RevisionNotFound")
        return _json({})

    def _create_branch(self, request: _Request) -> _Response:
        repo = self._repo_for(request, write=True)
        name = str(request.params["name"])
        if name in repo.branches:
            raise HubError(409, f"Branch {name} already exists")
        start = request.json().get("startingPoint") or DEFAULT_BRANCH
        repo.branches[name] = self._commit_for(repo, start).id
        return _json({})

    def _delete_branch(self, request: _Request) -> _Response:
        repo = self._repo_for(request, write=True)
        name = str(request.params["name"])
        if name == DEFAULT_BRANCH:
            raise HubError(403, "Cannot delete the default branch")
        if repo.branches.pop(name, None) is None:
            raise HubError(404, f"Branch {name} not found", "RevisionNotFound")
        return _json({})

    def _refs(self, request: _Request) -> _Response:
        repo = self._repo_for(request)

        def refs(names: Mapping[Any, str], prefix: str) -> list[dict[str, str]]:
            return [{"name": f"{name}", "ref": f"{prefix}{name}", "targetCommit": target}
                    for name, target in sorted(names.items())]

        pulls = [{"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": target}
                 for n, target in sorted(repo.pull_requests.items())]
        return _json({"branches": refs(repo.branches, "refs/heads/"), "tags": refs(repo.tags, "refs/tags/"),
                      "converts": [], "pullRequests": pulls})

    def _commits(self, request: _Request) -> _Response:
        repo = self._repo_for(request)
        history = repo.history(self._commit_for(repo, request.params["rev"]))
        return _json([{"id": c.id, "title": c.title, "message": c.message, "date": c.date,
                       "authors": [{"user": user, "avatar": None} for user in c.authors]} for c in history])

    # -- reads ----------------------------------------------------------------------------------------------------

    def _info(self, request: _Request) -> _Response:
        repo = self._repo_for(request)
        commit = self._commit_for(repo, request.params.get("rev"))
        card = _front_matter(commit.files.get("README.md", b""))
        tags = list(card.get("tags") or []) if isinstance(card.get("tags"), list) else []
        if isinstance(card.get("library_name"), str):
            tags.insert(0, card["library_name"])
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0], "sha": commit.id, "lastModified": commit.date,
            "createdAt": repo.created_at, "private": repo.private, "gated": False, "disabled": False,
            "downloads": 0, "likes": 0, "tags": tags, "cardData": card or None,
            "library_name": card.get("library_name"), "pipeline_tag": card.get("pipeline_tag"),
            "siblings": [self._sibling(commit, path) for path in sorted(commit.files)],
            "usedStorage": sum(len(data) for data in commit.files.values()),
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        return _json(info)

    @staticmethod
    def _sibling(commit: Commit, path: str) -> dict[str, Any]:
        entry = _tree_entry(commit, path)
        sibling: dict[str, Any] = {"rfilename": path, "size": entry["size"], "blobId": entry["oid"]}
        if "lfs" in entry:
            sibling["lfs"] = {"size": entry["size"], "sha256": entry["lfs"]["oid"],
                              "pointerSize": entry["lfs"]["pointerSize"]}
        return sibling

    def _tree(self, request: _Request) -> _Response:
        repo = self._repo_for(request)
        commit = self._commit_for(repo, request.params["rev"])
        root = (request.params.get("path") or "").strip("/")
        recursive = request.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = f"{root}/" if root else ""
        below = [path for path in commit.files if path.startswith(prefix)]
        if root and not below:
            raise HubError(404, f"{root} does not exist at {commit.id}", "EntryNotFound")
        rest = [path[len(prefix):] for path in below]
        if recursive:
            files, folders = rest, _folders(rest)
        else:
            files = [path for path in rest if "/" not in path]
            folders = {path.split("/", 1)[0] for path in rest if "/" in path}
        entries = [_folder_entry(commit, prefix + name) for name in sorted(folders)]
        entries += [_tree_entry(commit, prefix + name) for name in sorted(files)]
        return _json(entries)

    def _paths_info(self, request: _Request) -> _Response:
        repo = self._repo_for(request)
        commit = self._commit_for(repo, request.params["rev"])
        form = parse_qs(request.body.decode())
        folders = _folders(list(commit.files))
        entries = []
        for path in form.get("paths", []):
            path = path.strip("/")
            if path in commit.files:
                entries.append(_tree_entry(commit, path))
            elif path in folders:
                entries.append(_folder_entry(commit, path))
        return _json(entries)

    def _resolve(self, request: _Request) -> _Response:
        repo = self._repo_for(request)
        commit = self._commit_for(repo, request.params["rev"])
        path = str(request.params["path"])
        if path not in commit.files:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.id})
        data = commit.files[path]
        entry = _tree_entry(commit, path)
        headers = {"X-Repo-Commit": commit.id, "ETag": f'"{entry["oid"]}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if "lfs" in entry:
            headers.update({"X-Linked-Etag": f'"{entry["lfs"]["oid"]}"', "X-Linked-Size": str(len(data))})
        return _byte_range(data, request.headers.get("Range"), headers)


def _tree_entry(commit: Commit, path: str) -> dict[str, Any]:
    data = commit.files[path]
    if path not in commit.lfs_files:
        return {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
    pointer = lfs_pointer(data)
    return {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(pointer),
            "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": len(pointer)}}


def _folder_entry(commit: Commit, path: str) -> dict[str, Any]:
    # Not a real git tree id, but stable per (commit, folder), which is all the client needs.
    oid = hashlib.sha1(f"{commit.id}:{path}".encode()).hexdigest()
    return {"type": "directory", "path": path, "size": 0, "oid": oid}


def _byte_range(data: bytes, header: str | None, headers: dict[str, str]) -> _Response:
    """The whole file, or the ``Range: bytes=a-b`` slice the client asks for when resuming a download."""
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header or "")
    if match is None or not any(match.groups()):
        return _Response(200, data, headers)
    first, last = match.groups()
    start = int(first) if first else max(len(data) - int(last), 0)
    end = min(int(last), len(data) - 1) if first and last else len(data) - 1
    if start >= len(data):
        return _Response(416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"})
    return _Response(206, data[start:end + 1], {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"})


_ROUTE_TABLE: list[tuple[frozenset[str], re.Pattern[str], str, _Handler]] = [
    (frozenset(methods.split()), re.compile(pattern), name, handler)
    for methods, pattern, name, handler in [
        ("GET", r"/api/whoami-v2", "whoami", HubServer._whoami),
        ("POST", r"/api/repos/create", "create_repo", HubServer._create_repo_route),
        ("DELETE", r"/api/repos/delete", "delete_repo", HubServer._delete_repo),
        ("POST", r"/api/validate-yaml", "validate_yaml", HubServer._validate_yaml),
        ("GET", r"/api/agent-harnesses", "agent_harnesses", HubServer._agent_harnesses),
        ("GET", _API, "info", HubServer._info),
        ("GET", _API + r"/revision/(?P<rev>[^/]+)", "info", HubServer._info),
        ("PUT", _API + r"/settings", "settings", HubServer._settings),
        ("POST", _API + r"/preupload/(?P<rev>[^/]+)", "preupload", HubServer._preupload),
        ("POST", _API + r"/commit/(?P<rev>[^/]+)", "commit", HubServer._commit),
        ("POST", _API + r"/tag/(?P<rev>[^/]+)", "tag", HubServer._create_tag),
        ("DELETE", _API + r"/tag/(?P<name>[^/]+)", "delete_tag", HubServer._delete_tag),
        ("POST", _API + r"/branch/(?P<name>[^/]+)", "branch", HubServer._create_branch),
        ("DELETE", _API + r"/branch/(?P<name>[^/]+)", "delete_branch", HubServer._delete_branch),
        ("GET", _API + r"/refs", "refs", HubServer._refs),
        ("GET", _API + r"/commits/(?P<rev>[^/]+)", "commits", HubServer._commits),
        ("GET", _API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "tree", HubServer._tree),
        ("POST", _API + r"/paths-info/(?P<rev>[^/]+)", "paths_info", HubServer._paths_info),
        ("POST", _GIT + r"/batch", "lfs_batch", HubServer._lfs_batch),
        ("POST", _GIT + r"/verify", "lfs_verify", HubServer._lfs_verify),
        ("PUT", r"/lfs-upload/(?P<ticket>[0-9a-f]+)", "lfs_upload", HubServer._lfs_upload),
        ("GET HEAD", _RESOLVE, "resolve", HubServer._resolve),
    ]
]


# Names accepted by ``HubServer.fail_next``, one per route.
ROUTES = frozenset(name for _, _, name, _ in _ROUTE_TABLE)


def _match_route(request: _Request) -> tuple[str, _Handler] | None:
    """Find the route for ``request`` and store its URL-unquoted path parameters in ``request.params``."""
    for methods, pattern, name, handler in _ROUTE_TABLE:
        if request.method in methods and (match := pattern.fullmatch(request.path)):
            request.params = {key: unquote(value) if value is not None else None
                              for key, value in match.groupdict().items()}
            return name, handler
    return None


def _handler_class(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
        timeout = 60

        def do_GET(self) -> None:
            self._handle()

        do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

        def _handle(self) -> None:
            if hub._server is None:  # stopped: a kept-alive connection must not outlive the server
                self.close_connection = True
                return
            url = urlsplit(self.path)
            request = _Request(self.command, url.path, parse_qs(url.query), self.headers, self._read_body())
            try:
                response = hub._dispatch(request)
            except _Dropped as dropped:  # an injected fault: silence, then close without a byte of answer
                hub._stopping.wait(dropped.drop.silence)
                self.close_connection = True
                return
            except Exception as error:  # a server bug must reach the test as a 500, not a hung connection
                response = HubError(500, f"hub_server crashed: {type(error).__name__}: {error}").response()
            self._send(response)

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                return self._read_chunked()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _read_chunked(self) -> bytes:
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)

        def _send(self, response: _Response) -> None:
            self.send_response(response.status)
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            if self.command != "HEAD":
                try:
                    self.wfile.write(response.body)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep pytest output clean; ``hub.requests`` is the log

    return Handler
