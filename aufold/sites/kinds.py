"""What a site is, in architecture-independent terms, and where additive vectors apply.

A site is either the *input* or the *output* of a module inside each decoder layer:

- ``head``: the input of the attention output projection (the concatenated head
  outputs, unit = head * head_dim + d); folds into its columns.
- ``mlp``: the input of the MLP down projection (the intermediate neurons); folds
  into its columns.
- ``mlp-out``: the output of the MLP block; folds into the rows (and bias) of its
  down projection, or of every expert's and the shared expert's in a
  Mixture-of-Experts block, whose output is their weighted sum.
- ``residual``: the residual stream after a decoder layer; hook mode only, since
  no single weight produces it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from aufold.errors import AufoldError

Placement = Literal["input", "output"]


@dataclass(frozen=True)
class SiteKind:
    """A site in architecture-independent terms."""

    name: str
    projection: Literal["attention_out", "mlp_down", "layer"]
    placement: Placement
    foldable: bool
    description: str


SITES: Mapping[str, SiteKind] = {
    kind.name: kind
    for kind in (
        SiteKind("head", "attention_out", "input", True,
                 "attention head outputs: the input of the attention output projection"),
        SiteKind("mlp", "mlp_down", "input", True,
                 "MLP neurons: the input of the MLP down projection"),
        SiteKind("mlp-out", "mlp_down", "output", True,
                 "MLP output: the output of the MLP block (its down projection's rows)"),
        SiteKind("residual", "layer", "output", False,
                 "residual stream after the decoder layer (hook mode only)"),
    )
}

# The order of sites in rankings and ties; also the order of the table above.
SITE_ORDER: Mapping[str, int] = {name: index for index, name in enumerate(SITES)}


@dataclass(frozen=True)
class VectorSite:
    """Where an additive steering vector ``h <- h + v`` applies, at every token."""

    name: str
    projection: Literal["attention_out", "mlp_down"]  # whose bias holds the vector
    residual: bool  # meant for the residual stream after the layer, not the projection itself
    description: str


VECTOR_SITES: Mapping[str, VectorSite] = {
    site.name: site
    for site in (
        VectorSite("residual", "mlp_down", True,
                   "the residual stream after the decoder layer"),  # repeng, CAA, llama.cpp
        VectorSite("attention-out", "attention_out", False,
                   "the attention output: the output of the attention output projection"),
        VectorSite("mlp-out", "mlp_down", False,
                   "the MLP output: the output of the MLP down projection"),
    )
}


def site_kind(site: str) -> SiteKind:
    """Look up a site by name, with an error that lists the known ones."""
    try:
        return SITES[site]
    except KeyError:
        raise AufoldError(f"unknown site {site!r}; choose from: {', '.join(SITES)}") from None


def vector_target(name: str) -> VectorSite:
    """Look up where a steering vector applies, with an error that lists the choices."""
    try:
        return VECTOR_SITES[name]
    except KeyError:
        raise AufoldError(f"unknown vector site {name!r}; choose from: "
                          f"{', '.join(VECTOR_SITES)}") from None


def check_foldable(sites: Sequence[str]) -> None:
    """Refuse sites that have no exact weight fold, saying why."""
    for site in sites:
        if not site_kind(site).foldable:
            raise AufoldError(not_foldable_message(site))


def not_foldable_message(site: str) -> str:
    return (f"site {site!r} cannot be folded into weights: the residual stream is the sum of "
            f"every earlier layer's output, so no single weight scales it exactly; use it in "
            f"hook mode (aufold generate / aufold.steer) or export a plan of head, mlp or "
            f"mlp-out units")
