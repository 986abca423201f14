"""Progress bars and status lines on stderr, silenced by ``--quiet``.

Every step that can take more than a few seconds shows a bar with counts (localize,
eval, the tune sweep, export shards, verify passes, generated tokens) or a status line.
Both go to stderr, so stdout stays clean for ``--json`` and scripts.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")
_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence (or restore) aufold's bars and status lines for this process."""
    global _quiet
    _quiet = quiet


def bar(iterable: Iterable[T] | None = None, *, desc: str, unit: str, total: int | None = None,
        enabled: bool = True, **options: Any) -> Any:
    """A tqdm bar on stderr, off under ``--quiet`` or when ``enabled`` is false."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit=unit, total=total, disable=_quiet or not enabled,
                file=sys.stderr, **options)


def status(message: str) -> None:
    """One line about what runs now, unless ``--quiet``."""
    if not _quiet:
        print(message, file=sys.stderr, flush=True)

