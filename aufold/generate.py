"""Side-by-side greedy completions, unsteered and steered, for trying an edit by eye."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from aufold.encoding import chat_prompt
from aufold.errors import AufoldError
from aufold.modeling import fingerprint, input_device, load_model
from aufold.plan import Plan
from aufold.recipe import Recipe, as_recipe
from aufold.progress import bar
from aufold.steer import steer


@torch.inference_mode()
def compare_completions(model_ref: str | Path, plan: Plan | str | Path | Recipe, *,
                        k: int | None = None, alpha: float | None = None, prompt: str, sites: Sequence[str] | None = None, dtype: str = "auto",
                        max_new_tokens: int = 40, chat_template: bool = False,
                        force: bool = False, device: str | None = None,
                        device_map: str | None = None, allow_pickle: bool = False,
                        allow_extreme: bool = False) -> tuple[str, str]:
    """Return the greedy completions of ``prompt`` without and with the plan's top-k edit
    (or a composed :class:`Recipe`).

    ``device_map="auto"`` spreads a model larger than one device over several
    (accelerate); the hooks follow each layer's device.
    """
    if not prompt.strip():
        raise AufoldError("--prompt is empty; give the text to complete")
    recipe = as_recipe(plan, k, alpha, sites, allow_extreme=allow_extreme)
    edit = recipe.edit()
    model, tokenizer, _ = load_model(model_ref, dtype=dtype, device=device, device_map=device_map,
                                     allow_pickle=allow_pickle)
    recipe.check_fingerprint(fingerprint(model), force=force)
    text = chat_prompt(tokenizer, prompt) if chat_template else prompt
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not chat_template)
    inputs = inputs.to(input_device(model))

    def complete(desc: str) -> str:
        with bar(total=max_new_tokens, desc=desc, unit="token", leave=False) as tokens:
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                                    stopping_criteria=StoppingCriteriaList([_Count(tokens)]))
        return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    plain = complete("unsteered")
    with steer(model, edit):
        steered = complete("steered")
    return plain, steered


class _Count(StoppingCriteria):
    """Advances a progress bar by one per generated token; never stops generation."""

    def __init__(self, tokens: Any) -> None:
        self.tokens = tokens

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor,
                 **kwargs: Any) -> torch.BoolTensor:
        self.tokens.update()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
