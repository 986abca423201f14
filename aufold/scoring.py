"""Scoring multiple-choice items by the log-likelihood of each answer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerBase

from aufold.encoding import chat_prompt, encode, pad_id, pad_right
from aufold.modeling import input_device
from aufold.tasks import Item

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@torch.inference_mode()
def choice_logliks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Item],
    *,
    batch_size: int = 16,
    chat_template: bool = False,
) -> list[list[float]]:
    """For each item, the total log-probability of each choice's tokens after the prompt."""
    prompts = [chat_prompt(tokenizer, item.prompt) if chat_template else item.prompt for item in items]
    special = not chat_template
    prompt_ids, _ = encode(tokenizer, prompts, add_special_tokens=special)
    texts, owners = [], []
    for index, (prompt, item) in enumerate(zip(prompts, items)):
        texts.extend(prompt + choice for choice in item.choices)
        owners.extend([index] * len(item.choices))
    full_ids, _ = encode(tokenizer, texts, add_special_tokens=special)
    # The answer starts where the text's tokens stop matching the prompt's (usually
    # at the prompt's length; earlier when a token straddles the boundary).
    starts = [_common_prefix(prompt_ids[owner], ids) for owner, ids in zip(owners, full_ids)]

    scores: list[float] = []
    device = input_device(model)
    for begin in range(0, len(full_ids), batch_size):
        rows = full_ids[begin:begin + batch_size]
        batch = pad_right(rows, pad_id(tokenizer)).to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        token_logprobs = logprobs.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1).cpu()
        for row, start in zip(range(len(rows)), starts[begin:begin + batch_size]):
            first = max(start, 1)  # a first token has no prediction to score
            scores.append(float(token_logprobs[row, first - 1:len(rows[row]) - 1].sum()))
    grouped: list[list[float]] = [[] for _ in items]
    for owner, score in zip(owners, scores):
        grouped[owner].append(score)
    return grouped


def loglik_accuracy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                    items: Sequence[Item], *, batch_size: int = 16, chat_template: bool = False) -> float:
    """The fraction of items whose gold answer has the highest log-likelihood."""
    logliks = choice_logliks(model, tokenizer, items, batch_size=batch_size, chat_template=chat_template)
    correct = sum(item.choices[max(range(len(s)), key=s.__getitem__)] == item.answer
                  for item, s in zip(items, logliks))
    return correct / len(items)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length
