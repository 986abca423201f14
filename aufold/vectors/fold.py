"""Additive steering folded into biases: ``y = W x + b`` plus ``v`` at every token is ``b + v``.

A vector at the attention output or the MLP output is exactly a bias on that
projection. A vector meant for the residual stream after a layer (repeng, CAA,
llama.cpp control vectors) is a bias on the layer's MLP down projection, exactly
only where nothing sits between that projection and the residual add; the sites
table knows where that holds and which config flag adds the bias
(:meth:`Architecture.vector_bias`). The flag also adds biases to the projection's
siblings (``attention_bias`` covers q, k, v and o); those are written as zeros,
so the checkpoint loads in plain transformers as the same class and computes the
same function plus the vectors.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from aufold.errors import AufoldError
from aufold.modeling import model_architecture, num_layers
from aufold.safety.limits import check_finite, check_scale_factors
from aufold.vectors.read import SteeringVectors, check_vectors


@dataclass(frozen=True)
class VectorFold:
    """What a fold changed: the biases that now hold vectors, and the config flags switched on."""

    modules: tuple[str, ...]
    flags: tuple[str, ...]


def check_scale(scale: float, *, allow_extreme: bool = False, option: str = "--scale") -> None:
    """A vector multiplier must be finite and, unless allowed, within the scale limit."""
    if not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise AufoldError(f"{option} must be a finite number, got {scale!r}")
    check_scale_factors([(option, scale)], allow_extreme=allow_extreme,
                        what="vector multiplier", fix=f"lower {option}")


@torch.no_grad()
def fold_vectors(model: PreTrainedModel, vectors: SteeringVectors, target: str,
                 scale: float = 1.0, *, allow_extreme: bool = False) -> VectorFold:
    """Add ``scale * vector`` to the bias that holds each layer's vector, in place.

    Everything is checked before the model changes: the scale, the target on
    this architecture, and each vector's layer and size.
    """
    check_scale(scale, allow_extreme=allow_extreme)
    architecture = model_architecture(model)
    first = model.get_submodule(architecture.vector_bias(target, 0).module)  # refuses early
    width = int(architecture.out_in(first.weight).shape[0])
    check_vectors(vectors, hidden_size=width, num_layers=num_layers(model))
    biases = {layer: architecture.vector_bias(target, layer) for layer in vectors.layers}
    flags = sorted({bias.config_flag for bias in biases.values()
                    if bias.config_flag and not getattr(model.config, bias.config_flag, False)})
    if flags:
        _switch_on(model, flags)
    folded = {}
    for layer, bias in biases.items():
        module = model.get_submodule(bias.module)
        # Summed in float64 and rounded once to the bias's dtype.
        shift = scale * vectors.vectors[layer].to(module.bias.device, torch.float64)
        folded[module] = (module.bias.to(torch.float64) + shift).to(module.bias.dtype)
        check_finite(f"{bias.module}.bias", folded[module])
    for module, value in folded.items():
        module.bias.data = value
    return VectorFold(tuple(bias.module for bias in biases.values()), tuple(flags))


def _switch_on(model: PreTrainedModel, flags: list[str]) -> None:
    """Turn config flags on and give every module they add a bias to a zero bias."""
    config = copy.deepcopy(model.config)
    for flag in flags:
        setattr(config, flag, True)
    with torch.device("meta"):  # shapes only: which parameters the flagged class has
        expected = dict(AutoModelForCausalLM.from_config(config).named_parameters())
    present = dict(model.named_parameters())
    added = [name for name in expected if name not in present]
    if any(not name.endswith(".bias") for name in added) or any(n not in expected for n in present):
        raise AssertionError(f"switching on {flags} changes more than biases: {added[:3]}")
    for name in added:
        module = model.get_submodule(name.removesuffix(".bias"))
        weight = module.weight
        module.bias = nn.Parameter(torch.zeros(expected[name].shape, dtype=weight.dtype,
                                               device=weight.device), requires_grad=False)
    for flag in flags:
        setattr(model.config, flag, True)
