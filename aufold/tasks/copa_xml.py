"""Reading the Balanced-COPA XML into the same record shape as COPA's JSONL files."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path

from aufold.errors import AufoldError
from aufold.tasks.files import Record


def read_copa_xml(path: Path) -> list[Record]:
    """Read ``<item>`` elements as ``idx, premise, choice1, choice2, question, label`` records.

    ``label`` is 0-based like the JSONL files (the XML's most-plausible-alternative
    is 1-based), so one item builder serves both sources.
    """
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as error:
        raise AufoldError(f"{path}: not valid XML ({error}); restore the original file") from None
    records = []
    for number, item in enumerate(root.iter("item"), start=1):
        try:
            records.append(_record(item))
        except ValueError:
            raise AufoldError(f"{path}, item {number}: id or most-plausible-alternative is "
                              f"not a number; restore the original file") from None
    return records


def _record(item: ElementTree.Element) -> Record:
    return {
        "idx": int(item.get("id", "")),
        "premise": item.findtext("p"),
        "choice1": item.findtext("a1"),
        "choice2": item.findtext("a2"),
        "question": item.get("asks-for"),
        "label": int(item.get("most-plausible-alternative", "")) - 1,
    }
