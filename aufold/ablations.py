"""Control edits for the AUSteer ablations and baselines: random units, one fixed strength for
all units, and every unit of a block.

The first two answer "is it the localization, or just any nudge of this size?":

- :func:`random_units` steers ``k`` units drawn uniformly from the same sites
  (all layers), each with the strength its own counts give (``alpha * r_pos``, or
  ``-alpha * r_neg``), like the selected units. Only the choice of units differs.
- :func:`fixed_strength` steers the same top-``k`` units, each in its own
  direction, but with one magnitude for all: ``alpha`` times the mean score of the
  selected units, so the total strength matches and only the per-unit weighting
  (the adaptive strength of the paper) is removed.

:func:`block_units` is the block-level steering the paper argues against: AUSteer's
own gamma on *every* unit of one site in one layer (all of its heads' outputs, or all
of its MLP neurons), so only the number of steered units differs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from aufold.edit import Edit, SteeredUnit
from aufold.errors import AufoldError
from aufold.plan import Plan, check_alpha
from aufold.safety.limits import check_scale_factors


def random_units(plan: Plan, k: int, alpha: float, sites: Sequence[str], seed: int) -> Edit:
    """``k`` distinct units drawn uniformly from ``sites`` (seeded), steered by their own counts."""
    check_alpha(alpha)
    sizes = [plan.num_units([site]) for site in sites]
    if k < 1 or k > sum(sizes):
        raise AufoldError(f"k={k} must be between 1 and the {sum(sizes)} units of sites "
                          f"{', '.join(sites)}")
    generator = torch.Generator().manual_seed(seed)
    drawn = torch.randperm(sum(sizes), generator=generator)[:k].tolist()
    # The units that exist, flat in (site, layer, unit) order: a layer without the site has none.
    present = [(site, int(layer), int(unit)) for site in sites
               for layer, unit in plan.has_unit(site).nonzero().tolist()]
    units = []
    for flat in sorted(drawn):
        site, layer, unit = present[flat]
        ranked = plan.unit(site, layer, unit)
        units.append(SteeredUnit(site, ranked.layer, ranked.unit, ranked.gamma(alpha)))
    return Edit.of(units)


def fixed_strength(plan: Plan, k: int, alpha: float, sites: Sequence[str]) -> Edit:
    """The top-``k`` units of ``sites``, each in its own direction, all with the same |gamma|."""
    steered = plan.select(k, alpha, sites)
    magnitude = sum(abs(unit.gamma) for unit in steered.units) / len(steered)
    return Edit.of(SteeredUnit(u.site, u.layer, u.unit, magnitude if u.gamma >= 0 else -magnitude)
                   for u in steered.units)


def block_units(plan: Plan, site: str, layer: int, alpha: float, *,
                allow_extreme: bool = False) -> Edit:
    """Every unit of ``site`` in ``layer``, each with its own AUSteer gamma (``alpha`` times its
    signed score); scale factors beyond the safety limit are refused as by ``plan.select``."""
    check_alpha(alpha)
    layers = plan.counts[site].positive.shape[0] if site in plan.counts else 0
    if not 0 <= layer < layers:
        raise AufoldError(f"the plan has no layer {layer} of site {site!r}; it has "
                          f"{layers} layers of sites {', '.join(plan.sites)}")
    if layer in plan.layers_without(site):
        raise AufoldError(f"layer {layer} of the model has no {site!r} site (the plan skipped "
                          f"it); choose another layer")
    units = [plan.unit(site, layer, int(unit)) for unit in plan.has_unit(site)[layer].nonzero()]
    check_scale_factors(((f"{site} layer {layer} unit {u.unit}", 1.0 + u.gamma(alpha))
                         for u in units), allow_extreme=allow_extreme,
                        fix="lower the block alphas")
    return Edit.of(SteeredUnit(site, u.layer, u.unit, u.gamma(alpha)) for u in units)


def densest_layer(plan: Plan, site: str, k: int) -> int:
    """The layer that holds the most of the plan's top-``k`` units of ``site`` (the lowest on a
    tie): where a block baseline steers."""
    layers = [unit.layer for unit in plan.ranking([site], k)]
    return min(set(layers), key=lambda layer: (-layers.count(layer), layer))
