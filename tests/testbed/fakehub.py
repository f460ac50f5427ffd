"""SIMULATED Hugging Face Hub: serves model repositories from local folders over plain HTTP.

The testbed has no internet, so the weights test points the real `hf download` / `snapshot_download`
(huggingface_hub 2.4.0) at this server with `HF_ENDPOINT=http://<addr>:<port>`. It answers exactly what
huggingface_hub 2.4.0 asks for a model repo, read from its source:

- `GET /api/models/{repo_id}[/revision/{revision}][?blobs=true]`: hf_api.py `HfApi.model_info` (called by
  `repo_info`, the first request of `_snapshot_download.py:snapshot_download`); `ModelInfo.__init__` reads `id`,
  `sha` and `siblings[]` (`rfilename`, and with `blobs=true` `size`, `blobId`, `lfs: {sha256, size, pointerSize}`).
- `GET /api/models/{repo_id}/tree/{revision}[/{path}]?recursive=...`: hf_api.py `_iter_repo_tree_pages` (the
  file list of `snapshot_download`, also `list_repo_files`); `RepoFile.__init__` reads `type`, `path`, `size`,
  `oid`, `lfs: {oid, size, pointerSize}`; `RepoFolder` reads `path`, `oid`. One page: no `Link: next` header
  (utils/_pagination.py `_paginate_pages`).
- `HEAD /{repo_id}/resolve/{revision}/{filename}`: file_download.py `get_hf_file_metadata` reads `X-Repo-Commit`,
  `X-Linked-Etag` or `ETag` (through `_normalize_etag`), `X-Linked-Size` or `Content-Length`, and `Location`.
  The ETag names the cache blob (`_hf_hub_download_to_cache_dir`: `blobs/<etag>`): the git blob sha1 of a regular
  file, the sha256 of an LFS file, as on the Hub (see `hf_hub_url`'s docstring). No `X-Xet-*` header is sent, so
  `parse_xet_file_data_from_response` finds no Xet data and the plain HTTP path (`http_get`) is used.
- `GET` of the same URL: file_download.py `http_get`, which resumes after a broken connection with
  `Range: bytes=N-` (utils/_http.py `_adjust_range_header`); answered 206 with `Content-Range`.
  `HfApi.get_safetensors_metadata` reads `Range: bytes=0-N` the same way.
- Errors: utils/_http.py `hf_raise_for_status` maps the `X-Error-Code` header: `RepoNotFound` ->
  RepositoryNotFoundError, `RevisionNotFound` -> RevisionNotFoundError, `EntryNotFound` ->
  RemoteEntryNotFoundError (with `X-Repo-Commit`, which `_get_metadata_or_catch_error` uses to cache `.no_exist`).

Not simulated: the Hub's 302 from `/resolve/` of an LFS file to a CDN (`get_hf_file_metadata` takes the 200 as is),
Xet storage, authentication, gated/private repos, datasets and spaces, branches other than `main`, pagination.

Revisions: each repo has one commit, whose sha is derived from its files (path + git blob id); `main` and that
sha resolve to it, any other revision is RevisionNotFound. LFS files are those the Hub's default
`.gitattributes` sends to LFS: the extensions in `_LFS_SUFFIXES` and any file over 10 MB.

Download log, one flushed line per request, written before the response (a GET's before its last chunk), so a
client that holds a response always finds its line; `<revision>` as requested, `-` where there is none, fields
percent-encoded (a space is %20):
    <iso time> GET <repo> <revision> <filename> <bytes> [range=<first>-<last>]   a file body, sent completely
    <iso time> GET-ABORTED <repo> <revision> <filename> <bytes sent> [last-chunk] cut short (client gone, or
                                                       --drop-once-after-bytes); last-chunk: takes back the GET above
    <iso time> HEAD <repo> <revision> <filename> <size>
    <iso time> INFO <repo> <revision> - 0                                        model_info / repo_info
    <iso time> TREE <repo> <revision> <path or -> <entries>
    <iso time> ERROR <repo> <revision> <filename or -> <X-Error-Code>

    python3 -m tests.testbed.fakehub --dir FOLDER --repo ORG/NAME [--repo-dir ORG/NAME=FOLDER ...]
        [--host 127.0.0.1] [--port 0] [--log FILE] [--ready-file FILE] [--throttle-bytes-per-s N]
        [--drop-once-after-bytes N]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import http.server
import json
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

# The Hub's default .gitattributes (the patterns a new repo gets) for the suffixes model repos carry.
_LFS_SUFFIXES = frozenset(
    {
        ".safetensors",
        ".bin",
        ".pt",
        ".pth",
        ".ckpt",
        ".onnx",
        ".h5",
        ".msgpack",
        ".pkl",
        ".gguf",
        ".tflite",
        ".npz",
        ".model",
        ".zip",
        ".tar",
        ".gz",
        ".ot",
        ".parquet",
        ".arrow",
        ".joblib",
        ".pb",
        ".tgz",
        ".zst",
        ".7z",
        ".bz2",
        ".xz",
        ".npy",
        ".mlmodel",
        ".rar",
    }
)
_LFS_MIN_SIZE = 10 * 1024 * 1024
_COMMIT_DATE = "2024-01-01T00:00:00.000Z"
_CHUNK = 256 * 1024
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass(frozen=True)
class HubFile:
    """One file of a repo: its path in the repo, where it lives on disk and its Hub identifiers."""

    path: str
    source: Path
    size: int
    blob_id: str  # git blob sha1 of the content, or of the LFS pointer for an LFS file
    sha256: str | None  # set for LFS files only
    pointer_size: int | None

    @property
    def etag(self) -> str:
        """What the Hub sends as (X-Linked-)ETag, which names the blob in the client's cache."""
        return self.sha256 or self.blob_id


@dataclass(frozen=True)
class HubRepo:
    """A model repo with a single commit."""

    repo_id: str
    folder: Path
    sha: str
    files: Mapping[str, HubFile]

    def resolves(self, revision: str) -> bool:
        """Whether `revision` (as sent, URL-decoded) names this repo's commit."""
        return revision in ("main", self.sha)

    def folders(self) -> list[str]:
        """Every directory of the repo (not the root), sorted."""
        dirs = {"/".join(p.split("/")[:i]) for p in self.files for i in range(1, p.count("/") + 1)}
        return sorted(dirs)


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _is_lfs(path: str, size: int) -> bool:
    name = path.rsplit("/", 1)[-1]
    return size > _LFS_MIN_SIZE or any(name.endswith(s) for s in _LFS_SUFFIXES)


def load_repo(repo_id: str, folder: str | Path) -> HubRepo:
    """Read every file under `folder` (hidden files and `.git` skipped) into a repo with a derived commit sha."""
    root = Path(folder).resolve()
    if not root.is_dir():
        raise ValueError(f"{repo_id}: {root} is not a directory")
    files: dict[str, HubFile] = {}
    for source in sorted(root.rglob("*")):
        rel = source.relative_to(root).as_posix()
        if not source.is_file() or any(part.startswith(".") for part in rel.split("/")):
            continue
        data = source.read_bytes()
        if _is_lfs(rel, len(data)):
            sha256 = hashlib.sha256(data).hexdigest()
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n".encode()
            files[rel] = HubFile(rel, source, len(data), _git_blob_id(pointer), sha256, len(pointer))
        else:
            files[rel] = HubFile(rel, source, len(data), _git_blob_id(data), None, None)
    if not files:
        raise ValueError(f"{repo_id}: {root} holds no files")
    tree = "".join(f"{f.path}\0{f.blob_id}\n" for f in files.values())
    sha = hashlib.sha1(f"{repo_id}\n{tree}".encode()).hexdigest()
    return HubRepo(repo_id, root, sha, files)


def build_model_info(repo: HubRepo, blobs: bool) -> dict[str, object]:
    """The JSON of `GET /api/models/{repo_id}/revision/{revision}` (hf_api.py ModelInfo)."""
    siblings: list[dict[str, object]] = []
    for f in repo.files.values():
        sibling: dict[str, object] = {"rfilename": f.path}
        if blobs:
            sibling.update(size=f.size, blobId=f.blob_id)
            if f.sha256 is not None:
                sibling["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
        siblings.append(sibling)
    author = repo.repo_id.split("/")[0] if "/" in repo.repo_id else None
    return {
        "_id": repo.sha[:24],
        "id": repo.repo_id,
        "modelId": repo.repo_id,
        "author": author,
        "sha": repo.sha,
        "lastModified": _COMMIT_DATE,
        "createdAt": _COMMIT_DATE,
        "private": False,
        "gated": False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": [],
        "siblings": siblings,
        "usedStorage": sum(f.size for f in repo.files.values()),
    }


def build_tree(repo: HubRepo, path: str, recursive: bool) -> list[dict[str, object]] | None:
    """The JSON of `GET /api/models/{repo_id}/tree/{revision}/{path}`; None if `path` is no folder."""
    prefix = f"{path.strip('/')}/" if path.strip("/") else ""
    if prefix and prefix[:-1] not in repo.folders():
        return None

    def inside(p: str) -> bool:
        return p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :])

    entries: list[dict[str, object]] = []
    for d in repo.folders():
        if inside(d):
            tree_id = hashlib.sha1(f"{repo.sha}:{d}".encode()).hexdigest()
            entries.append({"type": "directory", "oid": tree_id, "size": 0, "path": d})
    for f in repo.files.values():
        if inside(f.path):
            entry: dict[str, object] = {"type": "file", "oid": f.blob_id, "size": f.size, "path": f.path}
            if f.sha256 is not None:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": f.pointer_size}
            entries.append(entry)
    return entries


class _HubError(Exception):
    def __init__(self, status: int, code: str, message: str, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects of the Hub
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass  # the download log is the record; stderr stays quiet

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def _dispatch(self, head: bool) -> None:
        url = urlsplit(self.path)
        # What the error line of the log names: the path until the request is parsed.
        self._subject = ("-", "-", url.path)
        try:
            if url.path.startswith("/api/"):
                self._api(url.path, parse_qs(url.query), head)
            elif "/resolve/" in url.path:
                raw_repo, rest = url.path.lstrip("/").split("/resolve/", 1)
                raw_rev, _, raw_name = rest.partition("/")
                self._resolve(unquote(raw_repo), unquote(raw_rev), unquote(raw_name), head)
            else:
                raise _HubError(404, "RepoNotFound", "Repository not found")
        except _HubError as e:
            repo_id, revision, name = self._subject
            self.server.record("ERROR", repo_id, revision, name or "-", e.code)
            body = json.dumps({"error": e.message}).encode()
            headers = {"X-Error-Code": e.code, "X-Error-Message": e.message, "Content-Type": "application/json"}
            if e.commit:
                headers["X-Repo-Commit"] = e.commit
            self._send(e.status, headers, b"" if head else body, len(body))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _repo(self, repo_id: str, revision: str) -> HubRepo:
        repo = self.server.repos.get(repo_id)
        if repo is None:
            raise _HubError(404, "RepoNotFound", "Repository not found")
        if not repo.resolves(revision):
            raise _HubError(404, "RevisionNotFound", "Invalid rev id: " + revision)
        return repo

    def _api(self, path: str, query: dict[str, list[str]], head: bool) -> None:
        # /api/models/{repo_id}[/revision/{rev}] and /api/models/{repo_id}/tree/{rev}[/{path}]
        m = re.fullmatch(r"/api/models/(.+?)(?:/(revision|tree)/([^/]+)(/.*)?)?", path)
        if m is None:
            raise _HubError(404, "RepoNotFound", "Repository not found")
        repo_id, kind, raw_rev, sub = unquote(m[1]), m[2], m[3], m[4]
        revision = unquote(raw_rev) if raw_rev else "main"
        self._subject = (repo_id, revision, unquote(sub or "").strip("/") or "-")
        repo = self._repo(repo_id, revision)
        data: object
        if kind == "tree":
            sub_path = unquote(sub or "")
            tree = build_tree(repo, sub_path, query.get("recursive", ["false"])[0].lower() == "true")
            if tree is None:
                raise _HubError(404, "EntryNotFound", f"{sub_path} does not exist on {revision}", repo.sha)
            data, verb, name, count = tree, "TREE", sub_path.strip("/") or "-", len(tree)
        else:
            blobs = query.get("blobs", ["false"])[0].lower() == "true"
            data, verb, name, count = build_model_info(repo, blobs), "INFO", "-", 0
        body = json.dumps(data).encode()
        self.server.record(verb, repo_id, revision, name, str(count))
        self._send(
            200, {"Content-Type": "application/json", "X-Repo-Commit": repo.sha}, b"" if head else body, len(body)
        )

    def _resolve(self, repo_id: str, revision: str, name: str, head: bool) -> None:
        self._subject = (repo_id, revision, name)
        repo = self._repo(repo_id, revision)
        f = repo.files.get(name)
        if f is None:
            raise _HubError(404, "EntryNotFound", f"{name} does not exist on {revision}", repo.sha)
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "X-Repo-Commit": repo.sha,
            "ETag": f'"{f.etag}"',
            "Content-Disposition": f'inline; filename="{name.rsplit("/", 1)[-1]}"',
        }
        if f.sha256 is not None:
            # What the Hub puts on the LFS redirect; get_hf_file_metadata prefers these over ETag/Content-Length.
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            headers["X-Linked-Size"] = str(f.size)
        if head:
            self.server.record("HEAD", repo_id, revision, name, str(f.size))
            self._send(200, headers, b"", f.size)
            return
        first, last = 0, f.size - 1
        status, extra = 200, []
        wanted = self.headers.get("Range")
        if wanted:
            first, last = self._parse_range(wanted, f.size)
            status, extra = 206, [f"range={first}-{last}"]
            headers["Content-Range"] = f"bytes {first}-{last}/{f.size}"
        length = last - first + 1
        cut = self.server.hub._cut_at(repo_id, name, length)
        complete = ("GET", repo_id, revision, name, str(length), *extra)
        if length == 0:
            self.server.record(*complete)
        self._send_headers(status, headers, length)
        sent, logged = 0, length == 0
        try:
            for chunk in self.server.read_chunks(f.source, first, length if cut is None else cut):
                if cut is None and sent + len(chunk) == length:
                    # Logged before the last bytes leave: a client holding the whole file finds its line.
                    self.server.record(*complete)
                    logged = True
                self.wfile.write(chunk)
                sent += len(chunk)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            # After the GET line: "last-chunk" takes it back (count_gets subtracts it).
            late = ["last-chunk"] if logged else []
            self.server.record("GET-ABORTED", repo_id, revision, name, str(sent), *late)
            return
        if cut is not None:
            self.close_connection = True
            self.server.record("GET-ABORTED", repo_id, revision, name, str(sent))

    def _parse_range(self, value: str, size: int) -> tuple[int, int]:
        m = _RANGE.fullmatch(value.strip())
        if m is None or (not m[1] and not m[2]):
            raise _HubError(416, "RangeNotSatisfiable", f"unsupported range {value!r}")
        if not m[1]:  # bytes=-K: the last K bytes
            first, last = max(size - int(m[2]), 0), size - 1
        else:
            first, last = int(m[1]), min(int(m[2]), size - 1) if m[2] else size - 1
        if first > last or first >= size:
            raise _HubError(416, "RangeNotSatisfiable", f"range {value!r} outside 0-{size - 1}")
        return first, last

    def _send_headers(self, status: int, headers: Mapping[str, str], length: int) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _send(self, status: int, headers: Mapping[str, str], body: bytes, length: int) -> None:
        self._send_headers(status, headers, length)
        if body:
            self.wfile.write(body)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, hub: FakeHub, address: tuple[str, int]) -> None:
        self.hub = hub
        self.repos = hub.repos
        super().__init__(address, _Handler)

    def record(self, *fields: str) -> None:
        # Percent-encoded so that a filename with a space stays one field; parse_log decodes.
        self.hub._record(" ".join(quote(f, safe="/:=-._~+@,") for f in fields))

    def read_chunks(self, source: Path, first: int, length: int) -> Iterator[bytes]:
        rate = self.hub.throttle_bytes_per_s
        chunk = min(_CHUNK, max(rate // 10, 1)) if rate else _CHUNK
        start = time.monotonic()
        done = 0
        with source.open("rb") as fh:
            fh.seek(first)
            while done < length:
                data = fh.read(min(chunk, length - done))
                if not data:
                    raise OSError(f"{source} shrank while being served")
                done += len(data)
                yield data
                if rate:
                    ahead = done / rate - (time.monotonic() - start)
                    if ahead > 0:
                        time.sleep(ahead)


def start_fakehub(repos: Mapping[str, str | Path], **options: Any) -> FakeHub:
    """A FakeHub serving `repos` ({"org/name": folder}) in a thread; options as FakeHub's; stop() it after."""
    hub = FakeHub(repos, **options)
    hub.start()
    return hub


class FakeHub:
    """The fake Hub, started in a thread: `with FakeHub({"org/name": folder}) as hub: hub.url`."""

    def __init__(
        self,
        repos: Mapping[str, str | Path],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_path: str | Path | None = None,
        throttle_bytes_per_s: int | None = None,
        drop_once_after_bytes: int | None = None,
    ) -> None:
        self.repos = {repo_id: load_repo(repo_id, folder) for repo_id, folder in repos.items()}
        self.throttle_bytes_per_s = throttle_bytes_per_s
        # A connection lost mid-body: the first GET of each file longer than this stops there.
        self.drop_once_after_bytes = drop_once_after_bytes
        self._dropped: set[tuple[str, str]] = set()
        self.log_path = Path(log_path) if log_path is not None else None
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._log_file = self.log_path.open("a", encoding="utf-8") if self.log_path is not None else None
        self._server = _Server(self, (host, port))
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The value for HF_ENDPOINT / `endpoint=`."""
        host = str(self._server.server_address[0])
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def start(self) -> str:
        """Serve in a daemon thread; returns the URL."""
        self._thread = threading.Thread(target=self._server.serve_forever, name="fakehub", daemon=True)
        self._thread.start()
        return self.url

    def serve_forever(self) -> None:
        """Serve in the calling thread until stop() (from a signal handler or another thread)."""
        self._server.serve_forever()

    def stop(self) -> None:
        """Stop serving and close the log."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()
        with self._lock:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    def __enter__(self) -> FakeHub:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_lines(self) -> list[str]:
        """Every log line so far (also kept in memory when no log file was given)."""
        with self._lock:
            return list(self._lines)

    def _cut_at(self, repo_id: str, name: str, length: int) -> int | None:
        limit = self.drop_once_after_bytes
        with self._lock:
            if limit is None or length <= limit or (repo_id, name) in self._dropped:
                return None
            self._dropped.add((repo_id, name))
            return limit

    def _record(self, line: str) -> None:
        stamped = f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='milliseconds')} {line}"
        with self._lock:
            self._lines.append(stamped)
            if self._log_file is not None:
                self._log_file.write(stamped + "\n")
                self._log_file.flush()


@dataclass(frozen=True)
class LogEntry:
    """One parsed log line."""

    time: str
    verb: str
    repo: str
    revision: str
    name: str
    value: str  # bytes for GET/GET-ABORTED, size for HEAD, entries for TREE, the error code for ERROR
    range: str | None = None  # "<first>-<last>" of a 206 GET
    retracts_get: bool = False  # a GET-ABORTED whose GET line was written before its last chunk failed


def parse_log(lines: list[str]) -> list[LogEntry]:
    """Parse log lines (from FakeHub.log_lines() or a log file's lines)."""
    entries = []
    for line in lines:
        fields = line.split()
        if len(fields) < 6:
            continue
        extra = fields[6] if len(fields) > 6 else ""
        rng = extra.removeprefix("range=") if extra.startswith("range=") else None
        when, verb, repo, revision, name, value = (unquote(f) for f in fields[:6])
        entries.append(LogEntry(when, verb, repo, revision, name, value, rng, extra == "last-chunk"))
    return entries


def read_log(path: str | Path) -> list[LogEntry]:
    """Parse a log file written by a fake hub (in this process or another)."""
    return parse_log(Path(path).read_text(encoding="utf-8").splitlines())


def count_gets(entries: list[LogEntry], repo: str | None = None) -> dict[str, int]:
    """Completed GETs of file bodies per filename."""
    counts: dict[str, int] = {}
    for e in entries:
        if repo is not None and e.repo != repo:
            continue
        if e.verb == "GET":
            counts[e.name] = counts.get(e.name, 0) + 1
        elif e.verb == "GET-ABORTED" and e.retracts_get:
            counts[e.name] -= 1
    return {name: n for name, n in counts.items() if n}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m tests.testbed.fakehub", description=__doc__.split("\n")[0])
    p.add_argument("--dir", type=Path, help="folder served as --repo")
    p.add_argument("--repo", help="repo id of --dir, e.g. sentence-transformers/all-MiniLM-L6-v2")
    p.add_argument("--repo-dir", action="append", default=[], metavar="ORG/NAME=FOLDER", help="another repo")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (see --ready-file)")
    p.add_argument("--log", type=Path, help="download log, appended to")
    p.add_argument("--ready-file", type=Path, help="written with the bound port once the server listens")
    p.add_argument("--throttle-bytes-per-s", type=int, help="send file bodies no faster than this")
    p.add_argument("--drop-once-after-bytes", type=int, help="cut the first GET of each longer file after N bytes")
    args = p.parse_args(argv)
    if (args.dir is None) != (args.repo is None):
        p.error("--dir and --repo go together")
    if args.dir is None and not args.repo_dir:
        p.error("give --dir with --repo, or --repo-dir ORG/NAME=FOLDER")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the fake hub in the foreground until SIGTERM/SIGINT."""
    args = _parse_args(argv)
    repos: dict[str, str | Path] = {}
    if args.repo is not None:
        repos[args.repo] = args.dir
    for spec in args.repo_dir:
        repo_id, sep, folder = spec.partition("=")
        if not sep or not repo_id or not folder:
            print(f"error: --repo-dir {spec!r}: expected ORG/NAME=FOLDER", file=sys.stderr)
            return 2
        repos[repo_id] = folder
    try:
        hub = FakeHub(
            repos,
            host=args.host,
            port=args.port,
            log_path=args.log,
            throttle_bytes_per_s=args.throttle_bytes_per_s,
            drop_once_after_bytes=args.drop_once_after_bytes,
        )
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def _stop(signum: int, frame: object) -> None:
        # shutdown() waits for serve_forever to return, so it must run outside the serving thread.
        threading.Thread(target=hub._server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if args.ready_file is not None:
        tmp = args.ready_file.with_name(args.ready_file.name + ".tmp")
        tmp.write_text(f"{hub.port}\n", encoding="utf-8")
        os.replace(tmp, args.ready_file)  # a reader never sees a half-written port
    for repo in hub.repos.values():
        print(f"fakehub: {repo.repo_id}@{repo.sha} from {repo.folder} ({len(repo.files)} files)", file=sys.stderr)
    print(f"fakehub: serving {hub.url}", file=sys.stderr, flush=True)
    hub.serve_forever()
    hub.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
