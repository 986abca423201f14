"""The control edits of the ablations, against the method's definitions restated plainly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from aufold.ablations import fixed_strength, random_units
from aufold.errors import AufoldError
from aufold.plan import Plan, SiteCounts
from aufold.plotting import matplotlib_available, plot_unit_scores


def _plan(num_pairs: int = 20) -> Plan:
    generator = torch.Generator().manual_seed(7)
    counts = {}
    for site, width in (("head", 8), ("mlp", 12)):
        positive = torch.randint(0, num_pairs + 1, (4, width), generator=generator)
        negative = num_pairs - positive
        counts[site] = SiteCounts(positive, negative)
    return Plan(model="test", fingerprint="sha256:x", num_pairs=num_pairs, counts=counts)


def _gamma(plan: Plan, site: str, layer: int, unit: int, alpha: float) -> float:
    positive = int(plan.counts[site].positive[layer, unit])
    negative = int(plan.counts[site].negative[layer, unit])
    if positive >= negative:
        return alpha * positive / plan.num_pairs
    return -alpha * negative / plan.num_pairs


def test_random_units_are_distinct_seeded_and_steered_by_their_own_counts() -> None:
    plan = _plan()
    edit = random_units(plan, 10, 5.0, ["mlp"], seed=3)
    assert edit == random_units(plan, 10, 5.0, ["mlp"], seed=3)
    assert edit != random_units(plan, 10, 5.0, ["mlp"], seed=4)
    keys = {(u.site, u.layer, u.unit) for u in edit.units}
    assert len(keys) == 10 and all(site == "mlp" for site, _, _ in keys)
    for unit in edit.units:
        assert unit.gamma == pytest.approx(_gamma(plan, unit.site, unit.layer, unit.unit, 5.0))


def test_random_units_cover_every_unit_of_several_sites() -> None:
    plan = _plan()
    everything = random_units(plan, plan.num_units(), 1.0, ["head", "mlp"], seed=0)
    expected = {(site, layer, unit) for site, counts in plan.counts.items()
                for layer in range(4) for unit in range(counts.positive.shape[1])}
    assert {(u.site, u.layer, u.unit) for u in everything.units} == expected
    with pytest.raises(AufoldError, match="k=81"):
        random_units(plan, 81, 1.0, ["head", "mlp"], seed=0)


def test_fixed_strength_keeps_units_and_directions_and_the_mean_strength() -> None:
    plan = _plan()
    steered = plan.select(6, 10.0, ["head"])
    fixed = fixed_strength(plan, 6, 10.0, ["head"])
    assert [(u.site, u.layer, u.unit) for u in fixed.units] == \
        [(u.site, u.layer, u.unit) for u in steered.units]
    magnitudes = {abs(u.gamma) for u in fixed.units}
    assert len(magnitudes) == 1
    assert magnitudes.pop() == pytest.approx(sum(abs(u.gamma) for u in steered.units) / 6)
    assert all((f.gamma >= 0) == (s.gamma >= 0) for f, s in zip(fixed.units, steered.units))


def test_plan_scores_and_unit_agree_with_the_counts() -> None:
    plan = _plan()
    scores = plan.scores("mlp")
    assert scores.shape == (4, 12)
    for layer, unit in ((0, 0), (3, 11), (2, 5)):
        ranked = plan.unit("mlp", layer, unit)
        assert float(scores[layer, unit]) == pytest.approx(ranked.score)


@pytest.mark.skipif(not matplotlib_available(), reason="matplotlib is not installed")
def test_unit_map_is_a_png(tmp_path: Path) -> None:
    plan = _plan()
    chosen = [(u.site, u.layer, u.unit) for u in plan.select(5, 1.0).units]
    path = plot_unit_scores({site: plan.scores(site) for site in plan.sites}, chosen,
                            tmp_path / "units.png", title="test")
    assert path.read_bytes()[:4] == b"\x89PNG"
