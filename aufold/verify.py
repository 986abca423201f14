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
from aufold.encoding import encode
from aufold.errors import AufoldError
from aufold.modeling import fingerprint, input_device, load_model, resolve_source
from aufold.plan import Plan
from aufold.recipe import Recipe, as_recipe
from aufold.progress import bar, status
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
# In bfloat16 / float16 the fold passes when its logits are at most this many times as far
# (root mean square over every logit) from the float32 steered model as the hook mode's own
# low-precision logits are. Both realizations round once per steered product, at different
# places, so neither is the reference. Measured by benchmarks/verify_bench.py on SmolLM2 and
# four tiny architectures (bf16 and fp16; head, mlp, mlp-out; alpha 5 to 100): correct
# folds 0.56 to 1.60, the unedited base at least 6.3. The maximum over logits separates
# them less (correct folds up to 1.71, the unedited base down to 2.1), so RMS it is.
LOW_PRECISION_FACTOR = 2.5


@dataclass(frozen=True)
class VerifyReport:
    """How far the folded model's logits are from the hooked base model's."""

    dtype: str
    tokens: int
    max_abs_diff: float  # max |hooks - fold|, both in ``dtype``
    logit_scale: float  # max |logit| of the hooked base model
    relative_diff: float
    top1_agreement: float
    tolerance: float  # on max_abs_diff (float32) or on fold_distance (lower precisions)
    tolerance_rule: str
    # Lower precisions only: RMS of (logits - float32 steered logits), of the fold and the hooks.
    fold_distance: float | None = None
    hook_distance: float | None = None

    @property
    def passed(self) -> bool:
        if self.fold_distance is None:
            return self.max_abs_diff <= self.tolerance
        return self.fold_distance <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def verify(
    model_ref: str | Path,
    plan: Plan | str | Path | Recipe,
    *,
    k: int | None = None,
    alpha: float | None = None,
    folded: str | Path,
    sites: Sequence[str] | None = None,
    dtype: str = "auto",
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    force: bool = False,
    device: str | None = None,
    device_map: str | None = None,
    allow_pickle: bool = False,
    allow_extreme: bool = False,
) -> VerifyReport:
    """Compare base + hooks against the folded folder on ``prompts``, at every real token;
    the edit is the top ``k`` units of ``plan`` at ``alpha``, or a composed :class:`Recipe`.

    Float32 passes at a relative difference of 1e-5. In a lower precision both
    realizations differ from the exact steered model by rounding, so each is compared
    with the float32 steered model (base + hooks in float32): the fold passes when its
    distance is at most :data:`LOW_PRECISION_FACTOR` times the hooks' own.
    ``device`` or ``device_map`` places each model; one is in memory at a time.
    """
    recipe = as_recipe(plan, k, alpha, sites, allow_extreme=allow_extreme)
    edit = recipe.edit()
    folded_source = resolve_source(folded)
    if folded_source.local_dir is None:
        raise AufoldError(f"--folded must be a local folder written by aufold export, got {folded}")
    if not prompts or not all(prompt.strip() for prompt in prompts):
        raise AufoldError("verify needs prompts with text; drop the empty --prompt")

    placement = {"device": device, "device_map": device_map, "allow_pickle": allow_pickle}
    status(f"verify: {model_ref} with hooks")
    base, tokenizer, _ = load_model(model_ref, dtype=dtype, **placement)  # type: ignore[arg-type]
    recipe.check_fingerprint(fingerprint(base), force=force)
    prompt_ids = encode_prompts(tokenizer, prompts)
    with steer(base, edit):
        hooked = prompt_logits(base, prompt_ids)
    model_dtype = base.dtype
    del base  # keep at most one model in memory at a time
    gc.collect()
    status(f"verify: the folded model {folded}")
    folded_model, _, _ = load_model(folded, dtype=str(model_dtype).removeprefix("torch."),
                                    **placement)  # type: ignore[arg-type]
    result = prompt_logits(folded_model, prompt_ids)
    del folded_model
    gc.collect()
    reference = None
    if model_dtype != torch.float32:
        status(f"verify: {model_ref} with hooks in float32, the reference for {model_dtype}")
        reference_model, _, _ = load_model(model_ref, dtype="float32", **placement)  # type: ignore[arg-type]
        with steer(reference_model, edit):
            reference = prompt_logits(reference_model, prompt_ids)
    return judge(hooked, result, reference, model_dtype)


def verify_loaded(base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, edit: Edit,
                  folded_model: PreTrainedModel, prompts: Sequence[str] = DEFAULT_PROMPTS) -> VerifyReport:
    """The same comparison for float32 models already in memory (base left unchanged)."""
    if base.dtype != torch.float32:
        raise AufoldError("verify_loaded compares float32 models; use verify() for other dtypes")
    prompt_ids = encode_prompts(tokenizer, prompts)
    with steer(base, edit):
        hooked = prompt_logits(base, prompt_ids)
    return judge(hooked, prompt_logits(folded_model, prompt_ids), None, base.dtype)


def judge(hooked: torch.Tensor, folded: torch.Tensor, reference: torch.Tensor | None,
          dtype: torch.dtype) -> VerifyReport:
    """Apply the tolerance rule: in float32 the fold matches the hooks to 1e-5 of the logits'
    scale; in a lower precision (``reference``: the float32 steered logits) the fold is at
    most :data:`LOW_PRECISION_FACTOR` times as far from the reference as the hooks are."""
    diff = (hooked - folded).abs().max().item()
    scale = hooked.abs().max().item()
    name = str(dtype).removeprefix("torch.")
    fold_distance = hook_distance = None
    if reference is None:
        tolerance = FLOAT32_RELATIVE_TOLERANCE * scale
        rule = f"float32: max |fold - hooks| <= {FLOAT32_RELATIVE_TOLERANCE:g} x logit scale"
    else:
        fold_distance = rms_distance(folded, reference)
        hook_distance = rms_distance(hooked, reference)
        tolerance = LOW_PRECISION_FACTOR * hook_distance
        rule = (f"{name}: RMS(fold - float32 steered) <= {LOW_PRECISION_FACTOR:g} x "
                f"RMS(hooks - float32 steered)")
    return VerifyReport(
        dtype=name,
        tokens=hooked.shape[0],
        max_abs_diff=diff,
        logit_scale=scale,
        relative_diff=diff / scale if scale else 0.0,
        top1_agreement=(hooked.argmax(-1) == folded.argmax(-1)).float().mean().item(),
        tolerance=tolerance,
        tolerance_rule=rule,
        fold_distance=fold_distance,
        hook_distance=hook_distance,
    )


def rms_distance(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """The root mean square of the difference of two logit matrices."""
    return float((logits.double() - reference.double()).pow(2).mean().sqrt())


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[list[int]]:
    ids, _ = encode(tokenizer, prompts)
    return ids


@torch.inference_mode()
def prompt_logits(model: PreTrainedModel, prompt_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """Float32 logits at every token, one prompt at a time, as one [tokens, vocab] matrix.

    Each prompt runs alone, unpadded: in a padded batch a low-precision model computes
    the real tokens of a short prompt with other kernels (a mask, a different shape) than
    it does alone, which shows up as noise between otherwise equal realizations.
    """
    device = input_device(model)
    rows = [model(input_ids=torch.tensor([ids], device=device)).logits[0].float().cpu()
            for ids in bar(prompt_ids, desc="verify", unit="prompt", leave=False)]
    return torch.cat(rows)
