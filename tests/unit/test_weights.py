"""Model weights on every Spark: the plans (fetch once, copy over the fabric, check, converged), the host-side helper
run for real (against the simulated hub, and on copies made by rsync), and the progress the live view shows.

Plans are built from the example pair (chat: Qwen/Qwen3-30B-A3B-Instruct-2507, TP=2 across both Sparks) with facts
as the probe parses them; the helper runs under this machine's Python with the real huggingface_hub.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sparkctl import paths
from sparkctl.facts.models import HostFacts, WeightsCopy
from sparkctl.facts.parse import parse_weights
from sparkctl.inventory import parse_inventory
from sparkctl.inventory.models import Inventory
from sparkctl.plan import images, runtime, weights, workload_commands
from sparkctl.plan.context import PlanContext
from sparkctl.plan.models import Step
from sparkctl.session.logphase import CopyProgress
from tests.unit.test_container_plan import EXAMPLE, edit, fresh

REPO_ID = "Qwen/Qwen3-30B-A3B-Instruct-2507"
KEY = f"{REPO_ID}@main"
FOLDER = paths.hub_folder(REPO_ID)
COMMIT = "c0ffee" + "0" * 34
SHA = "ab" * 32
HUB = "/home/nvidia/.cache/huggingface/hub"
DIGESTS = {"weights_code": "w" * 64, "peer_key": "d1g3st", "peer_key_pub": "ssh-ed25519 AAAA sparkctl-peer-spark-pair"}
HELPER = Path(weights.__file__).parents[1] / "workers" / "weights.py"
MANIFEST: dict[str, Any] = {
    "repo": REPO_ID,
    "revision": "main",
    "commit": COMMIT,
    "files": [
        {"path": "config.json", "size": 700, "sha256": None, "blob": "9f" * 20},
        {"path": "model.safetensors", "size": 61_000_000_000, "sha256": SHA, "blob": SHA},
    ],
}


def inventory(*edits: tuple[str, str]) -> Inventory:
    text = EXAMPLE.read_text()
    for old, new in edits:
        text = edit(text, old, new)
    return parse_inventory(text, "pair.yaml")


def holding(manifest: dict[str, Any] | None = MANIFEST, recorded: bool = True, missing: int = 0) -> WeightsCopy:
    """A host's cache as the probe lists it: the manifest's blobs (the last `missing` bytes short) and links."""
    files, links = {}, {}
    for f in MANIFEST["files"]:
        files[f"blobs/{f['blob']}"] = f["size"] - (missing if f["path"] == "model.safetensors" else 0)
        links[f"snapshots/{COMMIT}/{f['path']}"] = f"../../blobs/{f['blob']}"
    record = json.dumps(manifest) if recorded else None
    return WeightsCopy(files=files, links=links, refs={"main": COMMIT}, manifest=record)


def facts(inv: Inventory, **hosts: dict[str, Any]) -> dict[str, HostFacts]:
    base = fresh(inv)
    out = {}
    for name, f in base.items():
        update: dict[str, Any] = {
            "user": "nvidia",
            "home": "/home/nvidia",
            "hf_free": 500 << 30,
            "tools": {"rsync": "/usr/bin/rsync"},
            "files": {f"{paths.WEIGHTS_SCRIPT}.sha256": DIGESTS["weights_code"]},
        }
        out[name] = f.model_copy(update={**update, **hosts.get(name.replace("-", "_"), {})})
    return out


def ctx(inv: Inventory, f: dict[str, HostFacts]) -> PlanContext:
    return PlanContext(inv, f, {}, DIGESTS)


def planned(inv: Inventory, f: dict[str, HostFacts]) -> list[Step]:
    c = ctx(inv, f)
    return [
        s
        for h in inv.hosts
        for plan in (
            images.plan_peer_access,
            weights.plan_weights_fetch,
            weights.plan_weights_copy,
            weights.plan_weights_verify,
        )
        for s in plan(c, h)
    ]


def only(steps: list[Step], kind: str) -> Step:
    found = [s for s in steps if s.kind == kind]
    assert len(found) == 1, [s.id for s in steps]
    return found[0]


def sh_argv(step: Step) -> list[str]:
    argv = step.commands[0].argv
    assert argv[:2] == ["sh", "-c"]
    return shlex.split(argv[2])


def test_a_fresh_pair_downloads_once_on_the_head_copies_over_the_fabric_and_checks() -> None:
    inv = inventory()
    steps = planned(inv, facts(inv, spark_a={"files": {}}, spark_b={"files": {}}))
    fetch = only(steps, "weights_fetch")
    assert fetch.host == "spark-a" and fetch.target == REPO_ID
    argv = sh_argv(fetch)
    assert argv[-6:] == [
        "fetch",
        REPO_ID,
        "main",
        HUB,
        f"/home/nvidia/.local/state/sparkctl/weights/{FOLDER}@main.json",
        "spark-b=500=0",  # the target's free space (GiB) and what it holds, checked before any byte moves
    ]
    assert argv[argv.index("exec") + 1] == "/opt/sparkctl-runtime/bin/python"
    assert fetch.commands[0].stdin == "\n" and fetch.commands[0].stdin_secret is None  # no token named
    copy = only(steps, "weights_copy")
    assert copy.host == "spark-a" and copy.depends_on_earlier and "size known after the download" in copy.description
    rsync = sh_argv(copy)
    assert rsync[:5] == ["rsync", "-a", "--partial-dir=.rsync-partial", "--no-inc-recursive", "--info=progress2"]
    assert rsync[-2:] == [f"{HUB}/{FOLDER}/", f"nvidia@192.168.100.11:{FOLDER}/"]  # spark-b's fabric address
    assert shlex.split(rsync[rsync.index("-e") + 1]) == runtime.peer_ssh("/home/nvidia")
    check = only(steps, "weights_verify")
    assert check.host == "spark-b" and check.depends_on_earlier
    assert {s.kind for s in steps if s.host == "spark-b"} >= {"peer_access", "weights_code", "weights_verify"}
    assert {s.kind for s in steps if s.host == "spark-a"} >= {"peer_key", "weights_code", "weights_fetch"}


def test_a_converged_pair_plans_nothing_and_opens_no_access() -> None:
    inv = inventory()
    f = facts(inv, spark_a={"weights": {KEY: holding()}}, spark_b={"weights": {KEY: holding()}})
    assert planned(inv, f) == []
    assert weights.routes(ctx(inv, f)) == []


def test_a_partial_copy_is_resumed_with_the_bytes_to_move_and_checked_against_the_source() -> None:
    inv = inventory()
    partial = holding(recorded=False, missing=20_000_000_000)
    f = facts(inv, spark_a={"weights": {KEY: holding()}}, spark_b={"weights": {KEY: partial}})
    steps = planned(inv, f)
    assert not [s for s in steps if s.kind == "weights_fetch"]  # spark-a's verified copy is the source
    copy = only(steps, "weights_copy")
    assert "61.00 GB to move of 61.00 GB" in copy.description and not copy.depends_on_earlier
    assert copy.diff == [f"- spark-b: {KEY} partly held", f"+ spark-b: {KEY} (61.00 GB to move of 61.00 GB)"]
    check = only(steps, "weights_verify")
    assert json.loads(check.commands[0].stdin or "") == MANIFEST  # the source's manifest, on stdin
    assert "2 files, 61.00 GB, 1 with the hub's sha256" in check.description
    argv = sh_argv(check)
    assert argv == [
        "python3",
        f"/home/nvidia/.local/state/sparkctl/{paths.WEIGHTS_SCRIPT}",
        "verify",
        f"{HUB}/{FOLDER}",
        f"/home/nvidia/.local/state/sparkctl/weights/{FOLDER}@main.json",
    ]


def test_a_record_whose_files_are_gone_is_not_trusted() -> None:
    inv = inventory()
    gone = holding().model_copy(update={"files": {}})  # the manifest is there, the blobs are not
    f = facts(inv, spark_a={"weights": {KEY: holding()}}, spark_b={"weights": {KEY: gone}})
    assert [s.kind for s in planned(inv, f) if s.host == "spark-a"].count("weights_copy") == 1
    # and the copy is read from spark-b when only spark-b's is whole
    f = facts(inv, spark_a={"weights": {KEY: gone}}, spark_b={"weights": {KEY: holding()}})
    assert only(planned(inv, f), "weights_copy").host == "spark-b"


def test_a_target_without_the_space_is_refused_before_the_copy_with_the_numbers() -> None:
    inv = inventory()
    f = facts(inv, spark_a={"weights": {KEY: holding()}}, spark_b={"hf_free": 30 << 30})
    copy = only(planned(inv, f), "weights_copy")
    assert copy.verdict == (
        f"refused: spark-b has 32.21 GB free in {HUB}; {KEY} needs 61.00 GB more (+1 GiB kept free)"
    )


def test_hosts_without_rsync_are_named_before_the_copy() -> None:
    inv = inventory()
    f = facts(inv, spark_a={"weights": {KEY: holding()}}, spark_b={"tools": {}})
    assert "spark-b has no rsync" in only(planned(inv, f), "weights_copy").verdict


def test_the_workload_reads_the_cache_only_and_names_its_revision() -> None:
    inv = inventory(("    tensor_parallel_size: 2\n", "    tensor_parallel_size: 2\n    revision: v2.0\n"))
    w = inv.workloads[0]
    assert workload_commands.workload_env(inv, w)["HF_HUB_OFFLINE"] == "1"
    argv = workload_commands.workload_argv(inv, w, "/home/nvidia", inv.hosts[0])
    assert argv[argv.index("--revision") + 1] == "v2.0"
    assert "models--Qwen--Qwen3-30B-A3B-Instruct-2507@v2.0.json" in paths.weights_manifest(w.model, "v2.0")
    # the user's own setting wins; and without sync, the weights are left alone
    own = inventory(("    tensor_parallel_size: 2\n", "    tensor_parallel_size: 2\n    env: {HF_HUB_OFFLINE: '0'}\n"))
    assert workload_commands.workload_env(own, own.workloads[0])["HF_HUB_OFFLINE"] == "0"
    off = inventory(("    tensor_parallel_size: 2\n", "    tensor_parallel_size: 2\n    sync_weights: false\n"))
    assert "HF_HUB_OFFLINE" not in workload_commands.workload_env(off, off.workloads[0]) and off.synced_weights() == []
    assert planned(off, facts(off)) == []


def test_a_token_and_the_hub_settings_reach_the_download_and_a_path_model_is_not_synced() -> None:
    inv = inventory(
        (
            "    tensor_parallel_size: 2\n",
            "    tensor_parallel_size: 2\n    hf_token_env: HF_TOKEN\n"
            "    env: {HF_ENDPOINT: 'http://10.0.0.1:8080', VLLM_CPU_KVCACHE_SPACE: '1'}\n",
        )
    )
    fetch = only(planned(inv, facts(inv)), "weights_fetch")
    assert fetch.commands[0].stdin_secret == weights.token_secret(inv.workloads[0]) and fetch.commands[0].stdin is None
    line = fetch.commands[0].argv[2]
    assert line.startswith("export HF_ENDPOINT=http://10.0.0.1:8080; exec ") and "VLLM_CPU" not in line
    assert "hf_" not in line.lower().replace("hf_endpoint", "")  # the token's value is never in the line
    path = inventory(("    model: Qwen/Qwen3-30B-A3B-Instruct-2507\n", "    model: /models/qwen\n"))
    assert path.synced_weights() == [] and planned(path, facts(path)) == []


def test_container_mode_fetches_in_a_throwaway_container_of_the_image() -> None:
    inv = inventory(("  venv: /opt/sparkctl-runtime\n", "  image: nvcr.io/nvidia/vllm:26.05-py3\n"))
    f = facts(inv)
    for name in f:  # the image is on both hosts: no image copy, only the weights
        f[name] = f[name].model_copy(update={"runtime": f[name].runtime.model_copy(update={"image_id": "sha256:1"})})
    argv = sh_argv(only(planned(inv, f), "weights_fetch"))
    assert argv[:2] == ["mkdir", "-p"]
    run = argv[argv.index("exec") + 1 :]
    assert run[:6] == ["docker", "run", "--rm", "-i", "--network", "host"]
    assert "/home/nvidia/.cache/huggingface:/root/.cache/huggingface" in run
    entry = run.index("--entrypoint")
    assert run[entry + 1 : entry + 4] == ["python3", "nvcr.io/nvidia/vllm:26.05-py3", "/sparkctl/weights.py"]
    assert run[-2:] == [f"/sparkctl/weights/{FOLDER}@main.json", "spark-b=500=0"]
    assert run[run.index("fetch") + 1 : run.index("fetch") + 4] == [REPO_ID, "main", "/root/.cache/huggingface/hub"]


def test_the_probe_listing_parses_into_what_the_plan_compares() -> None:
    text = (
        f"== {KEY}\n"
        f"l\t17\tsnapshots/{COMMIT}/config.json\t../../blobs/{'9f' * 20}\n"
        f"f\t700\tblobs/{'9f' * 20}\t\n"
        f"l\t17\tsnapshots/{COMMIT}/model.safetensors\t../../blobs/{SHA}\n"
        f"f\t61000000000\tblobs/{SHA}\t\n"
        f"refs/main:{COMMIT}\n"
        "-- manifest\n" + json.dumps(MANIFEST, indent=1) + "\n"
    )
    copy = parse_weights(text)[KEY]
    assert weights.verified(copy) == MANIFEST
    assert weights.bytes_missing(copy, MANIFEST) == 0 and weights.bytes_held(copy) == 61_000_000_700


# --- the helper on the host, for real ------------------------------------------------------------------------------


def _repo(tmp: Path) -> Path:
    src = tmp / "model"
    (src / "1_Pooling").mkdir(parents=True)
    (src / "config.json").write_text('{"hidden_size": 8}\n')
    (src / "1_Pooling" / "config.json").write_text("{}\n")
    (src / "model.safetensors").write_bytes(bytes(range(256)) * 4096)  # 1 MiB: an LFS file on the hub
    return src


def run_helper(*args: str, stdin: str = "\n", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HELPER), *args], input=stdin, capture_output=True, text=True, timeout=120, env=env
    )


def test_the_helper_fetches_once_checks_the_hubs_sha256_and_refuses_a_short_peer(tmp_path: Path) -> None:
    pytest.importorskip("huggingface_hub")
    from tests.testbed.fakehub import count_gets, read_log, start_fakehub

    hub = start_fakehub({"org/mini": _repo(tmp_path)}, log_path=tmp_path / "hub.log")
    try:
        env = {"PATH": "/usr/bin:/bin", "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf")}
        cache, manifest = tmp_path / "hf" / "hub", tmp_path / "state" / "m.json"
        short = run_helper("fetch", "org/mini", "main", str(cache), str(manifest), "spark-b=0=0", env=env)
        assert short.returncode == 1 and "refused: spark-b has less than 1 GiB free" in short.stderr, short.stderr
        assert count_gets(read_log(tmp_path / "hub.log")) == {}  # refused before any file was downloaded
        ok = run_helper("fetch", "org/mini", "main", str(cache), str(manifest), "spark-b=100=0", env=env)
        assert ok.returncode == 0, ok.stderr
        assert count_gets(read_log(tmp_path / "hub.log")) == {
            "config.json": 1,
            "1_Pooling/config.json": 1,
            "model.safetensors": 1,
        }
        m = json.loads(manifest.read_text())
        lfs = next(f for f in m["files"] if f["path"] == "model.safetensors")
        assert lfs["sha256"] == lfs["blob"] and len(lfs["sha256"]) == 64 and lfs["size"] == 1 << 20
        assert next(f for f in m["files"] if f["path"] == "config.json")["sha256"] is None  # not an LFS file
        again = run_helper("fetch", "org/mini", "main", str(cache), str(manifest), env=env)
        assert again.returncode == 0 and sum(count_gets(read_log(tmp_path / "hub.log")).values()) == 3
    finally:
        hub.stop()

    # a copy made by rsync checks out and is recorded; a corrupted weight file is removed and named
    if shutil.which("rsync") is None:
        pytest.skip("rsync not installed")
    src = cache / "models--org--mini"
    dst = tmp_path / "b" / "models--org--mini"
    dst.parent.mkdir()
    subprocess.run(["rsync", "-a", f"{src}/", f"{dst}/"], check=True)
    record = tmp_path / "b-state" / "m.json"
    good = run_helper("verify", str(dst), str(record), stdin=manifest.read_text())
    assert good.returncode == 0 and json.loads(record.read_text()) == m, good.stderr
    blob = dst / "blobs" / lfs["blob"]
    data = bytearray(blob.read_bytes())
    data[1000] ^= 0xFF
    blob.write_bytes(bytes(data))
    record.unlink()
    bad = run_helper("verify", str(dst), str(record), stdin=manifest.read_text())
    assert bad.returncode == 1 and f"model.safetensors: sha256 differs from {lfs['sha256']} (removed)" in bad.stderr
    assert not blob.exists() and not record.exists()


def test_the_helper_refuses_a_manifest_path_out_of_the_snapshot(tmp_path: Path) -> None:
    outside = tmp_path / "keep"
    outside.write_text("x")
    manifest = {
        "repo": "a/b",
        "revision": "main",
        "commit": "c",
        "files": [{"path": "../../../keep", "size": 5, "sha256": None, "blob": "x"}],
    }
    (tmp_path / "r" / "snapshots" / "c").mkdir(parents=True)
    r = run_helper("verify", str(tmp_path / "r"), str(tmp_path / "m.json"), stdin=json.dumps(manifest))
    assert r.returncode == 1 and "not a path inside the snapshot" in r.stderr and outside.exists()


# --- progress -------------------------------------------------------------------------------------------------------


def test_rsync_progress2_and_the_helpers_lines_become_one_line_a_second() -> None:
    now = [0.0]
    rs = CopyProgress("rsync", lambda: now[0])
    # rsync 3.2+ --info=progress2 output: carriage returns between updates
    assert rs.feed("     32,768   0%    0.00kB/s    0:00:00  \r") == "0.00 GB (0%) at 0.00kB/s"
    now[0] = 0.5
    assert rs.feed("  1,048,576,000  42%  110.53MB/s    0:00:14 (xfr#3, to-chk=5/12)\r") is None  # within 1 s
    now[0] = 1.2
    assert rs.feed("  2,097,152,000  84%  111.00MB/s    0:00:03\r") == "2.10 GB (84%) at 111.00MB/s"
    helper = CopyProgress("bytes", lambda: now[0])
    now[0] = 10.0
    assert helper.feed("progress 0 4000000000\n") == "0.00 GB of 4.00 GB (0%)"
    now[0] = 12.0
    assert helper.feed("progress 1000000000 4000000000\nprog") == "1.00 GB of 4.00 GB (25%) at 500 MB/s"
    assert helper.feed("ress 1 2\n") is None  # a line split across reads is joined, then throttled


def test_the_engine_reads_a_copys_output_as_it_arrives_and_says_how_far_it_got() -> None:
    from sparkctl.execute.base import Result
    from sparkctl.execute.fake import RecordingTransport
    from sparkctl.plan.models import Command, Plan, Stage
    from sparkctl.session.engine import Engine
    from sparkctl.session.report import Event

    out = "  1,000,000,000  50%  100.00MB/s    0:00:10\r  2,000,000,000 100%  100.00MB/s    0:00:20\n"
    transports = {"spark-a": RecordingTransport("spark-a", {"sh -c": Result(0, out, "")})}
    seen: list[Event] = []
    copy = Step(
        host="spark-a",
        kind="weights_copy",
        target="spark-b:org/m",
        description="copy",
        commands=[Command(argv=["sh", "-c", "rsync ..."], progress="rsync")],
    )
    plain = Step(
        host="spark-a", kind="env_file", target="x", description="env", commands=[Command(argv=["sh", "-c", "cat ..."])]
    )
    plan = Plan(
        cluster="c",
        runbook="rb",
        hosts=["spark-a"],
        stages=[Stage(name="weights-copy", action="weights_copy", steps=[copy, plain])],
    )
    report = Engine(transports=transports, nopasswd={"spark-a": True}, emit=seen.append).run(plan)
    assert report.ok
    said = [(e.step, e.status, e.message) for e in seen if e.kind == "progress"]
    assert said == [("weights_copy:spark-b:org/m", "copying", "2.00 GB (100%) at 100.00MB/s")]


def test_plain_output_prints_a_copys_progress_every_few_seconds_and_no_workload_log_progress() -> None:
    import io

    from sparkctl.cli.render import Progress
    from sparkctl.session.report import Event

    now = [0.0]
    stream = io.StringIO()
    p = Progress(stream=stream, clock=lambda: now[0])
    for t, message in (
        (0.0, "0.10 GB (1%) at 90MB/s"),
        (1.0, "0.20 GB (2%) at 90MB/s"),
        (5.5, "0.60 GB (7%) at 90MB/s"),
    ):
        now[0] = t
        p(
            Event(
                "progress",
                host="spark-a",
                stage="weights-copy",
                step="weights_copy:spark-b:m",
                status="copying",
                message=message,
            )
        )
    p(Event("progress", host="spark-a", stage="ready", step="workload:chat", status="loading weights", message="3/8"))
    assert stream.getvalue().splitlines() == [
        "   spark-a: weights_copy:spark-b:m copying 0.10 GB (1%) at 90MB/s",
        "   spark-a: weights_copy:spark-b:m copying 0.60 GB (7%) at 90MB/s",
    ]
