"""The one table that knows architectures: where each atomic-unit site lives and how it folds.

Every other module asks this table; none branches on the model type. A site is
either the *input* or the *output* of a module inside each decoder layer:

- ``head``: the input of the attention output projection (the concatenated head
  outputs, unit = head * head_dim + d); folds into its columns.
- ``mlp``: the input of the MLP down projection (the intermediate neurons); folds
  into its columns.
- ``mlp-out``: the output of the MLP down projection; folds into its rows and bias.
- ``residual``: the residual stream after a decoder layer; hook mode only, since
  no single weight produces it.

"Columns" and "rows" are of the mathematical weight of ``y = W x``. A
``torch.nn.Linear`` stores ``W`` as ``[out, in]``; GPT-2's ``Conv1D`` stores it
transposed as ``[in, out]``, so the stored axis that a unit occupies depends on
the layout, and this table is where that fact lives.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from aufold.errors import AufoldError

Placement = Literal["input", "output"]
WeightLayout = Literal["linear", "conv1d"]


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
                 "MLP output: the output of the MLP down projection"),
        SiteKind("residual", "layer", "output", False,
                 "residual stream after the decoder layer (hook mode only)"),
    )
}

# The order of sites in rankings and ties; also the order of the table above.
SITE_ORDER: Mapping[str, int] = {name: index for index, name in enumerate(SITES)}


@dataclass(frozen=True)
class Architecture:
    """Where the foldable projections of one model type live, as name templates."""

    model_type: str
    layers: str  # the ModuleList of decoder layers, from the CausalLM's root
    attention_out: str  # relative to a decoder layer
    mlp_down: str  # relative to a decoder layer
    layout: WeightLayout = "linear"

    def module_path(self, site: str, layer: int) -> str:
        """The dotted module path of a site in a layer, e.g. ``model.layers.3.mlp.down_proj``."""
        projection = site_kind(site).projection
        base = f"{self.layers}.{layer}"
        if projection == "layer":
            return base
        return f"{base}.{getattr(self, projection)}"

    def weight_axis(self, site: str) -> int:
        """The axis of the stored weight tensor that indexes the units of a site."""
        kind = site_kind(site)
        if not kind.foldable:
            raise AufoldError(_not_foldable_message(site))
        input_axis, output_axis = (1, 0) if self.layout == "linear" else (0, 1)
        return input_axis if kind.placement == "input" else output_axis


ARCHITECTURES: Mapping[str, Architecture] = {
    arch.model_type: arch
    for arch in (
        Architecture("llama", "model.layers", "self_attn.o_proj", "mlp.down_proj"),
        Architecture("mistral", "model.layers", "self_attn.o_proj", "mlp.down_proj"),
        Architecture("qwen2", "model.layers", "self_attn.o_proj", "mlp.down_proj"),
        Architecture("qwen3", "model.layers", "self_attn.o_proj", "mlp.down_proj"),
        Architecture("gemma2", "model.layers", "self_attn.o_proj", "mlp.down_proj"),
        Architecture("gemma3_text", "model.layers", "self_attn.o_proj", "mlp.down_proj"),
        Architecture("phi3", "model.layers", "self_attn.o_proj", "mlp.down_proj"),
        Architecture("gpt2", "transformer.h", "attn.c_proj", "mlp.c_proj", layout="conv1d"),
    )
}


def site_kind(site: str) -> SiteKind:
    """Look up a site by name, with an error that lists the known ones."""
    try:
        return SITES[site]
    except KeyError:
        raise AufoldError(f"unknown site {site!r}; choose from: {', '.join(SITES)}") from None


def architecture_for(model_type: str) -> Architecture:
    """Look up an architecture by ``config.model_type``."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise AufoldError(f"unsupported architecture {model_type!r}; supported: "
                          f"{', '.join(sorted(ARCHITECTURES))}") from None


def check_foldable(sites: list[str] | tuple[str, ...]) -> None:
    """Refuse sites that have no exact weight fold, saying why."""
    for site in sites:
        if not site_kind(site).foldable:
            raise AufoldError(_not_foldable_message(site))


def _not_foldable_message(site: str) -> str:
    return (f"site {site!r} cannot be folded into weights: the residual stream is the sum of "
            f"every earlier layer's output, so no single weight scales it exactly; use it in "
            f"hook mode (aufold generate / aufold.steer) or export a plan of head, mlp or "
            f"mlp-out units")
