"""Looking at a plan: its ranked units (filtered), where they sit, and the gammas an export
would fold. What `aufold inspect` prints; no model is loaded."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aufold.errors import AufoldError
from aufold.plan import Plan, RankedUnit


@dataclass(frozen=True)
class PlanView:
    """The units of a plan that a filter keeps, in rank order, with their global ranks."""

    plan: Plan
    sites: tuple[str, ...]
    units: tuple[tuple[int, RankedUnit], ...]  # (rank from 1 over the chosen sites, unit)
    alpha: float | None = None  # with k: the units ranked <= k get gamma = alpha * signed score
    k: int | None = None

    def gamma(self, rank: int, unit: RankedUnit) -> float | None:
        if self.alpha is None or self.k is None or rank > self.k:
            return None
        return unit.gamma(self.alpha)

    def placement(self) -> dict[int, dict[str, int]]:
        """How many of the viewed units sit in each layer, per site (layers that hold any)."""
        table: dict[int, dict[str, int]] = {}
        for _, unit in self.units:
            row = table.setdefault(unit.layer, dict.fromkeys(self.sites, 0))
            row[unit.site] += 1
        return dict(sorted(table.items()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.plan.model, "num_pairs": self.plan.num_pairs, "sites": list(self.sites),
            "k": self.k, "alpha": self.alpha,
            "units": [{"rank": rank, **unit.to_record(), "gamma": self.gamma(rank, unit)}
                      for rank, unit in self.units],
            "placement": {str(layer): row for layer, row in self.placement().items()},
        }


def view_plan(plan: Plan, *, sites: Sequence[str] = (), layer: int | None = None,
              limit: int | None = 20, k: int | None = None, alpha: float | None = None) -> PlanView:
    """The top ``limit`` units of ``sites`` (all by default), optionally of one ``layer``.

    With ``k`` and ``alpha`` the view also gives the gammas that the edit (the top k of the
    same sites) folds; ``limit`` None lists every unit.
    """
    chosen = tuple(dict.fromkeys(sites)) or plan.sites
    if (k is None) != (alpha is None):
        raise AufoldError("give --k and --alpha together to see the gammas an export would fold")
    if k is not None and alpha is not None:
        plan.select(k, alpha, chosen, allow_extreme=True)  # checks k, alpha and the sites
    ranked = list(enumerate(plan.ranking(chosen), start=1))
    if layer is not None:
        layers = plan.counts[chosen[0]].positive.shape[0]
        if not 0 <= layer < layers:
            raise AufoldError(f"--layer {layer} is not a layer of this plan; it has layers 0 to "
                              f"{layers - 1}")
        ranked = [(rank, unit) for rank, unit in ranked if unit.layer == layer]
    if limit is not None:
        ranked = ranked[:limit]
    in_order = tuple(site for site in plan.sites if site in chosen)  # ranking() checked them
    return PlanView(plan, in_order, tuple(ranked), alpha, k)
