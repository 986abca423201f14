"""Math word problems: greedy generation, the final number of the answer, compared as a number.

The number read from a completion is the first number after its last ``####``
when it has one (the MAWPS prompt asks for it), else the last number it writes.
Thousands separators are allowed (``1,200``). Two numbers are the same answer
when they read the same in :func:`~aufold.tasks.numbers.format_number` (four
decimals), the rule that also decides which contrastive answers differ.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from aufold.defaults import MAX_NEW_TOKENS
from aufold.encoding import pad_id
from aufold.evaluate.batches import length_batches, pad_left
from aufold.evaluate.choices import encode_prompts
from aufold.evaluate.report import ItemResult
from aufold.modeling import fitted_length, input_device
from aufold.progress import bar
from aufold.tasks import Item, format_number

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DEFAULT_MAX_NEW_TOKENS = MAX_NEW_TOKENS
ANSWER_MARK = "####"
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def extract_number(text: str) -> float | None:
    """The answer number of a completion (see the module's rule), or None when it has none."""
    if ANSWER_MARK in text:
        match = _NUMBER.search(text.rsplit(ANSWER_MARK, 1)[1])
        found = match.group() if match else None
    else:
        numbers = _NUMBER.findall(text)
        found = numbers[-1] if numbers else None
    if found is None:
        return None
    value = float(found.replace(",", ""))
    return value if math.isfinite(value) else None


def same_number(value: float | None, gold: float) -> bool:
    return value is not None and format_number(value) == format_number(gold)


def greedy_config(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                  max_new_tokens: int) -> GenerationConfig:
    """Plain greedy decoding: no sampling or penalties from the model's own generation config."""
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                            eos_token_id=model.generation_config.eos_token_id,
                            pad_token_id=pad_id(tokenizer))


@torch.inference_mode()
def score_math(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, items: Sequence[Item], *,
               chat_template: bool, max_length: int, batch_size: int,
               max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, progress: bool = True,
               desc: str = "eval") -> tuple[list[ItemResult], int]:
    """Generate for every item in left-padded batches; return the results and the cut prompts."""
    # With learned positions (GPT-2) the prompt and the generated tokens must fit together.
    room = fitted_length(model, max_length + max_new_tokens) - max_new_tokens
    max_length = max(1, min(max_length, room))
    encoded = encode_prompts(tokenizer, items, chat_template=chat_template, max_length=max_length)
    prompts = [ids[-max_length:] for ids in encoded.prompts]
    config = greedy_config(model, tokenizer, max_new_tokens)
    device = input_device(model)
    outputs: list[str] = [""] * len(items)
    batches = length_batches([len(ids) for ids in prompts], batch_size)
    for indices in bar(batches, desc=desc, unit="batch", enabled=progress):
        batch = pad_left([prompts[i] for i in indices], pad_id(tokenizer)).to(device)
        generated = model.generate(  # type: ignore[operator]
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, generation_config=config)
        width = batch.input_ids.shape[1]
        for row, index in enumerate(indices):
            outputs[index] = str(tokenizer.decode(generated[row, width:], skip_special_tokens=True))
    results = []
    for item, text in zip(items, outputs):
        assert item.answer_value is not None, "math items carry their gold number"
        value = extract_number(text)
        results.append(ItemResult(item.id, "" if value is None else format_number(value),
                                  item.answer, same_number(value, item.answer_value),
                                  {"output": text}))
    return results, encoded.truncated
