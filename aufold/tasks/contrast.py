"""Turning loaded items into contrastive pairs, the input that localization needs.

Following the AUSteer authors, the positive continuation is the gold answer and
the negative is a wrong answer to the same prompt:

- choice tasks (multiple choice and yes/no): the first choice, in the item's own
  order, that differs from the gold answer; with two choices that is simply the
  other option.
- math tasks: the nearest *different* answer in the pool of gold answers of the
  items given. Nearest means the smallest absolute difference, and a tie goes to
  the smaller value. The authors picked the most similar answer by sentence-
  embedding similarity; the numeric rule needs no extra model and gives the same
  kind of near miss. Answers count as different when their text differs (see
  :func:`~aufold.tasks.numbers.format_number`), so a negative can never read the
  same as its positive.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from aufold.errors import AufoldError
from aufold.pairs import ContrastivePair
from aufold.tasks.item import Item
from aufold.tasks.numbers import answer_continuation, format_number


def choice_pairs(items: Sequence[Item]) -> list[ContrastivePair]:
    """Pair each item's gold answer with the first other choice as the negative."""
    pairs = []
    for item in items:
        if item.answer not in item.choices:
            raise AufoldError(f"item {item.id}: gold answer {item.answer!r} is not one of its "
                              f"choices {list(item.choices)}; fix the item's answer")
        wrong = [choice for choice in item.choices if choice != item.answer]
        if not wrong:
            raise AufoldError(f"item {item.id}: every choice equals the gold answer; a "
                              f"contrastive pair needs at least one different choice")
        pairs.append(ContrastivePair(item.prompt, item.answer, wrong[0]))
    return pairs


def math_pairs(items: Sequence[Item]) -> list[ContrastivePair]:
    """Pair each item's gold number with the nearest different number from the pool."""
    gold = [(item, _value_of(item)) for item in items]
    # One value per distinct answer text; the pool is sorted so the nearest
    # neighbours of a value are found by bisection instead of a full scan.
    by_text = {format_number(value): value for _, value in gold}
    if len(by_text) < 2 and gold:
        raise AufoldError(f"all {len(gold)} math items have the same answer "
                          f"{next(iter(by_text))}; give items with at least two different "
                          f"answers so that wrong answers can be drawn from them")
    pool = sorted(by_text.values())
    pool_text = [format_number(value) for value in pool]
    pairs = []
    for item, value in gold:
        negative = _nearest_different(value, pool, pool_text)
        pairs.append(ContrastivePair(item.prompt, answer_continuation(format_number(value)),
                                     answer_continuation(format_number(negative))))
    return pairs


def _value_of(item: Item) -> float:
    if item.answer_value is None:
        raise AufoldError(f"item {item.id}: a math item needs answer_value, the gold number; "
                          f"load it with a math task")
    return item.answer_value


def _nearest_different(value: float, pool: list[float], pool_text: list[str]) -> float:
    """Return the pool value closest to ``value`` whose text differs; ties go to the smaller."""
    text = format_number(value)
    index = bisect.bisect_left(pool, value)
    below = index - 1
    while below >= 0 and pool_text[below] == text:
        below -= 1
    above = index
    while above < len(pool) and pool_text[above] == text:
        above += 1
    candidates = [pool[i] for i in (below, above) if 0 <= i < len(pool)]
    return min(candidates, key=lambda candidate: (abs(candidate - value), candidate))
