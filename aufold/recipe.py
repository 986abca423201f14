"""Which edit to apply: one plan's top k units, or several plans' edits composed (a recipe).

A :class:`Component` is one plan with the choice of its units: the top ``k`` of some of
its sites, at strength ``alpha``. A :class:`Recipe` applies its components one after
another (:meth:`aufold.edit.Edit.compose`): a unit that two components steer is scaled
by both factors. Every command that takes an edit takes a recipe: ``--plan A --k 16
--alpha 5 --plan B --k 8 --alpha 10``, several ``--tuned`` files, or a recipe file
(JSON or YAML, in the manner of mergekit)::

    components:
      - plan: plans/copa        # a plan folder, relative to this file's folder
        k: 16
        alpha: 5
        sites: [mlp]            # optional: every site of the plan
      - tuned: runs/boolq/tune.json   # or the choice recorded by `aufold tune`
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from aufold.edit import Edit
from aufold.errors import AufoldError, expanded, first_line
from aufold.plan import Plan, RankedUnit
from aufold.safety.limits import check_scale_factors
from aufold.sites import SITE_ORDER, site_kind
from aufold.tuned import Selection, read_tuned

RECIPE_SUFFIXES = (".json", ".yaml", ".yml")


@dataclass(frozen=True)
class Component:
    """One plan and the choice of its units: the top ``k`` of ``sites``, gamma = alpha x score."""

    plan: Plan
    k: int
    alpha: float
    sites: tuple[str, ...]
    source: Path | None = None  # the plan folder it was read from

    def __post_init__(self) -> None:
        for site in self.sites:
            site_kind(site)  # an unknown name is refused here, before any ranking

    def edit(self, *, allow_extreme: bool = False) -> Edit:
        return self.plan.select(self.k, self.alpha, self.sites, allow_extreme=allow_extreme)

    def units(self) -> list[RankedUnit]:
        """The chosen units with their counts, best first."""
        return self.plan.ranking(self.sites, self.k)

    def describe(self) -> dict[str, Any]:
        return {"plan": str(self.source) if self.source else self.plan.model, "k": self.k,
                "alpha": self.alpha, "sites": list(self.sites)}


@dataclass(frozen=True)
class Recipe:
    """Components applied one after another; a recipe of one is a plain AUSteer edit."""

    components: tuple[Component, ...]
    allow_extreme: bool = False  # scale factors beyond aufold.safety.limits.MAX_SCALE

    def __post_init__(self) -> None:
        if not self.components:
            raise AufoldError("a recipe needs at least one component (a plan with k and alpha)")

    @classmethod
    def single(cls, plan: Plan | str | Path, k: int, alpha: float,
               sites: Sequence[str] | None = None, *, allow_extreme: bool = False) -> Recipe:
        """The top ``k`` units of one plan (a Plan, or its folder)."""
        source = None if isinstance(plan, Plan) else Path(plan)
        loaded = plan if isinstance(plan, Plan) else Plan.load(plan)
        chosen = loaded.sites if sites is None else tuple(sites)
        return cls((Component(loaded, k, alpha, chosen, source),), allow_extreme)

    @property
    def composed(self) -> bool:
        return len(self.components) > 1

    @property
    def sites(self) -> tuple[str, ...]:
        """Every site a component steers, in table order."""
        return tuple(sorted({s for c in self.components for s in c.sites}, key=SITE_ORDER.__getitem__))

    @property
    def plan_dirs(self) -> list[Path]:
        return [c.source for c in self.components if c.source is not None]

    def edit(self) -> Edit:
        """The composed edit; each component's k, alpha and sites are checked, and so is
        every product of factors a shared unit gets."""
        edits = []
        for number, component in enumerate(self.components, 1):
            with self._naming(number, component):
                edits.append(component.edit(allow_extreme=self.allow_extreme))
        edit = Edit.compose(edits)
        if self.composed:
            check_scale_factors(((f"{u.site} layer {u.layer} unit {u.unit}", 1.0 + u.gamma)
                                 for u in edit.units), allow_extreme=self.allow_extreme,
                                what="product of a unit's scale factors over the components",
                                fix="lower the alphas")
        return edit

    def check_fingerprint(self, fingerprint: str, *, force: bool = False) -> None:
        """Refuse a model that any component's plan was not made for, unless forced."""
        for number, component in enumerate(self.components, 1):
            with self._naming(number, component):
                component.plan.check_fingerprint(fingerprint, force=force)

    @contextmanager
    def _naming(self, number: int, component: Component) -> Iterator[None]:
        """Prefix an error of a composed recipe's component with which one it is."""
        try:
            yield
        except AufoldError as error:
            if not self.composed:
                raise
            raise AufoldError(f"component {number} ({component.describe()['plan']}): "
                              f"{error}") from None

    def label(self) -> str:
        """How the command line names the edit: "k=16, alpha=5", joined by " + "."""
        return " + ".join(f"k={c.k}, alpha={c.alpha:g}" for c in self.components)

    def describe(self) -> dict[str, Any] | list[dict[str, Any]]:
        """For reports: one component's choice, or the list of them."""
        described = [c.describe() for c in self.components]
        return described if self.composed else described[0]


def as_recipe(edit: Plan | str | Path | Recipe, k: int | None = None, alpha: float | None = None,
              sites: Sequence[str] | None = None, *, allow_extreme: bool = False) -> Recipe:
    """What library functions take as their edit: a recipe as given, or one plan (a Plan or
    its folder) with ``k`` and ``alpha`` (and optionally ``sites``)."""
    if isinstance(edit, Recipe):
        if k is not None or alpha is not None or sites is not None:
            raise AufoldError("a recipe names the k, alpha and sites of each component; do not "
                              "pass them beside it")
        return replace(edit, allow_extreme=edit.allow_extreme or allow_extreme)
    if k is None or alpha is None:
        raise AufoldError("a plan selects an edit with k and alpha; pass both")
    return Recipe.single(edit, k, alpha, sites, allow_extreme=allow_extreme)


def load_recipe(selections: Sequence[Selection], *, allow_extreme: bool = False) -> Recipe:
    """The plans of ``selections`` read, as one recipe."""
    components = []
    for number, selection in enumerate(selections, 1):
        try:
            plan = Plan.load(selection.plan_dir)
        except AufoldError as error:
            if len(selections) == 1:
                raise
            raise AufoldError(f"component {number}: {error}") from None
        sites = selection.sites if selection.sites else plan.sites
        components.append(Component(plan, selection.k, selection.alpha, tuple(sites),
                                    selection.plan_dir))
    return Recipe(tuple(components), allow_extreme)


def read_recipe(path: str | Path) -> list[Selection]:
    """The components a recipe file lists (plan paths relative to the file's folder)."""
    file = expanded(Path(path), "--recipe")
    if file.suffix.lower() not in RECIPE_SUFFIXES:
        raise AufoldError(f"recipe {file} must be a .json, .yaml or .yml file")
    if not file.is_file():
        raise AufoldError(f"recipe not found: {file}; give the path of a recipe file")
    try:
        text = file.read_text(encoding="utf-8")
        if file.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml  # installed with transformers

            data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise AufoldError(f"recipe {file} cannot be read ({type(error).__name__}: "
                          f"{first_line(error)})") from None
    except Exception as error:  # yaml.YAMLError, without importing yaml for JSON recipes
        raise AufoldError(f"recipe {file} is not valid YAML ({first_line(error)})") from None
    entries = data.get("components") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise AufoldError(f"recipe {file} needs a non-empty list `components:`, each with "
                          f"plan, k and alpha (and optionally sites), or tuned")
    return [_component(entry, number, file) for number, entry in enumerate(entries, 1)]


def _component(entry: Any, number: int, file: Path) -> Selection:
    where = f"component {number} of recipe {file}"
    if not isinstance(entry, dict):
        raise AufoldError(f"{where} must be a mapping with plan, k and alpha, or tuned")
    unknown = set(entry) - {"plan", "k", "alpha", "sites", "tuned"}
    if unknown:
        raise AufoldError(f"{where} has unknown keys {', '.join(sorted(map(str, unknown)))}; "
                          f"use plan, k, alpha and sites, or tuned")
    if "tuned" in entry:
        if set(entry) != {"tuned"}:
            raise AufoldError(f"{where} gives tuned with other keys; tuned already names the "
                              f"plan, site, k and alpha")
        return read_tuned(_relative(entry["tuned"], file, where))
    missing = [key for key in ("plan", "k", "alpha") if key not in entry]
    if missing:
        raise AufoldError(f"{where} lacks {', '.join(missing)}")
    k, alpha, sites = entry["k"], entry["alpha"], entry.get("sites")
    if type(k) is not int:
        raise AufoldError(f"{where}: k must be an integer, got {k!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise AufoldError(f"{where}: alpha must be a number, got {alpha!r}")
    try:
        alpha = float(alpha)
    except OverflowError:
        raise AufoldError(f"{where}: alpha must be a finite number") from None
    if isinstance(sites, str):
        sites = [sites]
    if sites is not None and (not isinstance(sites, list) or not sites or any(
            not isinstance(s, str) or s not in SITE_ORDER for s in sites)):
        raise AufoldError(f"{where}: sites must be a list of {', '.join(SITE_ORDER)}, got "
                          f"{sites!r}")
    return Selection(_relative(entry["plan"], file, where), k, alpha,
                     tuple(sites) if sites else None)


def _relative(value: Any, file: Path, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise AufoldError(f"{where}: a path must be a non-empty string, got {value!r}")
    path = expanded(Path(value), where)
    return path if path.is_absolute() else file.parent / path




def resolve_recipe(*, plan_dirs: Sequence[Path] = (), ks: Sequence[int] = (),
                   alphas: Sequence[float] = (), sites: Sequence[str] = (),
                   tuned: Sequence[Path] = (), recipe: Path | None = None,
                   required: bool = False, allow_extreme: bool = False) -> Recipe | None:
    """The edit the command-line options ask for, read and checked; None for no steering
    (unless ``required``).

    Exactly one way is given: ``--plan`` with ``--k`` and ``--alpha`` (one of each per plan,
    or one for all; ``--site`` applies to every plan), ``--tuned`` (repeatable), or
    ``--recipe``. Several components compose, in the order given.
    """
    manual = bool(plan_dirs or ks or alphas)
    ways = [name for name, given in (("--plan/--k/--alpha", manual), ("--tuned", bool(tuned)),
                                     ("--recipe", recipe is not None)) if given]
    if len(ways) > 1:
        raise AufoldError(f"give one of --plan/--k/--alpha, --tuned or --recipe, not "
                          f"{' and '.join(ways)}; a recipe file can list plans and tune results")
    if sites and not manual:
        raise AufoldError("--site selects units of a plan given by --plan; with --tuned or "
                          "--recipe the site is named there")
    if not ways:
        if required:
            raise AufoldError("no edit given; pass --plan with --k and --alpha, --tuned with the "
                              "tune.json of `aufold tune`, or --recipe")
        return None
    if recipe is not None:
        selections = read_recipe(recipe)
    elif tuned:
        selections = [read_tuned(file) for file in tuned]
    else:
        selections = _manual(plan_dirs, ks, alphas, sites)
    return load_recipe(selections, allow_extreme=allow_extreme)


def _manual(plan_dirs: Sequence[Path], ks: Sequence[int], alphas: Sequence[float],
            sites: Sequence[str]) -> list[Selection]:
    missing = [name for name, values in (("--plan", plan_dirs), ("--k", ks), ("--alpha", alphas))
               if not values]
    if missing:
        raise AufoldError(f"steering needs --plan, --k and --alpha together; missing "
                          f"{', '.join(missing)}")
    count = len(plan_dirs)
    for name, values in (("--k", ks), ("--alpha", alphas)):
        if len(values) not in (1, count):
            raise AufoldError(f"{len(values)} values of {name} for {count} plans; give one per "
                              f"--plan, in the same order, or one for all")
    return [Selection(plan_dir, ks[i if len(ks) > 1 else 0], alphas[i if len(alphas) > 1 else 0],
                      tuple(sites) or None)
            for i, plan_dir in enumerate(plan_dirs)]
