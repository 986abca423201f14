"""Evaluate the unsteered model and many edits on the same items, sharing the unchanged layers.

Used by the tuning sweep (one edit per grid cell) and by ablations (the chosen
units, the same units at a fixed strength, random units). For the multiple-choice
scorers, each batch runs once unsteered while recording the hidden states entering
every layer where some edit starts, then each edit resumes from its own earliest
steered layer (:mod:`aufold.evaluate.resume`); the results are identical to
evaluating each edit from scratch. Math tasks generate token by token under the
edit, so each of their edits runs from scratch.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch
from transformers import PreTrainedTokenizerBase

from aufold.edit import Edit
from aufold.evaluate.batches import DEFAULT_BATCH_SIZE, model_logits
from aufold.evaluate.choices import prepare_choices
from aufold.evaluate.core import (
    CHOICE_SCORERS,
    DEFAULT_EVAL_MAX_LENGTH,
    MATH_SCORER,
    evaluate_items,
    resolve_scorer,
)
from aufold.evaluate.math import DEFAULT_MAX_NEW_TOKENS
from aufold.evaluate.report import EvalResult
from aufold.evaluate.resume import (
    MAX_RESUME_POINTS,
    capture_layer_inputs,
    earliest_layer,
    resume_at,
    resume_points,
)
from aufold.modeling import fitted_length, input_device, is_layerwise
from aufold.progress import bar as progress_bar
from aufold.steer import steer
from aufold.tasks import Item, TaskKind

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Key = TypeVar("Key", bound=Hashable)


@dataclass
class EditResults(Generic[Key]):
    """The unsteered result and one result per edit, on the same items."""

    base: EvalResult
    steered: dict[Key, EvalResult]
    start_layers: dict[Key, int]  # each edit's earliest steered layer
    resumed_from: dict[Key, int] = field(default_factory=dict)  # empty when run from scratch
    seconds: float = 0.0

    @property
    def resumed(self) -> bool:
        return bool(self.resumed_from)


@torch.inference_mode()
def evaluate_edits(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Item],
    edits: Mapping[Key, Edit],
    *,
    kind: TaskKind = "choice",
    scorer: str | None = None,
    resume: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
    chat_template: bool = False,
    max_length: int = DEFAULT_EVAL_MAX_LENGTH,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    max_resume_points: int = MAX_RESUME_POINTS,
    progress: bool = True,
    desc: str = "eval",
) -> EditResults[Key]:
    """Score ``items`` unsteered and under each edit in hook mode.

    ``resume=False`` evaluates every edit from scratch (math tasks always do); the
    results are the same. ``max_resume_points`` caps the hidden-state tensors held
    per batch (:func:`~aufold.evaluate.resume.resume_points`).
    """
    name = resolve_scorer(kind, scorer)
    max_length = fitted_length(model, max_length)
    if is_layerwise(model):
        from aufold.layerwise.evaluate import evaluate_edits_layerwise

        return evaluate_edits_layerwise(model, tokenizer, items, edits, kind=kind, scorer=name,
                                        batch_size=batch_size, chat_template=chat_template,
                                        max_length=max_length, progress=progress, desc=desc)
    starts = {key: earliest_layer(edit) for key, edit in edits.items()}
    options: dict[str, Any] = dict(batch_size=batch_size, chat_template=chat_template,
                                   max_length=max_length)
    started = time.perf_counter()
    if resume and name != MATH_SCORER:
        points = resume_points(starts.values(), max_resume_points)
        resumed_from = {key: points[start] for key, start in starts.items()}
        base, steered = _resumed(model, tokenizer, items, name, edits, resumed_from, options,
                                 progress, desc)
        return EditResults(base, steered, starts, resumed_from, time.perf_counter() - started)
    options.update(kind=kind, scorer=name, max_new_tokens=max_new_tokens, progress=False)
    base = evaluate_items(model, tokenizer, items, **options)
    steered = {}
    for key in progress_bar(edits, desc=desc, unit="edit", enabled=progress):
        steered[key] = evaluate_items(model, tokenizer, items, edit=edits[key], **options)
    return EditResults(base, steered, starts, {}, time.perf_counter() - started)


def _resumed(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: Sequence[Item],
             scorer: str, edits: Mapping[Key, Edit], starts: Mapping[Key, int],
             options: Mapping[str, Any], progress: bool,
             desc: str) -> tuple[EvalResult, dict[Key, EvalResult]]:
    """Per batch: one unsteered pass recording layer inputs, then each edit from its layer in
    ``starts``."""
    prepared = prepare_choices(CHOICE_SCORERS[scorer], tokenizer, items,
                               chat_template=options["chat_template"],
                               max_length=options["max_length"], batch_size=options["batch_size"])
    device = input_device(model)
    base_values: list[Any] = [None] * len(prepared.queries)
    values: dict[Key, list[Any]] = {key: [None] * len(prepared.queries) for key in edits}
    total = len(prepared.batches) * (1 + len(edits))
    with progress_bar(total=total, desc=desc, unit="pass", enabled=progress) as bar:
        for index in range(len(prepared.batches)):
            batch, keep = prepared.batch(index, device)
            with capture_layer_inputs(model, set(starts.values())) as captured:
                prepared.store(index, model_logits(model, batch, keep), base_values)
            bar.update()
            for key, edit in edits.items():
                start = starts[key]
                with steer(model, edit), resume_at(model, start, captured[start]):
                    prepared.store(index, model_logits(model, batch, keep), values[key])
                bar.update()
    settings = {**options, "truncated_prompts": prepared.truncated}
    base = EvalResult(scorer, tuple(prepared.results(base_values)), dict(settings))
    steered = {key: EvalResult(scorer, tuple(prepared.results(values[key])),
                               {**settings, "steered_units": len(edits[key])})
               for key in edits}
    return base, steered
