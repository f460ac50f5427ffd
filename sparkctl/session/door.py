"""The one door to the hosts: every command that reaches a host gets its session here.

`open_session` checks the laptop's files first (key files exist and only their owner reads them, as ssh demands;
the sudo password file likewise; known_hosts is a file), then connects through `CONNECTOR` with strict host keys
and probes every host. `unlock`, `discover`, `status --watch` and the runs of runbooks (`session/run.py`) all
come through here, so a refusal that protects one command protects them all.

Tests replace the network in one place: the `connector` fixture (tests/unit/conftest.py) sets `CONNECTOR`.
"""

from __future__ import annotations

from collections.abc import Callable

from sparkctl import state
from sparkctl.errors import HostError, Problem, Unreachable
from sparkctl.execute.base import Connect, Endpoint, Transport
from sparkctl.inventory.models import Inventory, SshSettings
from sparkctl.session.discovery import Discovery, targets_of
from sparkctl.session.laptop import check_laptop_files
from sparkctl.session.report import Event
from sparkctl.session.session import Session, silent


def ssh_connect(accept_new_host_keys: bool) -> Connect:
    """The real connector: OpenSSH over Fabric with strict host keys (imports Fabric only when called)."""

    def connect(host: Endpoint, settings: SshSettings) -> Transport:
        from sparkctl.execute import ssh  # noqa: TID251 - the one place that builds the real connector

        return ssh.connect(host, settings, accept_new_host_keys=accept_new_host_keys)

    return connect


CONNECTOR: Callable[[bool], Connect] = ssh_connect
"""What builds the connector (given `--accept-new-host-keys`): the seam tests replace."""


def _no_connection(host: Endpoint, settings: SshSettings) -> Transport:
    raise HostError([Problem(host.name, "this command talks to the workloads' endpoints only, not over SSH")])


def session_for(inv: Inventory, accept_new_host_keys: bool, emit: Callable[[Event], None] | None = None) -> Session:
    """A session for `inv`, not connected yet (the caller opens it: with the cluster lock, or partial); the
    laptop's files are checked first."""
    check_laptop_files(inv)
    return Session(inv, CONNECTOR(accept_new_host_keys), emit=emit or silent)


def open_session(
    inv: Inventory,
    accept_new_host_keys: bool,
    emit: Callable[[Event], None] | None = None,
    *,
    partial: bool = False,
) -> Session:
    """Check the laptop's files, connect to and probe every host (one SSH connection each, in parallel).

    With `partial` (read-only commands), the session goes on with the hosts it reached and names the others in
    `unreachable`; only when no host answers does it raise Unreachable.
    """
    session = session_for(inv, accept_new_host_keys, emit)
    session.open(partial=partial)
    if partial and not session.facts:
        problems = session.unreachable_problems()
        session.close()
        raise Unreachable(problems, hint="nothing was changed on any host")
    return session


def endpoint_session(inv: Inventory) -> Session:
    """A session that talks HTTP to the workloads' endpoints only (`ask`): it connects to no host."""
    return Session(inv, _no_connection)


def open_discovery(addresses: list[str], settings: SshSettings, accept_new_host_keys: bool) -> Discovery:
    """A Discovery (hosts without an inventory yet) over the same connector; bad addresses and an exposed key file
    are refused first."""
    targets_of(addresses)
    if settings.identity_file:
        state.refuse_exposed(settings.identity_file, "--identity-file")
    return Discovery(addresses, settings, CONNECTOR(accept_new_host_keys))
