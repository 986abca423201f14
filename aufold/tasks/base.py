"""What every task offers: loading fixed splits and building contrastive pairs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from aufold.errors import AufoldError
from aufold.pairs import ContrastivePair
from aufold.tasks.contrast import choice_pairs, math_pairs
from aufold.tasks.item import Item

TaskKind = Literal["choice", "math"]

# pairs: contrastive pairs for localization; tune: choosing alpha and k; test: reporting.
SPLITS: tuple[str, ...] = ("pairs", "tune", "test")


class Task(ABC):
    """One task: its name, its kind, its fixed splits and how its pairs are built.

    ``kind`` is ``"choice"`` when each item lists its answer options (multiple choice
    and yes/no) and ``"math"`` when the answer is a free number.
    """

    name: str
    kind: TaskKind

    @abstractmethod
    def load(self, split: str, data_dir: Path) -> list[Item]:
        """Load the items of ``split`` (one of :data:`SPLITS`) from ``data_dir``."""

    def contrastive_pairs(self, items: Sequence[Item]) -> list[ContrastivePair]:
        """Build one contrastive pair per item, with the rule of this task's kind.

        See :mod:`aufold.tasks.contrast` for the rules; for math tasks the wrong
        answers are drawn from the answers of ``items`` themselves.
        """
        if self.kind == "math":
            return math_pairs(items)
        return choice_pairs(items)


def check_split(task: str, split: str) -> None:
    """Raise an error naming the known splits when ``split`` is not one of them."""
    if split not in SPLITS:
        raise AufoldError(f"{task}: unknown split {split!r}; choose one of {', '.join(SPLITS)}")
