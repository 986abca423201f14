"""Reading per-layer steering vectors from the formats people save them in; never pickle.

- ``.gguf``: a repeng / llama.cpp control vector, one ``direction.{layer}`` tensor per
  layer (what repeng's ``ControlVector.export_gguf`` and llama.cpp's
  ``cvector-generator`` write).
- ``.safetensors``: one tensor per layer, named by its layer (``13``,
  ``direction.13``, ``layers.13``, ``layer_13``, ...), or one [layers, hidden]
  tensor holding a vector for every layer (the steering-vectors / CAA layout).
- ``.json``: the same two shapes as lists: ``{"13": [...], ...}`` or ``[[...], ...]``,
  optionally under a ``"layers"``, ``"directions"`` or ``"vectors"`` key.
- a folder: CAA's layout, one file per layer whose name holds ``layer_{n}``
  (``vec_layer_13_<model>.npy``), each ``.npy`` (read without pickle),
  ``.safetensors`` or ``.json``.

Layer ``n`` is the output of decoder layer ``n``, counted from 0, as repeng and
llama.cpp count it. Shapes against the model are checked by
:func:`check_vectors` once the model is known.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from safetensors.torch import load_file

from aufold.errors import AufoldError, first_line
from aufold.jsonl import read_json_file

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".ckpt")
# "13", "direction.13", "model.layers.13", ...; a separator needs a name before it, so "-1"
# is not read as layer 1.
_KEY_LAYER = re.compile(r"(?:.*[^._-][._-])?(\d+)")
_FILE_LAYER = re.compile(r"layers?[._-]?(\d+)", re.IGNORECASE)  # vec_layer_13_<model>.npy
_JSON_WRAPPERS = ("layers", "directions", "vectors")
_FILE_SUFFIXES = (".npy", ".safetensors", ".json")


@dataclass(frozen=True)
class SteeringVectors:
    """Per-layer vectors (float32, 1-D), where they came from, and whether every layer has one."""

    vectors: Mapping[int, torch.Tensor]
    source: str  # the file or folder, for messages and provenance
    format: str  # "repeng-gguf", "safetensors", "json", "caa-folder"
    dense: bool = False  # one vector per layer of the model, by position

    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)


def read_vectors(path: str | Path) -> SteeringVectors:
    """Read a vector file or folder, refusing pickle and anything that is not finite numbers."""
    path = Path(path).expanduser()
    if not path.exists():
        raise AufoldError(f"vector file not found: {path}")
    if path.suffix in PICKLE_SUFFIXES:
        raise AufoldError(f"{path.name} is a pickle file, which can run code when loaded; save the "
                          f"vectors with safetensors instead: safetensors.torch.save_file("
                          f"{{str(layer): vector, ...}}, 'vectors.safetensors')")
    if path.is_dir():
        fmt, reader = "caa-folder", _read_folder
    elif path.suffix in _READERS:
        fmt, reader = _READERS[path.suffix]
    else:
        raise AufoldError(f"cannot read vectors from {path.name}; give a .gguf control vector, a "
                          f".safetensors or .json file, or a folder of per-layer files")
    vectors, dense = reader(path)
    if not vectors:
        raise AufoldError(f"{path} holds no vectors")
    for layer, vector in vectors.items():
        if not bool(torch.isfinite(vector).all()):
            raise AufoldError(f"the vector for layer {layer} in {path} is not finite; fix the file")
    return SteeringVectors(vectors, str(path), fmt, dense)


def check_vectors(vectors: SteeringVectors, *, hidden_size: int, num_layers: int) -> None:
    """Refuse vectors whose size or layers do not fit the model, saying what would."""
    if vectors.dense and len(vectors.vectors) != num_layers:
        raise AufoldError(f"{vectors.source} holds {len(vectors.vectors)} per-layer vectors but the "
                          f"model has {num_layers} layers; use vectors made for this model")
    for layer, vector in vectors.vectors.items():
        if layer >= num_layers:
            raise AufoldError(f"{vectors.source} has a vector for layer {layer} but the model has "
                              f"{num_layers} layers (0-{num_layers - 1}); use vectors made for "
                              f"this model")
        if vector.numel() != hidden_size:
            raise AufoldError(f"the vector for layer {layer} in {vectors.source} has "
                              f"{vector.numel()} values but the model's hidden size is "
                              f"{hidden_size}; use vectors made for this model")


def _read_control_vector(path: Path) -> tuple[dict[int, torch.Tensor], bool]:
    try:
        tensors = GGUFReader(path, "r").tensors
    except (OSError, ValueError, IndexError, KeyError, TypeError, EOFError, struct.error) as error:
        raise AufoldError(f"could not read the GGUF control vector {path}: "
                          f"{first_line(error)}") from None
    vectors: dict[int, torch.Tensor] = {}
    for tensor in tensors:
        if not tensor.name.startswith("direction."):
            continue
        layer = tensor.name.removeprefix("direction.")
        if not layer.isdigit():
            raise AufoldError(f"{path} has a tensor {tensor.name!r}; a control vector names them "
                              f"direction.<layer>")
        vectors[int(layer)] = _vector(np.array(tensor.data, dtype=np.float32), f"{path}:{tensor.name}")
    if not vectors:
        raise AufoldError(f"{path} has no direction.<layer> tensors; is it a control vector?")
    return vectors, False


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise AufoldError(f"could not read {path}: {first_line(error)}") from None


def _read_safetensors(path: Path) -> tuple[dict[int, torch.Tensor], bool]:
    tensors = _load_safetensors(path)
    if len(tensors) == 1:
        (name, only), = tensors.items()
        if only.dim() == 2 and min(only.shape) > 1:  # [layers, hidden]: one row per layer
            return _stacked(only, f"{path}:{name}"), True
    return _keyed(tensors.items(), path), False


def _read_json(path: Path) -> tuple[dict[int, torch.Tensor], bool]:
    data = read_json_file(path)
    if isinstance(data, dict):
        for wrapper in _JSON_WRAPPERS:
            if wrapper in data:
                data = data[wrapper]
                break
    if isinstance(data, list):
        return _stacked(data, str(path)), True
    if isinstance(data, dict):
        return _keyed(data.items(), path), False
    raise AufoldError(f"{path} must hold a list of per-layer vectors or an object mapping "
                      f"layers to vectors")


def _read_folder(folder: Path) -> tuple[dict[int, torch.Tensor], bool]:
    vectors: dict[int, torch.Tensor] = {}
    for file in sorted(folder.iterdir()):
        if file.suffix in PICKLE_SUFFIXES:
            raise AufoldError(f"{file} is a pickle file, which can run code when loaded; save "
                              f"each layer's vector as .npy or .safetensors instead")
        if file.suffix not in _FILE_SUFFIXES:
            continue
        match = _FILE_LAYER.search(file.stem)
        if match is None:
            raise AufoldError(f"cannot tell the layer of {file.name}; name per-layer files "
                              f"like vec_layer_<n>.npy")
        layer = int(match.group(1))
        if layer in vectors:
            raise AufoldError(f"{folder} has two files for layer {layer}")
        vectors[layer] = _vector(_read_one(file), str(file))
    return vectors, False


def _read_one(file: Path) -> Any:
    if file.suffix == ".npy":
        try:
            return np.load(file, allow_pickle=False)
        except ValueError as error:
            raise AufoldError(f"could not read {file} without pickle: {error}") from None
    if file.suffix == ".json":
        return read_json_file(file)
    tensors = _load_safetensors(file)
    if len(tensors) != 1:
        raise AufoldError(f"{file} holds {len(tensors)} tensors; a per-layer file holds one")
    return next(iter(tensors.values()))


def _stacked(rows: Any, where: str) -> dict[int, torch.Tensor]:
    """One vector per layer, by position: row i is layer i."""
    return {layer: _vector(row, f"{where}[{layer}]") for layer, row in enumerate(rows)}


def _keyed(items: Iterable[tuple[str, Any]], path: Path) -> dict[int, torch.Tensor]:
    """Vectors named by their layer ('13', 'direction.13', 'model.layers.13', ...)."""
    vectors: dict[int, torch.Tensor] = {}
    for key, values in items:
        match = _KEY_LAYER.fullmatch(key)
        if match is None:
            raise AufoldError(f"cannot tell the layer of {key!r} in {path}; name each vector by "
                              f"its layer, e.g. '13' or 'direction.13'")
        layer = int(match.group(1))
        if layer in vectors:
            raise AufoldError(f"{path} has two vectors for layer {layer}")
        vectors[layer] = _vector(values, f"{path}[{key!r}]")
    return vectors


def _vector(values: Any, where: str) -> torch.Tensor:
    try:
        vector = (values.float() if isinstance(values, torch.Tensor)
                  else torch.from_numpy(np.asarray(values, dtype=np.float32)))
    except (TypeError, ValueError):
        raise AufoldError(f"{where} is not a list of numbers") from None
    if vector.dim() == 0 or sum(size > 1 for size in vector.shape) > 1:
        raise AufoldError(f"{where} has shape {list(vector.shape)}; a steering vector is 1-D")
    return vector.reshape(-1).float()


Reader = Callable[[Path], tuple[dict[int, torch.Tensor], bool]]  # vectors, and whether dense
_READERS: dict[str, tuple[str, Reader]] = {
    ".gguf": ("repeng-gguf", _read_control_vector),
    ".safetensors": ("safetensors", _read_safetensors),
    ".json": ("json", _read_json),
}
