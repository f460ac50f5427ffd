"""Output modes against the testbed: on a pseudo-terminal `up` shows live per-host lines and a recap; piped (or with
--plain) the plain lines. Each run's effect is checked on the hosts too, not only in what was printed."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from sparkctl.cli.live import PHASES
from tests.integration.helpers import EMBED, REPO, TWINS, cli_env, ip_addrs, spark_processes, sparkctl
from tests.testbed import Testbed

pytestmark = pytest.mark.testbed

SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"  # rich's "dots"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
PLAIN_STEP = re.compile(r"^   (spark-[ab]): (.+?) (\.\.\.|ok \(\d+\.\ds\)|changed \(\d+\.\ds\))$")


def on_terminal(args: list[str], env: dict[str, str], timeout: float = 600) -> tuple[int, str]:
    """Run sparkctl with stdin, stdout and stderr on a pseudo-terminal of 120x40; everything it wrote."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "sparkctl", *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**env, "TERM": "xterm-256color"},
        cwd=REPO,
        start_new_session=True,
    )
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every holder of the terminal's other side has closed it
                break
            if not data:
                break
            out += data
        else:
            proc.kill()
            pytest.fail(f"sparkctl {' '.join(args)} still running after {timeout}s:\n{out.decode(errors='replace')}")
        return proc.wait(timeout=30), out.decode("utf-8", "replace")
    finally:
        os.close(master)


def drawn_lines(raw: str) -> list[str]:
    """Every line ever drawn, redraws included: escape sequences removed, carriage returns and newlines as breaks."""
    return [ln.rstrip() for ln in re.split(r"[\r\n]+", ANSI.sub("", raw)) if ln.strip()]


def final_screen(raw: str) -> list[str]:
    """What the terminal shows once the command ended, scrollback included (a VT100 emulator replays the output)."""
    import pyte

    screen = pyte.HistoryScreen(120, 40, history=10000)
    pyte.Stream(screen).feed(raw)
    rows = [[line[x].data for x in range(screen.columns)] for line in screen.history.top]
    lines = ["".join(r).rstrip() for r in rows] + [ln.rstrip() for ln in screen.display]
    return [ln for ln in lines if ln]


def endpoint_answers() -> bool:
    with urllib.request.urlopen("http://10.77.0.11:8100/health", timeout=10) as r:  # the head's management address
        return bool(r.status == 200)


class Run:
    def __init__(self, tb: Testbed, inventory: Path, env: dict[str, str]) -> None:
        self.tb, self.inventory, self.env = tb, inventory, env


@pytest.fixture(scope="module")
def run(testbed: Testbed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    testbed.reset_hosts()
    state = tmp_path_factory.mktemp("laptop-state")
    env = cli_env({**os.environ, "SPARKCTL_SUDO_PASSWORD": testbed.sudo_password}, state)
    env.pop("TERM", None)
    r = Run(testbed, testbed.inventory_path(workloads=[EMBED]), env)
    yield r
    sparkctl("down", "-i", str(r.inventory), env=env)
    testbed.reset_hosts()


def test_up_on_a_terminal_shows_live_host_lines_and_ends_with_the_recap(run: Run) -> None:
    code, raw = on_terminal(["up", "--yes", "-i", str(run.inventory)], run.env)
    screen = final_screen(raw)
    assert code == 0, "\n".join(screen[-60:])
    # the hosts' real state: twins at MTU 9000, Ray and the TP=2 worker running, the endpoint answering
    for host in run.tb.hosts:
        assert all(ip_addrs(run.tb, host)[t]["mtu"] == 9000 for t in TWINS)
        assert spark_processes(run.tb, host, "raylet")
    assert endpoint_answers()
    # while it ran: per host a spinner, the host, the elapsed time, what runs (for the workload wait, its phase)
    drawn = drawn_lines(raw)
    live = [ln for ln in drawn if ln[:1] in SPINNER]
    for host in run.tb.hosts:
        assert any(re.match(rf"^. {host} +\d+\.\ds \S", ln) for ln in live), live[:20]
    waits = [ln for ln in live if "embed answers at" in ln]
    assert any(PHASES["down"] in ln for ln in waits), waits[-5:]
    assert not any(PLAIN_STEP.match(ln) for ln in drawn)
    # what stays on screen: each stage once, one final line per host with its mark, then the recap
    assert screen.count("== fabric") == 1 and screen.count("== ready") == 1, screen
    assert not any(ln[:1] in SPINNER for ln in screen)
    i = screen.index("== fabric")
    assert sorted(ln.split()[1] for ln in screen[i + 1 : i + 3]) == ["spark-a", "spark-b"]
    assert all(re.match(r"^✓ spark-[ab] +\d+\.\ds 5 changed$", ln) for ln in screen[i + 1 : i + 3]), screen[i : i + 3]
    end = screen[screen.index("up on testbed: done") :]
    assert end[1] == "recap"
    rows = {ln.split()[0]: ln.replace("│", " ").split() for ln in end if ln.startswith("spark-")}
    assert rows["spark-a"][1] == "changed" and rows["spark-b"][1] == "changed"
    assert all(r[4] == "0" and r[5] == "0" for r in rows.values())  # failed, unreachable
    assert "timings" in end and any(ln.startswith(f"  {PHASES['down']}") for ln in end)
    assert end[-1].startswith("journal: sparkctl history show ")


def test_down_with_plain_on_a_terminal_prints_the_plain_lines(run: Run) -> None:
    code, raw = on_terminal(["down", "--plain", "-i", str(run.inventory)], run.env)
    lines = final_screen(raw)
    assert code == 0, "\n".join(lines)
    for host in run.tb.hosts:
        for needle in ("raylet", "embed_worker"):
            assert spark_processes(run.tb, host, needle) == [], (host, needle)
    assert "\x1b" not in raw and not any(ln[:1] in SPINNER for ln in lines)
    assert "down on testbed: done" in lines and "recap" not in lines
    assert any(PLAIN_STEP.match(ln) for ln in lines)


def test_up_piped_prints_the_plain_lines(run: Run) -> None:
    r = sparkctl("up", "--yes", "-i", str(run.inventory), env={**run.env, "TERM": "xterm-256color"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert endpoint_answers()
    assert "\x1b" not in r.stdout + r.stderr
    steps = [PLAIN_STEP.match(ln) for ln in r.stderr.splitlines() if ln.startswith("   spark-") and " phase " not in ln]
    assert steps and all(steps), r.stderr
    assert {m.group(1) for m in steps if m} == {"spark-a", "spark-b"}
    assert "   spark-a: verify_workload:embed phase down: " in r.stderr  # the readiness phases, as before
    assert "up on testbed: done" in r.stdout and "  spark-a: changed; applied: " in r.stdout
    assert "recap" not in r.stdout
