"""Which edit to apply: a plan with k and alpha, or the choice recorded by `aufold tune`.

``tune.json`` (written by :mod:`aufold.tune`) names its plan folder (relative to
the file's own folder when the sweep localized it) and the chosen site, k and
alpha, so ``export``, ``eval`` and friends can take ``--tuned tune.json`` in place of
``--plan/--k/--alpha/--site``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from aufold.errors import AufoldError

TUNE_FILE = "tune.json"
TUNE_FORMAT = "aufold-tune"


@dataclass(frozen=True)
class Selection:
    """A plan folder and the (k, alpha, sites) that select an edit from it."""

    plan_dir: Path
    k: int
    alpha: float
    sites: tuple[str, ...] | None = None  # None: every site of the plan
    allow_extreme: bool = False  # scale factors beyond aufold.safety.limits.MAX_SCALE

    def describe(self) -> dict[str, object]:
        return {"plan": str(self.plan_dir), "k": self.k, "alpha": self.alpha,
                "sites": list(self.sites) if self.sites else None}


def read_tuned(path: str | Path) -> Selection:
    """The best configuration recorded in a tune result (the file, or the folder holding it)."""
    file = Path(path).expanduser()
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


def resolve_selection(*, plan_dir: Path | None, k: int | None, alpha: float | None,
                      sites: Sequence[str] = (), tuned: Path | None = None,
                      required: bool = False, allow_extreme: bool = False) -> Selection | None:
    """The edit the options ask for: ``--tuned`` or ``--plan`` with ``--k`` and ``--alpha``.

    Returns None when none of them is given and ``required`` is false (no steering).
    """
    manual = plan_dir is not None or k is not None or alpha is not None
    if tuned is not None:
        if manual or sites:
            raise AufoldError("give either --tuned or --plan/--k/--alpha/--site, not both; "
                              "--tuned already names the plan, site, k and alpha")
        return replace(read_tuned(tuned), allow_extreme=allow_extreme)
    if not manual:
        if sites:
            raise AufoldError("--site selects units of a plan; give --plan, --k and --alpha too")
        if required:
            raise AufoldError("no edit given; pass --plan with --k and --alpha, or --tuned "
                              "with the tune.json of `aufold tune`")
        return None
    missing = [name for name, value in (("--plan", plan_dir), ("--k", k), ("--alpha", alpha))
               if value is None]
    if missing:
        raise AufoldError(f"steering needs --plan, --k and --alpha together; missing "
                          f"{', '.join(missing)}")
    assert plan_dir is not None and k is not None and alpha is not None
    return Selection(plan_dir, k, alpha, tuple(sites) or None, allow_extreme)
