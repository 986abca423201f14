"""Folding an edit into a copy of a GGUF file, keeping each tensor's quantized codes where it can.

aufold.sites names the tensors (:meth:`Architecture.gguf_naming`), so
:func:`aufold.fold.weight_edits` gives the scalings as for a checkpoint. Each edited
tensor then takes the most exact way its type allows:

- F32, F16 and BF16 tensors are scaled (float32 product, one rounding).
- A row scaling of a block-quantized tensor scales the float16 block scales of those
  rows (:mod:`.blocks`): the codes stay, and the result is exact up to the float16
  rounding of the new scales. ``mlp-out`` units are rows of ``ffn_down``; ``mlp``
  units are columns of ``ffn_down``, but in a gated MLP (neuron = act(gate x) *
  (up x)) they are equally rows of ``ffn_up``, so they fold there.
- A column scaling of a block-quantized tensor (``head`` units of ``attn_output``,
  ``mlp`` units of an ungated MLP) cannot move a block scale, since a block runs
  along a row. That tensor alone is re-encoded to Q8_0 (or F16): dequantized,
  scaled and quantized once. A Q8_0 tensor re-encoded to Q8_0 keeps its type, and
  only the blocks that hold an edited unit are requantized.

Every other tensor's bytes, and the metadata, are the input's (:mod:`.file`). A
composed edit (:meth:`Edit.compose`) folds part by part, as in a checkpoint, except into
block scales, which hold one factor per row: there the parts' factors multiply first.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, ReaderTensor
from gguf.quants import dequantize, quantize

from aufold.defaults import GGUF_REENCODE, GGUF_REENCODE_NAMES
from aufold.edit import Edit, SteeredUnit
from aufold.errors import AufoldError
from aufold.fold import TensorEdit, check_edit_fits, fold_tensor, weight_edits
from aufold.formats import check_gguf_reencode
from aufold.formats.gguf.blocks import BLOCK_SCALES, scale_rows
from aufold.formats.gguf.file import GgufModel, TensorData, write_gguf
from aufold.safety.limits import check_finite
from aufold.sites import GGUF_LAYERS

Q = GGMLQuantizationType
FLOAT_TYPES: Mapping[GGMLQuantizationType, torch.dtype] = {
    Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16,
}
# What a column-edited block-quantized tensor becomes (``--gguf-reencode``).
REENCODE_TYPES: Mapping[str, GGMLQuantizationType] = {
    name: Q[name.upper()] for name in GGUF_REENCODE_NAMES}
Method = Literal["scaled", "block scales", "requantized blocks", "re-encoded"]


@dataclass(frozen=True)
class TensorFold:
    """How one tensor was folded."""

    name: str
    source_type: str
    written_type: str
    method: Method
    blocks: int = 0  # blocks whose bytes changed (block scales, requantized blocks)


@dataclass(frozen=True)
class GgufFoldReport:
    """What a fold changed, tensor by tensor."""

    folds: tuple[TensorFold, ...]

    @property
    def tensor_types(self) -> tuple[str, ...]:
        """The types of the edited tensors as written."""
        return tuple(sorted({fold.written_type for fold in self.folds}))

    def by_method(self, method: Method) -> tuple[TensorFold, ...]:
        return tuple(fold for fold in self.folds if fold.method == method)


def fold_gguf(source: GgufModel, edit: Edit, destination: Path, *, reencode: str = GGUF_REENCODE
              ) -> GgufFoldReport:
    """Write ``source`` with ``edit`` folded in to ``destination``; ``source`` is only read.

    Every tensor is folded in memory before the file is written, so a refused tensor
    type or a plan that does not fit leaves nothing behind.
    """
    target = REENCODE_TYPES[check_gguf_reencode(reencode)]
    replaced: dict[str, TensorData] = {}
    folds = []
    for name, tensor_edit in gguf_tensor_edits(edit, source).items():
        tensor = source.tensors.get(name)
        if tensor is None:
            if tensor_edit.optional:
                continue
            raise AufoldError(f"the GGUF file has no tensor {name}; the plan does not fit it")
        replaced[name], fold = fold_gguf_tensor(tensor, tensor_edit, target)
        folds.append(fold)
    write_gguf(source, replaced, destination)
    return GgufFoldReport(tuple(folds))


def gguf_tensor_edits(edit: Edit, source: GgufModel) -> dict[str, TensorEdit]:
    """The scalings of each tensor of ``source``: :func:`weight_edits`, except that the
    ``mlp`` units of a gated MLP whose ``ffn_down`` is block-quantized fold into the rows
    of ``ffn_up`` (and its bias), where no requantization is needed. A composed edit keeps
    one step per part, as for a checkpoint."""
    architecture = source.architecture
    moved = {(u.site, u.layer, u.unit) for u in edit.units
             if u.site == "mlp" and _up_rows_hold_neurons(source, u.layer)}

    def key(unit: SteeredUnit) -> tuple[str, int, int]:
        return unit.site, unit.layer, unit.unit

    parts = edit.steps()
    rest = Edit.compose([Edit.of(u for u in part.units if key(u) not in moved) for part in parts])
    edits = weight_edits(rest, architecture.gguf_naming())
    for number, part in enumerate(parts):
        for group in Edit.of(u for u in part.units if key(u) in moved).groups():
            up = f"{GGUF_LAYERS}.{group.layer}.{architecture.gguf_mlp_up}"
            for name, optional in ((f"{up}.weight", False), (f"{up}.bias", True)):
                tensor_edit = edits.setdefault(name, TensorEdit(optional=optional))
                tensor_edit.step(number)[0] = (group.index, group.scale)
    return edits


def _up_rows_hold_neurons(source: GgufModel, layer: int) -> bool:
    """Whether ``mlp`` units of ``layer`` fold into rows of a gated up projection instead
    of columns of a block-quantized down projection."""
    naming = source.architecture.gguf_naming()
    down = source.tensors.get(f"{naming.module_path('mlp', layer)}.weight")
    up_name = source.architecture.gguf_mlp_up
    up = source.tensors.get(f"{GGUF_LAYERS}.{layer}.{up_name}.weight") if up_name else None
    gated = f"{GGUF_LAYERS}.{layer}.ffn_gate.weight" in source.tensors  # llama.cpp's gate name
    if down is None or up is None or not gated or down.tensor_type in FLOAT_TYPES:
        return False
    neurons = int(down.shape[0])  # GGUF shapes are ggml's [in, out]: down's in is the neurons
    return int(up.shape[-1]) == neurons and (
        up.tensor_type in FLOAT_TYPES or up.tensor_type in BLOCK_SCALES)


def fold_gguf_tensor(tensor: ReaderTensor, tensor_edit: TensorEdit,
                     reencode: GGMLQuantizationType = Q.Q8_0) -> tuple[TensorData, TensorFold]:
    """The folded data of one GGUF tensor, and how it was folded."""
    kind = tensor.tensor_type
    shape = tuple(int(n) for n in reversed(tensor.shape))
    raw = np.asarray(tensor.data).view(np.uint8).reshape(-1)
    if kind in FLOAT_TYPES:
        values = torch.from_numpy(raw.copy()).view(FLOAT_TYPES[kind]).reshape(shape)
        data = fold_tensor(values, tensor_edit, tensor.name).view(torch.uint8).numpy().tobytes()
        return TensorData(kind, data), TensorFold(tensor.name, kind.name, kind.name, "scaled")
    block_size, type_size = GGML_QUANT_SIZES[kind]
    blocks = raw.reshape(*shape[:-1], shape[-1] // block_size, type_size).copy()
    row_scaling = _rows_only(tensor_edit)
    if row_scaling is not None and kind in BLOCK_SCALES:
        check_edit_fits(shape, tensor_edit, tensor.name)
        rows, factors = row_scaling
        scale_rows(blocks, rows.numpy(), factors.numpy(), kind, tensor.name)
        fold = TensorFold(tensor.name, kind.name, kind.name, "block scales",
                          len(rows) * blocks.shape[-2])
        return TensorData(kind, blocks.tobytes()), fold
    folded = fold_tensor(_dequantized(tensor, raw, shape), tensor_edit, tensor.name)
    if kind == reencode:  # a Q8_0 tensor: requantize only the blocks that hold an edited unit
        touched = _edited_elements(shape, tensor_edit).reshape(*blocks.shape[:-1], block_size)
        touched = touched.any(-1).numpy()
        blocks[touched] = quantize(folded.numpy().reshape(*blocks.shape[:-1], block_size)[touched],
                                   kind)
        _check_decodes_finite(tensor.name, blocks, kind)
        fold = TensorFold(tensor.name, kind.name, kind.name, "requantized blocks", int(touched.sum()))
        return TensorData(kind, blocks.tobytes()), fold
    if reencode == Q.F16:
        half = folded.to(torch.float16)
        check_finite(tensor.name, half)
        data = half.view(torch.uint8).numpy().tobytes()
    else:
        encoded = quantize(folded.numpy(), reencode)
        _check_decodes_finite(tensor.name, encoded, reencode)
        data = encoded.tobytes()
    return TensorData(reencode, data), TensorFold(tensor.name, kind.name, reencode.name, "re-encoded")


def _rows_only(tensor_edit: TensorEdit) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The rows and their factors when every step scales rows only, else None. A block
    scale holds one factor, so the steps of a composed edit multiply into it (float32)."""
    if any(set(axes) - {0} for axes in tensor_edit.steps):
        return None
    rows = tensor_edit.edited()[0]  # ascending
    factors = torch.ones(len(rows))
    for axes in tensor_edit.steps:
        if 0 in axes:
            index, scale = axes[0]
            position = torch.searchsorted(rows, index)
            factors[position] = factors[position] * scale
    return rows, factors


def _dequantized(tensor: ReaderTensor, raw: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    try:
        values = dequantize(raw.reshape(*shape[:-1], -1), tensor.tensor_type)
    except NotImplementedError:
        raise AufoldError(f"tensor {tensor.name} is {tensor.tensor_type.name}, which the gguf "
                          f"package cannot decode, so it cannot be re-encoded with the edit; "
                          f"export a checkpoint or a LoRA adapter instead, or choose sites "
                          f"that scale rows only (--site mlp-out)") from None
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


def _check_decodes_finite(name: str, blocks: np.ndarray, kind: GGMLQuantizationType) -> None:
    """Q8_0 values are d times int8 codes: finite exactly when every block scale d is."""
    type_size = GGML_QUANT_SIZES[kind][1]
    scales = BLOCK_SCALES[kind].read(blocks.reshape(-1, type_size))
    check_finite(name, torch.from_numpy(scales))


def _edited_elements(shape: tuple[int, ...], tensor_edit: TensorEdit) -> torch.Tensor:
    changed = torch.zeros(shape, dtype=torch.bool)
    for axis, index in tensor_edit.edited().items():
        changed.index_fill_(axis, index, True)
    return changed

