"""Side-by-side greedy completions, unsteered and steered, for trying an edit by eye."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from aufold.encoding import chat_prompt
from aufold.modeling import fingerprint, input_device, load_model
from aufold.plan import Plan
from aufold.steer import steer


@torch.inference_mode()
def compare_completions(model_ref: str | Path, plan: Plan | str | Path, *, k: int, alpha: float,
                        prompt: str, sites: Sequence[str] | None = None, dtype: str = "auto",
                        max_new_tokens: int = 40, chat_template: bool = False,
                        force: bool = False, device: str | None = None,
                        device_map: str | None = None, allow_pickle: bool = False,
                        allow_extreme: bool = False) -> tuple[str, str]:
    """Return the greedy completions of ``prompt`` without and with the plan's top-k edit.

    ``device_map="auto"`` spreads a model larger than one device over several
    (accelerate); the hooks follow each layer's device.
    """
    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    edit = plan.select(k, alpha, sites, allow_extreme=allow_extreme)
    model, tokenizer, _ = load_model(model_ref, dtype=dtype, device=device, device_map=device_map,
                                     allow_pickle=allow_pickle)
    plan.check_fingerprint(fingerprint(model), force=force)
    text = chat_prompt(tokenizer, prompt) if chat_template else prompt
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not chat_template)
    inputs = inputs.to(input_device(model))

    def complete() -> str:
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    plain = complete()
    with steer(model, edit):
        steered = complete()
    return plain, steered
