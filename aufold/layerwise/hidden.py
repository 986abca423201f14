"""The hidden states of every batch between two layers: in memory, or in a mapped file.

Layer streaming keeps the hidden states of all texts while one layer runs over them,
so their size, not the model's, sets the memory a run needs. Each batch's block is
overwritten in place by the next layer's output, so one copy is enough. When they
would not fit in the memory available, they go to a file under a work folder,
mapped into memory, which the kernel pages out as needed; the file is deleted
whatever happens.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from aufold.errors import AufoldError

GB = 1 << 30
MARGIN_BYTES = GB  # room left for the interpreter, kernels' scratch and the tokenizer


class HiddenStore:
    """Blocks of the given shapes, one per pass, in one buffer of ``dtype``."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], dtype: torch.dtype, *,
                 spill_dir: Path | None = None) -> None:
        sizes = [math.prod(shape) for shape in shapes]
        total = sum(sizes)
        self.path: Path | None = None
        if spill_dir is None:
            buffer = torch.empty(total, dtype=dtype)
        else:
            handle, name = tempfile.mkstemp(prefix="aufold-hidden-", suffix=".bin", dir=spill_dir)
            self.path = Path(name)
            os.ftruncate(handle, total * dtype.itemsize)
            os.close(handle)
            buffer = torch.from_file(name, shared=True, size=total, dtype=dtype)
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
        if self.path is not None:
            self.path.unlink(missing_ok=True)


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


def choose_spill(needed: int, layer_bytes: int, work_dir: Path | None,
                 spill: bool | None = None) -> Path | None:
    """Where the hidden states go: None for memory, or the work folder to spill to.

    ``spill`` forces the choice (True needs ``work_dir``); by default they stay in
    memory when they fit beside two layers and a margin. A work folder is checked for
    room before the first layer runs, so a run never fails half-way for lack of disk.
    """
    fits = needed + 2 * layer_bytes + MARGIN_BYTES <= available_memory()
    if spill is False or (spill is None and fits):
        return None
    if work_dir is None:
        raise AufoldError(f"the hidden states of all texts need {_gb(needed)}, more than the "
                          f"{_gb(available_memory())} of memory available beside one layer; pass "
                          f"--work-dir DIR on a disk with {_gb(needed)} free to keep them there, "
                          f"or localize fewer pairs or a shorter --max-length")
    if not work_dir.is_dir():
        raise AufoldError(f"--work-dir {work_dir} is not a folder; create it or choose another")
    free = shutil.disk_usage(work_dir).free
    if free < needed:
        raise AufoldError(f"--work-dir {work_dir} has {_gb(free)} free, but the hidden states "
                          f"need {_gb(needed)}; free some space or choose a folder on a larger disk")
    return work_dir


def _gb(size: int) -> str:
    return f"{size / GB:.2f} GB"
