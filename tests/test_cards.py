"""Every export's card tells how to load it, and its usage code runs as written.

The Python blocks of the cards of a checkpoint, a LoRA and an IA3 adapter of a local
tiny model, and of a folded GGUF file, are executed as they stand (blocks that need a
serving engine, vLLM, are left out); they name the export's own folder and the base's
path, so nothing is filled in by hand. llama.cpp's command lines name a file that exists.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from edit_helpers import random_plan
from tiny_models import save_tiny_model, tiny_model

from aufold.export import export
from aufold.modeling import smollm2_gguf_path

CODE_BLOCK = re.compile(r"```(python|bash)\n(.*?)```", re.DOTALL)


def usage_blocks(card: Path, language: str) -> list[str]:
    usage = card.read_text().split("## Usage", 1)[1].split("\n## ", 1)[0]
    return [code for lang, code in CODE_BLOCK.findall(usage) if lang == language]


def run_python_blocks(card: Path) -> dict[str, object]:
    """Execute the card's Python usage blocks that need no serving engine; their names."""
    names: dict[str, object] = {}
    blocks = [code for code in usage_blocks(card, "python") if "vllm" not in code]
    assert blocks, card.read_text()
    for code in blocks:
        exec(compile(code, str(card), "exec"), names)  # noqa: S102 - the card's own code
    return names


@pytest.mark.parametrize("output_format", ["checkpoint", "lora", "ia3"])
def test_the_usage_code_of_a_card_runs_as_written(output_format: str, tmp_path: Path) -> None:
    base_dir = save_tiny_model("llama", tmp_path / "base")
    out = tmp_path / "export"
    sites = ("head", "mlp")  # IA3 cannot scale both sides of one module (mlp and mlp-out)
    export(base_dir, random_plan(tiny_model("llama")), k=6, alpha=2.0, out=out, sites=sites,
           format=output_format)
    names = run_python_blocks(out / "README.md")
    loaded = names.get("merged") or names["model"]
    assert isinstance(loaded, torch.nn.Module) and "tokenizer" in names
    reference = export(base_dir, random_plan(tiny_model("llama")), k=6, alpha=2.0, sites=sites,
                       out=tmp_path / "folded").out
    folded = names["model"] if output_format == "checkpoint" else loaded
    expected = type(folded).from_pretrained(reference)
    ids = torch.tensor([[5, 17, 42, 99]])
    with torch.no_grad():  # the card's code loads the edited model, not the base
        assert torch.allclose(folded(ids).logits, expected(ids).logits, atol=1e-5)


@pytest.mark.slow
def test_the_usage_of_a_folded_gguf_card_runs_as_written(smollm2, tmp_path: Path) -> None:
    base, _ = smollm2
    out = tmp_path / "export"
    export(smollm2_gguf_path(), random_plan(base), k=6, alpha=2.0, out=out, format="gguf")
    names = run_python_blocks(out / "README.md")
    assert isinstance(names["model"], torch.nn.Module) and "tokenizer" in names
    for command in usage_blocks(out / "README.md", "bash")[0].splitlines():
        words = shlex.split(command)
        assert words[0] in ("llama-cli", "llama-server")
        assert Path(words[words.index("-m") + 1]) == out / smollm2_gguf_path().name
