"""accelerate device maps (``--device-map auto``) for localize, eval, tune, verify and hook mode.

On a machine without a GPU, ``device_map="auto"`` with a tiny ``max_memory`` offloads
layers to disk, so accelerate's own hooks move weights in and out around aufold's:
the counts, scores and logits must not change.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from edit_helpers import assert_one_line_error, run_cli
from eval_helpers import generic_splits, write_generic
from test_localize import _varied_pairs
from tiny_models import save_tiny_model, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, PreTrainedModel

from aufold.evaluate import evaluate_items
from aufold.export import export
from aufold.localize import localize
from aufold.steer import steer
from aufold.tasks import Item
from aufold.tasks.contrast import choice_pairs

pytest.importorskip("accelerate")

SITES = ("head", "mlp", "mlp-out", "residual")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("device-map") / "model")


def offloaded(folder: Path, tmp_path: Path) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(
        folder, device_map="auto", max_memory={"cpu": "450KB"}, offload_folder=tmp_path / "offload").eval()
    assert "disk" in set(model.hf_device_map.values())
    return model


def test_offloaded_model_gives_the_same_counts_and_hooks(folder: Path, tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    pairs = _varied_pairs(6, seed=2)
    plain_model = AutoModelForCausalLM.from_pretrained(folder).eval()
    plain = localize(plain_model, tokenizer, pairs, SITES, progress=False)
    spread = offloaded(folder, tmp_path)
    plan = localize(spread, tokenizer, pairs, SITES, progress=False)
    for site in SITES:
        assert torch.equal(plan.counts[site].positive, plain.counts[site].positive)
        assert torch.equal(plan.counts[site].negative, plain.counts[site].negative)
    # Hook mode on the offloaded model computes what it computes on the plain one.
    edit = plan.select(6, 3.0, ["head", "mlp", "mlp-out"])
    ids = tokenizer(["the cat sat on a mat"], return_tensors="pt")["input_ids"]
    with torch.no_grad(), steer(plain_model, edit):
        want = plain_model(ids).logits
    with torch.no_grad(), steer(spread, edit):
        got = spread(ids).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("scorer", ["first-token", "loglik", "math"])
def test_offloaded_model_evaluates_like_the_plain_one(folder: Path, tmp_path: Path, scorer: str) -> None:
    tokenizer = tiny_tokenizer()
    plain_model = AutoModelForCausalLM.from_pretrained(folder).eval()
    splits = generic_splits()
    edit = localize(plain_model, tokenizer, choice_pairs(splits["pairs"]), ["head", "mlp"],
                    progress=False).select(4, 20.0)
    if scorer == "math":
        kind = "math"
        items = [Item(f"{a} + {b} =", (), str(a + b), float(a + b), f"sum-{a}-{b}")
                 for a, b in ((1, 2), (12, 30), (7, 7))]
    else:
        kind, items = "choice", splits["test"][:6]
    spread = offloaded(folder, tmp_path)
    options = {"kind": kind, "scorer": scorer, "edit": edit, "batch_size": 4, "max_new_tokens": 4,
               "progress": False}
    want = evaluate_items(plain_model, tokenizer, items, **options)  # type: ignore[arg-type]
    got = evaluate_items(spread, tokenizer, items, **options)  # type: ignore[arg-type]
    assert [r.prediction for r in got.items] == [r.prediction for r in want.items]
    assert [r.detail for r in got.items] == [r.detail for r in want.items]


@pytest.fixture(scope="module")
def workspace(folder: Path) -> Path:
    root = folder.parent
    write_generic(root / "data", generic_splits())
    localize(tiny_model("llama"), tiny_tokenizer(), choice_pairs(generic_splits()["pairs"]), ["head"],
             progress=False).save(root / "plan")
    return root


def test_commands_take_device_map_auto(folder: Path, workspace: Path) -> None:
    data, plan = workspace / "data", workspace / "plan"
    steering = ["--plan", plan, "--k", 4, "--alpha", 3]

    result = run_cli("generate", folder, *steering, "--prompt", "the cat", "--max-new-tokens", 4,
                     "--device-map", "auto")
    assert result.exit_code == 0, result.output
    assert "--- steered (k=4, alpha=3) ---" in result.output

    reports = {}
    for name, placement in (("plain", []), ("mapped", ["--device-map", "auto"])):
        reports[name] = workspace / f"{name}.json"
        result = run_cli("eval", folder, "--task", "generic", "--data-dir", data, *steering,
                         "--report", reports[name], *placement)
        assert result.exit_code == 0, result.output
    plain, mapped = (json.loads(reports[name].read_text()) for name in ("plain", "mapped"))
    assert mapped["items"] == plain["items"] and mapped["accuracy"] == plain["accuracy"]

    export(folder, plan, k=4, alpha=3.0, out=workspace / "folded")
    result = run_cli("verify", folder, *steering, "--folded", workspace / "folded", "--json",
                     "--device-map", "auto")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["passed"] is True

    result = run_cli("tune", folder, "--task", "generic", "--data-dir", data, "--plan", plan,
                     "--k-grid", "2", "--alpha-grid", "5", "--scorer", "loglik", "--no-plot",
                     "--out", workspace / "tuned", "--device-map", "auto")
    assert result.exit_code == 0, result.output
    assert json.loads((workspace / "tuned" / "tune.json").read_text())["test"]["n"] == 10


def test_device_and_device_map_together_are_refused(folder: Path, workspace: Path) -> None:
    result = run_cli("eval", folder, "--task", "generic", "--data-dir", workspace / "data",
                     "--device", "cpu", "--device-map", "auto")
    assert_one_line_error(result, "either --device or --device-map")
