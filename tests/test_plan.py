"""Ranking and selection, against a plain re-statement of the method's definitions."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from aufold.errors import AufoldError
from aufold.plan import Plan, SiteCounts
from aufold.safety.outputs import MARKER


def _plan(seed: int = 0, num_pairs: int = 10) -> Plan:
    generator = torch.Generator().manual_seed(seed)
    counts = {}
    for site, width in (("head", 6), ("mlp", 9), ("residual", 4)):
        positive = torch.randint(0, num_pairs + 1, (3, width), generator=generator)
        negative = (num_pairs - positive - torch.randint(0, 2, (3, width), generator=generator)).clamp(min=0)
        counts[site] = SiteCounts(positive, negative)
    return Plan(model="test", fingerprint="sha256:x", num_pairs=num_pairs, counts=counts)


def _reference_ranking(plan: Plan) -> list[tuple[str, int, int, float, float]]:
    """Every unit with (site, layer, unit, r_pos, r_neg), sorted the documented way."""
    order = {"head": 0, "mlp": 1, "mlp-out": 2, "residual": 3}
    units = []
    for site, counts in plan.counts.items():
        layers, width = counts.positive.shape
        for layer in range(layers):
            for unit in range(width):
                r_pos = int(counts.positive[layer, unit]) / plan.num_pairs
                r_neg = int(counts.negative[layer, unit]) / plan.num_pairs
                units.append((site, layer, unit, r_pos, r_neg))
    return sorted(units, key=lambda u: (-max(u[3], u[4]), u[1], order[u[0]], u[2]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranking_matches_the_definition(seed: int) -> None:
    plan = _plan(seed)
    expected = _reference_ranking(plan)
    ranked = plan.ranking()
    assert [(u.site, u.layer, u.unit) for u in ranked] == [e[:3] for e in expected]
    for unit, (_, _, _, r_pos, r_neg) in zip(ranked, expected):
        assert unit.r_pos == r_pos and unit.r_neg == r_neg
        assert unit.score == max(r_pos, r_neg)


def test_select_gives_signed_gammas_and_ties_promote() -> None:
    counts = {"head": SiteCounts(torch.tensor([[7, 2, 4, 0]]), torch.tensor([[1, 8, 4, 0]]))}
    plan = Plan(model="m", fingerprint="f", num_pairs=10, counts=counts)
    edit = plan.select(k=4, alpha=5.0)
    gammas = {u.unit: u.gamma for u in edit.units}
    assert gammas == {1: -5.0 * 0.8, 0: 5.0 * 0.7, 2: 5.0 * 0.4, 3: 0.0}
    assert [u.unit for u in edit.units] == [1, 0, 2, 3]


def test_select_restricted_to_sites() -> None:
    plan = _plan()
    edit = plan.select(k=5, alpha=1.0, sites=["mlp"])
    assert {u.site for u in edit.units} == {"mlp"}
    assert [(u.site, u.layer, u.unit) for u in edit.units] == [
        e[:3] for e in _reference_ranking(plan) if e[0] == "mlp"][:5]


@pytest.mark.parametrize(("k", "alpha", "message"), [
    (58, 1.0, r"k=58 is larger than the 57 units available"),
    (0, 1.0, "k must be a positive integer"),
    (3, math.nan, "alpha must be a finite number"),
    (3, math.inf, "alpha must be a finite number"),
])
def test_bad_selection(k: int, alpha: float, message: str) -> None:
    with pytest.raises(AufoldError, match=message):
        _plan().select(k=k, alpha=alpha)


def test_unknown_site_in_selection() -> None:
    with pytest.raises(AufoldError, match="site 'mlp-out' is not in this plan"):
        _plan().select(k=1, alpha=1.0, sites=["mlp-out"])


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    plan = _plan()
    plan.save(tmp_path / "plan")
    loaded = Plan.load(tmp_path / "plan")
    assert loaded.sites == plan.sites and loaded.num_pairs == plan.num_pairs
    for site in plan.sites:
        assert torch.equal(loaded.counts[site].positive, plan.counts[site].positive)
        assert torch.equal(loaded.counts[site].negative, plan.counts[site].negative)
    assert loaded.select(10, 2.0) == plan.select(10, 2.0)
    assert sorted(p.name for p in (tmp_path / "plan").iterdir()) == [MARKER, "counts.safetensors",
                                                                     "plan.json"]


def test_fingerprint_mismatch_is_refused_unless_forced() -> None:
    plan = _plan()
    with pytest.raises(AufoldError, match="the plan was made for another model"):
        plan.check_fingerprint("sha256:other")
    plan.check_fingerprint("sha256:other", force=True)


# --- layers without a site (hybrid models) -------------------------------------------

def _skipping_plan() -> Plan:
    """Head units in layers 0 and 2 only (layer 1 is linear attention), with the highest
    counts in the skipped layer, so ranking it would show."""
    plan = _plan()
    plan.counts["head"].positive[1] = plan.num_pairs
    plan.counts["head"].negative[1] = 0
    plan.settings["layers_without_site"] = {"head": [1]}
    return plan


def test_a_skipped_layer_is_never_ranked_selected_or_drawn() -> None:
    from aufold.ablations import block_units, random_units

    plan = _skipping_plan()
    width = plan.counts["head"].positive.shape[1]
    assert plan.num_units(["head"]) == 2 * width
    ranked = plan.ranking(["head"])
    assert len(ranked) == 2 * width and all(unit.layer != 1 for unit in ranked)
    expected = [u for u in _reference_ranking(plan) if u[0] == "head" and u[1] != 1]
    assert [(u.site, u.layer, u.unit) for u in ranked] == [u[:3] for u in expected]
    assert all(unit.layer != 1 for unit in plan.select(2 * width, 1.0, ["head"]).units)
    with pytest.raises(AufoldError, match=rf"k={2 * width + 1} is larger than the {2 * width}"):
        plan.select(2 * width + 1, 1.0, ["head"])
    for seed in range(5):
        assert all(u.layer != 1 for u in random_units(plan, 2 * width, 1.0, ["head"], seed).units)
    with pytest.raises(AufoldError, match=r"layer 1 of the model has no 'head' site"):
        block_units(plan, "head", 1, 1.0)
    assert len(block_units(plan, "mlp", 1, 1.0).units) == plan.counts["mlp"].positive.shape[1]


def test_skipped_layers_survive_saving(tmp_path: Path) -> None:
    plan = _skipping_plan()
    loaded = Plan.load(plan.save(tmp_path / "plan"))
    assert loaded.layers_without("head") == (1,) and loaded.layers_without("mlp") == ()
    assert [(u.site, u.layer, u.unit) for u in loaded.ranking()] == \
        [(u.site, u.layer, u.unit) for u in plan.ranking()]
