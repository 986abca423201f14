"""The engine shared by the multiple-choice scorers: queries, batches, one forward per batch.

A scorer turns each item into one or more :class:`Query` rows (token ids and how
many final positions it needs logits at), reduces each row's logits to a small
value right after its forward pass (so logits never pile up), and finally decides
each item from its rows' values. The batching lives here, once, so plain
evaluation, hook-mode evaluation and the prefix-resumed tuning sweep
(:mod:`aufold.evaluate.resume`) run exactly the same batches and therefore
compute exactly the same numbers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from aufold.encoding import chat_prompt, pad_id
from aufold.evaluate.batches import LeftBatch, LogitsFn, length_batches, pad_left
from aufold.evaluate.report import ItemResult
from aufold.progress import bar
from aufold.tasks import Item


@dataclass(frozen=True)
class Query:
    """One row of a forward pass: ``ids`` are the input; logits are needed at the last ``keep``.

    ``targets`` (log-likelihood scoring) pairs a choice index with the answer tokens
    whose log-probabilities are read at the last ``len(tokens)`` of those positions.
    """

    item: int
    ids: tuple[int, ...]
    keep: int
    targets: tuple[tuple[int, tuple[int, ...]], ...] = ()


@dataclass(frozen=True)
class Encoded:
    """Token ids of each item's prompt, and how many were cut from the left to fit."""

    prompts: list[list[int]]
    texts: list[str]
    special: bool  # whether the tokenizer adds its special tokens (not with a chat template)
    truncated: int


class ChoiceScorer(ABC):
    """A way to pick one of an item's choices from the model's logits."""

    name: str

    @abstractmethod
    def queries(self, tokenizer: PreTrainedTokenizerBase, items: Sequence[Item],
                encoded: Encoded, max_length: int) -> list[Query]:
        """The rows to run for ``items``, each naming the item it serves."""

    @abstractmethod
    def reduce(self, query: Query, logits: torch.Tensor) -> Any:
        """A row's value from its float32 logits at its last ``query.keep`` positions."""

    @abstractmethod
    def decide(self, tokenizer: PreTrainedTokenizerBase, item: Item, values: list[Any]) -> ItemResult:
        """The item's prediction from the values of its rows, in query order."""


def encode_prompts(tokenizer: PreTrainedTokenizerBase, items: Sequence[Item], *,
                   chat_template: bool, max_length: int) -> Encoded:
    """Each item's prompt (wrapped as a user turn with ``chat_template``) as token ids.

    A chat template writes its own special tokens; plain text gets the tokenizer's.
    Prompts longer than ``max_length`` keep their last tokens, where the answer goes.
    """
    texts = [chat_prompt(tokenizer, item.prompt) if chat_template else item.prompt for item in items]
    special = not chat_template
    ids = tokenizer(texts, add_special_tokens=special)["input_ids"] if texts else []
    truncated = sum(len(row) > max_length for row in ids)
    return Encoded([list(row) for row in ids], texts, special, truncated)


@dataclass
class PreparedChoices:
    """Everything fixed before the first forward pass: the queries and their batches."""

    scorer: ChoiceScorer
    tokenizer: PreTrainedTokenizerBase
    items: Sequence[Item]
    queries: list[Query]
    batches: list[list[int]]  # query indices per batch
    truncated: int

    def batch(self, index: int, device: torch.device) -> tuple[LeftBatch, int]:
        """Batch ``index`` on ``device``, and how many final positions need logits."""
        rows = [self.queries[i] for i in self.batches[index]]
        batch = pad_left([row.ids for row in rows], pad_id(self.tokenizer)).to(device)
        return batch, max(row.keep for row in rows)

    def store(self, index: int, logits: torch.Tensor, values: list[Any]) -> None:
        """Reduce batch ``index``'s logits ([rows, keep, vocab]) into ``values`` by query."""
        width = logits.shape[1]
        for row, query_index in enumerate(self.batches[index]):
            query = self.queries[query_index]
            values[query_index] = self.scorer.reduce(query, logits[row, width - query.keep:])

    def results(self, values: list[Any]) -> list[ItemResult]:
        """Each item's result, in item order, from the reduced values of all queries."""
        per_item: list[list[Any]] = [[] for _ in self.items]
        for query, value in zip(self.queries, values):
            per_item[query.item].append(value)
        return [self.scorer.decide(self.tokenizer, item, found)
                for item, found in zip(self.items, per_item)]


def prepare_choices(scorer: ChoiceScorer, tokenizer: PreTrainedTokenizerBase, items: Sequence[Item],
                    *, chat_template: bool, max_length: int, batch_size: int) -> PreparedChoices:
    encoded = encode_prompts(tokenizer, items, chat_template=chat_template, max_length=max_length)
    queries = scorer.queries(tokenizer, items, encoded, max_length)
    batches = length_batches([len(query.ids) for query in queries], batch_size)
    return PreparedChoices(scorer, tokenizer, items, queries, batches, encoded.truncated)


def run_choices(prepared: PreparedChoices, logits_fn: LogitsFn, device: torch.device, *,
                progress: bool = True, desc: str = "eval") -> list[ItemResult]:
    """Run every batch through ``logits_fn`` and decide every item."""
    values: list[Any] = [None] * len(prepared.queries)
    for index in bar(range(len(prepared.batches)), desc=desc, unit="batch", enabled=progress):
        batch, keep = prepared.batch(index, device)
        prepared.store(index, logits_fn(batch, keep), values)
    return prepared.results(values)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length
