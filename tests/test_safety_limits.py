"""Never write a broken model: absurd scale factors need --allow-extreme, every written tensor
is finite in its stored dtype, and a plan's counts are checked before they become gammas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from edit_helpers import assert_one_line_error, random_plan, run_cli, tree_digest
from safetensors.torch import load_file, save_file
from tiny_models import save_tiny_model, tiny_model

from aufold.errors import AufoldError
from aufold.fold import fold_model
from aufold.plan import Plan
from aufold.safety.limits import MAX_SCALE


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("limits")
    save_tiny_model("llama", root / "model")
    save_tiny_model("llama", root / "model-bf16", dtype=torch.bfloat16)
    model = tiny_model("llama")
    random_plan(model, num_pairs=10).save(root / "plan")
    (root / "v.json").write_text(json.dumps({"0": [1.0] * model.config.hidden_size}))
    return root


def _export(world: Path, model: str, alpha: str, *extra: str) -> list[str]:
    return ["export", str(world / model), "--plan", str(world / "plan"), "--k", "8", "--alpha",
            alpha, "--site", "head", "--out", str(world / "out"), *extra]


@pytest.mark.parametrize("fmt", ["checkpoint", "lora", "ia3"])
@pytest.mark.parametrize("alpha", ["1e300", "1e30", "-5000", "2000"])
def test_an_absurd_scale_needs_allow_extreme(world: Path, fmt: str, alpha: str) -> None:
    before = tree_digest(world)
    assert_one_line_error(run_cli(*_export(world, "model", alpha, "--format", fmt)),
                          "scale factor", "--allow-extreme")
    assert tree_digest(world) == before


@pytest.mark.parametrize(("model", "fmt"), [("model", "checkpoint"), ("model", "ia3"),
                                            ("model-bf16", "checkpoint"), ("model", "lora")])
def test_a_fold_that_overflows_its_dtype_is_never_written(world: Path, model: str, fmt: str) -> None:
    before = tree_digest(world)
    result = run_cli(*_export(world, model, "1e300", "--format", fmt, "--allow-extreme"))
    assert_one_line_error(result, "non-finite", "nothing was written")
    assert "--allow-extreme was given" in result.output  # warned first
    assert tree_digest(world) == before


def test_allow_extreme_writes_a_large_but_finite_fold_with_a_warning(world: Path, tmp_path: Path) -> None:
    args = _export(world, "model", "5000", "--allow-extreme")
    args[args.index("--out") + 1] = str(tmp_path / "out")
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert "warning" in result.output and "beyond 1000" in result.output


def test_the_hook_mode_commands_refuse_the_same_alphas(world: Path) -> None:
    select = ["--plan", str(world / "plan"), "--k", "8", "--alpha", "1e30"]
    assert_one_line_error(run_cli("verify", world / "model", *select, "--folded", world / "model"),
                          "--allow-extreme")
    assert_one_line_error(run_cli("generate", world / "model", *select, "--prompt", "hi"),
                          "--allow-extreme")
    assert_one_line_error(run_cli("eval", world / "model", "--task", "copa", *select), "--allow-extreme")
    assert_one_line_error(run_cli("tune", world / "model", "--task", "copa", "--plan", world / "plan",
                                  "--alpha-grid", "1,1e30", "--out", world / "t"), "--alpha-grid")


@pytest.mark.parametrize(("scale", "extra", "words"), [
    ("1e30", [], ("vector multiplier", "--allow-extreme")),
    ("1e300", ["--allow-extreme"], ("non-finite",)),
])
def test_fold_vector_refuses_absurd_or_overflowing_scales(world: Path, scale: str, extra: list[str],
                                                          words: tuple[str, ...]) -> None:
    before = tree_digest(world)
    assert_one_line_error(run_cli("fold-vector", world / "model", "--vector", world / "v.json",
                                  "--scale", scale, "--out", world / "out", *extra), *words)
    assert tree_digest(world) == before


def test_the_in_memory_fold_refuses_overflow_before_changing_the_model() -> None:
    model = tiny_model("llama")
    plan = random_plan(model, num_pairs=10)
    before = {name: p.clone() for name, p in model.named_parameters()}
    with pytest.raises(AufoldError, match="non-finite"):
        fold_model(model, plan.select(8, 1e300, ["mlp"], allow_extreme=True))
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
    assert MAX_SCALE == 1e3


def _edit_plan(source: Path, target: Path, *, meta: dict | None = None,
               counts: dict[str, torch.Tensor] | None = None) -> Path:
    target.mkdir()
    summary = json.loads((source / "plan.json").read_text())
    summary.update(meta or {})
    (target / "plan.json").write_text(json.dumps(summary))
    tensors = load_file(source / "counts.safetensors")
    tensors.update(counts or {})
    save_file(tensors, target / "counts.safetensors")
    return target


def test_hand_edited_counts_are_refused_in_one_line(world: Path, tmp_path: Path) -> None:
    """The issue's cases: num_pairs -4 flips every gamma, a count above num_pairs multiplies
    weights by 5e11, negative counts are accepted."""
    plan = Plan.load(world / "plan")
    positive = plan.counts["head"].positive
    cases = {
        "negative-pairs": ({"num_pairs": -4}, {}, "num_pairs must be at least 1"),
        "count-above-pairs": ({}, {"head.positive": positive * 0 + 11}, "more than the plan's num_pairs"),
        "huge-count": ({}, {"head.positive": positive * 0 + 5 * 10**11}, "more than the plan's num_pairs"),
        "negative-count": ({}, {"head.negative": positive * 0 - 1}, "negative count"),
    }
    for name, (meta, counts, message) in cases.items():
        edited = _edit_plan(world / "plan", tmp_path / name, meta=meta, counts=counts)
        with pytest.raises(AufoldError, match=message):
            Plan.load(edited)
        args = ["export", world / "model", "--plan", edited, "--k", "8", "--alpha", "2",
                "--out", tmp_path / "out"]
        assert_one_line_error(run_cli(*args), "is damaged", message)
        assert not (tmp_path / "out").exists()
