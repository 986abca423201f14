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

A Mixture-of-Experts architecture has no single MLP down projection (each token
goes through a few of many experts), so it has only the ``head`` and ``residual``
sites; :meth:`Architecture.module_path`, which every path asks, refuses the others.

"Columns" and "rows" are of the mathematical weight of ``y = W x``. A
``torch.nn.Linear`` stores ``W`` as ``[out, in]``; GPT-2's ``Conv1D`` stores it
transposed as ``[in, out]``, so the stored axis that a unit occupies depends on
the layout, and this table is where that fact lives.

The table also knows, per architecture, what the export formats need: the names
of the same projections inside a GGUF file (always stored [out, in]), and for
additive steering vectors (:data:`VECTOR_SITES`) which config flag gives a
projection a bias and whether a norm sits between the MLP down projection and
the residual add.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from aufold.errors import AufoldError

if TYPE_CHECKING:
    import torch

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

BUILT_IN_BIAS = "built-in"  # the projection always has a bias (GPT-2's Conv1D)
GGUF_LAYERS = "blk"  # GGUF names decoder-layer tensors blk.{layer}.<name>


@dataclass(frozen=True)
class VectorBias:
    """The bias that folds a vector: its module, and the config flag to switch on (if any)."""

    module: str
    config_flag: str | None


@dataclass(frozen=True)
class Architecture:
    """Where the foldable projections of one model type live, as name templates."""

    model_type: str
    layers: str  # the ModuleList of decoder layers, from the CausalLM's root
    attention_out: str  # relative to a decoder layer
    mlp_down: str | None  # relative to a decoder layer; None: a Mixture-of-Experts MLP
    layout: WeightLayout = "linear"
    # What gives each projection a bias: a config flag (which also adds zero biases to
    # its sibling projections), BUILT_IN_BIAS, or None when the class has no way to.
    attention_out_bias: str | None = None
    mlp_down_bias: str | None = None
    # A norm between the MLP down projection and the residual add, if the layer has one.
    norm_after_mlp_down: str | None = None
    # The same projections inside a GGUF file, ``blk.{layer}.<name>.weight``: llama.cpp's
    # converters store every one as [out, in] (GPT-2's Conv1D weights are transposed).
    gguf_attention_out: str = "attn_output"
    gguf_mlp_down: str = "ffn_down"
    # The GGUF tensor whose rows scale the MLP neurons one by one: the up projection of a
    # gated MLP (neuron = act(gate x) * (up x)). None where no such tensor exists: an
    # ungated MLP (GPT-2), or gate and up fused in one tensor (Phi-3's ffn_up).
    gguf_mlp_up: str | None = "ffn_up"

    @property
    def sites(self) -> tuple[str, ...]:
        """The sites this architecture has, in the order of :data:`SITES`."""
        return tuple(name for name, kind in SITES.items()
                     if kind.projection != "mlp_down" or self.mlp_down is not None)

    def check_sites(self, sites: Sequence[str]) -> None:
        """Refuse a site this architecture lacks, saying which it has."""
        for site in sites:
            if site_kind(site).name not in self.sites:
                raise AufoldError(
                    f"{self.model_type} has experts in its MLP, so no single weight holds its "
                    f"{site!r} units; aufold steers its {' and '.join(map(repr, self.sites))} "
                    f"sites only (choose --site head)")

    def module_path(self, site: str, layer: int) -> str:
        """The dotted module path of a site in a layer, e.g. ``model.layers.3.mlp.down_proj``."""
        self.check_sites((site,))
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

    def out_in(self, weight: torch.Tensor) -> torch.Tensor:
        """A stored weight as the [out, in] matrix ``W`` of ``y = W x`` (a view, no copy)."""
        return weight if self.layout == "linear" else weight.T

    def gguf_naming(self) -> Architecture:
        """This architecture as its tensors are named and laid out in a GGUF file.

        ``module_path`` then gives ``blk.{layer}.attn_output`` and ``weight_axis`` the
        axis of the [out, in] array, so :func:`aufold.fold.weight_edits` maps an
        Edit to GGUF tensors as it does to state-dict tensors.
        """
        return replace(self, layers=GGUF_LAYERS, attention_out=self.gguf_attention_out,
                       mlp_down=self.gguf_mlp_down if self.mlp_down else None, layout="linear")

    def vector_module(self, target: str, layer: int) -> str:
        """The module whose output a vector at ``target`` of ``layer`` is added to (hook mode)."""
        vector_site = vector_target(target)
        base = f"{self.layers}.{layer}"
        if vector_site.residual:
            return base
        return f"{base}.{self._vector_projection(target, vector_site)}"

    def vector_bias(self, target: str, layer: int) -> VectorBias:
        """Where an additive vector at ``target`` of ``layer`` folds: a bias, and its switch.

        Refuses, with the reason, a target that no bias of this architecture can hold
        exactly: no config flag adds that bias, or a norm sits between the bias and
        the residual stream that the vector was meant for.
        """
        vector_site = vector_target(target)
        projection = vector_site.projection
        module = f"{self.layers}.{layer}.{self._vector_projection(target, vector_site)}"
        if vector_site.residual and self.norm_after_mlp_down:
            raise AufoldError(
                f"a residual-stream vector cannot be folded into {self.model_type}: its layers "
                f"apply {self.norm_after_mlp_down} between {self.mlp_down} and the residual add, "
                f"so no bias adds the vector to the residual stream; apply it with hooks instead "
                f"(aufold.vectors.add_vectors)")
        switch = getattr(self, f"{projection}_bias")
        if switch is None:
            raise AufoldError(
                f"a vector at {target!r} folds into a bias of {getattr(self, projection)}, but "
                f"{self.model_type} has no config flag that adds one, so the result would not "
                f"load as the same class; apply the vector with hooks instead "
                f"(aufold.vectors.add_vectors)")
        return VectorBias(module=module, config_flag=None if switch == BUILT_IN_BIAS else switch)

    def _vector_projection(self, target: str, vector_site: VectorSite) -> str:
        """The projection a vector at ``target`` is added to, or why this architecture has none."""
        path = getattr(self, vector_site.projection)
        if path is None:
            raise AufoldError(
                f"a vector at {target!r} needs the MLP down projection, but {self.model_type} "
                f"has experts in its MLP, so no single projection holds it; add a residual "
                f"vector with hooks instead (aufold.vectors.add_vectors)")
        return str(path)


ARCHITECTURES: Mapping[str, Architecture] = {
    arch.model_type: arch
    for arch in (
        Architecture("llama", "model.layers", "self_attn.o_proj", "mlp.down_proj",
                     attention_out_bias="attention_bias", mlp_down_bias="mlp_bias"),
        Architecture("mistral", "model.layers", "self_attn.o_proj", "mlp.down_proj"),
        Architecture("qwen2", "model.layers", "self_attn.o_proj", "mlp.down_proj"),
        Architecture("qwen3", "model.layers", "self_attn.o_proj", "mlp.down_proj",
                     attention_out_bias="attention_bias"),
        Architecture("gemma2", "model.layers", "self_attn.o_proj", "mlp.down_proj",
                     attention_out_bias="attention_bias",
                     norm_after_mlp_down="post_feedforward_layernorm"),
        Architecture("gemma3_text", "model.layers", "self_attn.o_proj", "mlp.down_proj",
                     attention_out_bias="attention_bias",
                     norm_after_mlp_down="post_feedforward_layernorm"),
        Architecture("phi3", "model.layers", "self_attn.o_proj", "mlp.down_proj",
                     gguf_mlp_up=None),
        Architecture("gpt2", "transformer.h", "attn.c_proj", "mlp.c_proj", layout="conv1d",
                     attention_out_bias=BUILT_IN_BIAS, mlp_down_bias=BUILT_IN_BIAS,
                     gguf_mlp_up=None),
        # Mixture of Experts: the experts' down projections are one fused 3D parameter in
        # memory (per-expert 2D tensors on disk), so only the head site folds.
        Architecture("mixtral", "model.layers", "self_attn.o_proj", mlp_down=None),
        Architecture("qwen2_moe", "model.layers", "self_attn.o_proj", mlp_down=None),
        Architecture("qwen3_moe", "model.layers", "self_attn.o_proj", mlp_down=None,
                     attention_out_bias="attention_bias"),
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
