"""The user's own multiple-choice data, in a simple JSONL format.

Each split is the file ``{split}.jsonl`` directly in the data directory (for
example ``my_data/pairs.jsonl``, ``my_data/tune.jsonl``, ``my_data/test.jsonl``),
with one object per line::

    {"prompt": "2 + 2 =", "choices": [" 4", " 5"], "answer": " 4"}

``choices`` are appended to ``prompt`` exactly as written, so the file decides the
spacing; ``answer`` must be one of them. Items are named ``{split}-{line}``.
"""

from __future__ import annotations

from pathlib import Path

from aufold.errors import AufoldError
from aufold.jsonl import parse_json_object, text_lines
from aufold.tasks.base import Task, TaskKind, check_split
from aufold.tasks.files import require_file
from aufold.tasks.item import Item


class GenericTask(Task):
    """Multiple-choice items read from ``{split}.jsonl`` files in a folder of the user's."""

    name: str = "generic"
    kind: TaskKind = "choice"

    def load(self, split: str, data_dir: Path) -> list[Item]:
        """Load ``data_dir/{split}.jsonl``; a bad line is reported with its number."""
        check_split(self.name, split)
        path = require_file(Path(data_dir), f"{split}.jsonl", self.name)
        items = [_parse_item(line, f"{path}, line {line_number}", f"{split}-{line_number}")
                 for line_number, line in text_lines(path)]
        if not items:
            raise AufoldError(f"{path} holds no items; add one JSON object per line with "
                              f"the keys prompt, choices and answer")
        return items


def _parse_item(line: str, where: str, item_id: str) -> Item:
    record = parse_json_object(line, where)
    prompt, choices, answer = record.get("prompt"), record.get("choices"), record.get("answer")
    if not isinstance(prompt, str):
        raise AufoldError(f"{where}: 'prompt' must be a string; each line needs prompt, "
                          f"choices and answer")
    if (not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)
            or len(set(choices)) < 2):
        raise AufoldError(f"{where}: 'choices' must be a list of at least two different "
                          f"strings")
    if not isinstance(answer, str) or answer not in choices:
        raise AufoldError(f"{where}: 'answer' {answer!r} is not one of the choices "
                          f"{choices}; set it to the text of the correct choice")
    return Item(prompt=prompt, choices=tuple(choices), answer=answer, answer_value=None,
                id=item_id)
