"""The AUSteer authors' protocol: the greedy first token, matched to the answer as text.

The prediction is the decoded argmax token after the prompt (what
``generate(max_new_tokens=1)`` returns), compared with the gold answer after
stripping whitespace and ignoring case, so ``" Yes"`` matches ``" yes"`` and ``"A"``
matches ``"a"``. A first token that is none of the choices counts as wrong.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from aufold.evaluate.choices import ChoiceScorer, Encoded, Query
from aufold.evaluate.report import ItemResult
from aufold.tasks import Item


def normalize(text: str) -> str:
    return text.strip().lower()


class FirstTokenScorer(ChoiceScorer):
    """One row per item: the prompt; logits at its last position only."""

    name = "first-token"

    def queries(self, tokenizer: PreTrainedTokenizerBase, items: Sequence[Item],
                encoded: Encoded, max_length: int) -> list[Query]:
        return [Query(index, tuple(ids[-max_length:]), keep=1)
                for index, ids in enumerate(encoded.prompts)]

    def reduce(self, query: Query, logits: torch.Tensor) -> int:
        return int(logits[-1].argmax())

    def decide(self, tokenizer: PreTrainedTokenizerBase, item: Item, values: list[int]) -> ItemResult:
        (token,) = values
        text = str(tokenizer.decode([token], skip_special_tokens=True))
        return ItemResult(item.id, text, item.answer, normalize(text) == normalize(item.answer),
                          {"token_id": token})
