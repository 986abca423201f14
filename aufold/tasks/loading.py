"""Loading a task's split by name, with the data folder and size checks the commands share."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from aufold.errors import AufoldError
from aufold.pairs import ContrastivePair, read_pairs
from aufold.tasks.files import SHARED_DATA, default_data_dir
from aufold.tasks.item import Item
from aufold.tasks.registry import get_task

T = TypeVar("T")


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """The folder given, else ``../shared/data`` beside the repository; an error names both."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    found = default_data_dir()
    if found is None:
        raise AufoldError(f"no data folder given and the default {SHARED_DATA} does not exist; "
                          f"pass --data-dir DIR (the folder that holds the task's files)")
    return found


def load_split(task: str, split: str, data_dir: str | Path | None, *, size: int | None = None,
               option: str = "--limit") -> list[Item]:
    """The first ``size`` items of a task's fixed split (all when ``size`` is None).

    ``option`` names the command-line option that asked for ``size``, so a split
    too small for it gets an error that says which option to lower.
    """
    items = get_task(task).load(split, resolve_data_dir(data_dir))
    return first(items, size, f"the {split} split of {task}", option)


def first(items: list[T], size: int | None, what: str, option: str) -> list[T]:
    """The first ``size`` of ``items`` (all for None); too few is an error naming ``option``."""
    if size is None:
        return items
    if size < 1:
        raise AufoldError(f"{option} must be at least 1, got {size}")
    if size > len(items):
        raise AufoldError(f"{what} has {len(items)} items, fewer than {option} {size}; choose "
                          f"{option} <= {len(items)}")
    return items[:size]


def task_pairs(task: str, data_dir: str | Path | None, *, size: int | None = None,
               option: str = "--pairs-size") -> list[ContrastivePair]:
    """Contrastive pairs built from a task's ``pairs`` split, the input of localization."""
    items = load_split(task, "pairs", data_dir, size=size, option=option)
    return get_task(task).contrastive_pairs(items)


def read_pairs_or_task(pairs_file: str | Path | None, task: str | None,
                       data_dir: str | Path | None, *, limit: int | None = None
                       ) -> list[ContrastivePair]:
    """The pairs of ``aufold localize``: a pairs file, or the pairs split of a task (the
    first ``limit`` of them)."""
    if (pairs_file is None) == (task is None):
        raise AufoldError("give either --pairs FILE or --task NAME (to localize on the task's "
                          "pairs split), exactly one of them")
    if task is None:
        if data_dir is not None:
            raise AufoldError("--data-dir goes with --task; drop it when giving --pairs")
        pairs = read_pairs(pairs_file)  # type: ignore[arg-type]
        return first(pairs, limit, f"pairs file {pairs_file}", "--limit")
    return task_pairs(task, data_dir, size=limit, option="--limit")
