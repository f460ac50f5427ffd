"""The laptop's state: secrets and the journal under the XDG state dir; every directory 0700, every file 0600.

Nothing is ever left half-written: a secret file is written to a temporary file in its directory, flushed to disk,
then given its name in one step; a journal record is appended whole or taken back. A write that fails (a full disk,
a read-only filesystem) is a StateError naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
import time
from pathlib import Path
from typing import Any

from sparkctl.errors import Problem, SecretError, StateError

DIR_MODE = 0o700
FILE_MODE = 0o600


def state_home() -> Path:
    """$XDG_STATE_HOME/sparkctl (default ~/.local/state/sparkctl)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "sparkctl"


def private_dir(path: Path) -> Path:
    """`path` (inside the state dir) and every directory from the state dir down to it, 0700.

    `mkdir(parents=True, mode=...)` applies the mode to the last directory only, and the umask to all: each
    level is made and then set explicitly. Missing parents above the state dir are made 0700 too, as the XDG
    Base Directory spec asks of $XDG_STATE_HOME.
    """
    home = state_home()
    home.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    parts = path.relative_to(home).parts
    for level in [home, *(home.joinpath(*parts[: n + 1]) for n in range(len(parts)))]:
        level.mkdir(exist_ok=True, mode=DIR_MODE)
        if stat.S_IMODE(level.stat().st_mode) != DIR_MODE:
            level.chmod(DIR_MODE)
    return path


def _open_private(path: Path, flags: int) -> int:
    """Open (creating 0600) a file in the state dir; a file left wider by an older version is narrowed."""
    private_dir(path.parent)
    fd = os.open(path, flags, FILE_MODE)
    if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:
        os.fchmod(fd, FILE_MODE)
    return fd


def _private_file(path: Path, make: str) -> str:
    """Read a secret file, creating it 0600 (in 0700 dirs) with `make` if absent (or left empty by a failed write)."""
    try:
        try:
            fd = _open_private(path, os.O_RDONLY)
            with os.fdopen(fd) as f:
                value = f.read().strip()
            if value:
                return value
            _write_whole(path, make + "\n", replace=True)  # an empty secret is none: made anew
            return make
        except FileNotFoundError:
            if _write_whole(path, make + "\n"):
                return make
            return _private_file(path, make)  # another process made it meanwhile: that one counts
    except StateError:
        raise
    except OSError as exc:
        raise cannot_write(path, exc) from None


_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS}


def _write_whole(path: Path, text: str, *, replace: bool = False) -> bool:
    """Put `text` at `path` whole or not at all: written to a temporary 0600 file in the same directory, flushed to
    disk (fsync), then given its name in one step. Without `replace`, a file that exists is kept (False: another
    process made it first). A failed write (a full disk) leaves neither the file nor the temporary: StateError."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        private_dir(path.parent)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:
                os.fchmod(fd, FILE_MODE)
            _write_all(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # rename that never replaces a file made meanwhile
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno not in _NO_HARD_LINKS:
                    raise
                if path.exists():  # a filesystem without hard links: rename, unless the name is taken
                    return False
                os.replace(tmp, path)
        _sync_dir(path.parent)
    except OSError as exc:
        raise cannot_write(path, exc) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return True


def _write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a write may take fewer), or raise."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _sync_dir(path: Path) -> None:
    """Flush a directory's entries to disk, so that a new name survives a crash (best effort)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def cannot_write(path: Path, exc: OSError) -> StateError:
    """The error for a state file that could not be written: the path, the system's reason and the fix."""
    why = exc.strerror or str(exc)
    where = path.parent
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        hint = (
            f"free space on the filesystem of {where} (`df -h {where}`), or set XDG_STATE_HOME to a directory with room"
        )
    elif exc.errno == errno.EROFS:
        hint = f"{where} is on a read-only filesystem: set XDG_STATE_HOME to a writable directory"
    else:
        hint = f"check that you can write in {where} (`ls -ld {where}`)"
    return StateError([Problem(str(path), f"cannot write: {why}", hint)])


def _existing(path: Path) -> str | None:
    """A secret file's value, or None if there is none (creating nothing)."""
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def refuse_exposed(path: str | Path, what: str) -> None:
    """Refuse a secret file (a key, a password) that others may read, as OpenSSH refuses such a private key.

    Same rule as OpenSSH's sshkey_perm_ok() (openssh-portable authfile.c, $OpenBSD: authfile.c,v 1.145): a file
    owned by the user with any group/other permission bit (`st_mode & 077`) is "too open"; files of other owners
    are not checked.
    """
    full = Path(path).expanduser()
    try:
        st = full.stat()
    except OSError:
        return  # absent or unreadable: reported where it is used
    if st.st_uid == os.getuid() and st.st_mode & 0o077:
        raise SecretError(
            [
                Problem(
                    f"{what} {path}",
                    f"permissions {stat.S_IMODE(st.st_mode):04o} are too open: others can read this secret",
                    f"chmod 600 {full}",
                )
            ]
        )


def check_private_key(path: str | Path, what: str, fix: str) -> None:
    """A private key file sparkctl hands to SSH: a file that exists (`fix` says how to name another), not readable
    by others (refuse_exposed)."""
    full = Path(path).expanduser()
    if not full.is_file():
        found = "is a directory, not a private key" if full.is_dir() else "no such file"
        raise SecretError([Problem(f"{what} {path}", found, fix)])
    refuse_exposed(path, what)


def ray_token(cluster: str, *, create: bool = True) -> str | None:
    """The cluster's Ray auth token, generated once; with create=False None when there is none yet."""
    path = state_home() / cluster / "ray-token"
    return _private_file(path, secrets.token_hex(32)) if create else _existing(path)


def peer_key(cluster: str, *, create: bool = True) -> tuple[str, str] | None:
    """The cluster's peer key (one Spark copying an image to another): (private key in OpenSSH format, public key
    line `ssh-ed25519 <base64> sparkctl-peer-<cluster>`), made once and kept 0600; None if absent and not created."""
    private, public = state_home() / cluster / "peer-key", state_home() / cluster / "peer-key.pub"
    have = _existing(private), _existing(public)
    if have[0] is not None and have[1] is not None:
        return have[0], have[1]
    if not create:
        return None
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    for path in (private, public):
        path.unlink(missing_ok=True)  # a half pair (one file lost) is made anew, both files together
    return _private_file(private, pem.strip()), _private_file(public, f"{line} sparkctl-peer-{cluster}")


def api_key(cluster: str, workload: str, env_var: str | None, *, create: bool = True) -> str | None:
    """A workload's API key: from the named env var, else generated once and kept 0600 (None if absent and
    create=False: read-only commands never make secrets)."""
    if env_var and os.environ.get(env_var):
        return os.environ[env_var]
    path = state_home() / cluster / f"api-key-{workload}"
    return _private_file(path, "sk-" + secrets.token_urlsafe(24)) if create else _existing(path)


def journal_path() -> Path:
    return state_home() / "journal.jsonl"


def append_journal(record: dict[str, Any]) -> None:
    """Append one run's record (secrets already redacted by the caller), whole or not at all.

    Appended in place (O_APPEND), not rewritten through a temporary file: appends of runs ending at once (of other
    clusters, from other terminals) never lose one another, and a run's cost does not grow with the journal. A
    record that cannot be written whole is cut off again, so no half line stays to swallow the next record;
    StateError names the path.
    """
    path = journal_path()
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    try:
        fd = _open_private(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            end = os.fstat(fd).st_size
            try:
                _write_all(fd, line)
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, end)
                raise
        finally:
            os.close(fd)
    except OSError as exc:
        raise cannot_write(path, exc) from None


def read_journal() -> list[dict[str, Any]]:
    """Every recorded run, oldest first (unreadable lines skipped)."""
    try:
        lines = journal_path().read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
