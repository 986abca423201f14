"""The Edit: which units to steer and by how much; the value every realization consumes.

Hooks (:mod:`aufold.steer`), the weight fold (:mod:`aufold.fold`) and any later
format all take an :class:`Edit`, so they can be tested against each other.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from aufold.errors import AufoldError
from aufold.sites import SITE_ORDER, site_kind


@dataclass(frozen=True)
class SteeredUnit:
    """One atomic unit and its steering strength: ``x <- x + gamma * x``."""

    site: str
    layer: int
    unit: int
    gamma: float


@dataclass(frozen=True)
class UnitGroup:
    """The units of one site in one layer, ready to scale a tensor along one axis.

    ``scale`` is ``1 + gamma`` rounded once to float32: hooks and folds multiply by
    this same tensor, so the two realizations agree to the rounding of the product.
    """

    site: str
    layer: int
    index: torch.Tensor  # int64, ascending unit indices
    scale: torch.Tensor  # float32, one factor per index


@dataclass(frozen=True)
class Edit:
    """An immutable set of steered units, at most one entry per (site, layer, unit).

    A composed edit (:meth:`compose`) also keeps its ``parts``, the edits it applies one
    after another. Hooks and folds apply the parts in order, each rounded as it would be
    alone, so a composed edit folded once equals its parts folded one after the other,
    bitwise. Its own ``units`` are the union of the parts', a unit in several parts with the
    product of their factors: what a realization that holds one factor per unit (a LoRA or
    IA3 adapter, a GGUF block scale) applies.
    """

    units: tuple[SteeredUnit, ...]
    parts: tuple[Edit, ...] = ()

    def __post_init__(self) -> None:
        seen: set[tuple[str, int, int]] = set()
        for unit in self.units:
            site_kind(unit.site)
            if not math.isfinite(unit.gamma):
                raise AufoldError(f"gamma of {unit} is not finite; use a finite alpha")
            key = (unit.site, unit.layer, unit.unit)
            if key in seen:
                raise AufoldError(f"unit {key} appears twice in one edit")
            seen.add(key)
        # The checks of hooks and folds read the units and apply the parts: they must agree.
        if self.parts and (any(part.parts for part in self.parts)
                           or self.units != _product_units(self.parts)):
            raise AufoldError("a composed edit's units must be its parts' product; build it "
                              "with Edit.compose")

    @classmethod
    def of(cls, units: Iterable[SteeredUnit]) -> Edit:
        return cls(tuple(units))

    @classmethod
    def compose(cls, edits: Sequence[Edit]) -> Edit:
        """The edits applied one after another: a unit steered by several multiplies their
        factors ``(1 + gamma_a)(1 + gamma_b)``, which hooks and folds realize exactly."""
        steps = tuple(step for edit in edits for step in edit.steps())
        if not steps:
            raise AufoldError("nothing to compose; give at least one edit")
        if len(steps) == 1:
            return steps[0]
        return cls(_product_units(steps), steps)

    def steps(self) -> tuple[Edit, ...]:
        """The edits hooks and folds apply in order: a composed edit's parts, else itself."""
        return self.parts or (self,)

    @property
    def sites(self) -> tuple[str, ...]:
        """The sites this edit touches, in table order."""
        return tuple(sorted({unit.site for unit in self.units}, key=SITE_ORDER.__getitem__))

    def __len__(self) -> int:
        return len(self.units)

    def groups(self) -> Iterator[UnitGroup]:
        """The units grouped by (site, layer), in table order then layer order."""
        grouped: dict[tuple[str, int], list[SteeredUnit]] = {}
        for unit in self.units:
            grouped.setdefault((unit.site, unit.layer), []).append(unit)
        for site, layer in sorted(grouped, key=lambda key: (SITE_ORDER[key[0]], key[1])):
            members = sorted(grouped[site, layer], key=lambda unit: unit.unit)
            yield UnitGroup(
                site=site,
                layer=layer,
                index=torch.tensor([unit.unit for unit in members], dtype=torch.int64),
                scale=torch.tensor([1.0 + unit.gamma for unit in members], dtype=torch.float32),
            )

    def to_records(self) -> list[dict[str, object]]:
        return [{"site": u.site, "layer": u.layer, "unit": u.unit, "gamma": u.gamma}
                for u in self.units]

    @classmethod
    def from_records(cls, records: Iterable[dict[str, object]]) -> Edit:
        return cls.of(SteeredUnit(str(r["site"]), int(r["layer"]), int(r["unit"]),  # type: ignore[arg-type]
                                  float(r["gamma"])) for r in records)  # type: ignore[arg-type]


def _product_units(steps: Sequence[Edit]) -> tuple[SteeredUnit, ...]:
    """The union of the steps' units, each with the product of its factors, in first-seen order."""
    factors: dict[tuple[str, int, int], float] = {}
    for step in steps:
        for unit in step.units:
            key = (unit.site, unit.layer, unit.unit)
            factors[key] = factors.get(key, 1.0) * (1.0 + unit.gamma)
    return tuple(SteeredUnit(site, layer, unit, factor - 1.0)
                 for (site, layer, unit), factor in factors.items())


def scaled(values: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``values * factor`` computed in (at least) float32 and rounded once to ``values.dtype``.

    Hooks and folds both go through here, like PEFT's IA3, so a steered activation
    and a folded weight are each rounded exactly once.
    """
    compute = torch.promote_types(values.dtype, torch.float32)
    return (values.to(compute) * factor.to(device=values.device, dtype=compute)).to(values.dtype)
