"""The hidden states of every batch between two layers: in memory, or in a mapped file.

Layer streaming keeps the hidden states of all texts while one layer runs over them,
so their size, not the model's, sets the memory a run needs. Each batch's block is
overwritten in place by the next layer's output, so one copy is enough. When they
would not fit in the memory available, they go to a file under a work folder,
mapped into memory, which the kernel pages out as needed. Its space is reserved
up front (a disk that fills later cannot kill the run half-way), and its name is
removed as soon as it is mapped, so no end of the process, a kill included, leaves
it behind.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from aufold.errors import AufoldError

if TYPE_CHECKING:
    from aufold.layerwise.skeleton import LayerwiseModel

GB = 1 << 30
MARGIN_BYTES = GB  # room left for the interpreter, kernels' scratch and the tokenizer


class HiddenStore:
    """Blocks of the given shapes, one per pass, in one buffer of ``dtype``."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, *,
                 spill_dir: Path | None = None) -> None:
        sizes = [math.prod(shape) for shape in shapes]
        total = sum(sizes)
        if spill_dir is None:
            buffer = torch.empty(total, dtype=dtype)
        else:
            buffer = _mapped_file(spill_dir, total, dtype)
        self.blocks: list[torch.Tensor] = []
        offset = 0
        for shape, size in zip(shapes, sizes):
            self.blocks.append(buffer[offset:offset + size].view(shape))
            offset += size

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.blocks[index]

    def __enter__(self) -> HiddenStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.blocks.clear()


def _mapped_file(folder: Path, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A tensor backed by a new file in ``folder``, reserved on disk and already unlinked."""
    nbytes = numel * dtype.itemsize
    try:
        handle, name = tempfile.mkstemp(prefix="aufold-hidden-", suffix=".bin", dir=folder)
    except OSError as error:
        raise AufoldError(f"cannot create a file in --work-dir {folder} ({error.strerror}); "
                          f"choose a folder you can write to") from None
    try:
        if nbytes:
            os.posix_fallocate(handle, 0, nbytes)
        return torch.from_file(name, shared=True, size=numel, dtype=dtype)
    except OSError as error:
        raise AufoldError(f"cannot reserve {size_text(nbytes)} for the hidden states in --work-dir "
                          f"{folder} ({error.strerror}); free some space or choose another "
                          f"folder") from None
    finally:
        os.close(handle)
        os.unlink(name)  # the mapping stays valid; the name goes now


def open_store(lm: LayerwiseModel, shapes: Sequence[tuple[int, ...]], what: str) -> HiddenStore:
    """The store for ``shapes`` in the model's dtype, in memory or spilled to the model's
    work folder; says on stderr which, and what it holds (``what``)."""
    from aufold.progress import status

    needed = hidden_bytes(shapes, lm.dtype)
    largest = lm.largest_part_bytes()
    spill_dir = choose_spill(needed, largest, lm.work_dir, lm.spill)
    status(f"layer streaming: {lm.num_layers} layers, one at a time (the largest part of the "
           f"model {size_text(largest)}); hidden states of {what} ({size_text(needed)}) "
           + (f"in a memory-mapped file under {spill_dir}" if spill_dir else "in memory"))
    return HiddenStore(shapes, lm.dtype, spill_dir=spill_dir)


def hidden_bytes(shapes: Sequence[tuple[int, ...]], dtype: torch.dtype) -> int:
    return sum(math.prod(shape) for shape in shapes) * dtype.itemsize


def available_memory() -> int:
    """Bytes the kernel says a process can still allocate without swapping."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class HiddenStatesDoNotFit(AufoldError):
    """The hidden states of layer streaming fit neither in memory nor, without a work
    folder, anywhere else."""

    def __init__(self, needed: str, message: str) -> None:
        super().__init__(message)
        self.needed = needed


def choose_spill(needed: int, layer_bytes: int, work_dir: Path | None,
                 spill: bool | None = None) -> Path | None:
    """Where the hidden states go: None for memory, or the work folder to spill to.

    ``spill`` forces the choice (True needs ``work_dir``); by default they stay in
    memory when they fit beside two layers and a margin. A work folder is checked for
    room before the first layer runs, so a run never fails half-way for lack of disk.
    """
    available = available_memory()
    beside = 2 * layer_bytes + MARGIN_BYTES
    if spill is False or (spill is None and needed + beside <= available):
        return None
    if work_dir is None:
        raise HiddenStatesDoNotFit(size_text(needed),
                                   f"the hidden states of all texts need {size_text(needed)}, and "
                          f"{size_text(available)} of memory is available, of which the largest "
                          f"part of the model and a margin take {size_text(beside)}; pass "
                          f"--work-dir DIR on a disk with {size_text(needed)} free to keep them "
                          f"there, or use fewer texts (--limit) or a shorter --max-length")
    if not work_dir.is_dir():
        raise AufoldError(f"--work-dir {work_dir} is not a folder; create it or choose another")
    if not os.access(work_dir, os.W_OK | os.X_OK):
        raise AufoldError(f"--work-dir {work_dir} is not writable; choose a folder you can "
                          f"write to")
    free = shutil.disk_usage(work_dir).free
    if free < needed:
        raise AufoldError(f"--work-dir {work_dir} has {size_text(free)} free, but the hidden "
                          f"states need {size_text(needed)}; free some space or choose a folder "
                          f"on a larger disk")
    return work_dir


def size_text(size: int) -> str:
    """Bytes as GB, or MB below one GB (so that small sizes do not read as 0.00 GB)."""
    return f"{size / GB:.2f} GB" if size >= GB else f"{size / 2**20:.1f} MB"
