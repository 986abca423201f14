"""SIGTERM (and SIGHUP) end a command the way Ctrl-C does: every ``finally`` and context
manager runs, so partial outputs are removed and locks released before the exit."""

from __future__ import annotations

import signal
from types import FrameType


class Terminated(BaseException):
    """Raised in the main thread when the process is asked to stop by a signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention for a death by signal


def _raise_terminated(signum: int, _frame: FrameType | None) -> None:
    raise Terminated(signum)


def stop_cleanly_on_terminate() -> None:
    """Install the handlers; call once from the command line's entry point."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_terminated)
