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


# Where a scaling applies -> (unit indices, factors). An int is a stored axis; a pair
# (expert axis, axis) indexes the neurons of stacked experts, unit u being slice u % n of
# ``axis`` in expert u // n (n the size of ``axis``).
UnitAxis = int | tuple[int, int]
Scaling = dict[UnitAxis, tuple[torch.Tensor, torch.Tensor]]


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

    def edited(self) -> dict[UnitAxis, torch.Tensor]:
        """Every unit index any step scales, by axis."""
        indices: dict[UnitAxis, list[torch.Tensor]] = {}
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
                axis = tensor.axis if tensor.expert_axis is None else (tensor.expert_axis,
                                                                       tensor.axis)
                tensor_edit.step(number)[axis] = (group.index, group.scale)
    return edits


def check_edit_fits(shape: tuple[int, ...], tensor_edit: TensorEdit,
                    name: str = "a tensor") -> None:
    """Refuse an edit whose units lie beyond a tensor of ``shape``."""
    for axis, index in tensor_edit.edited().items():
        axes = (axis,) if isinstance(axis, int) else axis
        units = 1
        for each in axes:
            units = units * shape[each] if each < len(shape) else 0
        if int(index.max()) >= units:
            raise AufoldError(f"{name} has shape {list(shape)}, which has no unit "
                              f"{int(index.max())} on axis {axis}; the plan was made for "
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
    check_edit_fits(tuple(tensor.shape), tensor_edit, name)
    for axes in tensor_edit.steps:
        _scale_slices_(tensor, axes, name)
    return tensor


def _scale_slices_(tensor: torch.Tensor, axes: Scaling, name: str) -> None:
    """One step of :func:`fold_tensor_`: every edited slice read, scaled and checked, then
    all written."""
    factors = [_factor(tensor.shape, axis, index, scale) for axis, (index, scale) in axes.items()]
    blocks = []
    for axis, (index, _) in axes.items():
        if isinstance(axis, int):
            factor = torch.ones(())
            for full in factors:
                factor = factor * (full.index_select(axis, index) if full.shape[axis] > 1 else full)
            device_index = index.to(tensor.device)
            block = scaled(tensor.index_select(axis, device_index), factor)
            check_finite(name, block)
            blocks.append((axis, device_index, block))
        else:
            experts, slices = _expert_slices(tensor.shape, axis, index)
            factor = torch.ones(())
            for full in factors:
                factor = factor * _pick(full, axis, experts, slices)
            selected = _pick(tensor, axis, experts.to(tensor.device), slices.to(tensor.device))
            block = scaled(selected, factor)
            check_finite(name, block)
            blocks.append((axis, (experts.to(tensor.device), slices.to(tensor.device)), block))
    for axis, index, block in blocks:
        if isinstance(axis, int):
            tensor.index_copy_(axis, index, block)
        else:
            tensor.movedim(axis, (0, 1))[index] = block


def _factor(shape: torch.Size, axis: UnitAxis, index: torch.Tensor, scale: torch.Tensor
            ) -> torch.Tensor:
    """One scaling's factor for every element, as a tensor that broadcasts to ``shape``:
    ones except the scaled units, sized only along the axes that index them."""
    axes = (axis,) if isinstance(axis, int) else axis
    sizes = [shape[each] for each in axes]
    flat = torch.ones(sizes[0] * (sizes[1] if len(sizes) > 1 else 1)).index_copy(0, index, scale)
    factor = flat.view(sizes)
    if len(axes) == 2 and axes[0] > axes[1]:
        factor = factor.T
    broadcast = [1] * len(shape)
    for each in axes:
        broadcast[each] = shape[each]
    return factor.reshape(broadcast)


def _expert_slices(shape: torch.Size, axis: tuple[int, int], index: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert neuron units as (expert, slice) index pairs."""
    width = shape[axis[1]]
    return index // width, index % width


def _pick(tensor: torch.Tensor, axis: tuple[int, int], experts: torch.Tensor,
          slices: torch.Tensor) -> torch.Tensor:
    """The (expert, slice) units of ``tensor`` (or of a factor that broadcasts to it):
    [units, the other axes...]."""
    moved = tensor.movedim(axis, (0, 1))
    if moved.shape[0] == 1 or moved.shape[1] == 1:  # a factor sized along one of the two
        experts = experts if moved.shape[0] > 1 else torch.zeros_like(experts)
        slices = slices if moved.shape[1] > 1 else torch.zeros_like(slices)
    return moved[experts, slices]


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
