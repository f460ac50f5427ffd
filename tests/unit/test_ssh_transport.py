"""The SSH transport against paramiko itself: connection settings, host keys, and the command channel.

Settings tests stop at `SSHClient.connect`. Host-key and run() tests go through a real paramiko handshake
with an in-process SSH server on a socketpair (no network): paramiko.client's `socket` module is swapped
for one whose sockets are socketpairs with a fresh server on the other end.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paramiko
import paramiko.client
import pytest
from fabric import Connection

from sparkctl.execute.base import CommandTimeout, Unreachable
from sparkctl.execute.ssh import _build_connection, connect
from sparkctl.inventory.models import FabricInterface, Host, SshOverride, SshSettings

ADDR = "192.0.2.10"
SECRET = "hunter2-sudo-password"


def make_host(address: str = ADDR, **ssh: Any) -> Host:
    return Host(
        name="spark-a",
        address=address,
        ssh=SshOverride(**ssh),
        fabric=[FabricInterface(interface="enp1s0f1np1", address="192.168.100.10/24")],
    )


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private HOME (no real keys, known_hosts or ~/.ssh/config) and no ssh-agent."""
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return home


@pytest.fixture
def ssh_config(tmp_path: Path) -> Callable[[str], Path]:
    def write(text: str = "") -> Path:
        path = tmp_path / "ssh_config"
        path.write_text(text)
        return path

    return write


# --- connection settings, stopped at paramiko's connect -------------------------------------------------


@pytest.fixture
def paramiko_connect(mocker: Any) -> list[SimpleNamespace]:
    """Replace SSHClient.connect; record its kwargs and the client's host-key state at that moment."""
    seen: list[SimpleNamespace] = []

    def fake(client: paramiko.SSHClient, **kwargs: Any) -> None:
        seen.append(SimpleNamespace(kwargs=kwargs, policy=client._policy, host_keys=client.get_host_keys()))

    mocker.patch.object(paramiko.SSHClient, "connect", autospec=True, side_effect=fake)
    return seen


def test_inventory_settings_reach_paramiko(paramiko_connect, ssh_config, home):
    settings = SshSettings(user="nvidia", port=2222, identity_file="~/keys/spark", connect_timeout=2.5)

    connect(make_host(), settings, ssh_config=ssh_config())

    (call,) = paramiko_connect
    assert call.kwargs["hostname"] == ADDR
    assert call.kwargs["port"] == 2222
    assert call.kwargs["username"] == "nvidia"
    assert call.kwargs["key_filename"] == [str(home / "keys/spark")]
    assert call.kwargs["timeout"] == 2.5
    assert call.kwargs["banner_timeout"] == 2.5
    assert call.kwargs["allow_agent"] is True
    assert "sock" not in call.kwargs


def test_host_overrides_beat_cluster_settings_beat_ssh_config(paramiko_connect, ssh_config, home):
    config = ssh_config(f"Host {ADDR}\n  User cfguser\n  Port 2200\n  IdentityFile ~/.ssh/cfgkey\n")
    settings = SshSettings(user="cluster", port=2222, identity_file="~/cluster_key")

    connect(make_host(user="hostuser", port=2022, identity_file="~/host_key"), settings, ssh_config=config)
    connect(make_host(), settings, ssh_config=config)

    overridden, cluster = paramiko_connect
    assert (overridden.kwargs["username"], overridden.kwargs["port"]) == ("hostuser", 2022)
    # Like `ssh -i`: the given key goes first, ~/.ssh/config's keys are still tried after it.
    assert overridden.kwargs["key_filename"] == [str(home / "host_key"), str(home / ".ssh/cfgkey")]
    assert (cluster.kwargs["username"], cluster.kwargs["port"]) == ("cluster", 2222)
    assert cluster.kwargs["key_filename"][0] == str(home / "cluster_key")


def test_ssh_config_applies_when_the_inventory_leaves_values_unset(paramiko_connect, ssh_config, home):
    config = ssh_config(
        "Host spark-a\n  HostName 192.0.2.77\n  User cfguser\n  Port 2200\n  IdentityFile ~/.ssh/cfgkey\n"
    )

    connect(make_host(address="spark-a"), SshSettings(), ssh_config=config)

    (call,) = paramiko_connect
    assert call.kwargs["hostname"] == "192.0.2.77"
    assert call.kwargs["username"] == "cfguser"
    assert call.kwargs["port"] == 2200
    assert call.kwargs["key_filename"] == [str(home / ".ssh/cfgkey")]


def test_proxyjump_hops_get_the_same_host_key_checks(ssh_config, home):
    config = ssh_config(f"Host {ADDR}\n  ProxyJump jump@bastion.example:2201\n")

    conn = _build_connection(make_host(), SshSettings(connect_timeout=3), ssh_config=config)

    gateway = conn.gateway
    assert isinstance(gateway, Connection)
    assert (gateway.host, gateway.port, gateway.user) == ("bastion.example", 2201, "jump")
    for hop in (conn, gateway):
        assert isinstance(hop.client._policy, paramiko.RejectPolicy)
        assert hop.connect_timeout == 3


def test_unknown_host_keys_are_rejected_by_default(paramiko_connect, ssh_config):
    connect(make_host(), SshSettings(), ssh_config=ssh_config())

    (call,) = paramiko_connect
    assert isinstance(call.policy, paramiko.RejectPolicy)
    assert not isinstance(call.policy, paramiko.AutoAddPolicy)


@pytest.mark.parametrize(("flag", "policy"), [(True, "reject"), (False, "accept_new")], ids=["flag", "inventory"])
def test_accept_new_is_chosen_by_the_flag_or_the_inventory(paramiko_connect, ssh_config, flag, policy):
    connect(make_host(), SshSettings(host_key_policy=policy), accept_new_host_keys=flag, ssh_config=ssh_config())

    (call,) = paramiko_connect
    assert not isinstance(call.policy, (paramiko.RejectPolicy, paramiko.AutoAddPolicy))


def test_known_hosts_file_is_loaded_and_a_missing_one_counts_as_empty(paramiko_connect, ssh_config, tmp_path):
    key = paramiko.ECDSAKey.generate()
    known = tmp_path / "known_hosts"
    known.write_text(f"# my hosts\n[{ADDR}]:2222 {key.get_name()} {key.get_base64()}\n")

    connect(make_host(), SshSettings(port=2222, known_hosts=str(known)), ssh_config=ssh_config())
    connect(make_host(), SshSettings(known_hosts=str(tmp_path / "absent")), ssh_config=ssh_config())

    loaded, empty = paramiko_connect
    assert loaded.host_keys.lookup(f"[{ADDR}]:2222")[key.get_name()] == key
    assert len(empty.host_keys) == 0
    assert not (tmp_path / "absent").exists()


@pytest.mark.parametrize(
    ("error", "expected", "hint"),
    [
        (TimeoutError("timed out"), "no answer from 192.0.2.10:22 within 10s", "connect_timeout"),
        (
            paramiko.ssh_exception.NoValidConnectionsError(
                {(ADDR, 22): ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")}
            ),
            "connection refused by 192.0.2.10:22",
            "sshd",
        ),
        (socket.gaierror(-2, "Name or service not known"), "cannot resolve '192.0.2.10'", "address"),
        (paramiko.AuthenticationException("Authentication failed."), "authentication as 'nvidia'", "ssh-add"),
        (paramiko.PasswordRequiredException("private key file is encrypted"), "passphrase", "ssh-add"),
        (paramiko.SSHException("Error reading SSH protocol banner"), "protocol banner", "ssh -v"),
    ],
    ids=["timeout", "refused", "dns", "auth", "encrypted-key", "handshake"],
)
def test_connect_failures_become_unreachable_with_a_hint(mocker, ssh_config, error, expected, hint):
    mocker.patch.object(paramiko.SSHClient, "connect", autospec=True, side_effect=error)

    with pytest.raises(Unreachable) as caught:
        connect(make_host(), SshSettings(user="nvidia"), ssh_config=ssh_config())

    (problem,) = caught.value.problems
    assert problem.where == "spark-a"
    assert expected in problem.message
    assert hint in problem.hint


# --- a real paramiko handshake with an in-process server ----------------------------------------------

Handler = Callable[[paramiko.Channel, str], None]


def read_stdin(channel: paramiko.Channel) -> bytes:
    """Everything the client sends; returns only once the client has sent EOF."""
    data = b""
    while chunk := channel.recv(65536):
        data += chunk
    return data


def finish(channel: paramiko.Channel, code: int) -> None:
    """End a command the way OpenSSH does: EOF, exit status, close.

    It waits for the client's EOF first: the client sends that only once its exec request was answered,
    and real sshd never closes a channel before answering.
    """
    read_stdin(channel)
    channel.shutdown_write()
    channel.send_exit_status(code)
    channel.close()


class FakeSshd(paramiko.ServerInterface):
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.commands: list[str] = []
        self.users: list[str] = []
        self.pty_requested = False
        self.channel_closed = threading.Event()
        self.transport: paramiko.Transport | None = None

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED if kind == "session" else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        self.users.append(username)
        return paramiko.AUTH_SUCCESSFUL

    def check_channel_pty_request(self, *args: Any) -> bool:
        self.pty_requested = True
        return False

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        self.commands.append(command.decode())
        threading.Thread(target=self._serve, args=(channel, command.decode()), daemon=True).start()
        return True

    def _serve(self, channel: paramiko.Channel, command: str) -> None:
        try:
            self.handler(channel, command)
        finally:
            if channel.closed:
                self.channel_closed.set()


class _Plug:
    """A socketpair end that pretends to connect."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def connect(self, addr: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class FakeNetwork:
    """Stands in for the `socket` module inside paramiko.client: every new socket reaches a new FakeSshd."""

    def __init__(self, host_key: paramiko.PKey) -> None:
        self.host_key = host_key
        self.handler: Handler = lambda channel, command: finish(channel, 0)
        self.servers: list[FakeSshd] = []

    def socket(self, *args: Any, **kwargs: Any) -> _Plug:
        client_end, server_end = socket.socketpair()
        server = FakeSshd(lambda channel, command: self.handler(channel, command))
        transport = paramiko.Transport(server_end)
        transport.add_server_key(self.host_key)
        transport.start_server(event=threading.Event(), server=server)
        server.transport = transport
        self.servers.append(server)
        return _Plug(client_end)

    def __getattr__(self, name: str) -> Any:
        return getattr(socket, name)

    @property
    def server(self) -> FakeSshd:
        (server,) = self.servers
        return server


@pytest.fixture
def network(mocker: Any) -> Iterator[FakeNetwork]:
    net = FakeNetwork(paramiko.ECDSAKey.generate())
    mocker.patch.object(paramiko.client, "socket", net)
    yield net
    for server in net.servers:
        if server.transport is not None:
            server.transport.close()


@pytest.fixture
def settings(tmp_path: Path) -> Callable[..., SshSettings]:
    """SSH settings with a client key the fake server accepts and a known_hosts file under tmp_path."""
    key_file = tmp_path / "id_ecdsa"
    paramiko.ECDSAKey.generate().write_private_key_file(str(key_file))

    def make(**kwargs: Any) -> SshSettings:
        kwargs.setdefault("user", "nvidia")
        kwargs.setdefault("identity_file", str(key_file))
        kwargs.setdefault("known_hosts", str(tmp_path / "known_hosts"))
        return SshSettings(**kwargs)

    return make


def known_line(key: paramiko.PKey, port: int = 22) -> str:
    name = ADDR if port == 22 else f"[{ADDR}]:{port}"
    return f"{name} {key.get_name()} {key.get_base64()}\n"


@pytest.fixture
def trusted(network: FakeNetwork, settings, ssh_config, tmp_path) -> Callable[..., Any]:
    """Connect to the fake server, its host key already in known_hosts."""
    (tmp_path / "known_hosts").write_text(known_line(network.host_key))

    def open_transport(**kwargs: Any) -> Any:
        return connect(make_host(), settings(**kwargs), ssh_config=ssh_config())

    return open_transport


def test_unknown_host_key_is_refused_with_fingerprint_and_fix(network, settings, ssh_config, tmp_path):
    with pytest.raises(Unreachable) as caught:
        connect(make_host(), settings(port=2222), ssh_config=ssh_config())

    (problem,) = caught.value.problems
    assert problem.where == "spark-a"
    assert f"[{ADDR}]:2222" in problem.message
    assert f"ECDSA key {network.host_key.fingerprint}" in problem.message
    assert "--accept-new-host-keys" in problem.hint
    assert f"ssh-keyscan -H -p 2222 {ADDR} >> " in problem.hint
    assert not (tmp_path / "known_hosts").exists()
    assert network.server.users == []


@pytest.mark.parametrize("port", [22, 2222])
def test_accept_new_records_the_key_and_keeps_the_file(network, settings, ssh_config, tmp_path, port):
    other = paramiko.ECDSAKey.generate()
    kept = f"# managed by hand\n@cert-authority *.example {other.get_name()} {other.get_base64()}\n"
    known = tmp_path / "known_hosts"
    known.write_text(kept + f"192.0.2.99 {other.get_name()} {other.get_base64()}")  # no final newline

    connect(make_host(), settings(port=port), accept_new_host_keys=True, ssh_config=ssh_config()).close()

    text = known.read_text()
    assert text.startswith(kept)
    # OpenSSH's name for a non-standard port is [addr]:port.
    assert text.endswith(f"{other.get_base64()}\n" + known_line(network.host_key, port))
    # Recorded means trusted: the default policy now connects.
    connect(make_host(), settings(port=port), ssh_config=ssh_config()).close()
    assert len(network.servers) == 2


@pytest.mark.parametrize("accept_new", [False, True])
def test_a_revoked_host_key_is_refused_even_if_listed(network, settings, ssh_config, tmp_path, accept_new):
    key = network.host_key
    known = tmp_path / "known_hosts"
    known.write_text(f"not a key line\n{known_line(key)}@revoked * {key.get_name()} {key.get_base64()}\n")

    with pytest.raises(Unreachable) as caught:
        connect(make_host(), settings(), accept_new_host_keys=accept_new, ssh_config=ssh_config())

    assert "@revoked" in caught.value.problems[0].message
    assert key.fingerprint in caught.value.problems[0].message
    assert network.server.users == []


def test_accept_new_creates_a_missing_known_hosts_file_private(network, settings, ssh_config, tmp_path):
    known = tmp_path / "new" / "known_hosts"

    connect(make_host(), settings(known_hosts=str(known), host_key_policy="accept_new"), ssh_config=ssh_config())

    assert known.read_text() == known_line(network.host_key)
    assert known.stat().st_mode & 0o777 == 0o600


def test_changed_host_key_is_refused_even_when_accepting_new_keys(network, settings, ssh_config, tmp_path):
    old = paramiko.ECDSAKey.generate()
    known = tmp_path / "known_hosts"
    known.write_text(known_line(old, 2222))

    with pytest.raises(Unreachable) as caught:
        connect(make_host(), settings(port=2222), accept_new_host_keys=True, ssh_config=ssh_config())

    (problem,) = caught.value.problems
    assert problem.where == "spark-a"
    assert "CHANGED" in problem.message
    assert old.fingerprint in problem.message
    assert network.host_key.fingerprint in problem.message
    assert f"ssh-keygen -R '[{ADDR}]:2222'" in problem.hint
    assert known.read_text() == known_line(old, 2222)
    assert network.server.users == []


def test_run_sends_stdin_then_eof_and_returns_both_streams_and_the_exit_code(network, trusted):
    def handler(channel: paramiko.Channel, command: str) -> None:
        data = read_stdin(channel)
        channel.sendall(b"got:" + data)
        channel.sendall_stderr("warn \u00e9 \xff".encode("latin-1"))
        finish(channel, 3)

    network.handler = handler

    with trusted() as transport:
        result = transport.run("cat | tr a b", stdin="hello\n", timeout=10)

    assert (result.exit_code, result.stdout) == (3, "got:hello\n")
    assert result.stderr == "warn \ufffd \ufffd"
    assert result.duration >= 0
    # the host enforces the limit itself (a closed channel would not stop the command there)
    assert network.server.commands == ["timeout -k 5 10 sh -c 'cat | tr a b'"]
    assert not network.server.pty_requested


def test_run_without_stdin_closes_it_at_once(network, trusted):
    def handler(channel: paramiko.Channel, command: str) -> None:
        channel.sendall(b"%d" % len(read_stdin(channel)))
        finish(channel, 0)

    network.handler = handler

    with trusted() as transport:
        result = transport.run("cat", timeout=10)

    assert (result.exit_code, result.stdout) == (0, "0")


def test_one_connection_serves_every_command(network, trusted):
    network.handler = lambda channel, command: (channel.sendall(command.encode()), finish(channel, 0))

    with trusted() as transport:
        outputs = [transport.run(f"echo {i}", timeout=10).stdout for i in range(3)]

    expected = [f"timeout -k 5 10 sh -c 'echo {i}'" for i in range(3)]
    assert outputs == expected  # the fake host echoes the command line it was given
    assert network.server.commands == expected


def test_large_streams_both_ways_do_not_deadlock(network, trusted):
    size = 3 * 2**20  # larger than paramiko's 2 MiB channel window

    def handler(channel: paramiko.Channel, command: str) -> None:
        # Writes before it reads: a client that pushed all stdin first would wait forever.
        channel.sendall(b"o" * size)
        channel.sendall_stderr(b"e" * size)
        channel.sendall(b"|%d" % len(read_stdin(channel)))
        finish(channel, 0)

    network.handler = handler

    with trusted() as transport:
        result = transport.run("filter", stdin="i" * size, timeout=60)

    assert result.stdout == "o" * size + f"|{size}"
    assert result.stderr == "e" * size


def test_sudo_password_stays_out_of_commands_logs_and_errors(network, trusted, caplog):
    caplog.set_level(logging.DEBUG)
    received: list[bytes] = []

    def handler(channel: paramiko.Channel, command: str) -> None:
        received.append(read_stdin(channel))
        finish(channel, 0)

    network.handler = handler

    with trusted() as transport:
        result = transport.run("sudo -S -p '' true", stdin=SECRET + "\n", timeout=10)

    assert result.ok
    assert received == [SECRET.encode() + b"\n"]
    assert network.server.commands == ["timeout -k 5 10 sh -c 'sudo -S -p '\"'\"''\"'\"' true'"]
    assert "sudo -S -p '' true" in caplog.text
    assert SECRET not in caplog.text


def test_timeout_closes_the_channel_and_names_host_and_command(network, trusted, caplog):
    caplog.set_level(logging.DEBUG)

    def handler(channel: paramiko.Channel, command: str) -> None:
        read_stdin(channel)
        while not channel.closed:  # a command that never ends, until the client closes the session
            channel.status_event.wait(0.05)

    network.handler = handler
    command = "sudo -S -p '' " + "x" * 200

    with trusted() as transport, pytest.raises(CommandTimeout) as caught:
        transport.run(command, stdin=SECRET + "\n", timeout=0.3)

    (problem,) = caught.value.problems
    assert problem.where == "spark-a"
    assert f"`{command[:80]}…`" in problem.message
    assert command[:81] not in problem.message
    assert SECRET not in str(caught.value)
    assert SECRET not in caplog.text
    assert network.server.channel_closed.wait(10)


def test_the_host_stopping_a_command_at_its_limit_is_a_timeout(network, trusted):
    def handler(channel: paramiko.Channel, command: str) -> None:
        assert command.startswith("timeout -k 5 1 sh -c ")  # the limit travels with the command
        time.sleep(0.3)
        finish(channel, 124)  # what coreutils `timeout` exits with when it stopped the command

    network.handler = handler
    with trusted() as transport, pytest.raises(CommandTimeout) as caught:
        transport.run("sleep 600", timeout=0.2)
    assert "the host stopped it" in caught.value.problems[0].hint


def test_a_dropped_connection_is_reported_as_unreachable(network, trusted):
    network.handler = lambda channel, command: network.server.transport.close()

    with trusted() as transport, pytest.raises(Unreachable) as caught:
        transport.run("reboot", timeout=10)

    assert "connection lost while running `reboot`" in caught.value.problems[0].message


def test_a_missing_key_file_is_named_not_taken_for_the_network(trusted, tmp_path):
    missing = tmp_path / "id_gone"
    with pytest.raises(Unreachable) as caught:
        trusted(identity_file=str(missing))
    (problem,) = caught.value.problems
    assert problem.where == "spark-a"
    assert problem.message == f"identity file {missing} does not exist (ssh.identity_file)"
    assert "ssh.identity_file" in problem.hint and "network" not in problem.hint
