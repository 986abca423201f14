"""Left-padded batches and the one forward pass that every multiple-choice scorer makes.

Left padding puts every row's last token in the last column, so the positions a
scorer reads are "the last few" for every row and the model's own
``logits_to_keep`` applies the LM head to those positions only (with any final
logit soft-capping the model does). Position ids count real tokens only, as
``generate`` does, so a padded row sees the positions it would see alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from aufold.defaults import EVAL_BATCH_SIZE

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DEFAULT_BATCH_SIZE = EVAL_BATCH_SIZE


@dataclass(frozen=True)
class LeftBatch:
    """Left-padded token ids with their attention mask and position ids."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor

    def to(self, device: torch.device) -> LeftBatch:
        return LeftBatch(self.input_ids.to(device), self.attention_mask.to(device),
                         self.position_ids.to(device))


# Computes logits at the last ``keep`` positions of every row: [rows, keep, vocab].
LogitsFn = Callable[[LeftBatch, int], torch.Tensor]


def pad_left(rows: Sequence[Sequence[int]], pad_id: int) -> LeftBatch:
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, width - len(row):] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return LeftBatch(input_ids, attention_mask, position_ids)


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, so little compute goes to padding."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def model_logits(model: PreTrainedModel, batch: LeftBatch, keep: int) -> torch.Tensor:
    """Float32 logits at the last ``keep`` positions of each row, from one forward pass."""
    output = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids, use_cache=False, logits_to_keep=keep)
    return output.logits.float()
