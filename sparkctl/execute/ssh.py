"""The SSH transport: one Fabric connection per host, strict host keys, commands over a raw channel."""

from __future__ import annotations

import errno
import logging
import math
import os
import select
import shlex
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paramiko  # type: ignore[import-untyped]
from fabric import Config, Connection  # type: ignore[import-untyped]

from sparkctl.errors import Problem, Unreachable
from sparkctl.execute.base import CommandTimeout, Endpoint, Result
from sparkctl.inventory.models import SshSettings

log = logging.getLogger("sparkctl.ssh")

_CHUNK = 32768
_HOST_GRACE = 10  # seconds the host's `timeout` gets to stop a command and report before the channel is closed
_TIMED_OUT = 124  # exit code of coreutils `timeout` when the limit passed
_SSH_PORT = 22
# Connections to several hosts may record new keys at the same time; appends to the file must not interleave.
_known_hosts_lock = threading.Lock()


def connect(
    host: Endpoint,
    settings: SshSettings,
    *,
    accept_new_host_keys: bool = False,
    ssh_config: str | os.PathLike[str] | None = None,
) -> SshTransport:
    """Open the SSH connection to `host` that every command of this run will share.

    Per-host overrides beat the cluster settings, which beat ~/.ssh/config (or `ssh_config`, if given),
    which beats OpenSSH's defaults. Raises Unreachable, with a fix, when the host cannot be reached.
    """
    accept_new = accept_new_host_keys or settings.host_key_policy == "accept_new"
    conn = _build_connection(host, settings, ssh_config=ssh_config, accept_new=accept_new)
    transport = SshTransport(host.name, conn, settings)
    transport.open()
    return transport


class SshTransport:
    """Commands on one host over one SSH connection; build it with `connect`."""

    def __init__(self, host: str, connection: Connection, settings: SshSettings) -> None:
        self.host = host
        self._conn = connection
        self._settings = settings

    def open(self) -> None:
        """Connect (a no-op when already connected); raise Unreachable with the cause and a fix."""
        conn = self._conn
        if conn.is_connected:
            return
        log.debug("%s: connecting to %s@%s:%s", self.host, conn.user, conn.host, conn.port)
        try:
            conn.open()
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self.close()
            message, hint = _describe_connect_failure(exc, conn, self._settings)
            raise Unreachable([Problem(self.host, message, hint)]) from exc
        log.debug("%s: connected", self.host)

    def run(
        self,
        command: str,
        *,
        stdin: str | None = None,
        timeout: float,
        on_output: Callable[[str], None] | None = None,
    ) -> Result:
        """Run a shell command line on the host, feed `stdin` then EOF, and wait at most `timeout` seconds."""
        self.open()
        started = time.monotonic()
        deadline = started + timeout + _HOST_GRACE
        log.debug("%s: run%s: %s", self.host, " (with stdin)" if stdin is not None else "", command)
        chan: paramiko.Channel | None = None
        try:
            transport = self._conn.client.get_transport()
            if transport is None:
                raise EOFError("connection closed")
            chan = transport.open_session(timeout=timeout)
            out, err, code = _exchange(chan, bounded(command, timeout), stdin, deadline, on_output)
        except _Expired:
            raise CommandTimeout(
                [
                    Problem(
                        self.host,
                        f"{_short(command)} did not finish within {timeout:g}s",
                        "sparkctl closed the session (the command may still be running there); "
                        "check the host, or allow more time (ssh.command_timeout)",
                    )
                ]
            ) from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise self._lost(command, exc) from exc
        finally:
            if chan is not None:
                chan.close()
        if code == -1 and not transport.is_active():
            raise self._lost(command, EOFError("connection closed"))
        duration = time.monotonic() - started
        log.debug("%s: exit %d after %.2fs: %s", self.host, code, duration, _short(command))
        if code == _TIMED_OUT and duration >= timeout:
            raise CommandTimeout(
                [
                    Problem(
                        self.host,
                        f"{_short(command)} did not finish within {timeout:g}s",
                        "the host stopped it; check the host, or allow more time (ssh.command_timeout)",
                    )
                ]
            )
        return Result(
            exit_code=code,
            stdout=out.decode("utf-8", errors="replace"),
            stderr=err.decode("utf-8", errors="replace"),
            duration=duration,
        )

    def close(self) -> None:
        """Close the connection (and any jump hosts); safe to call twice."""
        hop: Any = self._conn
        while isinstance(hop, Connection):  # Fabric leaves jump hosts open
            hop.close()
            # After a failed handshake Fabric holds no transport, but the paramiko client still does.
            hop.client.close()
            hop = hop.gateway
        log.debug("%s: closed", self.host)

    def __enter__(self) -> SshTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _lost(self, command: str, exc: BaseException) -> Unreachable:
        cause = str(exc) or type(exc).__name__
        return Unreachable(
            [
                Problem(
                    self.host,
                    f"connection lost while running {_short(command)}: {cause}",
                    "check that the host is up and reachable, then re-run",
                )
            ]
        )


class _Expired(Exception):
    """The command's deadline passed."""


def _exchange(
    chan: paramiko.Channel,
    command: str,
    stdin: str | None,
    deadline: float,
    on_output: Callable[[str], None] | None = None,
) -> tuple[bytes, bytes, int]:
    """Drive one session channel: exec, feed stdin then EOF, drain both streams, return the exit status."""
    chan.settimeout(0.0)
    chan.exec_command(command)
    pending = stdin.encode("utf-8") if stdin else b""
    if not pending:
        chan.shutdown_write()
    out, err = bytearray(), bytearray()
    while True:
        if time.monotonic() >= deadline:
            raise _Expired
        busy = False
        if chan.recv_ready():
            chunk = chan.recv(_CHUNK)
            out += chunk
            if on_output is not None:
                on_output(chunk.decode("utf-8", errors="replace"))
            busy = True
        if chan.recv_stderr_ready():
            err += chan.recv_stderr(_CHUNK)
            busy = True
        if pending:
            if chan.closed:
                pending = b""
            elif chan.send_ready():
                # Interleaved with reading, so a command that writes before it reads cannot deadlock us.
                sent = chan.send(pending[:_CHUNK])
                pending = pending[sent:]
                busy = True
                if not pending:
                    chan.shutdown_write()
        if busy:
            continue
        if chan.closed or (chan.eof_received and chan.exit_status_ready()):
            break
        remaining = max(deadline - time.monotonic(), 0.0)
        if pending:
            # Waiting for send window: the channel's poll fd only signals incoming data.
            time.sleep(min(remaining, 0.02))
        elif chan.eof_received:
            # The poll fd stays readable after EOF; wait for the exit status instead.
            chan.status_event.wait(remaining)
        else:
            select.select([chan], [], [], remaining)
    # Data and EOF can land between the ready checks and the EOF check above.
    while chan.recv_ready():
        out += chan.recv(_CHUNK)
    while chan.recv_stderr_ready():
        err += chan.recv_stderr(_CHUNK)
    return bytes(out), bytes(err), chan.recv_exit_status()


def bounded(command: str, timeout: float) -> str:
    """The command under the host's own `timeout`: closing a channel does not stop a command on the host (no pty,
    no signal), so the host enforces the limit itself: TERM to the command's process group, KILL 5 s later."""
    return f"timeout -k 5 {max(1, math.ceil(timeout))} sh -c {shlex.quote(command)}"


def _short(command: str) -> str:
    """The command for messages: its first 80 characters, in backquotes."""
    text = command if len(command) <= 80 else command[:80] + "…"
    return f"`{text}`"


# --- building the connection -------------------------------------------------------------------------


def _build_connection(
    host: Endpoint,
    settings: SshSettings,
    *,
    ssh_config: str | os.PathLike[str] | None = None,
    accept_new: bool = False,
) -> Connection:
    """A Fabric Connection for `host` (not yet open), with host keys pinned on it and every jump host."""
    identity = host.ssh.identity_file or settings.identity_file
    timeout = settings.connect_timeout
    connect_kwargs: dict[str, Any] = {
        "allow_agent": True,
        # paramiko's defaults wait up to an hour for some; a stuck host should fail like a silent one.
        "banner_timeout": timeout,
        "auth_timeout": timeout,
        "channel_timeout": timeout,
    }
    if identity:
        connect_kwargs["key_filename"] = [os.path.expanduser(identity)]
    config = Config(runtime_ssh_path=os.fspath(ssh_config)) if ssh_config is not None else Config()
    conn = Connection(
        host.address,
        user=host.ssh.user or settings.user,
        port=host.ssh.port or settings.port,
        connect_kwargs=connect_kwargs,
        config=config,
    )
    known_hosts = Path(settings.known_hosts).expanduser()
    hop: Any = conn
    while isinstance(hop, Connection):
        # Fabric builds every client with AutoAddPolicy, ProxyJump hops included: replace it on each.
        _pin_host_keys(hop.client, known_hosts, accept_new=accept_new, subject=host.name)
        # Fabric truncates connect_timeout to an int (0.5s would mean no timeout at all).
        hop.connect_timeout = timeout
        hop = hop.gateway
    return conn


def _pin_host_keys(client: paramiko.SSHClient, known_hosts: Path, *, accept_new: bool, subject: str) -> None:
    try:
        revoked = _load_known_hosts(client.get_host_keys(), known_hosts)
    except OSError as exc:
        problem = Problem(subject, f"cannot read {known_hosts}: {exc.strerror or exc}", "check its permissions")
        raise Unreachable([problem]) from exc
    policy = _AcceptNewPolicy(known_hosts, revoked) if accept_new else _RejectUnknownPolicy(revoked)
    client.set_missing_host_key_policy(policy)


def _load_known_hosts(keys: paramiko.HostKeys, path: Path) -> frozenset[str]:
    """Add the file's host keys to `keys`; return the (base64) keys it marks @revoked. Missing means empty.

    Not `SSHClient.load_host_keys`: paramiko's loader raises on the first @cert-authority or @revoked line,
    and would trust a key that a @revoked line withdraws.
    """
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return frozenset()
    entries: list[paramiko.hostkeys.HostKeyEntry] = []
    revoked: set[str] = set()
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):
            fields = line.split()
            if fields[0] == "@revoked" and len(fields) >= 4:
                revoked.add(fields[3])
            continue  # @cert-authority: host certificates are not supported; such hosts count as unknown
        try:
            entry = paramiko.hostkeys.HostKeyEntry.from_line(line, lineno)
        except (paramiko.SSHException, paramiko.hostkeys.InvalidHostKey):
            continue  # like OpenSSH, one bad line does not spoil the file
        if entry is not None:
            entries.append(entry)
    for entry in entries:
        if entry.key.get_base64() not in revoked:
            for name in entry.hostnames:
                keys.add(name, entry.key.get_name(), entry.key)
    return frozenset(revoked)


class _UnknownHostKey(paramiko.SSHException):  # type: ignore[misc]
    """The server's key is not in known_hosts (or is marked @revoked there), and will not be recorded."""

    def __init__(self, hostname: str, key: paramiko.PKey, *, revoked: bool = False) -> None:
        super().__init__(f"host key for {hostname} is {'revoked' if revoked else 'not known'}")
        self.hostname = hostname
        self.key = key
        self.revoked = revoked


class _RejectUnknownPolicy(paramiko.RejectPolicy):  # type: ignore[misc]
    """Reject unknown host keys, keeping the key so the error can show its fingerprint."""

    def __init__(self, revoked: frozenset[str] = frozenset()) -> None:
        self.revoked = revoked

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        log.debug("rejecting unknown %s host key for %s", key.get_name(), hostname)
        raise _UnknownHostKey(hostname, key, revoked=key.get_base64() in self.revoked)


class _AcceptNewPolicy(paramiko.MissingHostKeyPolicy):  # type: ignore[misc]
    """OpenSSH's StrictHostKeyChecking=accept-new: record unknown keys; changed or revoked keys still fail.

    The key is appended to the file rather than saved with `save_host_keys`, which rewrites the whole file
    and drops what paramiko cannot parse (comments, @cert-authority lines, key types it does not know).
    """

    def __init__(self, known_hosts: Path, revoked: frozenset[str] = frozenset()) -> None:
        self.known_hosts = known_hosts
        self.revoked = revoked

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        if key.get_base64() in self.revoked:
            raise _UnknownHostKey(hostname, key, revoked=True)
        line = f"{hostname} {key.get_name()} {key.get_base64()}\n"
        try:
            _append_known_host(self.known_hosts, line)
        except OSError as exc:
            raise paramiko.SSHException(
                f"cannot record the host key of {hostname} in {self.known_hosts}: {exc.strerror or exc}"
            ) from exc
        client.get_host_keys().add(hostname, key.get_name(), key)
        log.debug("recorded new %s host key for %s in %s", key.get_name(), hostname, self.known_hosts)


def _append_known_host(path: Path, line: str) -> None:
    with _known_hosts_lock:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "r+b") as f:
            size = f.seek(0, os.SEEK_END)
            if size:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    line = "\n" + line
            f.write(line.encode())


# --- turning failures into messages ------------------------------------------------------------------


def _describe_connect_failure(exc: BaseException, conn: Connection, settings: SshSettings) -> tuple[str, str]:
    """(what happened, how to fix it) for an exception raised while connecting."""
    host_key = _describe_host_key_failure(exc, conn, settings.known_hosts)
    if host_key is not None:
        return host_key
    target = _hostport(conn.host, conn.port)
    via = f" (via jump host {conn.gateway.host})" if isinstance(conn.gateway, Connection) else ""
    ssh_port = f"-p {conn.port} " if conn.port != _SSH_PORT else ""
    login = f"{conn.user}@{conn.original_host}"
    if isinstance(exc, paramiko.PasswordRequiredException):
        return (
            f"the private key for {conn.user}@{target}{via} needs a passphrase",
            "load it into ssh-agent first (`ssh-add <key>`); sparkctl never asks for passphrases",
        )
    if isinstance(exc, paramiko.AuthenticationException):
        return (
            f"authentication as {conn.user!r} failed on {target}{via}",
            f"check that `ssh {ssh_port}{login}` logs in without a password: load your key with `ssh-add`, "
            "or set ssh.user / ssh.identity_file in the inventory",
        )
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
        codes = {getattr(e, "errno", None) for e in exc.errors.values()}
        if errno.ECONNREFUSED in codes:
            return (
                f"connection refused by {target}{via}",
                "check that sshd runs on the host and listens on that port "
                "(ssh.port in the inventory, or Port in ~/.ssh/config)",
            )
        return (f"no route to {target}{via}", "check the address and this machine's network")
    if isinstance(exc, OSError) and exc.filename is not None and exc.filename in _key_files(conn):
        # paramiko opens the key only after the handshake: its OSError is about the file, not the network
        problem = "does not exist" if isinstance(exc, FileNotFoundError) else f"cannot be read: {exc.strerror or exc}"
        return (
            f"identity file {exc.filename} {problem} (ssh.identity_file)",
            "set ssh.identity_file in the inventory to your private key's path (e.g. ~/.ssh/id_ed25519), "
            "or remove it to log in with ssh-agent and ~/.ssh/config",
        )
    if isinstance(exc, socket.gaierror):
        return (
            f"cannot resolve {conn.host!r}{via}: {exc.strerror or exc}",
            "check the host's address in the inventory (or its HostName in ~/.ssh/config)",
        )
    if isinstance(exc, TimeoutError):
        return (
            f"no answer from {target}{via} within {settings.connect_timeout:g}s",
            "check that the host is powered on and reachable from here, or raise ssh.connect_timeout",
        )
    if isinstance(exc, OSError) and not isinstance(exc, paramiko.SSHException):
        return (f"cannot connect to {target}{via}: {exc.strerror or exc}", "check the address and network")
    return (
        f"SSH session with {target}{via} failed: {exc or type(exc).__name__}",
        f"run `ssh -v {ssh_port}{login} true` to see why",
    )


def _describe_host_key_failure(exc: BaseException, conn: Connection, known: str) -> tuple[str, str] | None:
    """(what happened, how to fix it) when the host's key is revoked, unknown or changed; None for any other
    failure."""
    if isinstance(exc, _UnknownHostKey) and exc.revoked:
        return (
            f"host key of {exc.hostname} ({_fingerprint(exc.key)}) is marked @revoked in {known}; refusing to connect",
            "the host must get a new key: ask whoever manages it, and check the host's identity",
        )
    if isinstance(exc, _UnknownHostKey):
        addr, port = _split_known_name(exc.hostname)
        scan_port = f"-p {port} " if port != _SSH_PORT else ""
        keyscan = f"ssh-keyscan -H {scan_port}{addr} >> {_shell_path(known)}"
        return (
            f"host key of {exc.hostname} is not in {known}; the host offers {_fingerprint(exc.key)}",
            "if that is the host's key (on the host: `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`), "
            f"re-run with --accept-new-host-keys, or record it with `{keyscan}`",
        )
    if isinstance(exc, paramiko.BadHostKeyException):
        name = _known_name(exc.hostname, _hop_port(conn, exc.hostname))
        return (
            f"host key of {name} has CHANGED: {known} has {_fingerprint(exc.expected_key)}, "
            f"the host offers {_fingerprint(exc.key)}; refusing to connect (the host may have been "
            "reinstalled, or someone may be intercepting the connection)",
            "if the host was reinstalled, verify the new key on its console, then remove the old one with "
            f"`ssh-keygen -R {shlex.quote(name)} -f {_shell_path(known)}` and connect again",
        )
    return None


def _key_files(conn: Connection) -> list[str]:
    """The private key files given to the connection (ssh.identity_file, expanded)."""
    return list(conn.connect_kwargs.get("key_filename") or [])


def _fingerprint(key: paramiko.PKey | None) -> str:
    """A key as OpenSSH shows it, e.g. 'ED25519 key SHA256:...'."""
    if key is None:
        return "no key"
    return f"{key.algorithm_name} key {key.fingerprint}"


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _known_name(host: str, port: int) -> str:
    """The name OpenSSH (and paramiko) file a host's key under in known_hosts."""
    return host if port == _SSH_PORT else f"[{host}]:{port}"


def _split_known_name(name: str) -> tuple[str, int]:
    if name.startswith("[") and "]:" in name:
        addr, _, port = name[1:].rpartition("]:")
        return addr, int(port)
    return name, _SSH_PORT


def _hop_port(conn: Connection, hostname: str) -> int:
    """The port of whichever hop (the host itself or a jump host) is called `hostname`."""
    hop: Any = conn
    while isinstance(hop, Connection):
        if hop.host == hostname:
            return int(hop.port)
        hop = hop.gateway
    return int(conn.port)


def _shell_path(path: str) -> str:
    """Quote a path for a shell command line, keeping a leading ~/ expandable."""
    if path.startswith("~/"):
        return "~/" + shlex.quote(path[2:])
    return shlex.quote(path)
