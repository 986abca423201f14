"""The defaults and choices of aufold's settings, in one module that imports nothing heavy.

The command line builds its options from these before it loads torch (so that `--help`
and usage errors answer at once); the modules that use them import them from here.
"""

from __future__ import annotations

# Localization (aufold.localize).
LOCALIZE_BATCH_SIZE = 16
LOCALIZE_MAX_LENGTH = 512  # tokens; longer texts are cut from the left, keeping the answer
# |m| at most this times the activations' RMS is a tie. On SmolLM2 (800 COPA pairs, float32)
# it brings every counter of the batched forward within 1 of the batch-1 forward's (strict
# signs: within 3) and keeps the top 100 units of the strict rule; see
# `benchmarks/localize_bench.py --also-tolerances` and benchmarks/README.md.
TIE_TOLERANCE = 1e-6

# Evaluation (aufold.evaluate).
EVAL_BATCH_SIZE = 16
EVAL_MAX_LENGTH = 2048  # prompt tokens; longer prompts keep their last tokens
MAX_NEW_TOKENS = 128  # generation budget of math tasks
CHOICE_SCORER_NAMES: tuple[str, ...] = ("first-token", "loglik")
MATH_SCORER_NAME = "math"
SCORER_NAMES: tuple[str, ...] = (*CHOICE_SCORER_NAMES, MATH_SCORER_NAME)

# The cost of an edit (aufold.evaluate.cost): KL and perplexity on this many tokens of neutral
# text (the BoolQ test passages by default), in windows of this many tokens.
NEUTRAL_TOKENS = 4096
NEUTRAL_WINDOW = 256

# The tune sweep (aufold.tune): the paper's grid.
K_GRID: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 100)
ALPHA_GRID: tuple[float, ...] = (1.0, 5.0, 10.0, 20.0, 50.0, 100.0)

# Dtypes a model can be loaded in ("auto": the checkpoint's own).
DTYPE_NAMES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")

# GGUF export (aufold.formats.gguf): the type a block-quantized tensor is re-encoded to when
# its columns are steered (head units of attn_output), which no block scale can express.
GGUF_REENCODE_NAMES: tuple[str, ...] = ("q8_0", "f16")
GGUF_REENCODE = "q8_0"
