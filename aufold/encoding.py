"""Turning texts into padded batches, the same way for localization, scoring and verification."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from aufold.defaults import LOCALIZE_MAX_LENGTH
from aufold.errors import AufoldError

DEFAULT_MAX_LENGTH = LOCALIZE_MAX_LENGTH


@dataclass(frozen=True)
class Batch:
    """Right-padded token ids; ``last`` is the position of each row's last real token.

    Right padding keeps every text at positions 0..n-1, so models with absolute
    position embeddings (GPT-2) see exactly what they would see unpadded.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    last: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.last.to(device))


def chat_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """Wrap a prompt as one user turn of the tokenizer's chat template, ready for an answer."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "(unnamed)"
        raise AufoldError(f"tokenizer {name} has no chat template; drop --chat-template or "
                          f"use an instruction-tuned model's tokenizer")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def encode(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    add_special_tokens: bool = True,
) -> tuple[list[list[int]], int]:
    """Token ids of each text, cut from the left to ``max_length``; also how many were cut.

    Cutting from the left keeps the answer, whose last token is what gets read.
    """
    ids = tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
    truncated = sum(len(row) > max_length for row in ids)
    return [row[-max_length:] for row in ids], truncated


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> Batch:
    lengths = torch.tensor([len(row) for row in rows])
    input_ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return Batch(input_ids, attention_mask, lengths - 1)


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id used for padding; masked out, so any valid id works when none is defined."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0
