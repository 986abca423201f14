"""Evaluating a model, optionally steered by an edit, on a task split: the common entry point."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerBase

from aufold.defaults import CHOICE_SCORER_NAMES, EVAL_MAX_LENGTH, MATH_SCORER_NAME, SCORER_NAMES
from aufold.edit import Edit
from aufold.errors import AufoldError
from aufold.evaluate.batches import DEFAULT_BATCH_SIZE, model_logits
from aufold.evaluate.choices import ChoiceScorer, prepare_choices, run_choices
from aufold.evaluate.first_token import FirstTokenScorer
from aufold.evaluate.loglik import LoglikScorer
from aufold.evaluate.math import DEFAULT_MAX_NEW_TOKENS, score_math
from aufold.evaluate.report import EvalResult, write_json
from aufold.modeling import fingerprint, fitted_length, input_device, is_layerwise, resolve_source
from aufold.safety.outputs import Inputs, OutputKind, claim_output
from aufold.steer import steer
from aufold.tasks import Item, TaskKind, get_task, load_split, resolve_data_dir
from aufold.recipe import Recipe

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from aufold.evaluate.cost import EditCost

# Long enough for every prompt of the built-in tasks (BoolQ's longest is about 1,300
# tokens with SmolLM2's tokenizer); longer prompts keep their last tokens.
DEFAULT_EVAL_MAX_LENGTH = EVAL_MAX_LENGTH

CHOICE_SCORERS: Mapping[str, ChoiceScorer] = {s.name: s for s in (FirstTokenScorer(), LoglikScorer())}
assert tuple(CHOICE_SCORERS) == CHOICE_SCORER_NAMES, "aufold.defaults names every scorer"
MATH_SCORER = MATH_SCORER_NAME
SCORERS: tuple[str, ...] = SCORER_NAMES
# The authors' protocol for choice tasks; math answers are generated.
DEFAULT_SCORER: Mapping[TaskKind, str] = {"choice": "first-token", "math": MATH_SCORER}


def resolve_scorer(kind: TaskKind, scorer: str | None) -> str:
    """The scorer to use for a task of ``kind``: the given one if it fits, else the default."""
    if scorer is None:
        return DEFAULT_SCORER[kind]
    if scorer not in SCORERS:
        raise AufoldError(f"unknown scorer {scorer!r}; choose one of {', '.join(SCORERS)}")
    if (scorer == MATH_SCORER) != (kind == "math"):
        fits = MATH_SCORER if kind == "math" else " or ".join(CHOICE_SCORERS)
        raise AufoldError(f"scorer {scorer!r} does not fit a {kind} task; use {fits} "
                          f"(or leave --scorer out)")
    return scorer


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    split: str,
    scorer: str | None = None,
    edit: Edit | None = None,
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    **options: Any,
) -> EvalResult:
    """Evaluate on a task's fixed split (its first ``limit`` items); see :func:`evaluate_items`."""
    items = load_split(task, split, data_dir, size=limit)
    result = evaluate_items(model, tokenizer, items, kind=get_task(task).kind, scorer=scorer,
                            edit=edit, **options)
    result.settings.update(task=task, split=split)
    return result


@torch.inference_mode()
def evaluate_items(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Item],
    *,
    kind: TaskKind = "choice",
    scorer: str | None = None,
    edit: Edit | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    chat_template: bool = False,
    max_length: int = DEFAULT_EVAL_MAX_LENGTH,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    progress: bool = True,
    desc: str = "eval",
) -> EvalResult:
    """Score ``items`` with the model, steered by ``edit`` in hook mode when one is given;
    ``desc`` labels the progress bar."""
    name = resolve_scorer(kind, scorer)
    max_length = fitted_length(model, max_length)
    check_eval_options(items, batch_size=batch_size, max_length=max_length,
                       max_new_tokens=max_new_tokens)
    if is_layerwise(model):
        base, steered = evaluate_streamed(model, tokenizer, items, edit, kind=kind, scorer=name,
                                          batch_size=batch_size, chat_template=chat_template,
                                          max_length=max_length, progress=progress, desc=desc)
        return base if steered is None else steered
    started = time.perf_counter()
    with steer(model, edit) if edit is not None else nullcontext():
        if name == MATH_SCORER:
            results, truncated = score_math(model, tokenizer, items, chat_template=chat_template,
                                            max_length=max_length, batch_size=batch_size,
                                            max_new_tokens=max_new_tokens, progress=progress,
                                            desc=desc)
        else:
            prepared = prepare_choices(CHOICE_SCORERS[name], tokenizer, items,
                                       chat_template=chat_template, max_length=max_length,
                                       batch_size=batch_size)
            results = run_choices(prepared, lambda batch, keep: model_logits(model, batch, keep),
                                  input_device(model), progress=progress, desc=desc)
            truncated = prepared.truncated
    settings: dict[str, Any] = {
        "model": str(getattr(model.config, "_name_or_path", "")),
        "chat_template": chat_template, "batch_size": batch_size, "max_length": max_length,
        "truncated_prompts": truncated, "steered_units": len(edit) if edit is not None else 0,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if name == MATH_SCORER:
        settings["max_new_tokens"] = max_new_tokens
    return EvalResult(name, tuple(results), settings)


def evaluate_streamed(model: Any, tokenizer: PreTrainedTokenizerBase, items: Sequence[Item],
                      edit: Edit | None, *, kind: TaskKind, scorer: str, batch_size: int,
                      chat_template: bool, max_length: int, progress: bool, desc: str
                      ) -> tuple[EvalResult, EvalResult | None]:
    """A layer-streamed model unsteered, and steered by ``edit`` if given, in one pass over
    the layers, with the settings :func:`evaluate_items` records."""
    from aufold.layerwise.evaluate import evaluate_edits_layerwise

    both = evaluate_edits_layerwise(model, tokenizer, items, {} if edit is None else {0: edit},
                                    kind=kind, scorer=scorer, batch_size=batch_size,
                                    chat_template=chat_template, max_length=max_length,
                                    progress=progress, desc=desc)
    steered = both.steered.get(0)
    for result, units in ((both.base, 0), (steered, len(edit) if edit is not None else 0)):
        if result is not None:
            result.settings.update(model=str(model.config._name_or_path),
                                   seconds=round(both.seconds, 3), steered_units=units)
    return both.base, steered


def evaluate_both(model: Any, tokenizer: PreTrainedTokenizerBase, items: Sequence[Item],
                  edit: Edit, *, kind: TaskKind, scorer: str | None, batch_size: int,
                  chat_template: bool, max_length: int, max_new_tokens: int,
                  progress: bool = True) -> tuple[EvalResult, EvalResult]:
    """The unsteered and the steered result on ``items``: two passes of :func:`evaluate_items`,
    or one over the layers for a layer-streamed model (which reads every weight from disk)."""
    options: dict[str, Any] = dict(kind=kind, scorer=scorer, batch_size=batch_size,
                                   chat_template=chat_template, max_length=max_length,
                                   max_new_tokens=max_new_tokens, progress=progress)
    if not is_layerwise(model):
        return (evaluate_items(model, tokenizer, items, **options),
                evaluate_items(model, tokenizer, items, edit=edit, **options))
    name = resolve_scorer(kind, scorer)
    max_length = fitted_length(model, max_length)
    check_eval_options(items, batch_size=batch_size, max_length=max_length,
                       max_new_tokens=max_new_tokens)
    base, steered = evaluate_streamed(model, tokenizer, items, edit, kind=kind, scorer=name,
                                      batch_size=batch_size, chat_template=chat_template,
                                      max_length=max_length, progress=progress, desc="eval")
    assert steered is not None
    return base, steered


def check_eval_options(items: Sequence[Item], *, batch_size: int, max_length: int,
                       max_new_tokens: int) -> None:
    if not items:
        raise AufoldError("no items to evaluate; give a split with at least one item")
    if batch_size < 1 or max_length < 1 or max_new_tokens < 1:
        raise AufoldError("batch size, max length and max new tokens must each be at least 1")


def evaluate_model(
    model_ref: str | Path,
    task: str,
    split: str,
    *,
    recipe: Recipe | None = None,
    scorer: str | None = None,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    dtype: str = "auto",
    device: str | None = None,
    device_map: str | None = None,
    force: bool = False,
    report: str | Path | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    layer_streaming: bool = False,
    work_dir: Path | None = None,
    cost: bool = True,
    neutral: str | Path | None = None,
    **options: Any,
) -> ModelEvaluation:
    """Load a model and evaluate it; with a recipe, evaluate it unsteered and steered by
    the recipe's edit (hook mode) on the same items, sharing the work before the first
    steered layer (:func:`aufold.evaluate.edits.evaluate_edits`).

    Every input is checked before the model loads; ``report`` gets the JSON report (an
    existing one is replaced only with ``overwrite``, and only if aufold wrote it). With
    ``layer_streaming`` (or when the weights do not fit) the model runs one decoder layer
    at a time (:mod:`aufold.layerwise`). With a recipe and ``cost``, the edit's KL and
    perplexity ratio on neutral text (``neutral``, or the BoolQ test passages) are measured
    too (:mod:`aufold.evaluate.cost`).
    """
    from aufold.evaluate.cost import check_neutral, edit_costs, neutral_text
    from aufold.evaluate.edits import evaluate_edits  # it builds on this module
    from aufold.layerwise import load_for_run
    from aufold.layerwise.evaluate import MATH_NEEDS_WHOLE_MODEL

    items = load_split(task, split, data_dir, size=limit)
    kind = get_task(task).kind
    resolve_scorer(kind, scorer)
    data_folder = resolve_data_dir(data_dir)
    measure = cost and recipe is not None
    edit = recipe.edit() if recipe is not None else None  # k, alpha, sites checked here
    inputs = Inputs.of([*resolve_source(model_ref).input_paths(), data_folder,
                        *(recipe.plan_dirs if recipe else ()), neutral if measure else None])
    if measure:
        check_neutral(neutral, data_dir)
    claim = (claim_output(report, overwrite=overwrite, inputs=inputs, kind=OutputKind.FILE)
             if report is not None else nullcontext())
    with claim:
        model, tokenizer, source = load_for_run(
            model_ref, layer_streaming=layer_streaming, work_dir=work_dir, dtype=dtype,
            device=device, device_map=device_map, allow_pickle=allow_pickle,
            needs_whole_model=MATH_NEEDS_WHOLE_MODEL if kind == "math" else None)
        if recipe is not None:
            recipe.check_fingerprint(fingerprint(model), force=force)
        unsteered = None
        if edit is None:
            result = evaluate_items(model, tokenizer, items, kind=kind, scorer=scorer, **options)
        else:
            both = evaluate_edits(model, tokenizer, items, {"steered": edit}, kind=kind,
                                  scorer=scorer, **options)
            result, unsteered = both.steered["steered"], both.base
        for each in (result, unsteered):
            if each is not None:
                each.settings.update(model=source.ref, task=task, split=split,
                                     data_dir=str(data_folder))
        result.settings["steering"] = recipe.describe() if recipe else None
        measured = None
        if edit is not None and cost:
            text = neutral_text(tokenizer, file=neutral, data_dir=data_dir)
            measured = edit_costs(model, text, {"steered": edit},
                                  progress=options.get("progress", True))["steered"]
        evaluation = ModelEvaluation(result, unsteered, measured)
        if report is not None:
            write_json(evaluation.to_dict(), report)
    return evaluation


@dataclass(frozen=True)
class ModelEvaluation:
    """What `aufold eval` measured: the result, and with steering the unsteered one beside it."""

    result: EvalResult  # steered when a recipe was given
    unsteered: EvalResult | None = None
    cost: EditCost | None = None  # the edit's side effect on neutral text, when measured

    @property
    def gain(self) -> float | None:
        return None if self.unsteered is None else self.result.accuracy - self.unsteered.accuracy

    def to_dict(self) -> dict[str, Any]:
        """The report: the result with every item, plus the unsteered summary and predictions."""
        report = self.result.to_dict()
        if self.unsteered is not None:
            report["unsteered"] = {**self.unsteered.summary(),
                                   "predictions": self.unsteered.predictions()}
            report["gain"] = self.gain
        if self.cost is not None:
            report["cost"] = self.cost.to_dict()
        return report
