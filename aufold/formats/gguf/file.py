"""Reading a GGUF model without loading its weights, and writing a copy with some tensors replaced.

A GGUF file is a header (metadata, then one info record per tensor: name, shape, type
and data offset) followed by the tensors' data, each aligned. A replacement of the
same type and size is written over a plain copy; one that changes a tensor's type (a
re-encoded tensor) rewrites the type and offset fields of the header records, which
have a fixed size, and lays the data out again. Either way every other byte of the
header and every other tensor's data is the input's.
"""

from __future__ import annotations

import re
import shutil
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from transformers import AutoConfig

from aufold.errors import AufoldError, first_line
from aufold.modeling import fingerprint_of, fingerprint_sites
from aufold.sites import Architecture, architecture_for


@dataclass(frozen=True)
class GgufModel:
    """What a GGUF file is, read without loading its weights (they stay memory-mapped)."""

    path: Path
    architecture: Architecture
    fingerprint: str
    reader: GGUFReader  # parsing a header takes seconds on a large vocabulary: done once
    tensors: Mapping[str, ReaderTensor]

    @classmethod
    def read(cls, path: Path, architecture: Architecture, fingerprint: str) -> GgufModel:
        reader = read_gguf(path)
        return cls(path, architecture, fingerprint, reader,
                   {tensor.name: tensor for tensor in reader.tensors})


@dataclass(frozen=True)
class TensorData:
    """New contents for one tensor: its type and every byte of its data."""

    tensor_type: GGMLQuantizationType
    data: bytes


def gguf_tensors(path: Path) -> dict[str, ReaderTensor]:
    """The tensors of a GGUF file by name, memory-mapped read-only (the input cannot change).

    A truncated or damaged file is refused here, in one line, before transformers parses it.
    """
    return {tensor.name: tensor for tensor in read_gguf(path).tensors}


def read_gguf(path: Path) -> GGUFReader:
    """A GGUF file's header parsed, its data memory-mapped read-only.

    Parsing takes seconds for a large vocabulary (28 s for Gemma 3's 262k tokens), and
    an export reads the header for the card and again for the fold, so the last few
    are kept, keyed by the file's identity, size and modification time.
    """
    stat = path.stat()
    return _read_gguf(path.resolve(), stat.st_ino, stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=2)
def _read_gguf(path: Path, inode: int, size: int, modified: int) -> GGUFReader:
    try:
        return GGUFReader(path, "r")
    except (OSError, ValueError, struct.error, IndexError, KeyError, TypeError, EOFError) as error:
        raise AufoldError(f"{path} is not a valid GGUF file (truncated or damaged: "
                          f"{first_line(error)}); download it again") from None


# Metadata keys that name the model a GGUF file was converted from, by its hub URL. Not
# general.base_model.N.*: gguf-py fills those from the model card's base_model, the model
# this one was fine-tuned from (an Instruct file would name its pretrained parent).
SOURCE_KEYS = ("general.source.url", "general.source.huggingface.repository",
               "general.source.repo_url")
HUB_URL = re.compile(r"(?:huggingface\.co/|^)([\w.-]+/[\w.-]+?)/?$")


def gguf_source_repo(path: Path) -> str | None:
    """The hub id of the model a GGUF file was converted from, where its metadata says."""
    fields = read_gguf(path).fields
    for key in SOURCE_KEYS:
        if key in fields:
            value = fields[key].contents()
            match = HUB_URL.search(str(value).strip()) if isinstance(value, str) else None
            if match:
                return match.group(1)
    return None


def read_gguf_model(path: Path) -> GgufModel:
    """The architecture and fingerprint of a GGUF model, as transformers would load it."""
    reader = read_gguf(path)
    if reader.byte_order != "I":  # scales and float tensors are read in this machine's order
        raise AufoldError(f"{path} is a big-endian GGUF file, which aufold does not fold; "
                          f"convert it to little-endian (gguf-py's gguf_convert_endian.py)")
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError) as error:
        raise AufoldError(f"could not read the GGUF file {path}: {first_line(error)}") from None
    architecture = architecture_for(config)
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
    return GgufModel(path, architecture, fingerprint_of(config.to_dict(), weights), reader, tensors)


def write_gguf(source: GgufModel, replaced: Mapping[str, TensorData], destination: Path) -> None:
    """Write ``source`` to ``destination`` with the data (and type) of some tensors replaced."""
    reader, tensors = source.reader, source.tensors
    same_layout = all(new.tensor_type == tensors[name].tensor_type
                      and len(new.data) == tensors[name].n_bytes for name, new in replaced.items())
    if same_layout:
        shutil.copyfile(source.path, destination)
        with destination.open("r+b") as file:
            for name, new in replaced.items():
                file.seek(tensors[name].data_offset)
                file.write(new.data)
        return
    header = bytearray(reader.data[:reader.data_offset])
    ordered = sorted(tensors.values(), key=lambda tensor: tensor.data_offset)
    layout: list[tuple[int, ReaderTensor]] = []
    cursor = 0
    for tensor in ordered:
        cursor += -cursor % reader.alignment
        new = replaced.get(tensor.name)
        kind, offset = tensor.field.parts[4:6]
        type_at = tensor.field.offset + sum(int(part.nbytes) for part in tensor.field.parts[:4])
        kind_value = kind.copy()
        kind_value[0] = int(new.tensor_type if new else tensor.tensor_type)
        offset_value = offset.copy()
        offset_value[0] = cursor
        header[type_at:type_at + 4] = kind_value.tobytes()
        header[type_at + 4:type_at + 12] = offset_value.tobytes()
        layout.append((cursor, tensor))
        cursor += len(new.data) if new else int(tensor.n_bytes)
    with destination.open("wb") as file:
        file.write(header)
        for offset, tensor in layout:
            file.write(b"\0" * (reader.data_offset + offset - file.tell()))
            new = replaced.get(tensor.name)
            file.write(new.data if new else _raw_bytes(reader, tensor))
        # ggml sizes the data section as the padded sizes of all tensors, the last included.
        file.write(b"\0" * (-(file.tell() - reader.data_offset) % reader.alignment))


def _raw_bytes(reader: GGUFReader, tensor: ReaderTensor) -> memoryview:
    return memoryview(reader.data[tensor.data_offset:tensor.data_offset + tensor.n_bytes])
