"""The cost of an edit on neutral text: KL(base || steered) and the perplexity ratio.

Against a simple independent computation (whole logits from the model's own forward,
no chunking), zero for an edit that changes nothing, growing with alpha; and the tune
budget ``--max-kl``, which must never choose a configuration above it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from edit_helpers import assert_one_line_error, random_plan, run_cli
from eval_helpers import generic_splits, write_generic
from tiny_models import save_tiny_model, tiny_model, tiny_tokenizer

from aufold.errors import AufoldError
from aufold.evaluate.cost import NeutralText, edit_costs, neutral_text
from aufold.steer import steer
from aufold.tasks import default_data_dir
from aufold.tune import Config, choose

TEXT = ("The river rises in the hills north of the town and runs south through farmland. "
        "Its water was used for mills in the nineteenth century, and a canal joins it near "
        "the old bridge. ") * 6


def plain_costs(base, other, neutral: NeutralText) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """KL(base || other) and the perplexity ratio other / base from whole logits, one window at a
    time; ``base`` and ``other`` map input ids to logits."""
    kl, nll_base, nll_other, count = 0.0, 0.0, 0.0, 0
    for window in neutral.windows:
        ids = torch.tensor([window])
        with torch.no_grad():
            base_lp = torch.log_softmax(base(ids).float()[0, :-1], -1)
            other_lp = torch.log_softmax(other(ids).float()[0, :-1], -1)
        targets = ids[0, 1:, None]
        kl += float((base_lp.exp() * (base_lp - other_lp)).sum())
        nll_base -= float(base_lp.gather(-1, targets).sum())
        nll_other -= float(other_lp.gather(-1, targets).sum())
        count += len(window) - 1
    return kl / count, math.exp((nll_other - nll_base) / count)


def reference_costs(model, neutral: NeutralText, edit) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """The edit's KL and perplexity ratio from the full logits of the model's forward."""
    def steered(ids: torch.Tensor) -> torch.Tensor:
        with steer(model, edit):
            return model(input_ids=ids).logits

    return plain_costs(lambda ids: model(input_ids=ids).logits, steered, neutral)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])  # gemma2 soft-caps its logits
def test_cost_equals_a_plain_computation(arch: str) -> None:
    model, tokenizer = tiny_model(arch), tiny_tokenizer()
    neutral = neutral_text(tokenizer, file=None, data_dir=None, tokens=120, window=50) \
        if default_data_dir() is not None else None
    if neutral is None:
        pytest.skip("needs ../shared/data")
    edit = random_plan(model).select(30, 8.0)
    got = edit_costs(model, neutral, {"e": edit}, batch_size=2, progress=False)["e"]
    kl, ratio = reference_costs(model, neutral, edit)
    assert got.tokens == sum(len(w) - 1 for w in neutral.windows) == 117
    assert got.kl == pytest.approx(kl, rel=1e-4) and got.kl > 0
    assert got.perplexity_ratio == pytest.approx(ratio, rel=1e-5)
    assert got.corpus == "BoolQ test-split passages"


def test_zero_for_no_change_and_growing_with_alpha(tmp_path: Path) -> None:
    model, tokenizer = tiny_model("qwen3"), tiny_tokenizer()
    (tmp_path / "text.txt").write_text(TEXT)
    neutral = neutral_text(tokenizer, file=tmp_path / "text.txt", tokens=200, window=64)
    plan = random_plan(model, sites=("mlp",))
    edits = {alpha: plan.select(20, alpha, ["mlp"]) for alpha in (0.0, 1.0, 5.0, 20.0)}
    costs = edit_costs(model, neutral, edits, progress=False)
    assert costs[0.0].kl == 0.0 and costs[0.0].perplexity_ratio == 1.0
    kls = [costs[alpha].kl for alpha in (1.0, 5.0, 20.0)]
    assert 0 < kls[0] < kls[1] < kls[2]
    assert costs[1.0].corpus == str(tmp_path / "text.txt")


def test_choice_within_the_budget() -> None:
    from aufold.evaluate.cost import EditCost

    configs = [Config("mlp", k, alpha) for k in (2, 8) for alpha in (1.0, 10.0)]
    accuracy = dict(zip(configs, (0.5, 0.7, 0.6, 0.9)))
    costs = {c: EditCost(kl, 1.0, "t", 10) for c, kl in zip(configs, (0.01, 0.2, 0.05, 0.5))}
    assert choose(accuracy) == Config("mlp", 8, 10.0)
    assert choose(accuracy, costs=costs, max_kl=0.1) == Config("mlp", 8, 1.0)
    assert choose(accuracy, costs=costs, max_kl=0.3) == Config("mlp", 2, 10.0)
    with pytest.raises(AufoldError, match="smallest is 0.01"):
        choose(accuracy, costs=costs, max_kl=0.001)


def test_tune_and_eval_report_the_cost_and_respect_max_kl(tmp_path: Path) -> None:
    model_dir = save_tiny_model("llama", tmp_path / "model")
    data = write_generic(tmp_path / "data", generic_splits())
    (tmp_path / "text.txt").write_text(TEXT)
    common = ("--task", "generic", "--data-dir", data, "--scorer", "loglik", "--neutral",
              tmp_path / "text.txt")
    grid = ("--site", "mlp", "--k-grid", "2,16", "--alpha-grid", "1,50", "--no-plot")
    result = run_cli("tune", model_dir, *common, *grid, "--out", tmp_path / "free")
    assert result.exit_code == 0, result.output
    assert "KL(base || steered) on neutral text" in result.output
    free = json.loads((tmp_path / "free" / "tune.json").read_text())
    kls = {(c["k"], c["alpha"]): c["kl"] for c in free["tune"]["grid"]}
    assert len(kls) == 4 and all(kl >= 0 for kl in kls.values())
    budget = sorted(kls.values())[1]  # two configurations fit
    result = run_cli("tune", model_dir, *common, *grid, "--max-kl", budget, "--out",
                     tmp_path / "capped")
    assert result.exit_code == 0, result.output
    capped = json.loads((tmp_path / "capped" / "tune.json").read_text())
    best = capped["best"]
    assert best["cost"]["kl"] <= budget and capped["tune"]["max_kl"] == budget
    allowed = [c for c in capped["tune"]["grid"] if c["kl"] <= budget]
    assert best["tune_accuracy"] == max(c["accuracy"] for c in allowed)
    result = run_cli("tune", model_dir, *common, *grid, "--max-kl", min(kls.values()) / 2,
                     "--out", tmp_path / "none")
    assert_one_line_error(result, "--max-kl")
    assert not (tmp_path / "none").exists()

    report = tmp_path / "eval.json"
    result = run_cli("eval", model_dir, *common, "--tuned", tmp_path / "free" / "tune.json",
                     "--report", report)
    assert result.exit_code == 0, result.output
    cost = json.loads(report.read_text())["cost"]
    chosen = free["best"]
    assert cost["kl"] == pytest.approx(kls[chosen["k"], chosen["alpha"]], rel=1e-6)
    assert "nats/token" in result.output


def test_a_missing_neutral_file_is_refused_before_the_model_loads(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import aufold.layerwise as layerwise

    model_dir = save_tiny_model("llama", tmp_path / "model")
    data = write_generic(tmp_path / "data", generic_splits())
    random_plan(tiny_model("llama")).save(tmp_path / "plan")
    loads: list[object] = []
    monkeypatch.setattr(layerwise, "streaming_choice", lambda *a, **k: loads.append(1))
    result = run_cli("eval", model_dir, "--task", "generic", "--data-dir", data, "--plan",
                     tmp_path / "plan", "--k", 4, "--alpha", 2, "--neutral", tmp_path / "absent.txt")
    assert_one_line_error(result, "absent.txt", "--neutral")
    result = run_cli("tune", model_dir, "--task", "generic", "--data-dir", data, "--site", "mlp",
                     "--neutral", tmp_path / "absent.txt", "--out", tmp_path / "tuned")
    assert_one_line_error(result, "absent.txt")
    assert not loads and not (tmp_path / "tuned").exists()


@pytest.mark.parametrize("output_format", ["checkpoint", "lora", "ia3"])
def test_every_export_card_states_the_measured_cost(output_format: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny_model("llama", tmp_path / "model")
    random_plan(tiny_model("llama")).save(tmp_path / "plan")
    neutral_file = tmp_path / "neutral.txt"
    neutral_file.write_text(TEXT)
    out = tmp_path / "out"
    result = run_cli("export", model_dir, "--plan", tmp_path / "plan", "--k", 12, "--alpha", 4,
                     "--site", "mlp", "--neutral", neutral_file, "--format", output_format,
                     "--out", out)
    assert result.exit_code == 0, result.output
    cost = json.loads((out / "aufold.json").read_text())["cost"]
    assert cost["measured"] and cost["corpus"] == str(neutral_file) and cost["kl"] > 0
    card = (out / "README.md").read_text()
    assert f"| KL(base \\|\\| steered) on neutral text | {cost['kl']:.4g} nats/token |" in card
    assert f"| perplexity ratio (steered / base) | {cost['perplexity_ratio']:.4f} |" in card
    assert f"| neutral corpus | {neutral_file}, {cost['tokens']} tokens |" in card
    if output_format == "checkpoint":  # the folded model itself costs what the card says
        neutral = neutral_text(tiny_tokenizer(), file=neutral_file)
        base, folded = tiny_model("llama"), AutoModelForCausalLM.from_pretrained(out)
        kl, ratio = plain_costs(lambda ids: base(input_ids=ids).logits,
                                lambda ids: folded(input_ids=ids).logits, neutral)
        assert cost["tokens"] == sum(len(w) - 1 for w in neutral.windows)
        assert cost["kl"] == pytest.approx(kl, rel=1e-4)
        assert cost["perplexity_ratio"] == pytest.approx(ratio, rel=1e-5)


def test_an_export_card_says_why_the_cost_was_not_measured(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import aufold.evaluate.cost as cost_module

    model_dir = save_tiny_model("llama", tmp_path / "model")
    random_plan(tiny_model("llama")).save(tmp_path / "plan")
    export = ["export", model_dir, "--plan", tmp_path / "plan", "--k", 4, "--alpha", 2]

    def reason(out: Path) -> str:
        cost = json.loads((out / "aufold.json").read_text())["cost"]
        assert not cost["measured"]
        assert f"| cost on neutral text | not measured: {cost['reason']} |" in (out / "README.md").read_text()
        return str(cost["reason"])

    assert run_cli(*export, "--no-cost", "--out", tmp_path / "skipped").exit_code == 0
    assert reason(tmp_path / "skipped") == "skipped with --no-cost"
    monkeypatch.undo()
    monkeypatch.setattr(cost_module, "_boolq_file", lambda data_dir: (_ for _ in ()).throw(
        AufoldError("no BoolQ here")))  # as on a machine without ../shared/data
    assert run_cli(*export, "--out", tmp_path / "no-corpus").exit_code == 0
    assert "--neutral FILE" in reason(tmp_path / "no-corpus")
    result = run_cli(*export, "--neutral", tmp_path / "absent.txt", "--out", tmp_path / "bad")
    assert_one_line_error(result, "absent.txt", "--neutral")
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00text")
    for name, words in (("empty.txt", "is empty"), ("binary.txt", "UTF-8")):
        result = run_cli(*export, "--neutral", tmp_path / name, "--out", tmp_path / "bad")
        assert_one_line_error(result, name, words)
        assert "measuring" not in result.output  # refused before the model loads
    assert not (tmp_path / "bad").exists()


def test_a_model_larger_than_memory_gets_its_cost_one_layer_at_a_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under layer streaming the KL and perplexity ratio are the in-memory ones, in eval,
    tune and the card of an export whose weights do not fit in memory."""
    import aufold.layerwise as layerwise
    from aufold.layerwise import open_layerwise

    from aufold.edit import Edit
    from aufold.vectors.caa import VectorEdit, caa_vectors
    from test_caa import PAIRS

    model_dir = save_tiny_model("gemma2", tmp_path / "model")  # soft-capped logits, sliding layers
    neutral = neutral_text(tiny_tokenizer(), file=None, tokens=300, window=100) \
        if default_data_dir() is not None else None
    if neutral is None:
        pytest.skip("needs ../shared/data")
    model = tiny_model("gemma2")
    plan = random_plan(model)
    edits: dict[str, Edit | VectorEdit] = {
        "late": plan.select(12, 6.0, ["mlp"]), "all": plan.select(40, 3.0),
        "caa": VectorEdit(caa_vectors(model, tiny_tokenizer(), PAIRS, [1], progress=False), 2.0)}
    whole = edit_costs(model, neutral, edits, batch_size=2, progress=False)
    lm, _ = open_layerwise(model_dir)
    streamed = edit_costs(lm, neutral, edits, batch_size=2, progress=False)
    for key in edits:
        assert streamed[key].tokens == whole[key].tokens
        assert streamed[key].kl == pytest.approx(whole[key].kl, rel=1e-5, abs=1e-9)
        assert streamed[key].perplexity_ratio == pytest.approx(whole[key].perplexity_ratio, rel=1e-6)

    plan.save(tmp_path / "plan")
    export = ["export", model_dir, "--plan", tmp_path / "plan", "--k", 12, "--alpha", 6, "--site", "mlp"]
    assert run_cli(*export, "--out", tmp_path / "whole").exit_code == 0
    monkeypatch.setattr(layerwise, "available_memory", lambda: 10**6)  # the weights do not fit
    result = run_cli(*export, "--out", tmp_path / "big")
    assert result.exit_code == 0, result.output
    in_memory, by_layer = (json.loads((tmp_path / name / "aufold.json").read_text())["cost"]
                           for name in ("whole", "big"))
    assert by_layer["measured"] and by_layer["kl"] == pytest.approx(in_memory["kl"], rel=1e-5)


def test_the_tune_heatmap_shows_kl_beside_accuracy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import aufold.tune as tune_module
    from aufold.plotting import matplotlib_available

    if not matplotlib_available():
        pytest.skip("needs matplotlib")
    drawn: list[dict[str, object]] = []
    original = tune_module.plot_heatmap

    def spy(*args: object, **kwargs: object) -> Path:
        drawn.append(kwargs)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tune_module, "plot_heatmap", spy)
    model_dir = save_tiny_model("llama", tmp_path / "model")
    data = write_generic(tmp_path / "data", generic_splits())
    (tmp_path / "text.txt").write_text(TEXT)
    result = run_cli("tune", model_dir, "--task", "generic", "--data-dir", data, "--scorer",
                     "loglik", "--neutral", tmp_path / "text.txt", "--site", "mlp", "--k-grid",
                     "2,16", "--alpha-grid", "1,50", "--out", tmp_path / "tuned")
    assert result.exit_code == 0, result.output
    grid = json.loads((tmp_path / "tuned" / "tune.json").read_text())["tune"]["grid"]
    kl = {(c["alpha"], c["k"]): c["kl"] for c in grid}
    assert drawn[0]["kl"] == [[kl[1, 2], kl[1, 16]], [kl[50, 2], kl[50, 16]]]
    assert (tmp_path / "tuned" / "heatmap-mlp.png").stat().st_size > 0


def test_a_streamed_sweep_checks_room_for_its_cost_before_it_starts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import aufold.layerwise.cost as layerwise_cost
    import aufold.layerwise.hidden as hidden
    import aufold.tune as tune_module
    from aufold.layerwise import open_layerwise
    from aufold.layerwise.hidden import HiddenStatesDoNotFit

    model_dir = save_tiny_model("llama", tmp_path / "model")
    lm, tokenizer = open_layerwise(model_dir)
    (tmp_path / "text.txt").write_text(TEXT)
    neutral = neutral_text(tokenizer, file=tmp_path / "text.txt")
    layerwise_cost.check_cost_room(lm, neutral, 3)  # fits
    monkeypatch.setattr(hidden, "available_memory", lambda: 10**5)
    with pytest.raises(HiddenStatesDoNotFit, match="--work-dir"):
        layerwise_cost.check_cost_room(lm, neutral, 3)
    swept: list[object] = []
    monkeypatch.setattr(tune_module, "evaluate_edits", lambda *a, **k: swept.append(1))
    plan = random_plan(tiny_model("llama"))
    with pytest.raises(HiddenStatesDoNotFit):
        tune_module.sweep(lm, tokenizer, plan, generic_splits()["tune"], sites=["mlp"], ks=[2],
                          alphas=[1.0], scorer="loglik", progress=False, neutral=neutral)
    assert not swept  # refused before the accuracy sweep ran
