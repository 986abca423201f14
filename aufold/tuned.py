"""The choice recorded by `aufold tune`, read back as a selection of a plan's units.

``tune.json`` (written by :mod:`aufold.tune`) names its plan folder (relative to
the file's own folder when the sweep localized it) and the chosen site, k and
alpha, so ``export``, ``eval`` and friends can take ``--tuned tune.json`` in place of
``--plan/--k/--alpha/--site`` (:mod:`aufold.recipe`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from aufold.errors import AufoldError, expanded

TUNE_FILE = "tune.json"
TUNE_FORMAT = "aufold-tune"


@dataclass(frozen=True)
class Selection:
    """A plan folder and the (k, alpha, sites) that select an edit from it."""

    plan_dir: Path
    k: int
    alpha: float
    sites: tuple[str, ...] | None = None  # None: every site of the plan


def read_tuned(path: str | Path) -> Selection:
    """The best configuration recorded in a tune result (the file, or the folder holding it)."""
    file = expanded(Path(path), "--tuned")
    if file.is_dir():
        file = file / TUNE_FILE
    if not file.is_file():
        raise AufoldError(f"tune result not found: {file}; pass the {TUNE_FILE} written by "
                          f"`aufold tune`")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        if data.get("format") != TUNE_FORMAT:
            raise KeyError("format")
        best, plan = data["best"], Path(data["plan"])
        if type(best["k"]) is not int:  # 2.9 must not quietly become 2
            raise TypeError(f"k must be an integer, got {best['k']!r}")
        selection = Selection(plan if plan.is_absolute() else file.parent / plan,
                              best["k"], float(best["alpha"]), (str(best["site"]),))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError,
            OverflowError, UnicodeDecodeError, OSError) as error:
        raise AufoldError(f"{file} is not a tune result of aufold ({type(error).__name__}: "
                          f"{error}); run `aufold tune` again") from None
    return selection
