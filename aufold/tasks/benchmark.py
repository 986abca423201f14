"""A task described as data: which file and which items make each fixed split."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from aufold.errors import AufoldError
from aufold.tasks.base import Task, TaskKind, check_split
from aufold.tasks.files import Record, read_jsonl, require_file
from aufold.tasks.item import Item

Reader = Callable[[Path], list[Record]]
# Builds an item from a raw record and its 1-based position in the file.
ItemBuilder = Callable[[Record, int], Item]


@dataclass(frozen=True)
class Split:
    """Where one split's items come from.

    ``rows`` keeps the items at 1-based positions ``first..last`` (inclusive) in file
    order; ``ids`` keeps the items whose ``idx`` lies in one of the inclusive ranges;
    with neither, the whole file is the split. ``size`` is the count the data README
    fixes, checked on every load so that a changed file cannot silently shift a split.
    """

    file: str
    size: int
    rows: tuple[int, int] | None = None
    ids: tuple[tuple[int, int], ...] | None = None
    read: Reader = read_jsonl

    def select(self, records: list[Record]) -> list[tuple[int, Record]]:
        """Return ``(position, record)`` for the records of this split, in file order."""
        numbered = list(enumerate(records, start=1))
        if self.rows is not None:
            first, last = self.rows
            numbered = numbered[first - 1:last]
        if self.ids is not None:
            numbered = [(n, r) for n, r in numbered if _in_ranges(r.get("idx"), self.ids)]
        return numbered


def _in_ranges(value: object, ranges: tuple[tuple[int, int], ...]) -> bool:
    return isinstance(value, int) and any(low <= value <= high for low, high in ranges)


# eq=False: tasks compare by identity, and the splits mapping is not hashable.
@dataclass(frozen=True, eq=False)
class BenchmarkTask(Task):
    """A built-in benchmark: its splits as :class:`Split` records and an item builder."""

    name: str
    kind: TaskKind
    splits: Mapping[str, Split]
    build_item: ItemBuilder

    def load(self, split: str, data_dir: Path) -> list[Item]:
        """Load ``split`` from the task's files under ``data_dir`` (the shared data root)."""
        check_split(self.name, split)
        spec = self.splits[split]
        path = require_file(Path(data_dir), spec.file, self.name)
        chosen = spec.select(spec.read(path))
        if len(chosen) != spec.size:
            raise AufoldError(f"{self.name} {split}: expected {spec.size} items in {path}, "
                              f"found {len(chosen)}; the fixed splits were written for the "
                              f"original file, so restore it")
        return [self._build(record, number, path) for number, record in chosen]

    def _build(self, record: Record, number: int, path: Path) -> Item:
        try:
            return self.build_item(record, number)
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            # A missing field or a bad value means the file is not the benchmark's.
            raise AufoldError(f"{path}, item {number}: malformed {self.name} record "
                              f"({type(error).__name__}: {error}); restore the original "
                              f"file") from None
