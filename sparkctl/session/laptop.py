"""The laptop's files a run uses, checked before any connection. Light on purpose: offline plans check them too,
and load neither SSH nor the engine."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from sparkctl import state
from sparkctl.errors import InputError, Problem, SparkctlError

if TYPE_CHECKING:
    from sparkctl.inventory.models import Inventory


def check_laptop_files(inv: Inventory) -> None:
    """The laptop's files a run uses, before any connection (and in offline plans, which would run the same):
    key files exist and others cannot read them (as ssh refuses such a key), nor the sudo password file;
    known_hosts, if it exists, is a file."""
    problems: list[Problem] = []
    keys = {inv.ssh.identity_file, *(h.ssh.identity_file for h in inv.hosts)} - {None}
    fix = (
        "set ssh.identity_file in the inventory to your private key (e.g. ~/.ssh/id_ed25519), "
        "or remove it to log in with ssh-agent and ~/.ssh/config"
    )
    for key in sorted(k for k in keys if k):
        with _collect(problems):
            state.check_private_key(key, "ssh.identity_file", fix)
    if inv.sudo.password_file:
        with _collect(problems):
            state.refuse_exposed(inv.sudo.password_file, "sudo.password_file")
    known = inv.ssh.known_hosts
    if Path(known).expanduser().is_dir():
        fix_known = "set ssh.known_hosts to a file, e.g. ~/.ssh/known_hosts"
        problems.append(Problem(f"ssh.known_hosts {known}", "is a directory", fix_known))
    if problems:
        raise InputError(problems)


@contextlib.contextmanager
def _collect(problems: list[Problem]) -> Iterator[None]:
    try:
        yield
    except SparkctlError as exc:
        problems += exc.problems
