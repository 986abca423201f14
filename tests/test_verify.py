"""`aufold verify` in low precision: the fold and the hooks are each compared with the float32
steered model, so a correct fold passes at any alpha and an unedited or wrong checkpoint
fails. The factor's margins on both sides are measured by benchmarks/verify_bench.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from edit_helpers import random_plan, run_cli
from tiny_models import save_tiny_model, tiny_model

from aufold.export import export
from aufold.modeling import load_model
from aufold.verify import LOW_PRECISION_FACTOR, judge, verify


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Per architecture: a float32 tiny model folder and a random plan for it."""
    root = tmp_path_factory.mktemp("verify")
    made = {}
    for arch in ("llama", "gemma2", "gpt2"):
        folder = save_tiny_model(arch, root / arch)
        random_plan(tiny_model(arch), num_pairs=100).save(root / f"{arch}-plan")
        made[arch] = (folder, root / f"{arch}-plan")
    return made


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("alpha", [5.0, 50.0])
@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_a_correct_low_precision_fold_passes_and_the_unedited_model_fails(
        tiny: dict[str, tuple[Path, Path]], tmp_path: Path, arch: str, alpha: float, dtype: str) -> None:
    base, plan = tiny[arch]
    folded = tmp_path / "folded"
    export(base, plan, k=24, alpha=alpha, out=folded, dtype=dtype)  # loaded, folded and saved in dtype
    report = verify(base, plan, k=24, alpha=alpha, folded=folded, dtype=dtype)
    assert report.passed, report
    assert report.dtype == dtype and report.fold_distance is not None
    assert report.fold_distance <= LOW_PRECISION_FACTOR * report.hook_distance  # type: ignore[operator]
    # The base model itself, as if the fold had been lost, is far from the steered model.
    unedited = verify(base, plan, k=24, alpha=alpha, folded=base, dtype=dtype)
    assert not unedited.passed and unedited.fold_distance > 3 * unedited.hook_distance  # type: ignore[operator]


def test_the_cli_prints_both_distances_and_fails_a_wrong_fold(tiny: dict[str, tuple[Path, Path]],
                                                              tmp_path: Path) -> None:
    base, plan = tiny["llama"]
    export(base, plan, k=24, alpha=8.0, out=tmp_path / "folded", dtype="bfloat16")
    args = ["verify", base, "--plan", plan, "--k", 24, "--folded", tmp_path / "folded", "--dtype", "bfloat16"]
    result = run_cli(*args, "--alpha", 8)
    assert result.exit_code == 0, result.output
    assert "RMS distance to the float32 steered model: fold" in result.output and "PASS" in result.output
    result = run_cli(*args, "--alpha", -8)
    assert result.exit_code == 1 and "FAIL" in result.output


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_smollm2_low_precision_folds_pass_at_large_alphas(smollm2_dir: Path, smollm2, tmp_path: Path,
                                                          dtype: str) -> None:
    """The issue's false FAIL: a correct bf16 fold at a large alpha must pass."""
    model, _ = smollm2
    random_plan(model, num_pairs=100, sites=("head", "mlp")).save(tmp_path / "plan")
    for alpha in (10.0, 50.0):
        folded = tmp_path / f"folded-{alpha:g}"
        export(smollm2_dir, tmp_path / "plan", k=50, alpha=alpha, out=folded, dtype=dtype)
        report = verify(smollm2_dir, tmp_path / "plan", k=50, alpha=alpha, folded=folded, dtype=dtype)
        assert report.passed, report


def test_judge_in_float32_keeps_the_relative_rule() -> None:
    hooked = torch.randn(6, 10)
    assert judge(hooked, hooked + 1e-7, None, torch.float32).passed
    assert not judge(hooked, hooked + 1e-3, None, torch.float32).passed


def test_verify_runs_each_prompt_alone(tiny: dict[str, tuple[Path, Path]]) -> None:
    """Unpadded prompts: the logits of a prompt do not depend on the other prompts."""
    from aufold.verify import encode_prompts, prompt_logits

    base, _ = tiny["llama"]
    model, tokenizer, _ = load_model(base, dtype="bfloat16")
    prompts = ["a b c", "a much longer prompt than the first one, padded in a batch"]
    together = prompt_logits(model, encode_prompts(tokenizer, prompts))
    alone = prompt_logits(model, encode_prompts(tokenizer, prompts[:1]))
    assert torch.equal(together[:alone.shape[0]], alone)
