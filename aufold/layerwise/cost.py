"""The cost of edits on neutral text, one decoder layer at a time (a model larger than memory).

The windows, batches and sums are :func:`aufold.evaluate.cost.edit_costs`' own; the
hidden states go through the layers as in the streamed evaluation
(:func:`aufold.layerwise.evaluate.swept`), and the model's own final norm, LM head and
soft-capping give the log-probabilities, a few positions at a time.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from aufold.evaluate.cost import (
    CostTally,
    EditCost,
    NeutralText,
    pad_windows,
    window_batches,
)
from aufold.layerwise.evaluate import swept
from aufold.layerwise.hidden import choose_spill, hidden_bytes
from aufold.layerwise.skeleton import LayerwiseModel

if TYPE_CHECKING:
    from aufold.edit import Edit
    from aufold.vectors.caa import VectorEdit

Key = TypeVar("Key", bound=Hashable)


def check_cost_room(lm: LayerwiseModel, neutral: NeutralText, edits: int, *,
                    batch_size: int = 4) -> None:
    """Refuse, before a long sweep, hidden states of the cost that fit neither in memory nor
    in the work folder (:func:`aufold.layerwise.hidden.choose_spill`): the same shapes
    :func:`edit_costs_layerwise` stores, for the unsteered model and ``edits`` edits."""
    shapes = [(len(batch), max(len(window) for window in batch), lm.config.hidden_size)
              for batch in window_batches(neutral, batch_size)] * (1 + edits)
    choose_spill(hidden_bytes(shapes, lm.dtype), lm.largest_part_bytes(), lm.work_dir, lm.spill)


@torch.inference_mode()
def edit_costs_layerwise(lm: LayerwiseModel, neutral: NeutralText,
                         edits: Mapping[Key, Edit | VectorEdit], *, batch_size: int = 4,
                         progress: bool = True) -> dict[Key, EditCost]:
    """Each edit's KL and perplexity ratio against the unsteered model on ``neutral``."""
    batches = window_batches(neutral, batch_size)
    inputs = [(*pad_windows(batch, lm.device), None) for batch in batches]
    configs = {key: config for config, key in enumerate(edits, start=1)}
    tally = CostTally(edits)
    what = f"{len(batches)} batches of neutral text for the unsteered model and {len(edits)} edit(s)"
    with swept(lm, inputs, edits, what=what, desc="cost", progress=progress) as (runner, final):
        for index, (ids, mask, _) in enumerate(inputs):

            def log_probs(key: Any, start: int, stop: int) -> torch.Tensor:
                hidden = final(configs[key] if key is not None else 0, index)
                positions = torch.arange(start, stop, device=ids.device)
                logits = runner.logits(hidden, ids, mask, None, positions)  # type: ignore[arg-type]
                return torch.log_softmax(logits, dim=-1)

            tally.add(ids, mask, log_probs)
    return tally.costs(neutral)
