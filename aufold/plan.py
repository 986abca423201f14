"""The Plan: per-unit sign counts from localization, their ranking, and selection of an Edit.

A plan keeps the full counts (not just the top units), so any k, alpha or subset
of sites can be chosen later without running the model again. On disk it is a
folder with ``plan.json`` (a readable summary) and ``counts.safetensors`` (the
counts themselves); neither format can execute code.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from aufold.edit import Edit, SteeredUnit
from aufold.errors import AufoldError, first_line
from aufold.safety.limits import check_scale_factors
from aufold.safety.outputs import atomic_folder, claim_output
from aufold.sites import SITE_ORDER
from aufold.version import __version__

PLAN_JSON = "plan.json"
COUNTS_FILE = "counts.safetensors"
SUMMARY_TOP = 100  # how many ranked units plan.json lists; the counts hold all of them
# The settings key of the layers that lack a site the plan counts (a hybrid model's linear
# attention layers have no head site): their counts stay zero and they are never ranked.
LAYERS_WITHOUT = "layers_without_site"
# The settings key of the units per layer of a site whose layers differ in width (experts
# layers, E x neurons, beside dense ones): a narrower layer's units beyond its width do not
# exist, are never counted and never ranked.
UNITS_PER_LAYER = "units_per_layer"
MAX_PAIRS = 2**40  # far above any localization; keeps every count sum inside int64


@dataclass(frozen=True)
class SiteCounts:
    """For one site: per layer and unit, how many pairs had x_pos > x_neg and x_pos < x_neg
    (beyond the tie tolerance of :func:`aufold.localize.signs`)."""

    positive: torch.Tensor  # int64 [layers, width]
    negative: torch.Tensor  # int64 [layers, width]

    def __post_init__(self) -> None:
        if self.positive.shape != self.negative.shape or self.positive.dim() != 2:
            raise AufoldError("site counts must be two [layers, width] tensors of one shape")


@dataclass(frozen=True)
class RankedUnit:
    """A unit with its counts; r_pos, r_neg, score and the steering sign follow from them."""

    site: str
    layer: int
    unit: int
    positive: int
    negative: int
    num_pairs: int

    @property
    def r_pos(self) -> float:
        return self.positive / self.num_pairs

    @property
    def r_neg(self) -> float:
        return self.negative / self.num_pairs

    @property
    def score(self) -> float:
        return max(self.r_pos, self.r_neg)

    @property
    def promotes(self) -> bool:
        """A tie promotes, as in the authors' code."""
        return self.positive >= self.negative

    def gamma(self, alpha: float) -> float:
        return alpha * self.r_pos if self.promotes else -alpha * self.r_neg

    def direction_word(self) -> str:
        return "promote" if self.promotes else "suppress"

    def to_record(self) -> dict[str, Any]:
        return {"site": self.site, "layer": self.layer, "unit": self.unit,
                "r_pos": self.r_pos, "r_neg": self.r_neg, "score": self.score,
                "direction": self.direction_word()}


@dataclass
class Plan:
    """Localization results for one model: counts per site plus what they were made from."""

    model: str
    fingerprint: str
    num_pairs: int
    counts: dict[str, SiteCounts]
    settings: dict[str, Any] = field(default_factory=dict)
    aufold_version: str = __version__

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(sorted(self.counts, key=SITE_ORDER.__getitem__))

    def num_units(self, sites: Sequence[str] | None = None) -> int:
        return sum(int(self.has_unit(site).sum()) for site in self._sites(sites))

    def layers_without(self, site: str) -> tuple[int, ...]:
        """The layers of the model that lack ``site`` (skipped when localizing)."""
        return tuple(self.settings.get(LAYERS_WITHOUT, {}).get(site, ()))

    def has_unit(self, site: str) -> torch.Tensor:
        """bool [layers, width]: which units of ``site`` exist (all but the skipped layers'
        and those beyond a narrower layer's width)."""
        present = torch.ones(self.counts[site].positive.shape, dtype=torch.bool)
        present[list(self.layers_without(site))] = False
        for layer, units in enumerate(self.settings.get(UNITS_PER_LAYER, {}).get(site, ())):
            present[layer, units:] = False
        return present

    def ranking(self, sites: Sequence[str] | None = None, k: int | None = None) -> list[RankedUnit]:
        """Units ranked by score, descending; ties broken by (layer, site, unit) ascending."""
        chosen = self._sites(sites)
        scores, layers, orders, units, positives, negatives = [], [], [], [], [], []
        for site in chosen:
            counts = self.counts[site]
            n_layers, width = counts.positive.shape
            positive = counts.positive.numpy().ravel()
            negative = counts.negative.numpy().ravel()
            # A unit of a layer without the site ranks below every real one, and is cut below.
            scores.append(np.where(self.has_unit(site).numpy().ravel(),
                                   np.maximum(positive, negative), -1))
            layers.append(np.repeat(np.arange(n_layers), width))
            units.append(np.tile(np.arange(width), n_layers))
            orders.append(np.full(n_layers * width, SITE_ORDER[site]))
            positives.append(positive)
            negatives.append(negative)
        score, layer, order, unit = (np.concatenate(a) for a in (scores, layers, orders, units))
        # np.lexsort sorts by the last key first: score descending, then layer, site, unit.
        ranked = np.lexsort((unit, order, layer, -score))
        ranked = ranked[score[ranked] >= 0]
        if k is not None:
            ranked = ranked[:k]
        positive, negative = np.concatenate(positives), np.concatenate(negatives)
        site_names = {SITE_ORDER[site]: site for site in chosen}
        return [RankedUnit(site_names[int(order[i])], int(layer[i]), int(unit[i]),
                           int(positive[i]), int(negative[i]), self.num_pairs) for i in ranked]

    def unit(self, site: str, layer: int, unit: int) -> RankedUnit:
        """The counts of one unit, ranked or not."""
        counts = self.counts[self._sites([site])[0]]
        return RankedUnit(site, layer, unit, int(counts.positive[layer, unit]),
                          int(counts.negative[layer, unit]), self.num_pairs)

    def scores(self, site: str) -> torch.Tensor:
        """score = max(r_pos, r_neg) of every unit of ``site``, float32 [layers, width]."""
        counts = self.counts[self._sites([site])[0]]
        return torch.maximum(counts.positive, counts.negative).float() / self.num_pairs

    def select(self, k: int, alpha: float, sites: Sequence[str] | None = None, *,
               allow_extreme: bool = False) -> Edit:
        """The top-k units as an Edit with gamma = alpha * signed score.

        A scale factor 1 + gamma beyond :data:`aufold.safety.limits.MAX_SCALE` in size is
        refused unless ``allow_extreme``.
        """
        check_alpha(alpha)
        available = self.num_units(sites)
        if not isinstance(k, int) or k < 1:
            raise AufoldError(f"k must be a positive integer, got {k!r}")
        if k > available:
            raise AufoldError(f"k={k} is larger than the {available} units available in sites "
                              f"{', '.join(self._sites(sites))}; choose k <= {available}")
        edit = Edit.of(SteeredUnit(u.site, u.layer, u.unit, u.gamma(alpha))
                       for u in self.ranking(sites, k))
        check_scale_factors(((f"{u.site} layer {u.layer} unit {u.unit}", 1.0 + u.gamma)
                             for u in edit.units), allow_extreme=allow_extreme)
        return edit

    def check_fingerprint(self, fingerprint: str, *, force: bool = False) -> None:
        """Refuse to apply the plan to a model of another shape, unless forced."""
        if fingerprint != self.fingerprint and not force:
            raise AufoldError(f"the plan was made for another model ({self.model}, fingerprint "
                              f"{self.fingerprint}; this model has {fingerprint}); localize "
                              f"this model, or pass --force if you are sure")

    def summary(self, top: int = SUMMARY_TOP) -> dict[str, Any]:
        return {
            "format": "aufold-plan",
            "aufold_version": self.aufold_version,
            "model": self.model,
            "fingerprint": self.fingerprint,
            "sites": list(self.sites),
            "num_pairs": self.num_pairs,
            "shapes": {site: list(c.positive.shape) for site, c in self.counts.items()},
            "settings": self.settings,
            "ranking_rule": "score = max(r_pos, r_neg) descending; ties by layer, site "
                            "(head, mlp, mlp-out, residual), unit ascending",
            "top_units": [u.to_record() for u in self.ranking(k=min(top, self.num_units()))],
        }

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the plan folder atomically."""
        with (claim_output(path, overwrite=overwrite) as out,
              atomic_folder(out, content="plan") as staging):
            tensors = {}
            for site, counts in self.counts.items():
                tensors[f"{site}.positive"] = counts.positive.contiguous()
                tensors[f"{site}.negative"] = counts.negative.contiguous()
            save_file(tensors, staging / COUNTS_FILE, metadata={"format": "aufold-plan"})
            (staging / PLAN_JSON).write_text(json.dumps(self.summary(), indent=2) + "\n")
        return out

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a plan folder, validating every field: a damaged or hand-edited plan is
        refused in one line rather than turned into wrong gammas."""
        folder = Path(path)
        if not (folder / PLAN_JSON).is_file() or not (folder / COUNTS_FILE).is_file():
            raise AufoldError(f"{folder} is not a plan folder (needs {PLAN_JSON} and "
                              f"{COUNTS_FILE}); make one with `aufold localize`")
        try:
            meta = json.loads((folder / PLAN_JSON).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise _damaged(folder, f"{PLAN_JSON} is not readable JSON ({error})") from None
        try:
            tensors = load_file(folder / COUNTS_FILE)
        except (OSError, SafetensorError, ValueError) as error:
            raise _damaged(folder, f"{COUNTS_FILE} is not readable ({first_line(error)})") from None
        num_pairs, sites = _check_summary(folder, meta)
        counts = {site: _site_counts(folder, tensors, site, num_pairs, meta.get("shapes"))
                  for site in sites}
        return cls(model=meta["model"], fingerprint=meta["fingerprint"], num_pairs=num_pairs,
                   counts=counts, settings=meta.get("settings", {}),
                   aufold_version=meta["aufold_version"])

    def _sites(self, sites: Sequence[str] | None) -> tuple[str, ...]:
        if sites is None:
            return self.sites
        for site in sites:
            if site not in self.counts:
                raise AufoldError(f"site {site!r} is not in this plan; it has: "
                                  f"{', '.join(self.sites)}")
        return tuple(sorted(set(sites), key=SITE_ORDER.__getitem__))


def check_alpha(alpha: float) -> None:
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AufoldError(f"alpha must be a finite number, got {alpha!r}")


def _damaged(folder: Path, why: str) -> AufoldError:
    return AufoldError(f"plan {folder} is damaged: {why}; localize again (or restore the plan "
                       f"folder that `aufold localize` wrote)")


def _check_summary(folder: Path, meta: Any) -> tuple[int, list[str]]:
    """The plan.json fields a plan is built from, with their types and ranges checked."""
    if not isinstance(meta, dict):
        raise _damaged(folder, f"{PLAN_JSON} is not a JSON object")
    for key, kind in (("model", str), ("fingerprint", str), ("aufold_version", str),
                      ("sites", list), ("num_pairs", int)):
        if key not in meta:
            raise _damaged(folder, f"{PLAN_JSON} has no {key!r}")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise _damaged(folder, f"{key!r} in {PLAN_JSON} must be a {kind.__name__}, got "
                                   f"{meta[key]!r}")
    if not 1 <= meta["num_pairs"] <= MAX_PAIRS:
        raise _damaged(folder, f"num_pairs must be at least 1 and at most {MAX_PAIRS}, got "
                               f"{meta['num_pairs']}")
    if not isinstance(meta.get("settings", {}), dict):
        raise _damaged(folder, f"'settings' in {PLAN_JSON} must be an object")
    sites = meta["sites"]
    if not all(isinstance(site, str) for site in sites):
        raise _damaged(folder, f"'sites' must be a list of site names, got {sites!r}")
    if not sites or len(set(sites)) != len(sites):
        raise _damaged(folder, f"'sites' must list each site once, got {sites!r}")
    for site in sites:
        if site not in SITE_ORDER:
            raise _damaged(folder, f"unknown site {site!r}; sites are {', '.join(SITE_ORDER)}")
    shapes = meta.get("shapes")
    if shapes is not None and not isinstance(shapes, dict):
        raise _damaged(folder, f"'shapes' in {PLAN_JSON} must be an object")
    return meta["num_pairs"], sites


def _site_counts(folder: Path, tensors: dict[str, torch.Tensor], site: str, num_pairs: int,
                 shapes: dict[str, Any] | None) -> SiteCounts:
    """One site's counters, checked: int64 [layers, width], 0 <= count, positive + negative
    <= num_pairs (so r_pos + r_neg <= 1), and the shape plan.json states."""
    pair = []
    for sign in ("positive", "negative"):
        name = f"{site}.{sign}"
        tensor = tensors.get(name)
        if tensor is None:
            raise _damaged(folder, f"{COUNTS_FILE} has no tensor {name}")
        if tensor.dtype != torch.int64 or tensor.dim() != 2:
            raise _damaged(folder, f"{name} must be a 2-D int64 tensor, got "
                                   f"{str(tensor.dtype).removeprefix('torch.')} "
                                   f"{list(tensor.shape)}")
        if tensor.numel() and int(tensor.min()) < 0:
            raise _damaged(folder, f"{name} has a negative count ({int(tensor.min())})")
        if tensor.numel() and int(tensor.max()) > num_pairs:  # checked alone: a sum could wrap
            raise _damaged(folder, f"{name} has a count of {int(tensor.max())}, more than the "
                                   f"plan's num_pairs={num_pairs}")
        pair.append(tensor)
    positive, negative = pair
    if positive.shape != negative.shape:
        raise _damaged(folder, f"{site}.positive and {site}.negative differ in shape")
    if positive.numel() == 0:
        raise _damaged(folder, f"site {site} has no units")
    total = int((positive + negative).max())
    if total > num_pairs:
        raise _damaged(folder, f"a unit of site {site} has {total} signed pairs, more than the "
                               f"plan's num_pairs={num_pairs} (r_pos + r_neg would exceed 1)")
    stated = shapes.get(site) if shapes is not None else None
    if shapes is not None and stated != list(positive.shape):
        raise _damaged(folder, f"{PLAN_JSON} gives site {site} the shape {stated!r}, but its "
                               f"counts have {list(positive.shape)}")
    return SiteCounts(positive, negative)
