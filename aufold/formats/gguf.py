"""Folding an edit into a copy of a GGUF file, block by block.

A GGUF file holds each projection as an [out, in] array (numpy order; GGUF lists
shapes reversed, in ggml's ``ne`` order). The sites table names the tensors
(:meth:`Architecture.gguf_naming`), so :func:`aufold.fold.weight_edits` gives the
scalings and :func:`aufold.fold.fold_tensor` applies them, as for a checkpoint.

- F32, F16 and BF16 tensors are scaled exactly (float32 product, one rounding).
- Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 tensors are quantized in blocks of consecutive
  elements of a row. Only the blocks that hold an edited element are dequantized,
  scaled and requantized (with the gguf package's reference quantizers); every
  other block keeps its bytes.
- Other types (K-quants, IQ types) mix scales across a super-block and have no
  reference quantizer here; they are refused before anything is written.

The output is the input file copied, then overwritten only in the edited tensors'
data, so metadata, tensor names, shapes, types and offsets stay byte for byte.
"""

from __future__ import annotations

import shutil
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize, quantize
from transformers import AutoConfig

from aufold.card import Artifact, ExportRecord, units_sentence
from aufold.edit import Edit
from aufold.errors import AufoldError, first_line
from aufold.fold import TensorEdit, fold_tensor, weight_edits
from aufold.modeling import fingerprint_of, fingerprint_sites
from aufold.sites import Architecture, architecture_for

FLOAT_TYPES: dict[GGMLQuantizationType, torch.dtype] = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}
BLOCK_TYPES: tuple[GGMLQuantizationType, ...] = (
    GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_1,
    GGMLQuantizationType.Q5_0,
    GGMLQuantizationType.Q5_1,
)
SUPPORTED_TYPES: tuple[str, ...] = tuple(t.name for t in (*FLOAT_TYPES, *BLOCK_TYPES))


@dataclass(frozen=True)
class GgufModel:
    """What a GGUF file is, read without loading its weights (they stay memory-mapped)."""

    path: Path
    architecture: Architecture
    fingerprint: str
    tensors: Mapping[str, ReaderTensor]


@dataclass(frozen=True)
class Patch:
    """New bytes for one tensor's data, at its absolute offset in the file."""

    name: str
    tensor_type: str
    offset: int
    data: bytes
    requantized_blocks: int  # 0 for float tensors
    blocks: int  # blocks in the tensor; 0 for float tensors


@dataclass(frozen=True)
class GgufFoldReport:
    """What a fold changed: the tensors, and for quantized ones how many blocks."""

    patches: tuple[Patch, ...]

    @property
    def tensor_types(self) -> tuple[str, ...]:
        return tuple(sorted({patch.tensor_type for patch in self.patches}))

    @property
    def requantized_blocks(self) -> int:
        return sum(patch.requantized_blocks for patch in self.patches)

    @property
    def quantized_blocks(self) -> int:
        return sum(patch.blocks for patch in self.patches)


def read_gguf_model(path: Path) -> GgufModel:
    """The architecture and fingerprint of a GGUF model, as transformers would load it."""
    tensors = gguf_tensors(path)
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError) as error:
        raise AufoldError(f"could not read the GGUF file {path}: {first_line(error)}") from None
    architecture = architecture_for(config.model_type)
    named = architecture.gguf_naming()
    shapes = {name: [int(n) for n in reversed(t.shape)] for name, t in tensors.items()}
    weights: dict[str, list[int]] = {}
    for layer in range(config.num_hidden_layers):
        for site in fingerprint_sites(architecture):  # the weights modeling.fingerprint hashes
            out_in = shapes.get(named.module_path(site, layer) + ".weight")
            if out_in is None:
                raise AufoldError(f"the GGUF file {path} has no tensor "
                                  f"{named.module_path(site, layer)}.weight; it is not a "
                                  f"complete {config.model_type} model")
            # out_in() is a transpose or nothing, so it also maps [out, in] to the stored shape.
            stored = architecture.out_in(torch.empty(out_in, device="meta")).shape
            weights[architecture.module_path(site, layer) + ".weight"] = list(stored)
    return GgufModel(path, architecture, fingerprint_of(config.to_dict(), weights), tensors)


def fold_gguf(source: GgufModel, edit: Edit, destination: Path) -> GgufFoldReport:
    """Write ``source`` with ``edit`` folded in to ``destination``; ``source`` is only read.

    Every tensor is folded in memory before the copy starts, so a refused tensor
    type or a plan that does not fit leaves nothing behind.
    """
    patches = []
    for name, tensor_edit in weight_edits(edit, source.architecture.gguf_naming()).items():
        tensor = source.tensors.get(name)
        if tensor is None:
            if tensor_edit.optional:
                continue
            raise AufoldError(f"the GGUF file has no tensor {name}; the plan does not fit it")
        patches.append(fold_gguf_tensor(tensor, tensor_edit))
    shutil.copyfile(source.path, destination)
    with destination.open("r+b") as file:
        for patch in patches:
            file.seek(patch.offset)
            file.write(patch.data)
    return GgufFoldReport(tuple(patches))


def fold_gguf_tensor(tensor: ReaderTensor, tensor_edit: TensorEdit) -> Patch:
    """The folded bytes of one GGUF tensor."""
    kind = tensor.tensor_type
    shape = tuple(int(n) for n in reversed(tensor.shape))
    raw = np.asarray(tensor.data).view(np.uint8).reshape(-1)
    if kind in FLOAT_TYPES:
        values = torch.from_numpy(raw.copy()).view(FLOAT_TYPES[kind]).reshape(shape)
        data = fold_tensor(values, tensor_edit, tensor.name).view(torch.uint8).numpy().tobytes()
        return Patch(tensor.name, kind.name, tensor.data_offset, data, 0, 0)
    if kind not in BLOCK_TYPES:
        raise AufoldError(f"tensor {tensor.name} is {kind.name}, which aufold cannot requantize "
                          f"block by block; supported types: {', '.join(SUPPORTED_TYPES)} "
                          f"(convert the model to one of them, or export a checkpoint)")
    block_size, type_size = GGML_QUANT_SIZES[kind]
    blocked = (*shape[:-1], shape[-1] // block_size)
    values = torch.from_numpy(dequantize(raw.reshape(*shape[:-1], -1), kind)).reshape(shape)
    folded = fold_tensor(values, tensor_edit, tensor.name).numpy()
    touched = _edited_elements(shape, tensor_edit).reshape(*blocked, block_size).any(-1).numpy()
    blocks = raw.reshape(*blocked, type_size).copy()
    blocks[touched] = quantize(folded.reshape(*blocked, block_size)[touched], kind)
    return Patch(tensor.name, kind.name, tensor.data_offset, blocks.tobytes(),
                 int(touched.sum()), int(touched.size))


def gguf_artifact(record: ExportRecord, file_name: str, report: GgufFoldReport) -> Artifact:
    """The card texts of a folded GGUF file."""
    blocks = (f"{report.requantized_blocks} of the {report.quantized_blocks} blocks of the "
              f"edited quantized tensors were requantized" if report.quantized_blocks
              else "no tensor needed requantizing")
    return Artifact(
        format="gguf",
        library_name="gguf",
        summary=f"""`{file_name}` is {_base_phrase(record.base_model, file_name)} with fine-grained
activation steering (AUSteer, arXiv 2602.04428) folded into its weights. {units_sentence(record)} Float
tensors (F32, F16, BF16) were scaled exactly, with one rounding. In quantized tensors
only the blocks that hold a steered unit were dequantized, scaled and requantized to
the same type ({blocks}); every other block, the metadata, and the tensor names and
shapes are byte for byte those of the input file. The requantized blocks carry the
format's usual quantization noise.""",
        usage=f"""With llama.cpp:

```bash
llama-cli -m {file_name} -p "Hello"
llama-server -m {file_name}
```

With transformers (dequantized on load):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/or/repo-id", gguf_file="{file_name}")
tokenizer = AutoTokenizer.from_pretrained("path/or/repo-id", gguf_file="{file_name}")
```""",
        written=f"""`aufold export --format gguf`: the edited tensors of the GGUF file were rewritten
   in place in a copy ({blocks}).""",
        settings=(("format", "GGUF"), ("edited tensor types", ", ".join(report.tensor_types))),
    )


def _base_phrase(base_model: str, file_name: str) -> str:
    """How the card names the base: its id, or "the GGUF model of the same name" when all
    that is known of it is the file name."""
    return "the GGUF model of the same name" if base_model == file_name else f"`{base_model}`"


def gguf_tensors(path: Path) -> dict[str, ReaderTensor]:
    """The tensors of a GGUF file by name, memory-mapped read-only (the input cannot change).

    A truncated or damaged file is refused here, in one line, before transformers parses it.
    """
    try:
        return {tensor.name: tensor for tensor in GGUFReader(path, "r").tensors}
    except (OSError, ValueError, struct.error, IndexError, KeyError, TypeError, EOFError) as error:
        raise AufoldError(f"{path} is not a valid GGUF file (truncated or damaged: "
                          f"{first_line(error)}); download it again") from None


def _edited_elements(shape: tuple[int, ...], tensor_edit: TensorEdit) -> torch.Tensor:
    changed = torch.zeros(shape, dtype=torch.bool)
    for axis, (index, _) in tensor_edit.axes.items():
        changed.index_fill_(axis, index, True)
    return changed
