"""How math answers are written as text, so that gold answers and negatives agree."""

from __future__ import annotations

import math

# Gold answers in the data are floats such as 1.8333333333333335; no model writes
# that, so answers are cut to a few decimals, which also makes two answers that
# differ only by float noise count as the same answer.
DECIMALS = 4

# The math templates end with "Answer:", so the number follows after one space,
# the same way BoolQ's " yes"/" no" do.
ANSWER_PREFIX = " "


def format_number(value: float) -> str:
    """Write a math answer as text: integers without ".0", others with at most four decimals.

    Trailing zeros are dropped (``0.5`` not ``0.5000``), and a non-zero value too small
    to show in four decimals keeps Python's shortest form rather than becoming ``"0"``.
    """
    if not math.isfinite(value):
        raise ValueError(f"a math answer must be a finite number, got {value!r}")
    if value == int(value):
        return str(int(value))
    text = f"{value:.{DECIMALS}f}".rstrip("0").rstrip(".")
    if text in ("0", "-0"):
        return repr(value)
    return text


def answer_continuation(answer: str) -> str:
    """Return the text appended to a math prompt for the answer ``answer``."""
    return ANSWER_PREFIX + answer
