"""Evaluation results: per-item predictions, accuracy with its 95% interval, the JSON report."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aufold.errors import AufoldError
from aufold.safety.outputs import write_file
from aufold.version import __version__

Z_95 = 1.959963984540054  # the two-sided 95% quantile of the standard normal
CI_METHOD = "wilson"
REPORT_FORMAT = "aufold-eval"


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion.

    Unlike the normal approximation it stays inside [0, 1] and is not empty at
    0 or n correct, which matters on small tune splits.
    """
    if n < 1:
        raise AufoldError("no items were evaluated; an accuracy needs at least one item")
    p = correct / n
    scale = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / scale
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / scale
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class ItemResult:
    """One item's outcome; ``detail`` keeps what the scorer saw (choice scores, generated text)."""

    id: str
    prediction: str
    answer: str
    correct: bool
    detail: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        return {"id": self.id, "prediction": self.prediction, "answer": self.answer,
                "correct": self.correct, **self.detail}


@dataclass(frozen=True)
class EvalResult:
    """The outcome of one evaluation run: items in split order and the settings that made it."""

    scorer: str
    items: tuple[ItemResult, ...]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.items)

    @property
    def correct(self) -> int:
        return sum(item.correct for item in self.items)

    @property
    def accuracy(self) -> float:
        if not self.items:
            raise AufoldError("no items were evaluated; an accuracy needs at least one item")
        return self.correct / self.n

    @property
    def ci95(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.n)

    def predictions(self) -> list[str]:
        return [item.prediction for item in self.items]

    def summary(self) -> dict[str, Any]:
        """The headline numbers, without the per-item records."""
        low, high = self.ci95
        return {"accuracy": self.accuracy, "n": self.n, "correct": self.correct,
                "ci95": [low, high], "ci_method": CI_METHOD}

    def summary_line(self) -> str:
        low, high = self.ci95
        return (f"accuracy {self.accuracy:.4f} (95% CI {low:.4f}-{high:.4f}, "
                f"{self.correct}/{self.n} items)")

    def to_dict(self) -> dict[str, Any]:
        return {"format": REPORT_FORMAT, "aufold_version": __version__, **self.summary(),
                "scorer": self.scorer, "settings": self.settings,
                "items": [item.to_record() for item in self.items]}


def write_json(data: dict[str, Any], path: str | Path) -> Path:
    """Write JSON through a temporary file and a rename, so a report is complete or absent."""
    return write_file(Path(path), (json.dumps(data, indent=2) + "\n").encode())


def write_report(result: EvalResult, path: str | Path) -> Path:
    """Write an evaluation report: headline numbers, settings and every item's prediction."""
    return write_json(result.to_dict(), path)

