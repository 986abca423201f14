"""Verify: the exported checkpoint must compute what the hook mode computes on the base model."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerBase

from aufold.edit import Edit
from aufold.encoding import Batch, encode, pad_id, pad_right
from aufold.errors import AufoldError
from aufold.modeling import fingerprint, input_device, load_model, resolve_source
from aufold.plan import Plan
from aufold.steer import steer

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DEFAULT_PROMPTS = (
    "The capital of France is",
    "Question: What is 17 + 25?\nAnswer:",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "The most important thing to remember when cooking rice is",
)
FLOAT32_RELATIVE_TOLERANCE = 1e-5
NOISE_FLOOR_FACTOR = 3.0


@dataclass(frozen=True)
class VerifyReport:
    """How far the folded model's logits are from the hooked base model's."""

    dtype: str
    tokens: int
    max_abs_diff: float
    logit_scale: float  # max |logit| of the hooked base model
    relative_diff: float
    top1_agreement: float
    tolerance: float  # on max_abs_diff
    tolerance_rule: str
    noise_floor: float | None  # max |low-precision base - float32 base|, if not float32

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def verify(
    model_ref: str | Path,
    plan: Plan | str | Path,
    *,
    k: int,
    alpha: float,
    folded: str | Path,
    sites: Sequence[str] | None = None,
    dtype: str = "auto",
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    force: bool = False,
    device: str | None = None,
    device_map: str | None = None,
) -> VerifyReport:
    """Compare base + hooks against the folded folder on ``prompts``, at every real token.

    Float32 passes at a relative difference of 1e-5. Lower precisions pass within
    3x the dtype's own noise floor: the largest logit difference between the base
    model in that dtype and in float32, which a correct fold cannot beat.
    ``device`` or ``device_map`` places each model; one is in memory at a time.
    """
    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    edit = plan.select(k, alpha, sites)
    folded_source = resolve_source(folded)
    if folded_source.local_dir is None:
        raise AufoldError(f"--folded must be a local folder written by aufold export, got {folded}")
    if not prompts:
        raise AufoldError("verify needs at least one prompt")

    placement = {"device": device, "device_map": device_map}
    base, tokenizer, _ = load_model(model_ref, dtype=dtype, **placement)
    plan.check_fingerprint(fingerprint(base), force=force)
    batch = _batch(tokenizer, prompts)
    with steer(base, edit):
        hooked = _logits(base, batch)
    unsteered = _logits(base, batch)
    model_dtype = base.dtype
    del base  # keep at most one model in memory at a time
    gc.collect()
    folded_model, _, _ = load_model(folded, dtype=str(model_dtype).removeprefix("torch."), **placement)
    result = _logits(folded_model, batch)
    del folded_model
    gc.collect()
    reference = None
    if model_dtype != torch.float32:
        reference_model, _, _ = load_model(model_ref, dtype="float32", **placement)
        reference = _logits(reference_model, batch)
    return judge(hooked, result, unsteered, reference, model_dtype)


def verify_loaded(base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, edit: Edit,
                  folded_model: PreTrainedModel, prompts: Sequence[str] = DEFAULT_PROMPTS) -> VerifyReport:
    """The same comparison for float32 models already in memory (base left unchanged)."""
    if base.dtype != torch.float32:
        raise AufoldError("verify_loaded compares float32 models; use verify() for other dtypes")
    batch = _batch(tokenizer, prompts)
    with steer(base, edit):
        hooked = _logits(base, batch)
    return judge(hooked, _logits(folded_model, batch), _logits(base, batch), None, base.dtype)


def judge(hooked: torch.Tensor, folded: torch.Tensor, unsteered: torch.Tensor,
          reference: torch.Tensor | None, dtype: torch.dtype) -> VerifyReport:
    """Apply the tolerance rule: float32 relative 1e-5, else 3x the dtype's noise floor."""
    diff = (hooked - folded).abs().max().item()
    scale = hooked.abs().max().item()
    name = str(dtype).removeprefix("torch.")
    noise_floor = None
    if reference is None:
        tolerance = FLOAT32_RELATIVE_TOLERANCE * scale
        rule = f"float32: max |diff| <= {FLOAT32_RELATIVE_TOLERANCE:g} x logit scale"
    else:
        noise_floor = (unsteered - reference).abs().max().item()
        tolerance = NOISE_FLOOR_FACTOR * noise_floor
        rule = f"{name}: max |diff| <= {NOISE_FLOOR_FACTOR:g} x noise floor (max |base - float32 base|)"
    return VerifyReport(
        dtype=name,
        tokens=hooked.shape[0],
        max_abs_diff=diff,
        logit_scale=scale,
        relative_diff=diff / scale if scale else 0.0,
        top1_agreement=(hooked.argmax(-1) == folded.argmax(-1)).float().mean().item(),
        tolerance=tolerance,
        tolerance_rule=rule,
        noise_floor=noise_floor,
    )


def _batch(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> Batch:
    ids, _ = encode(tokenizer, prompts)
    return pad_right(ids, pad_id(tokenizer))


@torch.inference_mode()
def _logits(model: PreTrainedModel, batch: Batch) -> torch.Tensor:
    """Float32 logits at every real (unpadded) token, as one [tokens, vocab] matrix."""
    batch = batch.to(input_device(model))
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return logits[batch.attention_mask.bool()].float().cpu()
