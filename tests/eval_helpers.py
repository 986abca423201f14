"""Small data for the evaluation and tuning tests: a generic-task folder of arithmetic items."""

from __future__ import annotations

import json
from pathlib import Path

from aufold.demo import arithmetic_items
from aufold.tasks import Item


def generic_splits() -> dict[str, list[Item]]:
    """12 pairs, 10 tune and 10 test items of the demo's two-digit addition task."""
    return {"pairs": arithmetic_items("pairs")[:12], "tune": arithmetic_items("tune")[:10],
            "test": arithmetic_items("test")[:10]}


def write_generic(folder: Path, splits: dict[str, list[Item]]) -> Path:
    """A folder in the generic task's layout ({split}.jsonl) holding ``splits``."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, items in splits.items():
        lines = [json.dumps({"prompt": i.prompt, "choices": list(i.choices), "answer": i.answer})
                 for i in items]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder
