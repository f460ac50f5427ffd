"""The fake Hub against the real huggingface_hub client: snapshot_download, hf_hub_download and `hf download`.

The server listens on 127.0.0.1 only; nothing leaves the machine.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

from tests.testbed.fakehub import FakeHub, count_gets, load_repo, parse_log, read_log, start_fakehub

REPO_ID = "acme/tiny-embedder"
REPO = Path(__file__).resolve().parents[2]
FILES = {
    "config.json": b'{"hidden_size": 8}\n',
    "README.md": b"# tiny\n",
    "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}\n',
    "1_Pooling/notes v1.txt": b"a name with a space\n",
    # LFS by its suffix, as the Hub's default .gitattributes says; bytes that differ along the file.
    "model.safetensors": bytes(range(256)) * 96,
}


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture
def repo_dir(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for name, data in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


@pytest.fixture(autouse=True)
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """Other tests of the session run offline: huggingface_hub reads HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) once,
    at import (constants.py), and its functions look the constant up when called."""
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub(repo_dir: Path, tmp_path: Path) -> Iterator[FakeHub]:
    server = start_fakehub({REPO_ID: repo_dir}, log_path=tmp_path / "hub.log")
    yield server
    server.stop()


def hub_env(hub: FakeHub, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "TRANSFORMERS_OFFLINE"}
    return {**env, "HF_ENDPOINT": hub.url, "HF_HOME": str(home)}


def test_snapshot_download_lays_out_the_hub_cache_and_fetches_each_file_once(hub: FakeHub, tmp_path: Path) -> None:
    sha = hub.repos[REPO_ID].sha
    cache = tmp_path / "cache"
    snapshot = Path(snapshot_download(REPO_ID, cache_dir=cache, endpoint=hub.url))

    storage = cache / "models--acme--tiny-embedder"
    assert snapshot == storage / "snapshots" / sha
    assert (storage / "refs" / "main").read_text() == sha
    assert {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()} == set(FILES)
    for name, data in FILES.items():
        assert (snapshot / name).read_bytes() == data
    # Blobs are named by the ETag: sha256 for the LFS file, git blob sha1 for the others.
    blobs = {p.name for p in (storage / "blobs").iterdir()}
    assert hashlib.sha256(FILES["model.safetensors"]).hexdigest() in blobs
    assert git_blob_id(FILES["config.json"]) in blobs
    assert (snapshot / "model.safetensors").resolve().name == hashlib.sha256(FILES["model.safetensors"]).hexdigest()
    assert count_gets(parse_log(hub.log_lines())) == dict.fromkeys(FILES, 1)

    before = len(hub.log_lines())
    assert Path(snapshot_download(REPO_ID, cache_dir=cache, endpoint=hub.url)) == snapshot
    again = parse_log(hub.log_lines()[before:])
    assert [e.verb for e in again] == ["INFO"]  # the revision is resolved again, nothing else is asked
    assert count_gets(read_log(tmp_path / "hub.log")) == dict.fromkeys(FILES, 1)


def test_model_info_and_tree_describe_the_repo_like_the_hub(hub: FakeHub) -> None:
    repo = hub.repos[REPO_ID]
    api = HfApi(endpoint=hub.url)
    info = api.model_info(REPO_ID, files_metadata=True)
    assert info.sha == repo.sha
    siblings = {s.rfilename: s for s in info.siblings or []}
    assert set(siblings) == set(FILES)
    weights = FILES["model.safetensors"]
    lfs = siblings["model.safetensors"].lfs
    assert lfs is not None
    assert (lfs.sha256, lfs.size) == (hashlib.sha256(weights).hexdigest(), len(weights))
    assert siblings["config.json"].lfs is None
    assert siblings["config.json"].blob_id == git_blob_id(FILES["config.json"])

    assert sorted(api.list_repo_files(REPO_ID)) == sorted(FILES)
    top = {e.path for e in api.list_repo_tree(REPO_ID, revision=repo.sha)}
    assert top == {"config.json", "README.md", "model.safetensors", "1_Pooling"}


def test_hf_hub_download_of_one_file_by_branch(hub: FakeHub, tmp_path: Path) -> None:
    path = hf_hub_download(REPO_ID, "1_Pooling/config.json", cache_dir=tmp_path / "c", endpoint=hub.url)
    assert Path(path).read_bytes() == FILES["1_Pooling/config.json"]
    entries = parse_log(hub.log_lines())
    assert [(e.verb, e.revision, e.name) for e in entries] == [
        ("HEAD", "main", "1_Pooling/config.json"),
        ("GET", "main", "1_Pooling/config.json"),
    ]


def test_range_request_gets_206_with_the_tail(hub: FakeHub) -> None:
    data = FILES["model.safetensors"]
    request = urllib.request.Request(
        f"{hub.url}/{REPO_ID}/resolve/main/model.safetensors", headers={"Range": "bytes=1000-"}
    )
    with urllib.request.urlopen(request) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
        assert response.read() == data[1000:]
    (entry,) = parse_log(hub.log_lines())
    assert (entry.verb, entry.value, entry.range) == ("GET", str(len(data) - 1000), f"1000-{len(data) - 1}")


def test_a_cut_connection_is_resumed_with_a_range_request(tmp_path: Path) -> None:
    # http_get writes what it received in DOWNLOAD_CHUNK_SIZE (10 MiB) pieces and resumes from the last whole one.
    chunk = 10 * 1024 * 1024
    data = hashlib.sha256(b"weights").digest() * ((chunk + 64 * 1024) // 32)
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "model.safetensors").write_bytes(data)
    with FakeHub({REPO_ID: tmp_path / "repo"}, drop_once_after_bytes=chunk + 1000) as hub:
        path = hf_hub_download(REPO_ID, "model.safetensors", cache_dir=tmp_path / "c", endpoint=hub.url)
        entries = [e for e in parse_log(hub.log_lines()) if e.verb != "HEAD"]
    assert Path(path).read_bytes() == data
    assert [(e.verb, e.value, e.range) for e in entries] == [
        ("GET-ABORTED", str(chunk + 1000), None),
        ("GET", str(len(data) - chunk), f"{chunk}-{len(data) - 1}"),
    ]


def test_unknown_repo_revision_and_file_raise_the_hub_errors(hub: FakeHub, tmp_path: Path) -> None:
    cache = tmp_path / "c"
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("acme/missing", cache_dir=cache, endpoint=hub.url)
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(REPO_ID, revision="v2", cache_dir=cache, endpoint=hub.url)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO_ID, "config.json", revision="0" * 40, cache_dir=cache, endpoint=hub.url)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO_ID, "tokenizer.json", cache_dir=cache, endpoint=hub.url)
    codes = [e.value for e in parse_log(hub.log_lines()) if e.verb == "ERROR"]
    assert codes == ["RepoNotFound", "RevisionNotFound", "RevisionNotFound", "EntryNotFound"]
    assert count_gets(parse_log(hub.log_lines())) == {}


def test_commit_sha_follows_the_files(repo_dir: Path) -> None:
    first = load_repo(REPO_ID, repo_dir).sha
    assert first == load_repo(REPO_ID, repo_dir).sha
    (repo_dir / "config.json").write_bytes(b'{"hidden_size": 16}\n')
    assert load_repo(REPO_ID, repo_dir).sha != first
    assert len(first) == 40


RUNTIMES = [sys.executable, "/opt/sparkctl-runtime/bin/python"]


@pytest.mark.parametrize("python", RUNTIMES, ids=["runner", "runtime-venv"])
def test_hf_download_cli_prints_the_snapshot_path(hub: FakeHub, tmp_path: Path, python: str) -> None:
    if not Path(python).exists():
        pytest.skip(f"{python} is not installed")
    home = tmp_path / "hf-home"
    result = subprocess.run(
        [python, "-m", "huggingface_hub.cli.hf", "download", "--quiet", REPO_ID],
        env=hub_env(hub, home),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    snapshot = home / "hub" / "models--acme--tiny-embedder" / "snapshots" / hub.repos[REPO_ID].sha
    assert result.stdout == f"{snapshot}\n"
    for name, data in FILES.items():
        assert (snapshot / name).read_bytes() == data
    assert count_gets(parse_log(hub.log_lines())) == dict.fromkeys(FILES, 1)


def test_command_line_server_writes_its_port_and_log(repo_dir: Path, tmp_path: Path) -> None:
    # Debian's python3 runs it on the hosts' side of the testbed; the runner's python3 elsewhere.
    python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    ready, log = tmp_path / "port", tmp_path / "hub.log"
    argv = [
        python,
        "-m",
        "tests.testbed.fakehub",
        "--dir",
        str(repo_dir),
        "--repo",
        REPO_ID,
        "--port",
        "0",
        "--log",
        str(log),
        "--ready-file",
        str(ready),
    ]
    server = subprocess.Popen(
        argv, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert server.poll() is None, server.communicate()[1]
            assert time.monotonic() < deadline, "no ready file after 30 s"
            time.sleep(0.05)
        url = f"http://127.0.0.1:{int(ready.read_text())}"
        path = hf_hub_download(REPO_ID, "model.safetensors", cache_dir=tmp_path / "c", endpoint=url)
        assert Path(path).read_bytes() == FILES["model.safetensors"]
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=30)
    assert server.returncode == 0, stderr
    assert count_gets(read_log(log)) == {"model.safetensors": 1}
