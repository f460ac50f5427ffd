"""Container mode for today's images: vLLM's multiprocessing executor in a container of its own on every rank host,
no Ray when nothing needs it, the image copied host to host over the fabric with a restricted peer key.

The plans are built from the example pair in container mode (chat: TP=2, the default executor, mp); the docker and
ssh lines are taken apart, and the shell pieces that run on a target (the forced command, the authorized_keys
update) are run by dash and bash in a sandbox HOME against a stub `docker`.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from sparkctl import paths, state
from sparkctl.facts.models import HostFacts, Runtime
from sparkctl.facts.parse import parse_runtime
from sparkctl.inventory import parse_inventory
from sparkctl.inventory.models import Inventory
from sparkctl.plan import firewall, images, workload_commands
from sparkctl.plan.models import Plan
from tests.unit.test_container_plan import (
    EXAMPLE,
    HOME,
    IMAGE,
    MODEL_LINE,
    NO_SYNC,
    STATE,
    assert_spark_container,
    docker_run,
    edit,
    fresh,
    has,
    one,
    plan_of,
    sh_line,
    steps,
)

ID_A = "sha256:" + "a1" * 32
ID_B = "sha256:" + "b2" * 32
PUB = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOv3fY0b1vqf2kz4pNq3mVJm4u2mYl0xD3Hh8y9r2Q7s sparkctl-peer-spark-pair"
DIGESTS = {"ray_token": "5f2b6c1d0a9e8f7c", "worker_code": "0e1d2c3b4a59", "peer_key": "d1g3st", "peer_key_pub": PUB}
HOST_KEYS = {"spark-a": "ssh-ed25519 AAAAhostkeyA", "spark-b": "ssh-ed25519 AAAAhostkeyB"}
HUB = f"{HOME}/.cache/huggingface/hub"
SHELLS = [s for s in ("dash", "bash") if shutil.which(s)]


def mp_inventory(*edits: tuple[str, str]) -> Inventory:
    """The example pair in container mode; chat keeps the default executor (mp)."""
    text = edit(EXAMPLE.read_text(), "  venv: /opt/sparkctl-runtime\n", f"  image: {IMAGE}\n")
    # the weights are taken as present on both hosts (their copy: tests/unit/test_weights.py)
    text = edit(text, MODEL_LINE, MODEL_LINE + NO_SYNC)
    for old, new in edits:
        text = edit(text, old, new)
    return parse_inventory(text, "container-mp.yaml")


def with_images(inv: Inventory, ids: dict[str, str], **more: object) -> dict[str, HostFacts]:
    """Fresh facts with the given image IDs (and host keys) per host."""
    out = {}
    for name, f in fresh(inv).items():
        rt = Runtime(
            python="3.12.3",
            vllm="0.19.0",
            image_id=ids.get(name, ""),
            image_size=21_500_000_000 if ids.get(name) else 0,
        )
        out[name] = f.model_copy(update={"runtime": rt, "ssh_host_key": HOST_KEYS[name], **more})
    return out


def mp_plan(inv: Inventory, facts: dict[str, HostFacts], runbook: str = "up") -> Plan:
    return plan_of(inv, facts, runbook, DIGESTS)


# --- vLLM's multiprocessing executor, one container per rank host ------------------------------------------------


@pytest.mark.parametrize(("host", "rank"), [("spark-a", 0), ("spark-b", 1)])
def test_each_rank_host_runs_its_own_vllm_container_with_the_entrypoint_named(host: str, rank: int) -> None:
    inv = mp_inventory()
    plan = mp_plan(inv, with_images(inv, {"spark-a": ID_A, "spark-b": ID_A}))
    step = one(plan, host, "workload", "chat")
    assert step.commands[0].stdin_secret == "api_key:chat"
    line = sh_line(step.commands[-1])
    options, command = docker_run(line)
    assert options[:3] == ["-d", "--name", "sparkctl-chat"]
    assert_spark_container(["-d", "--name", "sparkctl-chat", *options[3:]], "sparkctl-chat")
    assert has(options, "--entrypoint", "vllm") and has(options, "-e", "VLLM_API_KEY")  # the key by name only
    assert command[:3] == ["vllm", "serve", "Qwen/Qwen3-30B-A3B-Instruct-2507"]
    assert command[command.index("--distributed-executor-backend") + 1] == "mp"
    assert command[command.index("--nnodes") + 1] == "2"
    assert command[command.index("--node-rank") + 1] == str(rank)
    assert command[command.index("--master-addr") + 1] == "192.168.100.10"  # the head's fabric address
    if rank == 0:
        assert has(command, "--host", "10.0.0.11") and has(command, "--port", "8000")
        assert "--headless" not in command
    else:
        assert "--headless" in command and "--port" not in command
    assert not any(o.startswith("RAY_ADDRESS") for o in options)  # the multiprocessing executor never joins Ray
    assert "IFS= read -r VLLM_API_KEY && export VLLM_API_KEY" in line
    assert f"docker logs -f sparkctl-chat >> {STATE}/logs/chat.log" in line
    assert line.endswith(f"> {STATE}/workload-chat.spec")


def test_no_ray_when_no_workload_needs_it_and_the_plan_says_why() -> None:
    inv = mp_inventory()
    plan = mp_plan(inv, with_images(inv, {"spark-a": ID_A, "spark-b": ID_A}))
    assert not steps(plan, kind="ray_token") and not steps(plan, kind="verify_ray")
    assert not steps(plan, kind="verify_placement")
    for host in ("spark-a", "spark-b"):
        note = one(plan, host, "ray_node")
        assert not note.changes and not note.commands and "no workload needs Ray" in note.description


def test_a_leftover_ray_container_is_removed_when_nothing_needs_ray() -> None:
    inv = mp_inventory()
    facts = with_images(inv, {"spark-a": ID_A, "spark-b": ID_A}, containers={"sparkctl-ray": IMAGE})
    plan = mp_plan(inv, facts)
    step = one(plan, "spark-b", "ray_stopped")
    assert step.changes and sh_line(step.commands[0]).startswith("docker rm -f sparkctl-ray")
    assert not steps(plan, kind="ray_node")


def test_an_embed_workload_still_forms_ray_and_runs_in_the_ray_container() -> None:
    inv = mp_inventory(
        (
            'extra_args: ["--max-model-len", "32768"]\n',
            'extra_args: ["--max-model-len", "32768"]\n  - {name: emb, engine: embed, port: 8001}\n',
        )
    )
    plan = mp_plan(inv, with_images(inv, {"spark-a": ID_A, "spark-b": ID_A}))
    assert one(plan, "spark-a", "ray_node", "head").changes
    emb = sh_line(one(plan, "spark-a", "workload", "emb").commands[-1])
    assert "docker exec -e SPARKCTL_API_KEY" in emb and " sparkctl-ray sh -c " in emb
    assert "docker run -d --name sparkctl-chat" in sh_line(one(plan, "spark-a", "workload", "chat").commands[-1])


def converged(inv: Inventory) -> dict[str, HostFacts]:
    """Both ranks running in their containers, as `up` left them (spec recorded, `docker ps` listing them)."""
    facts = with_images(inv, {"spark-a": ID_A, "spark-b": ID_A})
    out = {}
    for h in inv.hosts:
        spec = workload_commands.workload_spec(inv, inv.workload("chat"), HOME, h)
        out[h.name] = facts[h.name].model_copy(
            update={
                "containers": {"sparkctl-chat": IMAGE},
                "files": {"workload-chat.spec": spec, "firewall.nft": firewall.render_firewall(inv, h)},
                "env_file": None,
            }
        )
    return out


def test_a_converged_mp_pair_starts_nothing_and_copies_nothing() -> None:
    inv = mp_inventory()
    plan = mp_plan(inv, converged(inv))
    # (the fresh facts' fabric and env file are planned as for any fresh pair: not what this case is about)
    mine = {"workload", "page_cache", "image_pull", "image_copy", "peer_key", "peer_access", "ray_node", "ray_token"}
    assert [s.id for s in steps(plan) if s.changes and s.kind in mine] == []


def test_a_rank_whose_container_exited_is_broken_and_the_group_restarts() -> None:
    inv = mp_inventory()
    facts = converged(inv)
    b = facts["spark-b"]
    died = "ERROR 12-06 22:51:03 [multiproc_executor.py:154] Worker proc VllmWorker-0 died unexpectedly"
    facts["spark-b"] = b.model_copy(update={"containers": {}, "files": {**b.files, "workload-chat.exit": died}})
    from sparkctl.plan.context import PlanContext
    from sparkctl.plan.live_state import workload_state

    ctx = PlanContext(inv, facts, {}, DIGESTS)
    assert workload_state(ctx, inv.workload("chat"), inv.host("spark-b")) == "broken"
    plan = mp_plan(inv, facts)
    forget, _ = one(plan, "spark-b", "workload", "chat").commands
    assert sh_line(forget).startswith("docker rm -f sparkctl-chat >/dev/null 2>&1; rm -f ")  # no signal
    stop, _ = one(plan, "spark-a", "workload", "chat").commands  # the head's rank is restarted with it
    assert sh_line(stop).startswith("docker stop -t 30 sparkctl-chat")
    # the group is broken, and what is said names the host whose rank died, in status and in doctor
    from sparkctl.doctor.evaluators import EVALUATORS, CheckContext
    from sparkctl.doctor.rules import load_rules
    from sparkctl.plan.live_state import group_health

    assert workload_state(ctx, inv.workload("chat")) == "broken"
    assert group_health(ctx, inv.workload("chat")) == f"spark-b: failed exited by itself: {died}"
    rule = next(r for r in load_rules().rules if r.check == "workload_health")
    found = {f.subject: (f.level, f.evidence) for f in EVALUATORS["workload_health"](CheckContext(inv, facts), rule)}
    assert found["spark-b workload chat"] == (rule.level, f"failed exited by itself: {died}")
    assert found["spark-a workload chat"][0] == "pass"


def test_down_stops_the_rank_containers_on_every_host() -> None:
    inv = mp_inventory()
    plan = mp_plan(inv, converged(inv), "down")
    for host in ("spark-a", "spark-b"):
        (step,) = [s for s in steps(plan, host, "workload_stopped") if s.target == "chat"]
        assert step.diff[0] == "- chat: container sparkctl-chat"
        assert sh_line(step.commands[0]) == (
            "docker stop -t 30 sparkctl-chat >/dev/null 2>&1; docker rm -f sparkctl-chat >/dev/null 2>&1; "
            f"rm -f {STATE}/workload-chat.pid {STATE}/workload-chat.spec {STATE}/workload-chat.health; true"
        )


def test_readiness_watches_the_heads_container() -> None:
    inv = mp_inventory()
    wait = one(mp_plan(inv, with_images(inv, {"spark-a": ID_A, "spark-b": ID_A})), "spark-a", "verify_workload").wait
    assert wait is not None and wait.alive is not None
    assert sh_line(wait.alive) == "[ \"$(docker inspect -f '{{.State.Running}}' sparkctl-chat 2>/dev/null)\" = true ]"


# --- the image on every Spark --------------------------------------------------------------------------------------


def test_an_image_only_on_the_head_is_copied_over_the_fabric_with_scoped_access() -> None:
    inv = mp_inventory()
    plan = mp_plan(inv, with_images(inv, {"spark-a": ID_A}))
    key, known = steps(plan, "spark-a", "peer_key")
    assert key.commands[0].argv == ["install", "-D", "-m", "0600", "/dev/stdin", f"{STATE}/peer-key"]
    assert key.commands[0].stdin_secret == "peer_key"
    assert known.commands[0].stdin == "192.168.100.11,192.168.101.11 ssh-ed25519 AAAAhostkeyB\n"
    receive, authorize = steps(plan, "spark-b", "peer_access")
    assert receive.commands[0].stdin == images.render_peer_receive("spark-pair", HUB)
    assert authorize.commands[0].stdin_secret == "peer_key_pub"  # the key line arrives on stdin
    want = f'restrict,from="192.168.100.10,192.168.101.10",command="{STATE}/peer-receive"'
    assert want in sh_line(authorize.commands[0])
    copy = one(plan, "spark-a", "image_copy", "spark-b")
    line = sh_line(copy.commands[0])
    save, _, ssh = line.partition(" | ")
    assert save == f"docker save {IMAGE}"
    argv = shlex.split(ssh)
    assert argv[-2:] == ["nvidia@192.168.100.11", "docker load"]  # the target's fabric address, never 10.0.0.12
    for opt in (
        "IdentitiesOnly=yes",
        "BatchMode=yes",
        "StrictHostKeyChecking=yes",
        f"UserKnownHostsFile={STATE}/peer-known-hosts",
    ):
        assert has(argv, "-o", opt), opt
    assert has(argv, "-i", f"{STATE}/peer-key")
    assert "21.5 GB" in copy.description
    assert copy.diff == ["- spark-b: no image", f"+ spark-b: image {ID_A[:19]} (21.5 GB to move)"]
    check = one(plan, "spark-b", "verify_image")
    assert not check.changes and ID_A in sh_line(check.commands[0])
    stages = [st.name for st in plan.stages]
    assert stages.index("peer-access") < stages.index("image") < stages.index("image-check") < stages.index("workloads")


def test_another_image_under_the_same_name_is_replaced_by_the_heads() -> None:
    inv = mp_inventory()
    copy = one(mp_plan(inv, with_images(inv, {"spark-a": ID_A, "spark-b": ID_B})), "spark-a", "image_copy")
    assert copy.diff[0] == f"- spark-b: image {ID_B[:19]}"


def test_an_image_on_no_host_is_pulled_on_the_head_then_copied() -> None:
    inv = mp_inventory()
    plan = mp_plan(inv, with_images(inv, {}))
    pull, copy = steps(plan, "spark-a", "image_pull") + steps(plan, "spark-a", "image_copy")
    assert pull.commands[0].argv == ["docker", "pull", IMAGE]
    assert copy.depends_on_earlier and "size known after the pull" in copy.description
    assert not steps(plan, kind="verify_image")  # the ID is known once pulled: the re-plan checks it


def test_the_image_is_read_from_the_host_that_has_it_when_the_head_does_not() -> None:
    inv = mp_inventory()
    plan = mp_plan(inv, with_images(inv, {"spark-b": ID_A}))
    copy = one(plan, "spark-b", "image_copy", "spark-a")
    assert shlex.split(sh_line(copy.commands[0]).partition(" | ")[2])[-2] == "nvidia@192.168.100.10"


def test_peer_access_already_in_place_is_not_planned_again() -> None:
    inv = mp_inventory()
    facts = with_images(inv, {"spark-a": ID_A})
    known = images.render_peer_known_hosts(_ctx(inv, facts), [inv.host("spark-b")])
    a, b = facts["spark-a"], facts["spark-b"]
    facts["spark-a"] = a.model_copy(
        update={"files": {"peer-key.sha256": "d1g3st", "peer-known-hosts.sha256": images.sha256(known)}}
    )
    options = images.peer_options(inv, inv.host("spark-b"), HOME)
    facts["spark-b"] = b.model_copy(
        update={
            "files": {"peer-receive.sha256": images.sha256(images.render_peer_receive("spark-pair", HUB))},
            "peer_authorized": f"{options} {PUB}",
        }
    )
    plan = mp_plan(inv, facts)
    assert not steps(plan, kind="peer_key") and not steps(plan, kind="peer_access")
    assert one(plan, "spark-a", "image_copy")


def _ctx(inv: Inventory, facts: dict[str, HostFacts]):  # type: ignore[no-untyped-def]
    from sparkctl.plan.context import PlanContext

    return PlanContext(inv, facts, {}, DIGESTS)


@pytest.mark.parametrize("shell", SHELLS)
def test_the_forced_command_runs_docker_load_or_a_confined_rsync_and_nothing_else(tmp_path: Path, shell: str) -> None:
    script = tmp_path / "peer-receive"
    hub = tmp_path / "hf" / "hub"
    script.write_text(images.render_peer_receive("spark-pair", str(hub)))
    script.chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text('#!/bin/sh\necho "docker $*"; cat > /dev/null\n')
    (bin_dir / "docker").chmod(0o755)
    # the receiving rsync: the stub shows the arguments it was started with, and where
    (bin_dir / "rsync").write_text('#!/bin/sh\necho "rsync $* in $PWD"\n')
    (bin_dir / "rsync").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    ok = subprocess.run(
        [shell, str(script)],
        input="tar bytes",
        env={**env, "SSH_ORIGINAL_COMMAND": "docker load"},
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert (ok.returncode, ok.stdout) == (0, "docker load\n")
    # what `rsync -a --partial-dir=.rsync-partial <dir>/ <host>:models--a--b/` asks for (rsync 3.2-3.5)
    asked = "rsync --server -logDtpre.LsfxCIvu --partial-dir .rsync-partial . models--a--b/"
    r = subprocess.run(
        [shell, str(script)], env={**env, "SSH_ORIGINAL_COMMAND": asked}, capture_output=True, text=True, timeout=10
    )
    want = f"rsync --server -logDtpre.LsfxCIvu --partial-dir .rsync-partial --safe-links . models--a--b/ in {hub}\n"
    assert (r.returncode, r.stdout) == (0, want) and hub.is_dir(), r.stderr
    refused = [
        "docker load; rm -rf ~",
        "sh",
        "docker run --privileged x",
        "",
        "rsync --sender x",
        "rrsync /",
        asked.replace("models--a--b/", "models--../"),  # out of the hub cache
        asked.replace("models--a--b/", "models--a/../../x/"),
        asked.replace("models--a--b/", "/home/spark/.ssh/"),
        asked.replace("models--a--b/", "models--*/"),
        asked.replace("-logDtpre", "-logDtpLre"),  # -L: follow links on the receiver
        asked.replace("-logDtpre", "-logDtpKre"),
        asked.replace(" --partial-dir", " --delete --partial-dir"),
        asked.replace(".rsync-partial", "/home/spark/.ssh"),
        asked.replace("LsfxCIvu", "Ls;touch x"),
        asked + " extra",
    ]
    for asked in refused:
        r = subprocess.run(
            [shell, str(script)], env={**env, "SSH_ORIGINAL_COMMAND": asked}, capture_output=True, text=True, timeout=10
        )
        assert r.returncode == 1 and r.stdout == "" and "only docker load and rsync" in r.stderr, asked


@pytest.mark.parametrize("shell", SHELLS)
def test_authorizing_replaces_only_the_clusters_peer_line(tmp_path: Path, shell: str) -> None:
    ssh = tmp_path / ".ssh"
    ssh.mkdir()
    ak = ssh / "authorized_keys"
    ak.write_text(
        "ssh-ed25519 AAAAmine me@laptop\nrestrict ssh-ed25519 AAAAold sparkctl-peer-spark-pair\n"
        "ssh-ed25519 AAAAother sparkctl-peer-other-cluster\n"
    )
    options = 'restrict,from="192.168.100.10",command="/h/peer-receive"'
    line = images.build_authorize("spark-pair", options)
    for _ in range(2):  # idempotent
        r = subprocess.run(
            [shell, "-c", line],
            input=PUB + "\n",
            env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert r.returncode == 0, r.stderr
    assert ak.read_text().splitlines() == [
        "ssh-ed25519 AAAAmine me@laptop",
        "ssh-ed25519 AAAAother sparkctl-peer-other-cluster",
        f"{options} {PUB}",
    ]
    assert stat.S_IMODE(ak.stat().st_mode) == 0o600 and stat.S_IMODE(ssh.stat().st_mode) == 0o700


def test_the_probe_reads_the_images_size_and_cuda_requirement() -> None:
    env = '["PATH=/usr/bin","NVIDIA_REQUIRE_CUDA=cuda>=13.2 brand=unknown,driver>=580,driver<581","CUDA_VERSION=13.2"]'
    out = f"image_id={ID_A} image_size=21500000000 image_env={env}\nPython 3.12.3\nvllm-0.19.0.dist-info\n"
    rt = parse_runtime(out)
    assert (rt.image_id, rt.image_size, rt.image_cuda, rt.vllm) == (ID_A, 21_500_000_000, "13.2", "0.19.0")
    legacy = parse_runtime(f'image_id={ID_A} image_size=1 image_env=["CUDA_VERSION=12.8.1"]\n')
    assert legacy.image_cuda == "12.8"


def test_the_laptop_makes_one_peer_key_pair_per_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert state.peer_key("lab", create=False) is None
    made = state.peer_key("lab")
    assert made is not None and state.peer_key("lab") == made
    private, public = made
    assert private.startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert public.startswith("ssh-ed25519 ") and public.endswith(" sparkctl-peer-lab")
    for name in ("peer-key", "peer-key.pub"):
        assert stat.S_IMODE((tmp_path / "sparkctl" / "lab" / name).stat().st_mode) == 0o600
    if shutil.which("ssh-keygen"):  # OpenSSH reads the private key and derives the same public key
        derived = subprocess.run(
            ["ssh-keygen", "-y", "-f", str(tmp_path / "sparkctl" / "lab" / "peer-key")],
            capture_output=True,
            text=True,
            timeout=10,
            env={**os.environ},
        )
        assert derived.returncode == 0, derived.stderr
        assert derived.stdout.split()[:2] == public.split()[:2]


def test_venv_mode_has_no_image_steps() -> None:
    inv = parse_inventory(edit(EXAMPLE.read_text(), MODEL_LINE, MODEL_LINE + NO_SYNC), "pair.yaml")
    plan = plan_of(inv, fresh(inv))
    assert not [s for s in steps(plan) if s.kind in ("peer_key", "peer_access", "image_copy", "verify_image")]
    assert paths.peer_comment("x") == "sparkctl-peer-x"


# --- Ray for images that lack it (runtime.add_ray) -----------------------------------------------------------------

EMB = (
    'extra_args: ["--max-model-len", "32768"]\n',
    'extra_args: ["--max-model-len", "32768"]\n  - {name: emb, engine: embed, port: 8001}\n',
)
WITH_RAY = (
    "  image: nvcr.io/nvidia/vllm:25.11-py3\n",
    "  image: nvcr.io/nvidia/vllm:25.11-py3\n  add_ray: 2.60.0\n  ray_wheels: /opt/wheels\n",
)


def test_add_ray_derives_an_image_on_each_host_and_runs_ray_from_it() -> None:
    inv = parse_inventory(
        edit(
            edit(edit(EXAMPLE.read_text(), "  venv: /opt/sparkctl-runtime\n", f"  image: {IMAGE}\n"), *EMB), *WITH_RAY
        ),
        "x.yaml",
    )
    derived = "localhost/sparkctl/vllm:25.11-py3-ray2.60.0"
    assert inv.runtime.ray_image == derived
    plan = mp_plan(inv, with_images(inv, {"spark-a": ID_A}))
    for host in ("spark-a", "spark-b"):
        step = one(plan, host, "ray_image")
        line = sh_line(step.commands[0])
        # built from the image the host holds once the copy ran: spark-a's (spark-b's comes over the fabric first)
        assert line == f"docker build -q -t {derived} --label sparkctl.base={ID_A} -f - /opt/wheels"
        assert step.commands[0].stdin == (
            f"FROM {IMAGE}\nCOPY . /tmp/sparkctl-ray-wheels\nRUN python3 -m pip install --no-cache-dir --no-index "
            "--find-links /tmp/sparkctl-ray-wheels 'ray[default]==2.60.0' && rm -rf /tmp/sparkctl-ray-wheels\n"
        )
        _, command = docker_run(sh_line(one(plan, host, "ray_node").commands[-1]).replace(derived, IMAGE))
        assert command[:2] == ["sh", "-c"]
    stages = [st.name for st in plan.stages]
    assert stages.index("image") < stages.index("ray-image") < stages.index("ray-head")
    # built from that base already: nothing to do; a new base image: built again
    built = with_images(inv, {"spark-a": ID_A, "spark-b": ID_A})
    done = {
        h: f.model_copy(
            update={"runtime": f.runtime.model_copy(update={"ray_image_id": "c3" * 32, "ray_image_base": ID_A})}
        )
        for h, f in built.items()
    }
    assert not steps(mp_plan(inv, done), kind="ray_image")
    stale = {
        h: f.model_copy(update={"runtime": f.runtime.model_copy(update={"image_id": ID_B})}) for h, f in done.items()
    }
    assert len(steps(mp_plan(inv, stale), kind="ray_image")) == 2


def test_add_ray_builds_nothing_when_no_workload_needs_ray() -> None:
    inv = parse_inventory(
        edit(edit(EXAMPLE.read_text(), "  venv: /opt/sparkctl-runtime\n", f"  image: {IMAGE}\n"), *WITH_RAY), "x.yaml"
    )
    assert not steps(mp_plan(inv, with_images(inv, {"spark-a": ID_A, "spark-b": ID_A})), kind="ray_image")


def test_without_wheels_the_build_installs_from_the_index_in_an_empty_context() -> None:
    inv = parse_inventory(
        edit(
            edit(edit(EXAMPLE.read_text(), "  venv: /opt/sparkctl-runtime\n", f"  image: {IMAGE}\n"), *EMB),
            "  image: nvcr.io/nvidia/vllm:25.11-py3\n",
            "  image: nvcr.io/nvidia/vllm@sha256:" + "9f" * 32 + "\n  add_ray: 2.60.0\n",
        ),
        "x.yaml",
    )
    assert inv.runtime.ray_image == "localhost/sparkctl/vllm:digest-9f9f9f9f9f9f-ray2.60.0"
    step = one(mp_plan(inv, with_images(inv, {"spark-a": ID_A, "spark-b": ID_A})), "spark-b", "ray_image")
    assert step.commands[0].stdin.endswith("RUN python3 -m pip install --no-cache-dir 'ray[default]==2.60.0'\n")
    assert sh_line(step.commands[0]).startswith("ctx=$(mktemp -d) && docker build -q -t ")


@pytest.mark.parametrize(
    ("runtime", "message"),
    [
        ("  venv: /opt/x\n  add_ray: 2.60.0\n", "add_ray and ray_wheels are for an image"),
        ("  image: a/b:c\n  ray_wheels: /w\n", "ray_wheels is read only with add_ray"),
        ("  image: a/b:c\n  add_ray: latest\n", "add_ray"),
    ],
)
def test_add_ray_mistakes_are_refused(runtime: str, message: str) -> None:
    from sparkctl.errors import InventoryError

    text = edit(EXAMPLE.read_text(), "  venv: /opt/sparkctl-runtime\n", runtime)
    with pytest.raises(InventoryError, match=message):
        parse_inventory(text, "x.yaml")


def test_the_firewall_keeps_the_mp_rendezvous_off_the_management_network() -> None:
    # vLLM's multiprocessing executor meets at <master-addr>:29501 (torch's TCPStore, vllm/config/parallel.py)
    inv = mp_inventory()
    drop = next(line for line in firewall.render_firewall(inv, inv.hosts[0]).splitlines() if line.endswith("drop"))
    assert "29501" in drop
    ray = mp_inventory(("    tensor_parallel_size: 2\n", "    tensor_parallel_size: 2\n    executor: ray\n"))
    assert "29501" not in firewall.render_firewall(ray, ray.hosts[0])


def test_starting_ray_for_the_embed_worker_leaves_the_running_mp_containers_alone() -> None:
    inv = mp_inventory(EMB)
    facts = converged(inv)
    plan = mp_plan(inv, facts)
    assert one(plan, "spark-a", "ray_node", "head").changes  # Ray starts for emb ...
    assert one(plan, "spark-a", "workload", "emb").changes
    assert not [s for s in steps(plan, kind="workload") if s.target == "chat"]  # ... chat keeps running


def test_a_plan_before_the_first_copy_installs_a_key_the_run_makes() -> None:
    inv = mp_inventory()
    no_key = {k: v for k, v in DIGESTS.items() if not k.startswith("peer_key")}
    plan = plan_of(inv, with_images(inv, {"spark-a": ID_A}), "up", no_key)
    key, _ = steps(plan, "spark-a", "peer_key")
    assert key.commands[0].stdin_secret == "peer_key"  # the run that applies it makes the key first
