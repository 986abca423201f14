"""Hook mode: steer a loaded model at run time, ``with steer(model, edit): ...``.

Each selected unit's activation is multiplied by ``1 + gamma`` at every token
position. Input sites use forward pre-hooks on their projection, output sites
forward hooks, and the neurons of stacked experts an expert hook
(:mod:`aufold.experts`), which steers a neuron only where its expert computes; the
hooks are removed on exit, also when the block raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from aufold.edit import Edit, UnitGroup, scaled
from aufold.errors import AufoldError
from aufold.experts import (
    ExpertHook,
    ExpertNeurons,
    StackedExperts,
    register_expert_hook,
)
from aufold.modeling import (
    check_site_exists,
    layer_widths,
    model_architecture,
    num_layers,
    site_module,
)
from aufold.sites import site_kind

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from aufold.vectors.caa import VectorEdit


@contextmanager
def steer(model: PreTrainedModel, edit: Edit | VectorEdit) -> Iterator[PreTrainedModel]:
    """Apply an edit with hooks for the duration of the ``with`` block; an additive
    :class:`~aufold.vectors.caa.VectorEdit` (the CAA baseline) adds its vectors instead."""
    from aufold.vectors.caa import VectorEdit
    from aufold.vectors.hooks import add_vectors

    if isinstance(edit, VectorEdit):
        with add_vectors(model, edit.vectors, edit.target, edit.scale):
            yield model
        return
    for site in edit.sites:
        check_site_exists(model, site)
    layers = num_layers(model)
    widths = {site: layer_widths(model, site) for site in edit.sites}
    for group in edit.groups():
        width = widths[group.site][group.layer] if group.layer < layers else 0
        if group.layer >= layers or int(group.index.max()) >= width:
            raise AufoldError(f"the edit steers layer {group.layer} unit {int(group.index.max())} "
                              f"of site {group.site}, but this model has {layers} layers and "
                              f"{width} units there; the plan was made for another model")
    handles: list[Any] = []
    architecture = model_architecture(model)
    try:
        # Hooks on one module run in the order they were registered: the parts in order.
        for step in edit.steps():
            for group in step.groups():
                neurons = architecture.expert_neurons(group.site, group.layer)
                if neurons is not None:
                    experts = StackedExperts.of(model, neurons)
                    handles.append(register_expert_hook(
                        experts.module, experts.down,
                        _scale_expert_units(group, experts.per_expert)))
                    continue
                module = site_module(model, group.site, group.layer)
                handles.append(_register(module, group))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _register(module: nn.Module, group: UnitGroup) -> torch.utils.hooks.RemovableHandle:
    if site_kind(group.site).placement == "input":
        def scale_input(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if args:
                return (_scale_units(args[0], group), *args[1:]), kwargs
            name = next(iter(kwargs))  # projections take one tensor: (x) or (input=x)
            return args, {**kwargs, name: _scale_units(kwargs[name], group)}

        return module.register_forward_pre_hook(scale_input, with_kwargs=True)

    def scale_output(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
        if isinstance(output, tuple):  # decoder layers of some models return tuples
            return (_scale_units(output[0], group), *output[1:])
        return _scale_units(output, group)

    return module.register_forward_hook(scale_output)


def _scale_expert_units(group: UnitGroup, per_expert: int) -> ExpertHook:
    """Scale the group's units (expert * per_expert + neuron) inside their own experts."""
    experts = group.index // per_expert

    def scale(call: ExpertNeurons) -> torch.Tensor | None:
        mine = experts == call.expert
        if not bool(mine.any()):
            return None
        return _scale_units(call.neurons, UnitGroup(group.site, group.layer,
                                                     group.index[mine] % per_expert,
                                                     group.scale[mine]))
    return scale


def _scale_units(hidden: torch.Tensor, group: UnitGroup) -> torch.Tensor:
    """Scale the group's units along the last axis, leaving the input tensor untouched."""
    index = group.index.to(hidden.device)
    steered = hidden.clone()
    steered[..., index] = scaled(hidden[..., index], group.scale)
    return steered
