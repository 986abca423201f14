"""Contrastive pairs: reading and validating the JSONL file that localization consumes.

One object per line with the keys ``prompt``, ``positive`` and ``negative``. The
two texts that localization compares are exactly ``prompt + positive`` and
``prompt + negative``: no separator is added, so the file decides the spacing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from aufold.errors import AufoldError
from aufold.jsonl import parse_json_object, text_lines

PAIR_KEYS = ("prompt", "positive", "negative")


@dataclass(frozen=True)
class ContrastivePair:
    """A prompt with a wanted (positive) and an unwanted (negative) continuation."""

    prompt: str
    positive: str
    negative: str

    @property
    def positive_text(self) -> str:
        return self.prompt + self.positive

    @property
    def negative_text(self) -> str:
        return self.prompt + self.negative


def read_pairs(path: str | Path) -> list[ContrastivePair]:
    """Read a pairs JSONL file; every problem is reported with its line number."""
    path = Path(path)
    if not path.is_file():
        raise AufoldError(f"pairs file not found: {path}; pass a JSONL file with one "
                          f'{{"prompt", "positive", "negative"}} object per line')
    pairs = [_parse_line(line, path, line_number) for line_number, line in text_lines(path)]
    if not pairs:
        raise AufoldError(f"pairs file {path} holds no pairs; add one JSON object per line "
                          f"with the keys {', '.join(PAIR_KEYS)}")
    return pairs


def validate_pairs(pairs: Iterable[ContrastivePair]) -> list[ContrastivePair]:
    """Check pairs built in code with the same rules as pairs read from a file."""
    checked = list(pairs)
    if not checked:
        raise AufoldError("no contrastive pairs given; localization needs at least one")
    for index, pair in enumerate(checked):
        _check_pair(pair, f"pair {index}")
    return checked


def write_pairs(pairs: Sequence[ContrastivePair], path: str | Path) -> None:
    """Write pairs as JSONL in the format that :func:`read_pairs` reads."""
    with Path(path).open("w", encoding="utf-8") as handle:
        for pair in pairs:
            record = {"prompt": pair.prompt, "positive": pair.positive, "negative": pair.negative}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def _parse_line(line: str, path: Path, line_number: int) -> ContrastivePair:
    where = f"{path}, line {line_number}"
    record = parse_json_object(line, where,
                               expected=f"a JSON object with the keys {', '.join(PAIR_KEYS)}")
    missing = [key for key in PAIR_KEYS if key not in record]
    if missing:
        raise AufoldError(f"{where}: missing key(s) {', '.join(missing)}; each line needs "
                          f"{', '.join(PAIR_KEYS)}")
    for key in PAIR_KEYS:
        if not isinstance(record[key], str):
            raise AufoldError(f"{where}: '{key}' must be a string, got "
                              f"{type(record[key]).__name__}")
    pair = ContrastivePair(record["prompt"], record["positive"], record["negative"])
    _check_pair(pair, where)
    return pair


def _check_pair(pair: ContrastivePair, where: str) -> None:
    if pair.positive == pair.negative:
        raise AufoldError(f"{where}: 'positive' equals 'negative' ({pair.positive!r}); a "
                          f"contrastive pair needs two different continuations")
    if not (pair.prompt + pair.positive).strip() or not (pair.prompt + pair.negative).strip():
        raise AufoldError(f"{where}: a text is empty; give a prompt or non-empty answers")
