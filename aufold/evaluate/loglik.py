"""Log-likelihood scoring: the choice whose answer tokens have the highest total log-probability.

Answer tokens are the tokens of ``prompt + choice`` after the longest prefix they
share with the prompt's own tokens (usually the prompt's length; earlier when a
token straddles the boundary). When every choice of an item adds exactly one
token to the prompt's tokens (``A``/``B``, `` yes``/`` no``), one row, the prompt,
scores all choices at its last position. Otherwise each choice is a row of its
own, ``prompt + choice`` without its last token, scored at the answer positions.
Ties go to the earlier choice.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from aufold.errors import AufoldError
from aufold.evaluate.choices import ChoiceScorer, Encoded, Query, common_prefix
from aufold.evaluate.report import ItemResult
from aufold.tasks import Item


class LoglikScorer(ChoiceScorer):
    name = "loglik"

    def queries(self, tokenizer: PreTrainedTokenizerBase, items: Sequence[Item],
                encoded: Encoded, max_length: int) -> list[Query]:
        texts = [prompt + choice for prompt, item in zip(encoded.texts, items) for choice in item.choices]
        full = iter(tokenizer(texts, add_special_tokens=encoded.special)["input_ids"] if texts else [])
        queries = []
        for index, (item, prompt) in enumerate(zip(items, encoded.prompts)):
            answers = []
            for choice in item.choices:
                ids = list(next(full))
                # The first token of a text has no prediction, so it is never scored.
                start = max(common_prefix(prompt, ids), 1)
                if len(ids) <= start:
                    raise AufoldError(f"item {item.id}: choice {choice!r} adds no token to the "
                                      f"prompt, so it has no likelihood; give non-empty choices")
                answers.append((ids, start))
            if prompt and all(start == len(prompt) and len(ids) == start + 1 for ids, start in answers):
                targets = tuple((c, (ids[-1],)) for c, (ids, _start) in enumerate(answers))
                queries.append(Query(index, tuple(prompt[-max_length:]), 1, targets))
                continue
            for c, (ids, start) in enumerate(answers):
                row = ids[:-1][-max_length:]
                answer = tuple(ids[start:])[-len(row):]  # a cut row keeps as much answer as it can
                queries.append(Query(index, tuple(row), len(answer), ((c, answer),)))
        return queries

    def reduce(self, query: Query, logits: torch.Tensor) -> list[tuple[int, float]]:
        logprobs = torch.log_softmax(logits, dim=-1)
        keep = logprobs.shape[0]
        scores = []
        for choice, tokens in query.targets:
            positions = torch.arange(keep - len(tokens), keep)
            picked = logprobs[positions, torch.tensor(tokens)]
            scores.append((choice, float(picked.sum())))
        return scores

    def decide(self, tokenizer: PreTrainedTokenizerBase, item: Item,
               values: list[list[tuple[int, float]]]) -> ItemResult:
        scores = [0.0] * len(item.choices)
        for row in values:
            for choice, score in row:
                scores[choice] = score
        best = max(range(len(scores)), key=scores.__getitem__)
        prediction = item.choices[best]
        return ItemResult(item.id, prediction, item.answer, prediction == item.answer,
                          {"scores": scores})
