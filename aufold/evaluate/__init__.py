"""Evaluation: scorers for multiple-choice and math tasks, reports with confidence intervals.

    from aufold.evaluate import evaluate
    result = evaluate(model, tokenizer, "copa", "test", scorer="first-token", edit=edit)
    print(result.summary_line())
"""

from aufold.evaluate.core import (
    DEFAULT_EVAL_MAX_LENGTH,
    SCORERS,
    evaluate,
    evaluate_items,
    evaluate_model,
    resolve_scorer,
)
from aufold.evaluate.report import EvalResult, ItemResult, wilson_interval, write_report

__all__ = [
    "DEFAULT_EVAL_MAX_LENGTH", "SCORERS", "EvalResult", "ItemResult", "evaluate", "evaluate_items",
    "evaluate_model", "resolve_scorer", "wilson_interval", "write_report",
]
