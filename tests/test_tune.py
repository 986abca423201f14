"""Tuning: the choice rule, prefix resume against from-scratch runs, the tune command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from eval_helpers import generic_splits, write_generic
from tiny_models import ARCHITECTURES, save_tiny_model, tiny_model, tiny_tokenizer

import cli
from aufold import tune as tune_module
from aufold.demo import arithmetic_items
from aufold.errors import AufoldError
from aufold.evaluate import evaluate_items
from aufold.evaluate.resume import capture_layer_inputs, resume_at, resume_points
from aufold.localize import localize
from aufold.modeling import fingerprint, num_layers, site_width
from aufold.plan import Plan, SiteCounts
from aufold.plotting import matplotlib_available
from aufold.safety.outputs import MARKER
from aufold.tasks import Item
from aufold.tasks.contrast import choice_pairs
from aufold.tune import Config, choose, grid_configs, parse_grid, sweep
from aufold.tuned import read_tuned

ALL_SITES = ["head", "mlp", "mlp-out", "residual"]


def tiny_items() -> list[Item]:
    """Three choices, one or more tokens each, prompts of different lengths (padding)."""
    return [Item(f"The answer to {a} plus {a % 7} is", (f" {a + a % 7}", f" {a + 1}", " no"),
                 f" {a + a % 7}", None, f"sum-{a}") for a in range(10, 22)]


def layered_plan(model: Any, sites: list[str] = ALL_SITES) -> Plan:
    """A plan whose later layers rank higher, so small k starts late and large k early.

    With N=20 pairs, layer l's units score 10 + 3l or 11 + 3l, and every other unit
    suppresses. For head (64 units a layer): k=1 starts at layer 2, k=70 at 1, k=140 at 0.
    """
    layers, generator = num_layers(model), torch.Generator().manual_seed(0)
    counts = {}
    for site in sites:
        width = site_width(model, site)
        winner = 10 + 3 * torch.arange(layers)[:, None] + torch.randint(0, 2, (layers, width), generator=generator)
        loser = 20 - winner
        odd = torch.arange(width) % 2 == 1
        counts[site] = SiteCounts(torch.where(odd, loser, winner), torch.where(odd, winner, loser))
    return Plan(model="tiny", fingerprint=fingerprint(model), num_pairs=20, counts=counts)


# --- the choice rule and the grid --------------------------------------------------

def test_choice_rule_prefers_accuracy_then_small_k_then_small_alpha_then_site_order() -> None:
    accuracy = {Config("mlp", 4, 5.0): 0.7, Config("head", 8, 1.0): 0.7, Config("head", 4, 10.0): 0.7,
                Config("head", 2, 100.0): 0.6}
    assert choose(accuracy) == Config("mlp", 4, 5.0)
    accuracy[Config("head", 4, 5.0)] = 0.7
    assert choose(accuracy) == Config("head", 4, 5.0)
    accuracy[Config("head", 64, 50.0)] = 0.71
    assert choose(accuracy) == Config("head", 64, 50.0)


def test_grid_order_and_parsing() -> None:
    configs = grid_configs(["mlp", "head"], [8, 2], [5.0, 1.0])
    assert configs[0] == Config("head", 2, 1.0) and configs[-1] == Config("mlp", 8, 5.0)
    assert len(configs) == 8
    assert parse_grid("2, 4,8", int, "--k-grid") == (2, 4, 8)
    with pytest.raises(AufoldError, match="--k-grid must be comma-separated numbers"):
        parse_grid("2,four", int, "--k-grid")
    with pytest.raises(AufoldError, match="finite"):
        parse_grid("1,inf", float, "--alpha-grid")


def test_k_larger_than_a_site_is_refused_before_sweeping() -> None:
    model = tiny_model("llama")
    plan = layered_plan(model, ["head"])
    with pytest.raises(AufoldError, match="k=1000 is larger than the 192 units of site head"):
        sweep(model, tiny_tokenizer(), plan, tiny_items(), sites=["head"], ks=[2, 1000], alphas=[1.0])


# --- prefix resume -----------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_resumed_sweep_equals_from_scratch_on_every_architecture(arch: str) -> None:
    model, tokenizer = tiny_model(arch), tiny_tokenizer()
    plan = layered_plan(model)
    items = tiny_items()
    # Three k start at three layers; two alphas share each start (a reused tensor).
    options: dict[str, Any] = dict(sites=["head", "residual"], ks=[1, 70, 140], alphas=[0.5, 8.0],
                                   scorer="first-token", batch_size=5, progress=False)
    resumed = sweep(model, tokenizer, plan, items, resume=True, **options)
    scratch = sweep(model, tokenizer, plan, items, resume=False, **options)
    assert resumed.resumed and not scratch.resumed
    assert resumed.base.items == scratch.base.items
    for config, result in scratch.cells.items():
        assert resumed.cells[config].items == result.items, config  # predictions and token ids
        assert resumed.start_layers[config] == min(u.layer for u in plan.select(
            config.k, config.alpha, [config.site]).units)
    assert set(resumed.start_layers.values()) == {0, 1, 2}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_resumed_loglik_sweep_equals_from_scratch_bitwise(arch: str) -> None:
    model, tokenizer = tiny_model(arch), tiny_tokenizer()
    plan = layered_plan(model)
    options: dict[str, Any] = dict(sites=["mlp", "mlp-out"], ks=[3, 140], alphas=[2.0, 20.0],
                                   scorer="loglik", batch_size=8, progress=False)
    resumed = sweep(model, tokenizer, plan, tiny_items(), resume=True, **options)
    scratch = sweep(model, tokenizer, plan, tiny_items(), resume=False, **options)
    for config, result in scratch.cells.items():
        assert resumed.cells[config].items == result.items  # scores compared exactly


def test_resume_points_cap_the_held_tensors() -> None:
    assert resume_points([5, 0, 9, 5], limit=8) == {0: 0, 5: 5, 9: 9}
    points = resume_points(range(30), limit=4)
    assert sorted(set(points.values())) == [0, 7, 15, 22]
    assert all(0 <= start - layer < 8 for start, layer in points.items())


def test_a_capped_sweep_resumes_earlier_and_stays_exact() -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    plan = layered_plan(model, ["head"])
    options: dict[str, Any] = dict(sites=["head"], ks=[1, 70, 140], alphas=[4.0], scorer="first-token",
                                   batch_size=5, progress=False)
    capped = sweep(model, tokenizer, plan, tiny_items(), max_resume_points=2, **options)
    scratch = sweep(model, tokenizer, plan, tiny_items(), resume=False, **options)
    assert sorted(capped.resumed_from.values()) == [0, 1, 1] and sorted(capped.start_layers.values()) == [0, 1, 2]
    for config, result in scratch.cells.items():
        assert capped.cells[config].items == result.items


def test_resume_restores_the_layers() -> None:
    model = tiny_model("llama")
    layers = model.model.layers
    inputs = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        expected = model(inputs).logits
        with capture_layer_inputs(model, [2]) as captured:
            model(inputs)
        with resume_at(model, 2, captured[2]):
            assert all("forward" in layers[i].__dict__ for i in (0, 1))
            resumed = model(inputs).logits
        assert not any("forward" in layer.__dict__ for layer in layers)
        assert torch.equal(resumed, expected) and torch.equal(model(inputs).logits, expected)


@pytest.mark.slow
def test_resumed_sweep_equals_from_scratch_on_smollm2(smollm2: Any) -> None:
    model, tokenizer = smollm2
    plan = localize(model, tokenizer, choice_pairs(arithmetic_items("pairs")[:32]), ["head"], progress=False)
    items = arithmetic_items("tune")[:16]
    options: dict[str, Any] = dict(sites=["head"], ks=[2, 16], alphas=[5.0, 50.0], scorer="loglik",
                                   batch_size=16, progress=False)
    resumed = sweep(model, tokenizer, plan, items, resume=True, **options)
    scratch = sweep(model, tokenizer, plan, items, resume=False, **options)
    assert resumed.base.items == scratch.base.items
    for config, result in scratch.cells.items():
        assert resumed.cells[config].items == result.items, config
    # The hook-mode evaluation of a single configuration agrees with its cell.
    best = resumed.best()
    single = evaluate_items(model, tokenizer, items, scorer="loglik", batch_size=16, progress=False,
                            edit=plan.select(best.k, best.alpha, ["head"]))
    assert single.items == resumed.cells[best].items


# --- the tune command --------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tune")
    save_tiny_model("llama", root / "model")
    write_generic(root / "data", generic_splits())
    return root


def run(args: list[str]) -> Any:
    return CliRunner().invoke(cli.main, args)


def test_tune_then_export_the_choice(workspace: Path) -> None:
    out = workspace / "tuned"
    result = run(["tune", str(workspace / "model"), "--task", "generic", "--data-dir", str(workspace / "data"),
                  "--site", "head", "--site", "mlp", "--k-grid", "2,8", "--alpha-grid", "5,50",
                  "--scorer", "loglik", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "tune.json").read_text())
    assert record["format"] == "aufold-tune" and record["plan"] == "plan"
    assert len(record["tune"]["grid"]) == 8 and record["tune"]["n"] == 10
    assert record["tune"]["prefix_resume"] is True
    grid = {(c["site"], c["k"], c["alpha"]): c["accuracy"] for c in record["tune"]["grid"]}
    best = record["best"]
    assert grid[best["site"], best["k"], best["alpha"]] == max(grid.values())
    assert record["test"]["n"] == 10
    steered = json.loads((out / "test-steered.json").read_text())
    assert steered["accuracy"] == record["test"]["steered"]["accuracy"] and len(steered["items"]) == 10
    assert "site head: tune accuracy" in result.stdout and "alpha\\k" in result.stdout
    assert Plan.load(out / "plan").sites == ("head", "mlp")
    if matplotlib_available():
        assert sorted(record["heatmaps"]) == ["heatmap-head.png", "heatmap-mlp.png"]
        assert (out / "heatmap-head.png").read_bytes()[:4] == b"\x89PNG"
    else:
        assert record["heatmaps"] == [] and "matplotlib is not installed" in result.stderr

    selection = read_tuned(out / "tune.json")
    assert (selection.k, selection.alpha, selection.sites) == (best["k"], best["alpha"], (best["site"],))
    exported = workspace / "exported"
    result = run(["export", str(workspace / "model"), "--tuned", str(out / "tune.json"), "--out", str(exported)])
    assert result.exit_code == 0, result.output
    provenance = json.loads((exported / "aufold.json").read_text())
    assert len(provenance["units"]) == best["k"]

    # The folded checkpoint scores the test split as the hooks did during tuning.
    report = workspace / "folded.json"
    result = run(["eval", str(exported), "--task", "generic", "--data-dir", str(workspace / "data"),
                  "--scorer", "loglik", "--report", str(report)])
    assert result.exit_code == 0, result.output
    folded = json.loads(report.read_text())
    assert [i["prediction"] for i in folded["items"]] == [i["prediction"] for i in steered["items"]]


def test_tune_without_matplotlib_still_writes_everything(workspace: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tune_module, "matplotlib_available", lambda: False)
    out = workspace / "no-plot"
    result = run(["tune", str(workspace / "model"), "--task", "generic", "--data-dir", str(workspace / "data"),
                  "--site", "mlp", "--k-grid", "2", "--alpha-grid", "5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "no heatmap: matplotlib is not installed" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "plan", "test-base.json", "test-steered.json",
                                                     "tune.json"]


def test_localize_on_a_task(workspace: Path) -> None:
    out = workspace / "task-plan"
    result = run(["localize", str(workspace / "model"), "--task", "generic", "--data-dir",
                  str(workspace / "data"), "--site", "mlp", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert Plan.load(out).num_pairs == 12


def fails(args: list[str], message: str) -> None:
    result = run(args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("aufold: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr


def test_tune_and_localize_bad_input(workspace: Path, tmp_path: Path) -> None:
    model, data = str(workspace / "model"), str(workspace / "data")
    tune = ["tune", model, "--task", "generic", "--data-dir", data, "--out", str(tmp_path / "out")]
    fails([*tune, "--site", "head", "--tune-size", "11"],
          "the tune split of generic has 10 items, fewer than --tune-size 11; choose --tune-size <= 10")
    fails([*tune, "--site", "head", "--k-grid", "2,500"], "k=500 is larger than the 192 units of site head")
    fails([*tune, "--k-grid", "2"], "no site to tune")
    fails([*tune, "--site", "head", "--alpha-grid", "1,x"], "--alpha-grid must be comma-separated")
    fails(["tune", model, "--task", "nope", "--site", "head", "--out", str(tmp_path / "o")], "'nope' is not one of")
    fails(["localize", model, "--site", "mlp", "--out", str(tmp_path / "p")], "give either --pairs FILE or --task")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(["localize", model, "--task", "generic", "--data-dir", str(empty), "--site", "mlp",
           "--out", str(tmp_path / "p")], f"data file pairs.jsonl not found (looked for {empty / 'pairs.jsonl'})")
    fails(["export", model, "--out", str(tmp_path / "e")], "no edit given; pass --plan")
    (tmp_path / "fake.json").write_text('{"format": "something else"}')
    fails(["export", model, "--tuned", str(tmp_path / "fake.json"), "--out", str(tmp_path / "e")],
          "is not a tune result of aufold")
    assert not (tmp_path / "out").exists() and not (tmp_path / "e").exists()


def test_math_sweeps_run_each_configuration_from_scratch() -> None:
    from aufold.tasks import default_data_dir, load_split

    if default_data_dir() is None:
        pytest.skip("benchmark data not found at ../shared/data")
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    plan = layered_plan(model, ["head"])
    items = load_split("svamp", "tune", None, size=3)
    result = sweep(model, tokenizer, plan, items, sites=["head"], ks=[1, 70], alphas=[5.0], kind="math",
                   max_new_tokens=3, progress=False)
    assert not result.resumed and result.base.scorer == "math"
    for config, cell in result.cells.items():
        single = evaluate_items(model, tokenizer, items, kind="math", max_new_tokens=3, progress=False,
                                edit=plan.select(config.k, config.alpha, ["head"]))
        assert cell.items == single.items
