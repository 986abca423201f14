"""Prefix resume: run the decoder layers before an edit's first steered layer once, reuse them.

An edit leaves every layer before its earliest steered layer untouched, so on a
given batch the input of that layer is the same with and without the edit. The
sweep records it once per batch in the unsteered pass (:func:`capture_layer_inputs`)
and each configuration resumes from there (:func:`resume_at`): the layers before
it return the recorded tensor instead of computing, while the model's own forward
still builds the embeddings, masks and position embeddings, runs the remaining
layers, the final norm and the LM head. Nothing is re-implemented per
architecture, and the resumed layers see bitwise the tensors they would see in a
full pass, so the logits are identical.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from aufold.edit import Edit
from aufold.modeling import model_architecture

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from aufold.vectors.caa import VectorEdit


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    return model.get_submodule(model_architecture(model).layers)  # type: ignore[return-value]


# Each resume point holds one [batch, length, hidden] tensor per batch; a cap keeps a
# large model with units spread over many layers from holding one for every layer.
MAX_RESUME_POINTS = 8


def earliest_layer(edit: Edit | VectorEdit) -> int:
    """The first decoder layer whose computation the edit changes."""
    if isinstance(edit, Edit):
        return min(unit.layer for unit in edit.units)
    return edit.first_layer  # an additive edit changes the output of its first layer


def resume_points(starts: Iterable[int], limit: int = MAX_RESUME_POINTS) -> dict[int, int]:
    """For each start layer, the layer to resume from: itself, or with more than ``limit``
    distinct starts, the nearest kept layer below it (resuming early is still exact, the
    layers in between just run again). The kept layers are spread evenly over the starts
    and always include the lowest one."""
    distinct = sorted(set(starts))
    if limit < 1:
        raise ValueError("at least one resume point is needed")
    if len(distinct) <= limit:
        kept = distinct
    else:
        kept = sorted({distinct[(i * len(distinct)) // limit] for i in range(limit)})
    return {start: max(k for k in kept if k <= start) for start in distinct}


@contextmanager
def capture_layer_inputs(model: PreTrainedModel, layers: Iterable[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the hidden states entering each of ``layers`` during the forward passes inside."""
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def recorder(layer: int) -> Any:
        def record(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured[layer] = args[0] if args else kwargs["hidden_states"]
        return record

    modules = decoder_layers(model)
    try:
        for layer in sorted(set(layers)):
            handles.append(modules[layer].register_forward_pre_hook(recorder(layer), with_kwargs=True))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def resume_at(model: PreTrainedModel, layer: int, hidden: torch.Tensor) -> Iterator[None]:
    """Make the forward passes inside skip layers ``0..layer-1``: they return ``hidden``.

    ``hidden`` must be what :func:`capture_layer_inputs` recorded entering ``layer``
    for the same batch. Layer 0 needs no skipping.
    """
    modules = decoder_layers(model)
    skipped = [modules[i] for i in range(layer)]

    def recorded(*_args: Any, **_kwargs: Any) -> torch.Tensor:
        return hidden

    # An instance attribute shadows the class's forward; any earlier instance
    # attribute (e.g. an accelerate device hook) is put back afterwards.
    previous = [module.__dict__.get("forward") for module in skipped]
    try:
        for module in skipped:
            module.forward = recorded  # type: ignore[method-assign]
        yield
    finally:
        for module, before in zip(skipped, previous):
            if before is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = before  # type: ignore[method-assign]
