"""Where the sites of one model live, as name templates relative to its decoder layers.

An :class:`Architecture` is derived from the model itself (:mod:`aufold.sites.derive`)
and answers every question the rest of aufold asks about a site: which module to hook,
which stored tensors and axes a fold scales, what the export formats need. No other
module branches on the model type.

"Columns" and "rows" are of the mathematical weight of ``y = W x``. A
``torch.nn.Linear`` stores ``W`` as ``[out, in]``; GPT-2's ``Conv1D`` stores it
transposed as ``[in, out]``, so the stored axis that a unit occupies depends on the
layout, and this class is where that fact lives.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from aufold.errors import AufoldError
from aufold.sites.kinds import (
    SITES,
    SiteKind,
    VectorSite,
    not_foldable_message,
    site_kind,
    vector_target,
)

if TYPE_CHECKING:
    import torch

WeightLayout = Literal["linear", "conv1d"]

BUILT_IN_BIAS = "built-in"  # the projection always has a bias (GPT-2's Conv1D)
GGUF_LAYERS = "blk"  # GGUF names decoder-layer tensors blk.{layer}.<name>


@dataclass(frozen=True)
class FoldTensor:
    """A stored tensor that a fold scales: its name relative to a decoder layer, the axis
    that indexes the site's units, and whether it may be missing (a bias).

    The neurons of stacked experts ([E, ...]) are indexed by two axes: ``expert_axis``
    and ``axis``. Unit u is then neuron u % n of expert u // n, n the size of ``axis``.
    """

    name: str
    axis: int
    optional: bool = False
    expert_axis: int | None = None

    def units(self, shape: Sequence[int]) -> int:
        """How many units a stored tensor of ``shape`` holds."""
        experts = 1 if self.expert_axis is None else shape[self.expert_axis]
        return int(experts * shape[self.axis])


@dataclass(frozen=True)
class VectorBias:
    """The bias that folds a vector: its module, and the config flag to switch on (if any)."""

    module: str
    config_flag: str | None


@dataclass(frozen=True)
class LayerSites:
    """Where the sites of one decoder layer live, relative to the layer."""

    attention_out: str | None  # the attention output projection; None: the layer has none
    mlp_down: str | None  # a dense MLP's down projection; None: experts, or no MLP
    # A Mixture-of-Experts block: its output is the mlp-out site, and ``expert_outputs``
    # are the tensors whose slices are that output's units (every expert's down
    # projection, stacked [E, ...], their biases, a shared expert's down projection).
    # Empty where the block passes that sum through a norm of its own (``moe_norm``):
    # its output then scales with no weight, so the layer has no mlp-out site.
    moe_block: str | None = None
    expert_outputs: tuple[FoldTensor, ...] = ()
    moe_norm: str | None = None
    # The stacked experts' down projection, whose input columns are the block's 'mlp'
    # units, one per (expert, neuron); None where the experts are not stacked.
    expert_neurons: FoldTensor | None = None

    def module(self, kind: SiteKind) -> str | None:
        """The module of a site in this layer, None where it has none: the projection, or
        for experts the block (its output) or the stacked experts (their neurons)."""
        if kind.projection == "attention_out":
            return self.attention_out
        if self.mlp_down is not None:
            return self.mlp_down
        if kind.placement == "input":
            return None if self.expert_neurons is None else \
                self.expert_neurons.name.rpartition(".")[0]
        return self.moe_block if self.expert_outputs else None


@dataclass(frozen=True)
class Architecture:
    """Where the foldable projections of one model live, layer by layer."""

    model_type: str
    layers: str  # the ModuleList of decoder layers, from the model's root
    layer_sites: tuple[LayerSites, ...]
    layout: WeightLayout = "linear"
    # Why a site is missing from every layer, in one sentence, for the refusal.
    absent: Mapping[str, str] = field(default_factory=dict)
    # The layers without a site that other layers have (a hybrid model's linear-attention
    # layers have no head site): localization skips them, and a plan says so.
    skipped: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    # What gives each projection a bias: a config flag (which also adds zero biases to
    # its sibling projections), BUILT_IN_BIAS, or None when aufold knows no way to.
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
    def num_layers(self) -> int:
        return len(self.layer_sites)

    @property
    def sites(self) -> tuple[str, ...]:
        """The sites this model has (in every layer, or in some), in the order of :data:`SITES`."""
        return tuple(name for name in SITES if name not in self.absent)

    def site_layers(self, site: str) -> tuple[int, ...]:
        """The layers that have ``site``."""
        self.check_sites((site,))
        missing = set(self.skipped.get(site_kind(site).name, ()))
        return tuple(layer for layer in range(self.num_layers) if layer not in missing)

    @property
    def attention_out(self) -> str | None:
        """The attention output projection, where every layer has it at one path."""
        return _uniform(layer.attention_out for layer in self.layer_sites)

    @property
    def mlp_down(self) -> str | None:
        """The dense MLP down projection, where every layer has it at one path."""
        return _uniform(layer.mlp_down for layer in self.layer_sites)

    @property
    def has_experts(self) -> bool:
        """Whether some layer's MLP is a Mixture-of-Experts block."""
        return any(layer.moe_block is not None for layer in self.layer_sites)

    def check_sites(self, sites: Sequence[str]) -> None:
        """Refuse a site this model lacks, saying why and which it has."""
        for site in sites:
            reason = self.absent.get(site_kind(site).name)
            if reason is not None:
                raise AufoldError(f"{reason}; aufold steers its "
                                  f"{', '.join(map(repr, self.sites))} sites (choose one of them)")

    def module_path(self, site: str, layer: int) -> str:
        """The dotted module path of a site in a layer, e.g. ``model.layers.3.mlp.down_proj``."""
        self.check_sites((site,))
        kind = site_kind(site)
        base = f"{self.layers}.{layer}"
        if kind.projection == "layer":
            return base
        module = self._layer(layer).module(kind)
        if module is None:
            raise AufoldError(f"layer {layer} of this {self.model_type} model has no {site!r} "
                              f"site (it has it in layers {_ranges(self.site_layers(site))}); "
                              f"the plan or edit was made for another model")
        return f"{base}.{module}"

    def _layer(self, layer: int) -> LayerSites:
        if not 0 <= layer < len(self.layer_sites):
            raise AufoldError(f"layer {layer} is beyond this {self.model_type} model's "
                              f"{len(self.layer_sites)} layers; the plan was made for another "
                              f"model")
        return self.layer_sites[layer]

    def fold_tensors(self, site: str, layer: int) -> tuple[FoldTensor, ...]:
        """The stored tensors (by state-dict name) that scaling the site's units scales, and
        the axis of each that indexes the units."""
        kind = site_kind(site)
        if not kind.foldable:
            raise AufoldError(not_foldable_message(site))
        module = self.module_path(site, layer)
        sites = self._layer(layer)
        neurons = self.expert_neurons(site, layer)
        if neurons is not None:
            return (neurons,)
        if kind.projection == "mlp_down" and sites.mlp_down is None:  # mlp-out of experts
            return tuple(replace(tensor, name=f"{module}.{tensor.name}")
                         for tensor in sites.expert_outputs)
        weight = FoldTensor(f"{module}.weight", self.weight_axis(site))
        if kind.placement == "input":
            return (weight,)
        return (weight, FoldTensor(f"{module}.bias", 0, optional=True))

    def expert_neurons(self, site: str, layer: int) -> FoldTensor | None:
        """Where a site's units in ``layer`` are neurons of stacked experts: their down
        projection (named from the model's root); None for every other site and layer."""
        kind = site_kind(site)
        sites = self._layer(layer)
        if kind.projection != "mlp_down" or kind.placement != "input" or sites.mlp_down \
                or sites.expert_neurons is None:
            return None
        neurons = sites.expert_neurons
        return replace(neurons, name=f"{self.layers}.{layer}.{neurons.name}")

    def weight_axis(self, site: str) -> int:
        """The axis of a dense projection's stored weight that indexes the units of a site."""
        kind = site_kind(site)
        if not kind.foldable:
            raise AufoldError(not_foldable_message(site))
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
        absent = dict(self.absent)
        for site in ("mlp", "mlp-out"):
            if self.has_experts and site not in absent:
                absent[site] = f"aufold does not fold the experts of a GGUF {self.model_type} file"
        named = tuple(LayerSites(self.gguf_attention_out if layer.attention_out else None,
                                 self.gguf_mlp_down if layer.mlp_down else None)
                      for layer in self.layer_sites)
        return replace(self, layers=GGUF_LAYERS, layer_sites=named, layout="linear",
                       absent=absent)

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
                f"aufold knows no config flag of {self.model_type} that adds one, so the result "
                f"would not load as the same class; apply the vector with hooks instead "
                f"(aufold.vectors.add_vectors)")
        return VectorBias(module=module, config_flag=None if switch == BUILT_IN_BIAS else switch)

    def _vector_projection(self, target: str, vector_site: VectorSite) -> str:
        """The projection a vector at ``target`` is added to, or why this architecture has none."""
        path = getattr(self, vector_site.projection)
        if path is None:
            what = ("attention output projection" if vector_site.projection == "attention_out"
                    else "MLP down projection")
            raise AufoldError(
                f"a vector at {target!r} needs the {what}, but not every layer of "
                f"{self.model_type} has one at the same place (experts, or a hybrid layer), so "
                f"no single projection holds it; add a residual vector with hooks instead "
                f"(aufold.vectors.add_vectors)")
        return str(path)


def _uniform(paths: Iterable[str | None]) -> str | None:
    found = set(paths)
    return found.pop() if len(found) == 1 else None


def _ranges(layers: Sequence[int]) -> str:
    """0-3, 5, 7-9: a short list of layer numbers."""
    parts, start = [], None
    for index, layer in enumerate(layers):
        if start is None:
            start = layer
        if index + 1 == len(layers) or layers[index + 1] != layer + 1:
            parts.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ", ".join(parts)
