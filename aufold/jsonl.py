"""Reading JSON Lines: one JSON object per line, with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aufold.errors import AufoldError

Record = dict[str, Any]


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """The non-blank lines of a UTF-8 text file with their numbers (from 1); a line that is
    not UTF-8 is reported by its number."""
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise AufoldError(f"{path}, line {line_number}: not UTF-8 text (byte "
                                  f"{raw[error.start]:#04x} at column {error.start + 1}); save "
                                  f"the file as UTF-8") from None
            if line.strip():
                yield line_number, line


def _check_text(value: Any, where: str) -> None:
    """Refuse strings that are not valid Unicode (JSON allows lone surrogates like \\ud800,
    which no tokenizer can encode)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise AufoldError(f"{where}: a string holds a lone surrogate ({value!r:.40}); write "
                              f"the text as valid Unicode") from None
    elif isinstance(value, dict):
        for item in value.values():
            _check_text(item, where)
    elif isinstance(value, list):
        for item in value:
            _check_text(item, where)


def read_json_file(path: Path) -> Any:
    """A whole JSON file; a file that is not UTF-8 JSON is one error naming the file."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise AufoldError(f"{path}: not UTF-8 text; save the file as UTF-8") from None
    except json.JSONDecodeError as error:
        raise AufoldError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}); "
                          f"restore the original file") from None
    except RecursionError:
        raise AufoldError(f"{path}: nested too deeply to read; restore the original file") from None


def parse_json_object(line: str, where: str, *, expected: str = "a JSON object") -> Record:
    """Parse one JSONL line that must hold a JSON object; ``where`` names the file and line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise AufoldError(f"{where}: not valid JSON ({error.msg}); each line must be one "
                          f"JSON object") from None
    except RecursionError:
        raise AufoldError(f"{where}: nested too deeply to read; each line must be one flat "
                          f"JSON object") from None
    _check_text(record, where)
    if not isinstance(record, dict):
        raise AufoldError(f"{where}: expected {expected}, got {type(record).__name__}")
    return record
