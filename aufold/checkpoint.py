"""Safetensors checkpoints on disk, read and written one tensor at a time, never a shard at once.

A safetensors file is an 8-byte little-endian header length, a JSON header that
maps each tensor name to its dtype, shape and byte range, and then the raw
little-endian bytes of every tensor. That is all this module needs: headers are
parsed without touching the data, a tensor is read into memory it owns (no
memory map, whose touched pages would count as resident memory), unchanged
byte ranges are copied file to file by the kernel, and new files are written
header first, then tensor by tensor.

A checkpoint folder is either one ``model.safetensors`` or shards listed by
``model.safetensors.index.json``. Pickle weights (``.bin``, ``.pt``) are never
opened here: unpickling can run code.
"""

from __future__ import annotations

import errno
import json
import math
import os
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from aufold.errors import AufoldError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
MAX_HEADER_BYTES = 100_000_000  # the limit of the safetensors library itself
COPY_CHUNK = 1 << 30  # bytes per copy_file_range call

# The dtypes a fold can scale; other stored dtypes are copied as bytes, never parsed.
FLOAT_DTYPES: Mapping[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
# Bytes per element of every safetensors dtype, to check a header's byte ranges.
ITEM_SIZES: Mapping[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1,
}
DTYPE_NAMES: Mapping[torch.dtype, str] = {dtype: name for name, dtype in FLOAT_DTYPES.items()}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in its file: dtype name, shape and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class ShardHeader:
    """The parsed header of one safetensors file."""

    path: Path
    size: int  # of the whole file
    tensors: Mapping[str, TensorEntry]
    metadata: Mapping[str, str]


def read_header(path: str | Path) -> ShardHeader:
    """Parse a safetensors header, checking that every byte range lies inside the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _damaged(path, "shorter than a safetensors header")
            (length,) = struct.unpack("<Q", prefix)
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise _damaged(path, f"header length {length} does not fit the file")
            raw = json.loads(handle.read(length))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _damaged(path, str(error).splitlines()[0] if str(error) else type(error).__name__) from None
    if not isinstance(raw, dict):
        raise _damaged(path, "the header is not a JSON object")
    data_start = 8 + length
    metadata = raw.pop("__metadata__", None) or {}
    tensors = {}
    try:
        for name, info in raw.items():
            begin, end = (int(offset) + data_start for offset in info["data_offsets"])
            shape = tuple(int(dim) for dim in info["shape"])
            if any(dim < 0 for dim in shape):
                raise _damaged(path, f"tensor {name} has a negative dimension {list(shape)}")
            if not data_start <= begin <= end <= size:
                raise _damaged(path, f"tensor {name} lies outside the file (truncated?)")
            itemsize = ITEM_SIZES.get(str(info["dtype"]))
            if itemsize is not None and math.prod(shape) * itemsize != end - begin:
                raise _damaged(path, f"tensor {name} has {end - begin} bytes, not the "
                                     f"{math.prod(shape) * itemsize} its shape {list(shape)} needs")
            tensors[name] = TensorEntry(name, str(info["dtype"]), shape, begin, end)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise _damaged(path, f"bad tensor entry ({error})") from None
    return ShardHeader(path, size, tensors, dict(metadata))


@dataclass(frozen=True)
class Checkpoint:
    """A local safetensors checkpoint: its shards' headers and which shard holds each tensor."""

    folder: Path
    shards: Mapping[str, ShardHeader]  # file name -> header, in file name order
    weight_map: Mapping[str, str]  # tensor name -> file name
    index_file: str | None  # the index's file name, None for a single file

    def entry(self, name: str) -> TensorEntry:
        return self.shards[self.weight_map[name]].tensors[name]

    def entries(self) -> Iterator[TensorEntry]:
        return (self.entry(name) for name in self.weight_map)

    @property
    def largest_tensor_bytes(self) -> int:
        return max((entry.nbytes for entry in self.entries()), default=0)

    @property
    def weight_files(self) -> tuple[str, ...]:
        return tuple(self.shards) + ((self.index_file,) if self.index_file else ())


def has_safetensors(folder: Path) -> bool:
    return (folder / INDEX_FILE).is_file() or (folder / SINGLE_FILE).is_file()


def pickle_weight_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)


def local_checkpoint(folder: Path, *, allow_pickle: bool) -> Checkpoint | None:
    """The checked safetensors checkpoint of a model folder, or None for a folder of pickle
    weights only when ``allow_pickle`` lets transformers unpickle them (with torch's
    ``weights_only`` loader). Without it such a folder, and any damaged one, is refused."""
    if allow_pickle and not has_safetensors(folder) and pickle_weight_files(folder):
        return None
    return open_checkpoint(folder)


def open_checkpoint(folder: str | Path) -> Checkpoint:
    """Read the index (or the single file's header) and every shard header of a folder.

    Refuses pickle-only folders, shards that the index names but the folder lacks,
    and tensors that the index places in a shard that does not hold them.
    """
    folder = Path(folder)
    if (folder / INDEX_FILE).is_file():
        return _open_sharded(folder)
    if (folder / SINGLE_FILE).is_file():
        header = read_header(folder / SINGLE_FILE)
        return Checkpoint(folder, {SINGLE_FILE: header}, {name: SINGLE_FILE for name in header.tensors},
                          None)
    pickles = pickle_weight_files(folder) if folder.is_dir() else []
    if pickles:
        raise AufoldError(
            f"{folder} holds pickle weights only ({', '.join(pickles[:3])}); aufold does not "
            f"unpickle files, which can run code. Convert the checkpoint to safetensors (load it "
            f"and call save_pretrained, or use the Hub's convert space), or pass --allow-pickle "
            f"to load it through transformers in memory")
    others = sorted(p.name for p in folder.glob("*.safetensors")) if folder.is_dir() else []
    if others:
        raise AufoldError(f"{folder} has safetensors shards ({', '.join(others[:3])}) but no "
                          f"{INDEX_FILE} or {SINGLE_FILE}; restore the index file")
    raise AufoldError(f"{folder} has no safetensors weights ({SINGLE_FILE} or {INDEX_FILE})")


def _open_sharded(folder: Path) -> Checkpoint:
    index_path = folder / INDEX_FILE
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise AufoldError(f"{index_path} is damaged ({error}); restore it from the original "
                          f"checkpoint") from None
    files = sorted(set(weight_map.values()))
    for file in files:
        if not isinstance(file, str) or Path(file).name != file or file in (".", ".."):
            raise AufoldError(f"{INDEX_FILE} names a shard outside the folder: {file!r}; the "
                              f"checkpoint is damaged or not safe to read")
    missing = [file for file in files if not (folder / file).is_file()]
    if missing:
        raise AufoldError(f"shard {missing[0]} listed in {INDEX_FILE} is missing from {folder}"
                          f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                          f"download the complete checkpoint again")
    shards = {file: read_header(folder / file) for file in files}
    for name, file in weight_map.items():
        if name not in shards[file].tensors:
            raise AufoldError(f"{INDEX_FILE} places tensor {name} in {file}, which does not hold "
                              f"it; the checkpoint is damaged or mixed from two versions")
    for file, shard in shards.items():
        unlisted = sorted(set(shard.tensors) - set(weight_map))
        if unlisted:
            raise AufoldError(f"shard {file} holds tensor {unlisted[0]}, which {INDEX_FILE} does "
                              f"not list; the checkpoint is damaged or mixed from two versions")
    return Checkpoint(folder, shards, dict(weight_map), INDEX_FILE)


def stored_name(name: str, stored: Mapping[str, str]) -> str | None:
    """The name a tensor has on disk: as in the model, or without the base model prefix
    (GPT-2's original checkpoints store ``h.0...`` for ``transformer.h.0...``)."""
    if name in stored:
        return name
    short = name.split(".", 1)[-1]
    return short if short in stored else None


def read_tensor(handle: BinaryIO, entry: TensorEntry) -> torch.Tensor:
    """Read one floating-point tensor into fresh, writable memory that it owns."""
    dtype = FLOAT_DTYPES.get(entry.dtype)
    if dtype is None:
        raise AufoldError(f"tensor {entry.name} is stored as {entry.dtype}; aufold folds "
                          f"floating-point weights only ({', '.join(FLOAT_DTYPES)}), not "
                          f"quantized ones")
    numel = 1
    for dim in entry.shape:
        numel *= dim
    if numel * dtype.itemsize != entry.nbytes:
        raise AufoldError(f"tensor {entry.name} has {entry.nbytes} bytes, not the "
                          f"{numel * dtype.itemsize} its shape {list(entry.shape)} needs; the "
                          f"checkpoint is damaged")
    tensor = torch.empty(entry.shape, dtype=dtype)
    view = memoryview(tensor.view(-1).view(torch.uint8).numpy()) if numel else memoryview(b"")
    done = 0
    while done < entry.nbytes:
        handle.seek(entry.begin + done)
        read = handle.readinto(view[done:])
        if not read:
            raise AufoldError(f"unexpected end of file reading {entry.name} from {handle.name}")
        done += read
    return tensor


def copy_range(source: int, target: int, offset: int, count: int, target_offset: int) -> None:
    """Copy ``count`` bytes between open files inside the kernel, without a user-space buffer."""
    while count > 0:
        try:
            copied = os.copy_file_range(source, target, min(count, COPY_CHUNK), offset, target_offset)
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            copied = _copy_range_buffered(source, target, offset, min(count, COPY_CHUNK), target_offset)
        if copied == 0:
            raise AufoldError("unexpected end of file while copying a checkpoint shard")
        offset, target_offset, count = offset + copied, target_offset + copied, count - copied


def _copy_range_buffered(source: int, target: int, offset: int, count: int, target_offset: int) -> int:
    chunk = os.pread(source, min(count, 1 << 24), offset)
    write_all(target, chunk, target_offset)
    return len(chunk)


def write_all(target: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(target, view, offset)
        view, offset = view[written:], offset + written


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a contiguous CPU tensor, without a copy."""
    flat = tensor.contiguous().view(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def header_bytes(entries: Sequence[tuple[str, str, Sequence[int], int]],
                 metadata: Mapping[str, str] | None = None) -> bytes:
    """A safetensors header for tensors stored back to back in the order given.

    ``entries`` are ``(name, dtype name, shape, byte count)``. The JSON is padded
    with spaces so the data starts 8-byte aligned, as the safetensors library does.
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text


@contextmanager
def safetensors_writer(path: str | Path, entries: Sequence[tuple[str, str, Sequence[int], int]],
                       metadata: Mapping[str, str] | None = None) -> Iterator[SafetensorsWriter]:
    """Write a safetensors file tensor by tensor: the header now, each tensor's bytes later."""
    with open(path, "wb") as handle:
        writer = SafetensorsWriter(handle, entries)
        handle.write(header_bytes(entries, metadata))
        yield writer
        writer.close()


class SafetensorsWriter:
    """Appends tensor bytes in header order; refuses wrong sizes and missing tensors."""

    def __init__(self, handle: BinaryIO, entries: Iterable[tuple[str, str, Sequence[int], int]]) -> None:
        self._handle = handle
        self._pending = [(name, nbytes) for name, _, _, nbytes in entries]
        self._next = 0
        self._written = 0

    def write(self, name: str, data: bytes | memoryview) -> None:
        expected, nbytes = self._pending[self._next]
        view = memoryview(data).cast("B")
        if name != expected:
            raise ValueError(f"expected tensor {expected} next, got {name}")
        self._written += len(view)
        self._handle.write(view)
        if self._written > nbytes:
            raise ValueError(f"tensor {name} got more than its {nbytes} bytes")
        if self._written == nbytes:
            self._next += 1
            self._written = 0

    def close(self) -> None:
        if self._next != len(self._pending):
            raise ValueError(f"tensor {self._pending[self._next][0]} was never written")


def _damaged(path: Path, why: str) -> AufoldError:
    return AufoldError(f"{path} is not a valid safetensors file ({why}); download it again")
