"""Reading contrastive pairs: the format, and every malformed input with its line number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aufold.errors import AufoldError
from aufold.pairs import ContrastivePair, read_pairs, validate_pairs, write_pairs


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_texts_are_prompt_plus_answer_without_separator(tmp_path: Path) -> None:
    record = {"prompt": "2 + 2 =", "positive": " 4", "negative": " 5"}
    pairs = read_pairs(_write(tmp_path / "p.jsonl", [json.dumps(record), ""]))
    assert pairs == [ContrastivePair("2 + 2 =", " 4", " 5")]
    assert pairs[0].positive_text == "2 + 2 = 4"
    assert pairs[0].negative_text == "2 + 2 = 5"


def test_round_trip(tmp_path: Path) -> None:
    pairs = [ContrastivePair("Q: é?\nA:", " yes", " no"), ContrastivePair("x", "1", "2")]
    write_pairs(pairs, tmp_path / "p.jsonl")
    assert read_pairs(tmp_path / "p.jsonl") == pairs


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", r"line 2: not valid JSON"),
    ("[1, 2]", r"line 2: expected a JSON object"),
    ('{"prompt": "a", "positive": "b"}', r"line 2: missing key\(s\) negative"),
    ('{"prompt": "a", "positive": 1, "negative": "c"}', r"line 2: 'positive' must be a string"),
    ('{"prompt": "a", "positive": " b", "negative": " b"}', r"line 2: 'positive' equals 'negative'"),
])
def test_malformed_lines_name_their_line(tmp_path: Path, line: str, message: str) -> None:
    good = json.dumps({"prompt": "a", "positive": " b", "negative": " c"})
    with pytest.raises(AufoldError, match=message):
        read_pairs(_write(tmp_path / "p.jsonl", [good, line]))


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(AufoldError, match="pairs file not found"):
        read_pairs(tmp_path / "absent.jsonl")
    with pytest.raises(AufoldError, match="holds no pairs"):
        read_pairs(_write(tmp_path / "empty.jsonl", ["", "  "]))


def test_pairs_built_in_code_are_validated_too() -> None:
    with pytest.raises(AufoldError, match="no contrastive pairs"):
        validate_pairs([])
    with pytest.raises(AufoldError, match="pair 1: 'positive' equals 'negative'"):
        validate_pairs([ContrastivePair("a", "b", "c"), ContrastivePair("a", "b", "b")])
