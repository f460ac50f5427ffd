"""The operator's view on the testbed: `ask` gets a real embedding, `endpoint --env` drives the official openai
client, `status --watch` under a pseudo-terminal shows hosts and workload, keeps one SSH connection per host
across refreshes, and leaves with exit 0 on Ctrl-C; with one host unreachable, `status` and `doctor` still show the
other and name the lost one."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import re
import select
import shlex
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.helpers import EMBED, REPO, cli_env, sparkctl
from tests.testbed import Testbed
from tests.testbed.layout import MGMT_IFNAME

pytestmark = pytest.mark.testbed

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Cluster:
    def __init__(self, tb: Testbed, inventory: Path, env: dict[str, str]) -> None:
        self.tb, self.inventory, self.env = tb, inventory, env

    def run(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return sparkctl(*args, "-i", str(self.inventory), env=self.env, timeout=timeout)


@pytest.fixture(scope="module")
def cluster(testbed: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    testbed.reset_hosts()
    state = tmp_path_factory.mktemp("laptop-state")
    env = cli_env({**os.environ, "SPARKCTL_SUDO_PASSWORD": testbed.sudo_password}, state)
    c = Cluster(testbed, testbed.inventory_path(workloads=[EMBED]), env)
    up = c.run("up", "--yes")
    assert up.returncode == 0, up.stdout + up.stderr
    yield c
    c.run("down")
    testbed.reset_hosts()


def test_ask_embed_prints_a_384_dimensional_summary_and_the_latency(cluster: Cluster) -> None:
    r = cluster.run("ask", "embed", "hello")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^embedding: 384 dimensions, L2 norm 1\.0000, first values \[-?\d", r.stdout, re.M), r.stdout
    assert re.search(r"^-- embed: \d+ ms, \d+ prompt tokens$", r.stdout, re.M), r.stdout


def test_endpoint_env_drives_the_official_openai_client(cluster: Cluster) -> None:
    code = (
        "import openai\n"
        "c = openai.OpenAI()\n"  # OPENAI_BASE_URL and OPENAI_API_KEY from the environment
        "r = c.embeddings.create(model='embed', input=['hello', 'two Sparks'])\n"
        "print(len(r.data), len(r.data[0].embedding), r.usage.prompt_tokens)\n"
    )
    line = f"{shlex.quote(sys.executable)} -m sparkctl endpoint embed --env -i {shlex.quote(str(cluster.inventory))}"
    r = subprocess.run(
        ["sh", "-c", f'eval "$({line})" && exec {shlex.quote(sys.executable)} -c {shlex.quote(code)}'],
        env=cluster.env, cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    n, dim, tokens = r.stdout.split()
    assert (n, dim) == ("2", "384") and int(tokens) > 0
    key = (Path(cluster.env["XDG_STATE_HOME"]) / "sparkctl" / "testbed" / "api-key-embed").read_text().strip()
    # without the key the endpoint refuses: the key in the lines is the one the workload was given
    bad = subprocess.run(
        [sys.executable, "-c", code], env={**cluster.env, "OPENAI_BASE_URL": "http://10.77.0.11:8100/v1",
                                           "OPENAI_API_KEY": key + "x"},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert bad.returncode != 0 and "401" in bad.stderr


def _ssh_sessions(tb: Testbed, host: str) -> int:
    """Established TCP connections to the host's sshd, read on the host."""
    out = tb.exec(host, ["ss", "-tnH", "state", "established", "( sport = :22 )"]).stdout
    return len([line for line in out.splitlines() if line.strip()])


def _read(fd: int, seconds: float) -> str:
    out = b""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    return out.decode(errors="replace")


def test_status_watch_on_a_terminal_shows_the_cluster_and_leaves_on_ctrl_c(cluster: Cluster) -> None:
    before = {h: _ssh_sessions(cluster.tb, h) for h in cluster.tb.hosts}
    argv = [sys.executable, "-m", "sparkctl", "status", "--watch", "--interval", "1", "-i", str(cluster.inventory)]
    status = None
    pid, fd = pty.fork()
    if pid == 0:  # the child: sparkctl on the pseudo-terminal
        os.chdir(REPO)
        os.execve(sys.executable, argv, cluster.env)
    try:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 220, 0, 0))
        screen = _read(fd, 8)
        for _ in range(3):  # traffic between refreshes, so the counters move
            assert cluster.run("ask", "embed", "hello there").returncode == 0
        screen += _read(fd, 4)
        during = {h: _ssh_sessions(cluster.tb, h) for h in cluster.tb.hosts}
        screen += _read(fd, 3)
        after = {h: _ssh_sessions(cluster.tb, h) for h in cluster.tb.hosts}
        os.kill(pid, signal.SIGINT)
        screen += _read(fd, 10)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
        if status is None:  # the test failed before the child ended
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    text = ANSI.sub("", screen)
    assert status is not None and os.waitstatus_to_exitcode(status) == 0, text[-3000:]
    # several refreshes went over one connection per host, held open between them
    assert all(during[h] == before[h] + 1 == after[h] for h in cluster.tb.hosts), (before, during, after)
    for want in (
        "41 C, 0 %, memory n/a",  # the simulated GB10: 41 C idle, memory [N/A]
        "(simulated)",
        "simulated: the GPU values come from a simulated nvidia-smi",
        "nvidia-smi reports none on GB10",
        "enp1s0f1np1 up 9000 192.168.100.10/24",
        "enP2p1s0f1np1 up 9000 192.168.101.11/24",
        "embed (embed)",
        "http://10.77.0.11:8100/v1",
    ):
        assert want in text, (want, text[-3000:])
    assert re.search(r"spark-a .*\balive\b", text) and re.search(r"spark-b .*\balive\b", text), text[-3000:]
    assert re.search(r"embed \(embed\) .* ok .* ok ", text), text[-3000:]
    totals = [int(n) for n in re.findall(r"requests (\d+), prompt_tokens \d+", text)]
    assert totals and max(totals) >= 3, text[-3000:]
    rates = [float(x) for x in re.findall(r"│ ok\s+│ (\d+\.\d) ", text)]
    assert any(r > 0 for r in rates), text[-3000:]
    # nothing was left connected after the exit
    assert {h: _ssh_sessions(cluster.tb, h) for h in cluster.tb.hosts} == before


@contextlib.contextmanager
def _unreachable(tb: Testbed, host: str, how: str) -> Iterator[None]:
    """`host` cannot be reached from the laptop: its sshd stopped, or its management link cut (the fabric, and so
    the workload's ranks and Ray, stay up)."""
    if how == "sshd-stopped":
        tb.stop_sshd(host)
    else:
        tb.carrier_down(host, MGMT_IFNAME)
    try:
        yield
    finally:
        if how == "sshd-stopped":
            tb.start_sshd(host)
        else:
            tb.carrier_up(host, MGMT_IFNAME)


@pytest.mark.parametrize("how", ["sshd-stopped", "management-link-cut"])
def test_one_host_unreachable_status_and_doctor_show_the_other_and_name_it(cluster: Cluster, how: str) -> None:
    with _unreachable(cluster.tb, "spark-b", how):
        text = cluster.run("status", timeout=120)
        as_json = cluster.run("status", "--json", timeout=120)
        doctor = cluster.run("doctor", "--json", timeout=120)
    # status: spark-a's state as it is, spark-b named as unreachable with its connection error; exit 1
    assert text.returncode == 1, text.stdout + text.stderr
    assert "  spark-a: ray running" in text.stdout, text.stdout
    assert "    enp1s0f1np1: 192.168.100.10/24 MTU 9000 (ok)" in text.stdout, text.stdout
    assert "  spark-b: UNREACHABLE" in text.stdout, text.stdout
    # the workload's head (spark-a) is read and its endpoint answers
    assert "  workload embed (embed): http://10.77.0.11:8100/v1 process ok, ready" in text.stdout, text.stdout
    assert "error: spark-b: " in text.stderr and "10.77.0.12" in text.stderr, text.stderr
    assert "Traceback" not in text.stderr
    assert as_json.returncode == 1, as_json.stderr
    st = json.loads(as_json.stdout)
    assert list(st["hosts"]) == ["spark-a"] and st["hosts"]["spark-a"]["ray"] == "running"
    assert all(t["ok"] for t in st["hosts"]["spark-a"]["fabric"]), st["hosts"]["spark-a"]
    assert list(st["unreachable"]) == ["spark-b"] and "10.77.0.12" in st["unreachable"]["spark-b"]["error"]
    assert st["workloads"]["embed"]["health"] == "ready"
    # doctor: spark-a judged as usual, spark-b a failed host-reachable naming its connection error; exit 1
    assert doctor.returncode == 1, doctor.stderr
    findings = json.loads(doctor.stdout)
    reach = {f["subject"]: (f["level"], f["evidence"]) for f in findings if f["rule"] == "host-reachable"}
    assert reach["spark-a"][0] == "pass" and reach["spark-b"][0] == "fail", reach
    assert "10.77.0.12" in reach["spark-b"][1], reach
    assert {f["subject"] for f in findings if f["rule"] == "gpu-present"} == {"spark-a"}
    jumbo = {f["subject"]: f["level"] for f in findings if f["rule"] == "jumbo-path"}
    assert jumbo and all(s.startswith("spark-a ") for s in jumbo), jumbo  # pinged from spark-a, over the fabric
    assert set(jumbo.values()) == {"pass"}, jumbo
    # back: both hosts answer again, nothing was left broken
    after = cluster.run("status", "--json", timeout=120)
    assert after.returncode == 0, after.stderr
    assert list(json.loads(after.stdout)["hosts"]) == ["spark-a", "spark-b"]
