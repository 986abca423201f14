"""AUSteer against its baselines at matched KL: the block baseline, the comparison and its command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from edit_helpers import assert_one_line_error, random_plan, run_cli
from eval_helpers import generic_splits, write_generic
from test_cost import TEXT
from test_tune import tiny_items
from tiny_models import save_tiny_model, tiny_model, tiny_tokenizer

from aufold.ablations import block_units, densest_layer
from aufold.errors import AufoldError
from aufold.evaluate import evaluate_items
from aufold.evaluate.compare import METHODS, compare_methods
from aufold.evaluate.cost import edit_costs, neutral_text
from aufold.modeling import site_width
from aufold.tasks.contrast import choice_pairs


def test_block_units_steer_every_unit_of_one_layer_with_its_own_gamma() -> None:
    model = tiny_model("llama")
    plan = random_plan(model, sites=("mlp",))
    edit = block_units(plan, "mlp", 1, 3.0)
    assert len(edit) == site_width(model, "mlp")
    assert {u.layer for u in edit.units} == {1}
    for unit in edit.units:
        assert unit.gamma == plan.unit("mlp", 1, unit.unit).gamma(3.0)
    layers = [u.layer for u in plan.ranking(["mlp"], 40)]
    assert densest_layer(plan, "mlp", 40) == max(set(layers), key=lambda l: (layers.count(l), -l))
    with pytest.raises(AufoldError, match="no layer 7"):
        block_units(plan, "mlp", 7, 1.0)


def test_comparison_is_each_method_scored_and_costed_alike(tmp_path: Path) -> None:
    model, tokenizer = tiny_model("qwen2"), tiny_tokenizer()
    (tmp_path / "text.txt").write_text(TEXT)
    neutral = neutral_text(tokenizer, file=tmp_path / "text.txt", tokens=150, window=64)
    plan = random_plan(model, sites=("head",))
    result = compare_methods(model, tokenizer, plan, tiny_items(), neutral, site="head",
                             ks=(2, 16), alphas=(1.0, 20.0), block_alphas=(0.5, 5.0),
                             budgets=(0.01, 1.0, 100.0), scorer="loglik", progress=False,
                             pairs=choice_pairs(generic_splits()["pairs"]), caa_multipliers=(2.0,))
    assert len(result.points) == 3 * 4 + 2 + 1
    assert {p.method for p in result.points} == set(METHODS)
    block = [p for p in result.points if p.method == "block"]
    assert all(p.units == site_width(model, "head") for p in block)
    # A point is what evaluating and costing that one edit alone gives.
    austeer = next(p for p in result.points if p.method == "austeer" and p.setting == "k=16 a=20")
    edit = plan.select(16, 20.0, ["head"])
    alone = evaluate_items(model, tokenizer, tiny_items(), scorer="loglik", edit=edit, progress=False)
    assert austeer.accuracy == alone.accuracy
    assert austeer.kl == pytest.approx(edit_costs(model, neutral, {0: edit}, progress=False)[0].kl,
                                       rel=1e-6)
    for budget in result.budgets:
        for method in METHODS:
            best = result.best_within(method, budget)
            within = [p for p in result.points if p.method == method and p.kl <= budget]
            assert (best is None) == (not within)
            if best is not None:
                assert best.kl <= budget and best.accuracy == max(p.accuracy for p in within)
    assert "KL <= 100" in result.table()


def test_compare_command(tmp_path: Path) -> None:
    model_dir = save_tiny_model("llama", tmp_path / "model")
    data = write_generic(tmp_path / "data", generic_splits())
    (tmp_path / "text.txt").write_text(TEXT)
    random_plan(tiny_model("llama"), sites=("mlp",)).save(tmp_path / "plan")
    common = ("compare", model_dir, "--task", "generic", "--data-dir", data, "--plan",
              tmp_path / "plan", "--neutral", tmp_path / "text.txt", "--scorer", "loglik")
    result = run_cli(*common, "--site", "mlp", "--k-grid", "2,8", "--alpha-grid", "5",
                     "--block-alpha-grid", "1", "--budgets", "0.1,10", "--no-plot", "--no-caa",
                     "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "best accuracy within each KL budget" in result.output
    record = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert record["format"] == "aufold-compare" and len(record["points"]) == 3 * 2 + 1
    assert set(record["best_within"]["10.0"]) == set(METHODS) - {"caa"}  # --no-caa
    result = run_cli(*common, "--site", "head", "--out", tmp_path / "wrong")
    assert_one_line_error(result, "no site 'head'")
    assert not (tmp_path / "wrong").exists()


def test_block_scale_factors_have_the_safety_limit() -> None:
    plan = random_plan(tiny_model("llama"), sites=("mlp",))
    with pytest.raises(AufoldError, match="lower the block alphas"):
        block_units(plan, "mlp", 0, 5000.0)
    assert len(block_units(plan, "mlp", 0, 5000.0, allow_extreme=True)) == 128


def test_tradeoff_plot(tmp_path: Path) -> None:
    from aufold.plotting import matplotlib_available, plot_tradeoff

    if not matplotlib_available():
        pytest.skip("matplotlib is not installed")
    path = plot_tradeoff({"austeer": [(0.01, 0.5), (0.0, 0.4)], "block": [(1.0, 0.3)]},
                         tmp_path / "tradeoff.png", title="t", base=0.45, budgets=(0.1,))
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_the_comparison_report_merges_runs_of_one_setup(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "compare_baselines", Path(__file__).parent.parent / "examples" / "compare_baselines.py")
    assert spec is not None and spec.loader is not None
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)

    def run(points: list[tuple[str, str, int, float, float]], **extra: object) -> dict[str, object]:
        return {"model": "m", "task": "copa", "split": "tune", "scorer": "first-token",
                "neutral": {"corpus": "c", "tokens": 10}, "unsteered": {"accuracy": 0.5, "n": 100},
                "site": "mlp", "plan": "plan", "block_layer": 3, "budgets": [0.05, 0.2], **extra,
                "points": [{"method": m, "setting": s, "units": u, "accuracy": a, "kl": k,
                            "perplexity_ratio": 1.0} for m, s, u, a, k in points]}

    first = run([("austeer", "k=8 a=5", 8, 0.55, 0.01), ("block", "L3 a=1", 64, 0.56, 0.1)])
    second = run([("austeer", "k=8 a=5", 8, 0.55, 0.01), ("caa", "L3 x2", 64, 0.53, 0.04)],
                 caa_layer=3, caa_pairs="copa pairs split, first 800")
    files = []
    for number, data in enumerate((first, second)):
        files.append(tmp_path / f"run{number}.json")
        files[-1].write_text(json.dumps(data))
    merged = report.merged(files)
    assert {(p["method"], p["setting"]) for p in merged["points"]} == {
        ("austeer", "k=8 a=5"), ("block", "L3 a=1"), ("caa", "L3 x2")}
    assert report.best_within(merged["points"], "block", 0.05) is None
    assert report.best_within(merged["points"], "block", 0.2)["accuracy"] == 0.56
    lines = report.summary(merged, ["austeer", "block", "caa"], 100)
    assert lines == ["- KL <= 0.05: AUSteer 55.0%; each baseline's best against it, in items: "
                     "block has no configuration within it, caa -2.",
                     "- KL <= 0.2: AUSteer 55.0%; each baseline's best against it, in items: "
                     "block +1, caa -2."]
    files[1].write_text(json.dumps(run([("austeer", "k=8 a=5", 8, 0.54, 0.01)])))
    with pytest.raises(SystemExit, match="differs between runs"):
        report.merged(files)
