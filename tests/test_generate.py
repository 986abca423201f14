"""`aufold generate`: unsteered and steered completions side by side, in hook mode."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner
from tiny_models import save_tiny_model, tiny_model, tiny_tokenizer

import cli
from aufold.generate import compare_completions
from aufold.localize import localize
from aufold.pairs import ContrastivePair

PAIRS = [ContrastivePair(f"the cat {w} is", " yes", " no") for w in ("sat", "ran", "dog", "mat", "far")]


def test_generate_prints_both_completions(tmp_path: Path) -> None:
    base = save_tiny_model("llama", tmp_path / "base")
    localize(tiny_model("llama"), tiny_tokenizer(), PAIRS, ["mlp", "residual"], progress=False).save(tmp_path / "plan")
    result = CliRunner().invoke(cli.main, ["generate", str(base), "--plan", str(tmp_path / "plan"), "--k", "20",
                                           "--alpha", "30", "--prompt", "the cat", "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert "--- unsteered ---" in result.stdout and "--- steered (k=20, alpha=30) ---" in result.stdout

    plain, steered = compare_completions(base, tmp_path / "plan", k=20, alpha=30.0, prompt="the cat",
                                         max_new_tokens=8)
    assert plain != steered  # strong steering of a random model changes its greedy path
    plain_again, unchanged = compare_completions(base, tmp_path / "plan", k=20, alpha=0.0, prompt="the cat",
                                                 max_new_tokens=8)
    assert plain_again == unchanged == plain  # alpha 0 is no steering, and hooks leave nothing behind
