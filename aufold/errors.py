"""The one exception type that aufold raises for bad input."""

from __future__ import annotations


class AufoldError(Exception):
    """A problem with the user's input, with a message that names it and the fix.

    The command line turns it into a one-line error and exit code 2; anything
    else that escapes is a bug in aufold and keeps its traceback.
    """
