"""The fold: an Edit applied to weight tensors, by name, so one function serves every source.

Steering ``x_i <- (1 + gamma_i) x_i`` on the input of ``y = W x`` equals scaling
column ``i`` of ``W``; on the output it equals scaling row ``i`` of ``W`` and
element ``i`` of the bias. :func:`weight_edits` turns an Edit into per-tensor
scalings (which stored axis, which indices, which factors, from the sites
table), and :func:`fold_tensor` applies them. The in-memory fold below and any
streamed checkpoint share both functions, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from aufold.edit import Edit, scaled
from aufold.errors import AufoldError
from aufold.modeling import model_architecture
from aufold.safety.limits import check_finite
from aufold.sites import Architecture, check_foldable

if TYPE_CHECKING:
    from transformers import PreTrainedModel


Scaling = dict[int, tuple[torch.Tensor, torch.Tensor]]  # axis -> (unit indices, factors)


@dataclass
class TensorEdit:
    """The scalings of one stored tensor, applied in order: one per part of a composed edit
    (:meth:`aufold.edit.Edit.compose`), else one."""

    steps: list[Scaling] = field(default_factory=list)
    optional: bool = False  # a bias the checkpoint may not have

    @classmethod
    def scaling(cls, axes: Scaling, *, optional: bool = False) -> TensorEdit:
        """The edit of a tensor scaled once."""
        return cls([axes], optional)

    def step(self, number: int) -> Scaling:
        """The scaling of step ``number``, created (with empty ones before it) if missing."""
        while len(self.steps) <= number:
            self.steps.append({})
        return self.steps[number]

    def edited(self) -> dict[int, torch.Tensor]:
        """Every unit index any step scales, by axis."""
        indices: dict[int, list[torch.Tensor]] = {}
        for axes in self.steps:
            for axis, (index, _) in axes.items():
                indices.setdefault(axis, []).append(index)
        return {axis: torch.cat(parts).unique() for axis, parts in indices.items()}


def weight_edits(edit: Edit, architecture: Architecture) -> dict[str, TensorEdit]:
    """Map an Edit to the stored tensors it changes, by their state-dict names."""
    check_foldable(edit.sites)
    edits: dict[str, TensorEdit] = {}
    for number, step in enumerate(edit.steps()):
        for group in step.groups():
            for tensor in architecture.fold_tensors(group.site, group.layer):
                tensor_edit = edits.setdefault(tensor.name, TensorEdit(optional=tensor.optional))
                tensor_edit.step(number)[tensor.axis] = (group.index, group.scale)
    return edits


def check_edit_fits(shape: tuple[int, ...], tensor_edit: TensorEdit) -> None:
    """Refuse an edit whose units lie beyond a tensor of ``shape``."""
    for axis, index in tensor_edit.edited().items():
        if axis >= len(shape) or int(index.max()) >= shape[axis]:
            raise AufoldError(f"edit does not fit a tensor of shape {list(shape)} "
                              f"(axis {axis}, unit {int(index.max())}); the plan was made for "
                              f"another model")


def fold_tensor(tensor: torch.Tensor, tensor_edit: TensorEdit, name: str = "a folded weight"
                ) -> torch.Tensor:
    """A new tensor with the edited slices scaled in float32 and rounded once (once per step
    of a composed edit).

    Every element outside the edited slices is copied bitwise. An element in both
    an edited row and an edited column (``mlp`` and ``mlp-out`` in one layer)
    gets the product of both factors, computed the same way in either slice.
    """
    return fold_tensor_(tensor.clone(), tensor_edit, name)


def fold_tensor_(tensor: torch.Tensor, tensor_edit: TensorEdit, name: str = "a folded weight"
                 ) -> torch.Tensor:
    """:func:`fold_tensor` in place, for a streamed tensor that nothing else shares.

    Every edited slice is read before any is written, so an element in both an
    edited row and an edited column is scaled once by the product, bitwise as
    :func:`fold_tensor` does; the extra memory is the edited slices only. A slice that
    overflows its dtype is refused (:func:`aufold.safety.limits.check_finite`) before the
    tensor changes. The steps of a composed edit apply in order, each as alone; a slice
    refused in a later step leaves the earlier steps written, on a tensor the caller discards.
    """
    check_edit_fits(tuple(tensor.shape), tensor_edit)
    for axes in tensor_edit.steps:
        _scale_slices_(tensor, axes, name)
    return tensor


def _scale_slices_(tensor: torch.Tensor, axes: Scaling, name: str) -> None:
    """One step of :func:`fold_tensor_`: every edited slice read, scaled and checked, then
    all written."""
    full = {}
    for axis, (index, scale) in axes.items():
        full[axis] = torch.ones(tensor.shape[axis]).index_copy(0, index, scale)
    blocks = []
    for axis, (index, _) in axes.items():
        factor = torch.ones(())
        for other_axis, vector in full.items():
            shape = [1] * tensor.dim()
            shape[other_axis] = -1
            part = vector.index_select(0, index) if other_axis == axis else vector
            factor = factor * part.view(shape)
        index = index.to(tensor.device)
        block = scaled(tensor.index_select(axis, index), factor)
        check_finite(name, block)
        blocks.append((axis, index, block))
    for axis, index, block in blocks:
        tensor.index_copy_(axis, index, block)


@torch.no_grad()
def fold_model(model: PreTrainedModel, edit: Edit) -> None:
    """Fold an edit into a loaded model's weights, in place."""
    parameters = dict(model.named_parameters())
    for name, tensor_edit in weight_edits(edit, model_architecture(model)).items():
        if name not in parameters:
            if tensor_edit.optional:
                continue
            raise AufoldError(f"the model has no weight {name}; the plan does not fit it")
        parameter = parameters[name]
        parameter.data = fold_tensor(parameter.data, tensor_edit, name)
