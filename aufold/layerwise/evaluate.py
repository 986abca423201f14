"""Multiple-choice evaluation one decoder layer at a time: the unsteered model and many edits.

The batches are the in-memory evaluation's own (:func:`aufold.evaluate.choices.prepare_choices`),
so the numbers are too. Every batch's hidden states go through layer 0, then layer 1,
and so on. An edit leaves the layers before its first steered layer unchanged, so it
shares the unsteered hidden states up to there (as the in-memory sweep's prefix
resume does) and keeps its own from then on, steered by the same hooks as hook mode.
After the last layer, the model's own final norm and LM head read the last positions
that the scorer needs (the head loads for that stage only).

Memory: one layer, and the hidden states of every batch for the unsteered model and
each edit that has started (in memory, or spilled, see :mod:`aufold.layerwise.hidden`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from aufold.edit import Edit
from aufold.errors import AufoldError
from aufold.evaluate.choices import prepare_choices
from aufold.evaluate.core import CHOICE_SCORERS, MATH_SCORER, resolve_scorer
from aufold.evaluate.edits import EditResults
from aufold.evaluate.report import EvalResult
from aufold.evaluate.resume import earliest_layer
from aufold.layerwise.forward import LayerRunner
from aufold.layerwise.hidden import open_store
from aufold.layerwise.skeleton import OUTSIDE, LayerwiseModel
from aufold.progress import bar as progress_bar
from aufold.steer import steer
from aufold.tasks import Item, TaskKind

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from aufold.vectors.caa import VectorEdit

Key = TypeVar("Key", bound=Hashable)
# Why a math task needs the whole model (said when layer streaming is asked for or needed).
MATH_NEEDS_WHOLE_MODEL = ("a math answer is generated token by token, which needs every layer "
                          "for every token")


@torch.inference_mode()
def evaluate_edits_layerwise(
    lm: LayerwiseModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Item],
    edits: Mapping[Key, Edit],
    *,
    kind: TaskKind = "choice",
    scorer: str | None = None,
    batch_size: int,
    chat_template: bool,
    max_length: int,
    progress: bool = True,
    desc: str = "eval",
) -> EditResults[Key]:
    """Score ``items`` unsteered and under each edit (hook mode), one layer at a time."""
    name = resolve_scorer(kind, scorer)
    if name == MATH_SCORER:
        raise AufoldError(f"layer streaming scores multiple-choice tasks only: "
                          f"{MATH_NEEDS_WHOLE_MODEL}; load the model whole (without "
                          f"--layer-streaming, or with --device-map auto)")
    started = time.perf_counter()
    prepared = prepare_choices(CHOICE_SCORERS[name], tokenizer, items, chat_template=chat_template,
                               max_length=max_length, batch_size=batch_size)
    cpu = torch.device("cpu")
    batches = [prepared.batch(index, cpu) for index in range(len(prepared.batches))]
    inputs = [_inputs(batch, lm.device) for batch, _ in batches]
    keys = list(edits)
    values: list[list[Any]] = [[None] * len(prepared.queries) for _ in range(1 + len(keys))]
    what = f"{len(batches)} batches for the unsteered model and {len(keys)} edit(s)"
    with swept(lm, inputs, edits, what=what, desc=desc, progress=progress) as (runner, final):
        for index, (_, keep) in enumerate(batches):
            for config in range(1 + len(keys)):
                logits = runner.logits(final(config, index), *inputs[index], keep)
                prepared.store(index, logits, values[config])
    starts = {key: earliest_layer(edit) for key, edit in edits.items()}

    settings: dict[str, Any] = {"batch_size": batch_size, "chat_template": chat_template,
                                "max_length": max_length, "truncated_prompts": prepared.truncated}
    base_result = EvalResult(name, tuple(prepared.results(values[0])), dict(settings))
    steered = {key: EvalResult(name, tuple(prepared.results(values[config])),
                               {**settings, "steered_units": len(edits[key])})
               for config, key in enumerate(keys, start=1)}
    # Each edit shared the unsteered hidden states up to its first steered layer: a resume there.
    return EditResults(base_result, steered, starts, dict(starts), time.perf_counter() - started)


Inputs = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]  # ids, mask, positions


@contextmanager
def swept(lm: LayerwiseModel, inputs: Sequence[Inputs], edits: Mapping[Key, Edit | VectorEdit], *,
          what: str, desc: str, progress: bool
          ) -> Iterator[tuple[LayerRunner, Callable[[int, int], torch.Tensor]]]:
    """Run every batch of ``inputs`` through every layer, unsteered and under each edit; then,
    with the LM head loaded and the runner in its head stage, yield the runner and the final
    hidden states by (configuration, batch): configuration 0 is the unsteered model, then
    the edits in order. An edit shares the unsteered states up to its first steered layer."""
    starts = {key: earliest_layer(edit) for key, edit in edits.items()}
    beyond = [key for key, start in starts.items() if start >= lm.num_layers]
    if beyond:
        raise AufoldError(f"an edit steers layer {starts[beyond[0]]}, but this model has "
                          f"{lm.num_layers} layers; the plan was made for another model")
    keys = list(edits)
    hidden = lm.config.hidden_size
    shapes = [(*ids.shape, hidden) for ids, _, _ in inputs] * (1 + len(keys))

    def block(config: int, index: int) -> int:
        return config * len(inputs) + index

    runner = LayerRunner(lm)
    with open_store(lm, shapes, what) as store, \
            lm.loaded(OUTSIDE, skip=(lm.head, lm.embeddings)), \
            progress_bar(total=lm.num_layers + 2, desc=desc, unit="layer", enabled=progress) as bar:
        with lm.loaded(OUTSIDE, only=(lm.embeddings,)), runner.stage(None):
            for index, batch in enumerate(inputs):
                store[block(0, index)].copy_(runner.run(None, *batch))
        bar.update(1)
        for layer in range(lm.num_layers):
            with lm.loaded(layer), runner.stage(layer):
                for index, batch in enumerate(inputs):
                    base = store[block(0, index)]
                    for config, key in enumerate(keys, start=1):
                        if starts[key] > layer:
                            continue  # still the unsteered hidden states
                        source = base if starts[key] == layer else store[block(config, index)]
                        with steer(lm.model, edits[key]):
                            output = runner.run(source, *batch)
                        store[block(config, index)].copy_(output)
                    base.copy_(runner.run(base, *batch))
            bar.update(1)
        with lm.loaded(OUTSIDE, only=(lm.head_source,)), runner.head_stage():
            yield runner, lambda config, index: store[block(config, index)]
        bar.update(1)


def _inputs(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A left-padded batch's ids, mask and positions on the device, in ``runner.run`` order."""
    return (batch.input_ids.to(device), batch.attention_mask.to(device),
            batch.position_ids.to(device))
