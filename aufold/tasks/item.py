"""The one record type that every task loader produces."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Item:
    """One benchmark question, already rendered with its task's prompt template.

    ``choices`` are the answer strings exactly as they are appended to ``prompt``
    (``"A"``/``"B"`` for COPA, ``" yes"``/``" no"`` for BoolQ) and are empty for math
    tasks. ``answer`` is the gold answer: one of ``choices`` for choice tasks, the
    gold number written by :func:`aufold.tasks.numbers.format_number` for math tasks
    (for example ``"12"`` or ``"0.75"``), whose value is also kept in ``answer_value``.
    ``id`` names the item within its task, for example ``"copa-401"``.
    """

    prompt: str
    choices: tuple[str, ...]
    answer: str
    answer_value: float | None
    id: str
