"""Reading JSON Lines: one JSON object per line, with errors that name the file and line."""

from __future__ import annotations

import json
from typing import Any

from aufold.errors import AufoldError

Record = dict[str, Any]


def parse_json_object(line: str, where: str, *, expected: str = "a JSON object") -> Record:
    """Parse one JSONL line that must hold a JSON object; ``where`` names the file and line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise AufoldError(f"{where}: not valid JSON ({error.msg}); each line must be one "
                          f"JSON object") from None
    if not isinstance(record, dict):
        raise AufoldError(f"{where}: expected {expected}, got {type(record).__name__}")
    return record
