"""Finding the benchmark data and reading its files, with errors that say where we looked."""

from __future__ import annotations

from pathlib import Path

from aufold.errors import AufoldError
from aufold.jsonl import Record, parse_json_object, read_json_file, text_lines

# The data lives beside the repository, never inside it: repo/../shared/data.
# This file is repo/aufold/tasks/files.py, so the repository root is three levels up.
_REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = _REPO_ROOT.parent / "shared" / "data"


def default_data_dir() -> Path | None:
    """Return ``../shared/data`` next to the repository when it exists, else ``None``."""
    return SHARED_DATA if SHARED_DATA.is_dir() else None


def require_file(data_dir: Path, relative: str, task: str) -> Path:
    """Return ``data_dir / relative``, or raise an error naming the missing folder or file."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise AufoldError(f"{task}: data folder {data_dir} does not exist; point the data "
                          f"directory at the folder that holds {relative}")
    path = data_dir / relative
    if not path.is_file():
        raise AufoldError(f"{task}: data file {relative} not found (looked for {path}); put "
                          f"the file there or point the data directory elsewhere")
    return path


def read_jsonl(path: Path) -> list[Record]:
    """Read one JSON object per non-blank line; a bad line is reported with its number."""
    return [parse_json_object(line, f"{path}, line {line_number}")
            for line_number, line in text_lines(path)]


def read_json_list(path: Path) -> list[Record]:
    """Read a JSON file that holds one list of objects."""
    records = read_json_file(path)
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise AufoldError(f"{path}: expected a JSON list of objects; restore the original file")
    return records
