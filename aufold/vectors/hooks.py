"""Hook mode for additive steering: ``with add_vectors(model, vectors, "residual", 4.0): ...``.

Each layer's vector, times ``scale``, is added at every token position to the
output of the module aufold.sites names for the target: the decoder layer
itself for ``residual`` (as repeng's ControlModel does), the attention output
projection for ``attention-out``, the MLP down projection for ``mlp-out``.
Works on every architecture, including those whose biases cannot hold a vector.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from aufold.modeling import model_architecture
from aufold.vectors.read import SteeringVectors


@contextmanager
def add_vectors(model: PreTrainedModel, vectors: SteeringVectors, target: str,
                scale: float = 1.0) -> Iterator[PreTrainedModel]:
    """Add ``scale * vector`` to the target's output in each layer that has a vector."""
    architecture = model_architecture(model)
    handles = []
    try:
        for layer, vector in vectors.vectors.items():
            module = model.get_submodule(architecture.vector_module(target, layer))
            handles.append(module.register_forward_hook(_adder(scale * vector)))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _adder(shift: torch.Tensor) -> Any:
    def add(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
        if isinstance(output, tuple):  # decoder layers of some models return tuples
            return (_shifted(output[0], shift), *output[1:])
        return _shifted(output, shift)

    return add


def _shifted(hidden: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return hidden + shift.to(device=hidden.device, dtype=hidden.dtype)
