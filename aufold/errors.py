"""The one exception type that aufold raises for bad input."""

from __future__ import annotations

from pathlib import Path


class AufoldError(Exception):
    """A problem with the user's input, with a message that names it and the fix.

    The command line turns it into a one-line error and exit code 2; anything
    else that escapes is a bug in aufold and keeps its traceback.
    """


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (library errors can run to many lines)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def expanded(path: Path, what: str = "the path") -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded, refused in one line if it cannot be."""
    try:
        return path.expanduser()
    except RuntimeError:
        raise AufoldError(f"{what}: cannot expand {path} (no such user or home folder); give the "
                          f"path without ~") from None
