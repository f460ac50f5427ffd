"""Model weights on a Spark: fetch a Hugging Face snapshot once, verify it, record what was verified.

Installed on the hosts as `<state dir>/weights.py` and run there (standard library only, except `fetch`, which runs
under the runtime's own Python and imports its `huggingface_hub`):

    python weights.py fetch REPO REVISION CACHE MANIFEST [PEER...]   (token, if any, on the first line of stdin)
        PEER: NAME=FREE_GIB=HAVE_BYTES, a target's free space (whole GiB, so that the command stays the same while
        a disk's use moves by bytes) and what it already holds of the repository
    python3 weights.py verify REPO_DIR MANIFEST                       (the source's manifest JSON on stdin)

`fetch` asks the hub for the file list with sizes and LFS sha256 (`HfApi.model_info(files_metadata=True)`,
huggingface_hub hf_api.py), refuses when this host or a peer (read by the plan) lacks the space, downloads with
`snapshot_download` (huggingface_hub 2.4.0 _snapshot_download.py, file_download.py: each file lands in a
`.incomplete` blob renamed when whole, so a partial file is never at its final name; a finished file is not fetched
again, one cut off by an interrupted run is fetched again from its start), checks each LFS file's sha256 against
the hub's, and writes the manifest. With HF_HUB_OFFLINE=1 the hub is not
asked: `snapshot_download` returns the cached snapshot (or fails if there is none) and the manifest takes the
sha256 from the blob names (an LFS blob is stored under its sha256: huggingface_hub file_download.py names blobs
by the ETag, which the hub sets to the LFS object's sha256).

`verify` checks a copy against the source's manifest (every file present with its size and, where known, its
sha256); a file that does not match is removed, so that the next copy brings it again, and named. Then it writes
the manifest: the record the probe compares on the next run.

Output lines `progress <done bytes> <total bytes>` (once a second while fetching or hashing) are read by the
engine for the live view.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

MARGIN = 1 << 30
"""Free space kept on a disk after the weights land (bytes)."""


def folder(repo: str) -> str:
    """The repository's folder in the hub cache (huggingface_hub file_download.py, repo_folder_name)."""
    return "models--" + repo.replace("/", "--")


def _progress(total: int, done: Callable[[], int]) -> threading.Event:
    """Print `progress <done> <total>` once a second until the returned event is set."""
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(1.0):
            print(f"progress {done()} {total}", flush=True)

    threading.Thread(target=tick, daemon=True).start()
    return stop


def _dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # a file renamed meanwhile
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _sha256(path: Path, counter: list[int]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            counter[0] += len(chunk)
    return h.hexdigest()


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _check_space(where: str, path: Path, need: int) -> None:
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need + MARGIN > free:
        sys.exit(f"refused: {where} {path} has {_gb(free)} free; the weights need {_gb(need)} more (+1 GiB kept free)")


def _check(snapshot: Path, files: list[dict[str, Any]], repo_dir: Path) -> list[str]:
    """Files of the manifest missing or different under `snapshot`; a different one is removed (blob and link)."""
    bad = []
    total = sum(f["size"] for f in files if f.get("sha256"))
    hashed = [0]
    stop = _progress(total, lambda: hashed[0])
    try:
        for f in files:
            if f["path"].startswith("/") or ".." in f["path"].split("/"):
                bad.append(f"{f['path']}: not a path inside the snapshot")
                continue
            path = snapshot / f["path"]
            try:
                size = path.stat().st_size
            except OSError:
                bad.append(f"{f['path']}: missing")
                continue
            why = ""
            if size != f["size"]:
                why = f"{size} bytes, want {f['size']}"
            elif f.get("sha256") and _sha256(path, hashed) != f["sha256"]:
                why = f"sha256 differs from {f['sha256']}"
            if why:
                bad.append(f"{f['path']}: {why} (removed)")
                real = path.resolve()
                if real.is_relative_to(repo_dir):
                    real.unlink(missing_ok=True)
                path.unlink(missing_ok=True)
    finally:
        stop.set()
    return bad


def _write(manifest_path: Path, manifest: dict[str, Any]) -> None:
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = manifest_path.with_name(manifest_path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, manifest_path)


def fetch(repo: str, revision: str, cache: str, manifest_path: str, peers: list[str]) -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.constants import HF_HUB_OFFLINE

    token = sys.stdin.readline().strip() or None
    repo_dir = Path(cache) / folder(repo)
    published: dict[str, dict[str, Any]] = {}
    total = 0
    if not HF_HUB_OFFLINE:
        info = HfApi().model_info(repo, revision=revision, files_metadata=True, token=token)
        for s in info.siblings or []:
            published[s.rfilename] = {"size": s.size or 0, "sha256": s.lfs.sha256 if s.lfs else None}
        total = sum(p["size"] for p in published.values())
        have = _dir_bytes(repo_dir / "blobs") if (repo_dir / "blobs").is_dir() else 0
        _check_space("this host:", Path(cache), total - have)
        for peer in peers:
            name, free_gib, peer_have = peer.split("=")
            need = total - int(peer_have)
            if need + MARGIN > int(free_gib) << 30:
                free = "less than 1 GiB" if free_gib == "0" else f"about {free_gib} GiB"
                sys.exit(
                    f"refused: {name} has {free} free for the weights; {repo} needs {_gb(need)} more there "
                    "(+1 GiB kept free)"
                )
    stop = _progress(total, lambda: _dir_bytes(repo_dir / "blobs") if (repo_dir / "blobs").is_dir() else 0)
    try:
        snapshot = Path(snapshot_download(repo, revision=revision, cache_dir=cache, token=token))
    finally:
        stop.set()
    files: list[dict[str, Any]] = []
    for path in sorted(p for p in snapshot.rglob("*") if p.is_file()):
        rel = path.relative_to(snapshot).as_posix()
        blob = path.resolve().name
        sha = published.get(rel, {}).get("sha256")
        if not published and len(blob) == 64 and all(c in "0123456789abcdef" for c in blob):
            sha = blob
        files.append({"path": rel, "size": path.stat().st_size, "sha256": sha, "blob": blob})
    missing = [f"{rel}: not downloaded" for rel in published if not (snapshot / rel).is_file()]
    bad = missing + _check(snapshot, files, repo_dir)
    if bad:
        sys.exit(f"{repo}@{snapshot.name} on this host does not match the hub: " + "; ".join(bad))
    manifest = {"repo": repo, "revision": revision, "commit": snapshot.name, "files": files}
    _write(Path(manifest_path), manifest)
    size = sum(f["size"] for f in files)
    print(f"fetched {repo}@{snapshot.name}: {len(files)} files, {_gb(size)}, verified", flush=True)


def verify(repo_dir: str, manifest_path: str) -> None:
    manifest = json.loads(sys.stdin.read())
    root = Path(repo_dir)
    snapshot = root / "snapshots" / manifest["commit"]
    bad = _check(snapshot, manifest["files"], root.resolve())
    if bad:
        sys.exit(f"{manifest['repo']}@{manifest['commit']} here does not match the source: " + "; ".join(bad))
    ref = root / "refs" / manifest["revision"]
    if manifest["revision"] != manifest["commit"] and (not ref.is_file() or ref.read_text() != manifest["commit"]):
        sys.exit(f"{ref} does not name {manifest['commit']}")
    _write(Path(manifest_path), manifest)
    print(f"verified {manifest['repo']}@{manifest['commit']}: {len(manifest['files'])} files", flush=True)


def main(argv: list[str]) -> None:
    if argv[:1] == ["fetch"] and len(argv) >= 5:
        fetch(argv[1], argv[2], argv[3], argv[4], argv[5:])
    elif argv[:1] == ["verify"] and len(argv) == 3:
        verify(argv[1], argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
