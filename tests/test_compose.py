"""Composed edits: several edits in one model, applied one after another.

A composed edit folded once equals its parts folded one after the other, bitwise, on
every architecture and in bfloat16 as well; it equals the parts' hooks stacked in
order, bitwise, and the fold equals the hooks as for one edit. The streamed fold of a
recipe equals the in-memory fold; adapters (one factor per unit) match the hooks to
float32 rounding. The command line composes from repeated --plan/--k/--alpha, repeated
--tuned and recipe files alike, and every bad recipe is refused in one line.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from edit_helpers import assert_one_line_error, random_plan, run_cli
from eval_helpers import generic_splits, write_generic
from safetensors.torch import load_file
from test_fold import logits, random_edit
from tiny_models import ARCHITECTURES, save_tiny_model, tiny_model, tiny_tokenizer

from aufold.edit import Edit, SteeredUnit
from aufold.errors import AufoldError
from aufold.export import export, export_loaded
from aufold.fold import fold_model
from aufold.plan import Plan
from aufold.recipe import Component, Recipe, read_recipe, resolve_recipe
from aufold.steer import steer
from aufold.tuned import TUNE_FORMAT
from aufold.verify import verify


def overlapping_edits(model: torch.nn.Module) -> tuple[Edit, Edit]:
    """Two edits over head, mlp and mlp-out that share half of the first one's units (with
    other gammas), so shared units, rows and columns of one weight all meet."""
    first = random_edit(model, ("head", "mlp", "mlp-out"), seed=1)
    shared = [SteeredUnit(u.site, u.layer, u.unit, -0.4 * u.gamma) for u in first.units[::2]]
    taken = {(u.site, u.layer, u.unit) for u in shared}
    others = [u for u in random_edit(model, ("mlp", "mlp-out"), seed=2).units
              if (u.site, u.layer, u.unit) not in taken]
    return first, Edit.of(shared + others)


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


def test_compose_multiplies_the_factors_of_shared_units_and_keeps_the_parts() -> None:
    a = Edit.of([SteeredUnit("head", 0, 1, 0.5), SteeredUnit("mlp", 1, 2, -0.25)])
    b = Edit.of([SteeredUnit("head", 0, 1, 1.0), SteeredUnit("mlp-out", 2, 3, 2.0)])
    composed = Edit.compose([a, b])
    assert composed.steps() == (a, b) and len(composed) == 3
    gammas = {(u.site, u.layer, u.unit): u.gamma for u in composed.units}
    assert gammas == {("head", 0, 1): 1.5 * 2.0 - 1, ("mlp", 1, 2): -0.25, ("mlp-out", 2, 3): 2.0}
    assert Edit.compose([a]) is a and a.steps() == (a,)
    assert Edit.compose([composed, a]).steps() == (a, b, a)  # a composed part is flattened
    with pytest.raises(AufoldError, match="nothing to compose"):
        Edit.compose([])


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_a_composed_fold_equals_its_parts_folded_in_turn_and_the_hooks(arch: str) -> None:
    model = tiny_model(arch)
    a, b = overlapping_edits(model)
    composed = Edit.compose([a, b])
    once, in_turn = copy.deepcopy(model), copy.deepcopy(model)
    fold_model(once, composed)
    fold_model(in_turn, a)
    fold_model(in_turn, b)
    folded_once, folded_in_turn = parameters(once), parameters(in_turn)
    assert all(torch.equal(folded_once[n], folded_in_turn[n]) for n in folded_once)
    assert any(not torch.equal(p, folded_once[n]) for n, p in parameters(model).items())

    with steer(model, composed):
        hooked = logits(model)
    with steer(model, a), steer(model, b):
        stacked = logits(model)
    assert torch.equal(hooked, stacked)
    assert (hooked - logits(once)).abs().max() <= 1e-5 * hooked.abs().max()
    with steer(model, a):
        assert not torch.equal(logits(model), hooked)  # the second part does something


def test_a_composed_fold_equals_its_parts_in_turn_in_bfloat16_too() -> None:
    model = tiny_model("llama", dtype=torch.bfloat16)
    a, b = overlapping_edits(model)
    once, in_turn = copy.deepcopy(model), copy.deepcopy(model)
    fold_model(once, Edit.compose([a, b]))
    fold_model(in_turn, a)
    fold_model(in_turn, b)
    assert all(torch.equal(p, parameters(in_turn)[n]) for n, p in parameters(once).items())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama folder, two plans for it and the data of the generic task."""
    root = tmp_path_factory.mktemp("compose")
    save_tiny_model("llama", root / "model")
    model = tiny_model("llama")
    random_plan(model, seed=0).save(root / "plan-a")
    random_plan(model, seed=1).save(root / "plan-b")
    write_generic(root / "data", generic_splits())
    return root


def two_plans(world: Path) -> Recipe:
    return Recipe((Component(Plan.load(world / "plan-a"), 24, 0.8, ("head", "mlp", "mlp-out")),
                   Component(Plan.load(world / "plan-a"), 12, -0.4, ("mlp", "mlp-out")),
                   Component(Plan.load(world / "plan-b"), 16, 1.5, ("mlp-out",))))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_streamed_export_of_a_recipe_equals_the_in_memory_fold(arch: str, tmp_path: Path) -> None:
    folder = save_tiny_model(arch, tmp_path / "model")
    model = tiny_model(arch)
    plan_a, plan_b = random_plan(model, seed=0), random_plan(model, seed=1)
    recipe = Recipe((Component(plan_a, 24, 0.8, ("head", "mlp", "mlp-out")),
                     Component(plan_a, 12, -0.4, ("mlp", "mlp-out")),
                     Component(plan_b, 16, 1.5, ("mlp-out",))))
    streamed = export(folder, recipe, out=tmp_path / "streamed")
    assert streamed.streamed is not None
    loaded = tiny_model(arch)
    export_loaded(loaded, tiny_tokenizer(), recipe, out=tmp_path / "memory", base_model="tiny")
    in_turn = tiny_model(arch)
    for component in recipe.components:
        fold_model(in_turn, component.edit())
    tensors = load_file(tmp_path / "streamed" / "model.safetensors")
    memory = load_file(tmp_path / "memory" / "model.safetensors")
    expected = parameters(in_turn)
    assert tensors.keys() == memory.keys()
    assert all(torch.equal(tensors[n], memory[n]) for n in tensors)
    assert all(torch.equal(tensors[n], expected[n]) for n in tensors if n in expected)

    provenance = json.loads((tmp_path / "streamed" / "aufold.json").read_text())
    assert [c["selection"]["k"] for c in provenance["components"]] == [24, 12, 16]
    assert len(provenance["units"]) == len(streamed.edit) < 24 + 12 + 16  # shared units once
    card = (tmp_path / "streamed" / "README.md").read_text()
    assert "## Components" in card and "| 3 | test | 1000 | mlp-out | 16 | 1.5 |" in card
    assert f"{len(streamed.edit)} atomic units" in card and "product of their factors" in card


@pytest.mark.parametrize("format", ["lora", "ia3"])
def test_adapters_of_a_recipe_match_its_hooks(world: Path, format: str, tmp_path: Path) -> None:
    from peft import PeftModel

    recipe = two_plans(world)
    if format == "ia3":  # IA3 scales a module's inputs or its outputs, not both
        recipe = Recipe((Component(Plan.load(world / "plan-a"), 12, -0.4, ("mlp",)),
                         Component(Plan.load(world / "plan-b"), 8, 1.0, ("mlp",))))
    result = export(world / "model", recipe, out=tmp_path / format, format=format)
    base = tiny_model("llama")
    with steer(base, result.edit):
        hooked = logits(base)
    adapted = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / format)
    assert (logits(adapted) - hooked).abs().max() <= 1e-5 * hooked.abs().max()


def test_the_command_line_composes_from_options_tune_results_and_recipe_files(
        world: Path, tmp_path: Path) -> None:
    options = ["--plan", world / "plan-a", "--k", 24, "--alpha", 0.8,
               "--plan", world / "plan-a", "--k", 12, "--alpha", -0.4]
    assert run_cli("export", world / "model", *options, "--out", tmp_path / "options").exit_code == 0
    yaml_recipe = tmp_path / "recipe.yaml"
    yaml_recipe.write_text(f"components:\n  - plan: {world / 'plan-a'}\n    k: 24\n    alpha: 0.8\n"
                           f"  - tuned: runs/tune.json\n")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tune.json").write_text(json.dumps(
        {"format": TUNE_FORMAT, "plan": str(world / "plan-a"),
         "best": {"k": 12, "alpha": -0.4, "site": "mlp"}}))
    assert run_cli("export", world / "model", "--recipe", yaml_recipe,
                   "--out", tmp_path / "recipe").exit_code == 0
    json_recipe = tmp_path / "recipe.json"
    json_recipe.write_text(json.dumps({"components": [
        {"plan": str(world / "plan-a"), "k": 24, "alpha": 0.8},
        {"plan": str(world / "plan-a"), "k": 12, "alpha": -0.4, "sites": ["mlp"]}]}))
    tuned = run_cli("export", world / "model", "--recipe", json_recipe, "--out", tmp_path / "json")
    assert tuned.exit_code == 0, tuned.output
    from_options = load_file(tmp_path / "options" / "model.safetensors")
    from_files = load_file(tmp_path / "recipe" / "model.safetensors")
    from_json = load_file(tmp_path / "json" / "model.safetensors")
    # --site is not given with the options, so their second component ranks every site.
    assert any(not torch.equal(from_options[n], from_files[n]) for n in from_files)
    assert all(torch.equal(from_json[n], from_files[n]) for n in from_files)

    checked = run_cli("verify", world / "model", *options, "--folded", tmp_path / "options")
    assert checked.exit_code == 0 and "PASS" in checked.output, checked.output
    checked = run_cli("verify", world / "model", "--recipe", yaml_recipe, "--folded", tmp_path / "recipe")
    assert checked.exit_code == 0 and "PASS" in checked.output, checked.output
    evaluated = run_cli("eval", world / "model", "--task", "generic", "--data-dir", world / "data",
                        "--recipe", yaml_recipe, "--no-cost", "--report", tmp_path / "report.json")
    assert evaluated.exit_code == 0, evaluated.output
    assert "steered (k=24, alpha=0.8 + k=12, alpha=-0.4)" in evaluated.output
    steering = json.loads((tmp_path / "report.json").read_text())["settings"]["steering"]
    assert [c["k"] for c in steering] == [24, 12] and steering[1]["sites"] == ["mlp"]


def test_verify_passes_the_export_of_a_recipe(world: Path, tmp_path: Path) -> None:
    recipe = two_plans(world)
    export(world / "model", recipe, out=tmp_path / "folded")
    report = verify(world / "model", recipe, folded=tmp_path / "folded")
    assert report.passed and report.relative_diff <= 1e-5


def test_one_value_of_k_or_alpha_serves_every_plan(world: Path) -> None:
    recipe = resolve_recipe(plan_dirs=[world / "plan-a", world / "plan-b"], ks=[8], alphas=[2.0, 3.0],
                            sites=["mlp"])
    assert recipe is not None
    assert [(c.k, c.alpha, c.sites) for c in recipe.components] == [(8, 2.0, ("mlp",)), (8, 3.0, ("mlp",))]
    assert recipe.label() == "k=8, alpha=2 + k=8, alpha=3"


def test_bad_recipes_are_refused_in_one_line(world: Path, tmp_path: Path) -> None:
    model, out = world / "model", tmp_path / "out"
    plan = ["--plan", world / "plan-a"]
    cases = {
        "3 values of --k for 2 plans": [*plan, *plan, "--k", 1, "--k", 2, "--k", 3, "--alpha", 1],
        "not --plan/--k/--alpha and --tuned": [*plan, "--k", 1, "--alpha", 1, "--tuned", tmp_path / "t.json"],
        "recipe not found": ["--recipe", tmp_path / "missing.yaml"],
        "must be a .json, .yaml or .yml": ["--recipe", world / "plan-a" / "counts.safetensors"],
    }
    bad = {
        "unknown keys weight": {"components": [{"plan": "p", "k": 1, "alpha": 1, "weight": 2}]},
        "needs a non-empty list": {"components": []},
        "k must be an integer": {"components": [{"plan": "p", "k": 1.5, "alpha": 1}]},
        "lacks alpha": {"components": [{"plan": "p", "k": 1}]},
        "sites must be a list": {"components": [{"plan": "p", "k": 1, "alpha": 1, "sites": ["mlp2"]}]},
        "tuned with other keys": {"components": [{"tuned": "t.json", "k": 3}]},
        "component 2 (": {"components": [{"plan": str(world / "plan-a"), "k": 4, "alpha": 1},
                                         {"plan": str(world / "plan-b"), "k": 10**9, "alpha": 1}]},
        "product of a unit's scale factors": {"components": [{"plan": str(world / "plan-a"), "k": 4, "alpha": 40}] * 2},
    }
    for number, (words, data) in enumerate(bad.items()):
        file = tmp_path / f"bad{number}.json"
        file.write_text(json.dumps(data))
        cases[words] = ["--recipe", file]
    broken = tmp_path / "broken.yaml"
    broken.write_text("components: [\n")
    cases["not valid YAML"] = ["--recipe", broken]
    for words, options in cases.items():
        assert_one_line_error(run_cli("export", model, *options, "--out", out), words)
        assert not out.exists()
    # Each factor is allowed alone; their product (41 x 41) needs --allow-extreme.
    assert run_cli("export", model, "--recipe", tmp_path / f"bad{len(bad) - 1}.json",
                   "--allow-extreme", "--out", out).exit_code == 0


def test_a_recipe_file_names_plans_relative_to_its_folder(tmp_path: Path) -> None:
    (tmp_path / "recipes").mkdir()
    file = tmp_path / "recipes" / "r.yml"
    file.write_text("components:\n  - {plan: ../plans/a, k: 4, alpha: 2, sites: mlp}\n")
    (selection,) = read_recipe(file)
    assert selection.plan_dir == tmp_path / "recipes" / ".." / "plans" / "a"
    assert (selection.k, selection.alpha, selection.sites) == (4, 2.0, ("mlp",))


@pytest.mark.parametrize("kind", ["F32", "Q8_0"])
def test_a_gguf_fold_of_a_composed_edit_goes_part_by_part_except_into_block_scales(
        kind: str, tmp_path: Path) -> None:
    import numpy as np
    from gguf import GGMLQuantizationType
    from test_gguf import write_llama_gguf

    from aufold.formats.gguf import fold_gguf, read_gguf_model

    source = read_gguf_model(write_llama_gguf(tiny_model("llama"), tmp_path / "m.gguf",
                                              GGMLQuantizationType[kind]))
    a = Edit.of([SteeredUnit("mlp", 0, 3, 0.37), SteeredUnit("head", 0, 2, 0.3),
                 SteeredUnit("mlp-out", 1, 7, 0.2)])
    b = Edit.of([SteeredUnit("mlp-out", 0, 5, -0.41), SteeredUnit("mlp", 0, 3, 0.77),
                 SteeredUnit("mlp-out", 1, 7, 0.9)])
    fold_gguf(source, Edit.compose([a, b]), tmp_path / "once.gguf")
    fold_gguf(source, a, tmp_path / "a.gguf")
    fold_gguf(read_gguf_model(tmp_path / "a.gguf"), b, tmp_path / "in-turn.gguf")
    once, in_turn = read_gguf_model(tmp_path / "once.gguf"), read_gguf_model(tmp_path / "in-turn.gguf")
    differ = {name for name in once.tensors if not np.array_equal(
        np.asarray(once.tensors[name].data), np.asarray(in_turn.tensors[name].data))}
    if kind == "F32":  # float tensors fold part by part, bitwise as in turn
        assert differ == set()
    else:  # mlp units fold into ffn_up's block scales, mlp-out into ffn_down's: one factor each
        assert differ <= {"blk.0.ffn_up.weight", "blk.0.ffn_down.weight", "blk.1.ffn_down.weight",
                          "blk.0.attn_output.weight"}


def test_a_composed_edit_must_be_built_by_compose() -> None:
    a = Edit.of([SteeredUnit("head", 0, 1, 0.5)])
    b = Edit.of([SteeredUnit("mlp", 1, 2, 1.0)])
    with pytest.raises(AufoldError, match="build it with Edit.compose"):
        Edit((), parts=(a, b))
    with pytest.raises(AufoldError, match="build it with Edit.compose"):
        Edit(Edit.compose([a, b]).units, parts=(Edit.compose([a, b]), a))


def test_more_bad_recipes_are_refused_in_one_line(world: Path, tmp_path: Path) -> None:
    model, out = world / "model", tmp_path / "out"
    tune = tmp_path / "tune.json"
    tune.write_text(json.dumps({"format": TUNE_FORMAT, "plan": str(world / "plan-a"),
                                "best": {"k": 4, "alpha": 1, "site": "nosite"}}))
    nested, huge = tmp_path / "nested.yaml", tmp_path / "huge.yaml"
    nested.write_text(f"components:\n  - {{plan: {world / 'plan-a'}, k: 4, alpha: 1, sites: [[mlp]]}}\n")
    huge.write_text(f"components:\n  - {{plan: {world / 'plan-a'}, k: 4, alpha: 1{'0' * 400}}}\n")
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"components": [
        {"plan": str(world / "plan-a"), "k": 4, "alpha": 1},
        {"plan": str(tmp_path / "nosuch"), "k": 4, "alpha": 1}]}))
    cases = {
        "unknown site 'nosite'": ["--tuned", tune],
        "sites must be a list": ["--recipe", nested],
        "alpha must be a finite number": ["--recipe", huge],
        "cannot expand ~nosuchuser-aufold": ["--recipe", "~nosuchuser-aufold/r.yaml"],
        "component 2: ": ["--recipe", missing],
    }
    for words, options in cases.items():
        for output_format in ("checkpoint", "lora"):
            result = run_cli("export", model, *options, "--format", output_format, "--out", out)
            assert_one_line_error(result, words)
            assert not out.exists()
