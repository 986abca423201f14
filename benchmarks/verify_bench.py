"""How far a low-precision fold and the low-precision hooks each are from the exact steered
model: the measurements behind `aufold verify`'s bfloat16 / float16 rule.

In float32 the fold equals the hooks to rounding. In bfloat16 or float16 both realizations
round once per steered product, but at different places (the fold rounds the scaled
weight, the hooks the scaled activation), so neither is the reference: each is compared
with the float32 steered model (base + hooks in float32). For every model, dtype, site and
alpha this prints

    fold distance = RMS of logits(fold, dtype) - logits(float32 steered)
    hook distance = RMS of logits(hooks, dtype) - logits(float32 steered)

and their ratio; and the same ratio for two checkpoints verify must reject: the unedited
base (as if the fold had been lost) and a fold with twice the alpha. `aufold verify` passes
a fold whose ratio is at most LOW_PRECISION_FACTOR (aufold.verify); the summary gives the
largest ratio of a correct fold and the smallest of a wrong one. (At large alphas a
doubled alpha can be close to the right model in any precision: the steered units then
dominate their layer's normalization either way.)

    python benchmarks/verify_bench.py                  # SmolLM2 and tiny models
    python benchmarks/verify_bench.py --no-smollm2     # tiny models only (a minute)
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from edit_helpers import random_plan  # noqa: E402
from tiny_models import tiny_model, tiny_tokenizer  # noqa: E402

from aufold.fold import fold_model  # noqa: E402
from aufold.modeling import load_model, local_smollm2  # noqa: E402
from aufold.steer import steer  # noqa: E402
from aufold.verify import (  # noqa: E402
    DEFAULT_PROMPTS,
    LOW_PRECISION_FACTOR,
    encode_prompts,
    prompt_logits,
    rms_distance,
)

DTYPES = (torch.bfloat16, torch.float16)
SITES = ("head", "mlp", "mlp-out")
ALPHAS = (5.0, 20.0, 100.0)
K = 32
WRONG = 2.0  # a wrong fold: alpha x 2


def distances(base32: torch.nn.Module, ids: list[list[int]], dtype: torch.dtype, edit, wrong_edit
              ) -> tuple[float, float, float, float]:
    """Distances to the float32 steered model, in one dtype, of: the fold, the hooks, the
    unedited base and the wrong fold."""
    with steer(base32, edit):
        reference = prompt_logits(base32, ids)
    low = copy.deepcopy(base32).to(dtype)
    with steer(low, edit):
        hooks = prompt_logits(low, ids)
    folded = copy.deepcopy(low)
    fold_model(folded, edit)
    wrong = copy.deepcopy(low)
    fold_model(wrong, wrong_edit)
    return tuple(rms_distance(x, reference)  # type: ignore[return-value]
                 for x in (prompt_logits(folded, ids), hooks, prompt_logits(low, ids), prompt_logits(wrong, ids)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-smollm2", action="store_true")
    args = parser.parse_args()
    models = [(name, tiny_model(name), tiny_tokenizer()) for name in ("llama", "gemma2", "qwen3", "gpt2")]
    if not args.no_smollm2:
        model, tokenizer, _ = load_model(local_smollm2(REPO), dtype="float32")
        models.insert(0, ("SmolLM2-135M", model, tokenizer))
    print(f"{'model':<14}{'dtype':<10}{'site':<9}{'alpha':>6}{'fold':>10}{'hooks':>10}"
          f"{'ratio':>8}{'unedited':>10}{'2x alpha':>10}")
    worst, least_unedited, least_doubled = 0.0, float("inf"), float("inf")
    for name, model, tokenizer in models:
        ids = encode_prompts(tokenizer, DEFAULT_PROMPTS)
        plan = random_plan(model, num_pairs=100)
        for dtype in DTYPES:
            for site in SITES:
                for alpha in ALPHAS:
                    edit = plan.select(K, alpha, [site])
                    wrong_edit = plan.select(K, alpha * WRONG, [site])
                    fold, hooks, unedited, doubled = distances(model, ids, dtype, edit, wrong_edit)
                    ratio = fold / hooks
                    worst = max(worst, ratio)
                    least_unedited = min(least_unedited, unedited / hooks)
                    least_doubled = min(least_doubled, doubled / hooks)
                    print(f"{name:<14}{str(dtype).removeprefix('torch.'):<10}{site:<9}{alpha:>6g}"
                          f"{fold:>10.3g}{hooks:>10.3g}{ratio:>8.2f}{unedited / hooks:>10.1f}"
                          f"{doubled / hooks:>10.1f}")
    print(f"correct folds: largest fold/hooks ratio {worst:.2f} (verify passes up to "
          f"{LOW_PRECISION_FACTOR:g}); unedited base: smallest ratio {least_unedited:.1f}; fold "
          f"with 2x alpha: smallest ratio {least_doubled:.1f}")
    return 0 if worst <= LOW_PRECISION_FACTOR < least_unedited else 1


if __name__ == "__main__":
    sys.exit(main())
