"""Ctrl-C, SIGTERM and SIGHUP: the first interrupts the run; the cleanup after it cannot be interrupted.

The first signal raises KeyboardInterrupt in the main thread (the run stops at its next safe point and cleans
up). Every later one is refused with a message, except that the third signal in all force-quits the process,
after a warning of what may be left behind. sparkctl installs these handlers itself, whatever disposition it
inherited: a job started in the background of a non-interactive shell inherits SIGINT ignored (POSIX, "Shell
Command Language" 2.11, asynchronous lists), and Python leaves an ignored SIGINT ignored at startup.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from types import FrameType
from typing import NoReturn

from sparkctl.errors import EXIT_INTERRUPTED

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
FORCE_QUIT_AT = 3
"""The signal (counting from the first) that force-quits instead of being refused."""


def _write_stderr(text: str) -> None:
    # os.write, not sys.stderr: a handler may run while the main thread is inside a write to sys.stderr.
    with contextlib.suppress(OSError):
        os.write(2, (text + "\n").encode("utf-8", "replace"))


def _hard_exit(code: int) -> NoReturn:
    os._exit(code)


class Interrupts:
    """The signal policy of one sparkctl process (the CLI installs one; tests drive `handle` directly)."""

    def __init__(
        self,
        say: Callable[[str], None] = _write_stderr,
        hard_exit: Callable[[int], NoReturn] = _hard_exit,
    ) -> None:
        self.say = say
        self.hard_exit = hard_exit
        self.count = 0
        self.first = ""
        self.cleanup = "finishing the commands under way"
        """What the process does after the first signal (said when a later one is refused)."""
        self.left_behind: Callable[[], str] = lambda: "the commands under way may not have finished"
        """What a force quit would leave behind (asked only when it happens)."""
        self.before_exit: list[Callable[[], None]] = []
        self._shield = 0

    @property
    def interrupted(self) -> bool:
        return self.count > 0

    def install(self) -> None:
        """Handle SIGINT, SIGTERM and SIGHUP here, replacing whatever was inherited (SIG_IGN included)."""
        for sig in SIGNALS:
            signal.signal(sig, self.handle)

    @contextlib.contextmanager
    def shielded(self, doing: str) -> Iterator[None]:
        """A stretch that must finish (the cleanup, releasing the lock): even a first signal does not raise here."""
        previous = self.cleanup
        self.cleanup = doing
        self._shield += 1
        try:
            yield
        finally:
            self._shield -= 1
            self.cleanup = previous

    def handle(self, signum: int, frame: FrameType | None = None) -> None:
        """The handler: raise KeyboardInterrupt the first time; refuse, then force-quit, after that."""
        name = signal.Signals(signum).name
        self.count += 1
        if self.count == 1:
            self.first = name
            if self._shield:
                self.say(f"{name}: interrupted; {self.cleanup} first (this cannot be interrupted)")
                return
            self.say(
                f"{name}: interrupted; stopping at the next safe point and cleaning up. The cleanup cannot be "
                "interrupted (a third Ctrl-C force-quits)"
            )
            raise KeyboardInterrupt
        if self.count < FORCE_QUIT_AT:
            self.say(
                f"{name}: still {self.cleanup}; this cannot be interrupted. Press Ctrl-C once more to force quit "
                "(leaves things half-done)"
            )
            return
        self.say(f"warning: force quit ({name}): {self.left_behind()}")
        for fn in self.before_exit:
            with contextlib.suppress(Exception):
                fn()
        self.hard_exit(EXIT_INTERRUPTED)


INTERRUPTS = Interrupts()
"""The process's policy; `main()` installs it."""
