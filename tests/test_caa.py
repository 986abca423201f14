"""The CAA baseline: its vector against a plain computation, its fold against its hook, and its
place in `aufold compare` beside AUSteer.

The vector equals the mean residual difference computed one text at a time with a
hook; `aufold caa` writes it as `fold-vector` reads it, and the folded checkpoint
equals the hook (float32 relative 1e-5) on every architecture where a bias can hold
it, while the others refuse in one line. In the comparison, CAA's configurations are
scored by the same scorer (resumed from their layer, as from scratch) and priced by the
same KL.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from edit_helpers import assert_one_line_error, random_plan, relative_diff, run_cli
from eval_helpers import generic_splits, write_generic
from test_fold import logits
from tiny_models import ARCHITECTURES, save_tiny_model, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from aufold.errors import AufoldError
from aufold.evaluate.edits import evaluate_edits
from aufold.modeling import model_architecture
from aufold.pairs import ContrastivePair
from aufold.steer import steer
from aufold.tasks.contrast import choice_pairs
from aufold.vectors import add_vectors, read_vectors
from aufold.vectors.caa import VectorEdit, caa_vectors

PAIRS = [ContrastivePair("The sky is", " blue", " green"),
         ContrastivePair("Two plus two is", " four", " five"),
         ContrastivePair("Paris is the capital of", " France", " Spain"),
         ContrastivePair("Ice is", " cold", " hot"),
         ContrastivePair("A", " cat purrs and sleeps in the sun", " dog")]


def plain_caa(model: torch.nn.Module, layer: int) -> torch.Tensor:
    """Mean over pairs of (residual_pos - residual_neg) after ``layer`` at the last token, one
    text at a time, read by a hook on the decoder layer."""
    tokenizer = tiny_tokenizer()
    module = model.get_submodule(f"{model_architecture(model).layers}.{layer}")
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(
        lambda _m, _a, out: seen.append((out[0] if isinstance(out, tuple) else out)[0, -1]))
    total = torch.zeros(model.config.hidden_size, dtype=torch.float64)
    try:
        for pair in PAIRS:
            for text in (pair.prompt + pair.positive, pair.prompt + pair.negative):
                with torch.no_grad():
                    model(**tokenizer(text, return_tensors="pt"))
            negative, positive = seen.pop(), seen.pop()
            total += (positive - negative).double()
    finally:
        handle.remove()
    return (total / len(PAIRS)).float()


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "qwen2"])
def test_the_caa_vector_is_the_mean_residual_difference(arch: str) -> None:
    model = tiny_model(arch)
    vectors = caa_vectors(model, tiny_tokenizer(), PAIRS, [0, 2], batch_size=2, progress=False)
    assert vectors.layers == [0, 2]
    for layer in (0, 2):
        expected = plain_caa(model, layer)
        assert float((vectors.vectors[layer] - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_the_folded_caa_vector_equals_its_hook_or_is_refused(arch: str, tmp_path: Path) -> None:
    model_dir = save_tiny_model(arch, tmp_path / "model")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p.__dict__) + "\n" for p in PAIRS))
    vector_file = tmp_path / "caa.safetensors"
    result = run_cli("caa", model_dir, "--pairs", pairs, "--layer", 1, "--out", vector_file)
    assert result.exit_code == 0, result.output
    vectors = read_vectors(vector_file)
    assert vectors.layers == [1]
    base = tiny_model(arch)
    out = tmp_path / "folded"
    folded = run_cli("fold-vector", model_dir, "--vector", vector_file, "--site", "residual",
                     "--scale", 3, "--out", out)
    try:
        model_architecture(base).vector_bias("residual", 1)
    except AufoldError:  # a norm sits before the residual add (or no bias can hold it): hooks
        assert_one_line_error(folded, "with hooks instead")
        assert not out.exists()
        return
    assert folded.exit_code == 0, folded.output
    with add_vectors(base, vectors, "residual", 3.0):
        hooked = logits(base)
    assert relative_diff(logits(AutoModelForCausalLM.from_pretrained(out)), hooked) <= 1e-5


def test_a_vector_edit_scores_the_same_resumed_and_from_scratch() -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    vectors = caa_vectors(model, tokenizer, PAIRS, [1, 2], progress=False)
    items = generic_splits()["tune"]
    edits = {"caa": VectorEdit(vectors, 4.0)}
    resumed = evaluate_edits(model, tokenizer, items, edits, scorer="loglik", progress=False)
    scratch = evaluate_edits(model, tokenizer, items, edits, scorer="loglik", progress=False,
                             resume=False)
    assert resumed.resumed_from == {"caa": 1}
    assert resumed.steered["caa"].items == scratch.steered["caa"].items
    assert resumed.steered["caa"].items != resumed.base.items
    with steer(model, edits["caa"]):
        steered = logits(model)
    assert not torch.equal(steered, logits(model))  # the hooks are gone after the block


def test_compare_scores_caa_beside_austeer(tmp_path: Path) -> None:
    model_dir = save_tiny_model("llama", tmp_path / "model")
    splits = generic_splits()
    data = write_generic(tmp_path / "data", splits)
    pairs = choice_pairs(splits["pairs"])
    random_plan(tiny_model("llama"), sites=("mlp",), num_pairs=len(pairs)).save(tmp_path / "plan")
    common = ["compare", model_dir, "--task", "generic", "--data-dir", data, "--plan",
              tmp_path / "plan", "--site", "mlp", "--scorer", "loglik", "--k-grid", "4",
              "--alpha-grid", "5", "--block-alpha-grid", "1", "--no-plot"]
    result = run_cli(*common, "--caa-multipliers", "0,1,4", "--caa-layer", 1, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "compare.json").read_text())
    caa = [p for p in record["points"] if p["method"] == "caa"]
    assert [p["setting"] for p in caa] == ["L1 x0", "L1 x1", "L1 x4"]
    assert all(p["units"] == 64 for p in caa) and record["caa_layer"] == 1
    assert caa[0]["kl"] == 0 and caa[0]["accuracy"] == record["unsteered"]["accuracy"]
    assert 0 < caa[1]["kl"] < caa[2]["kl"]
    assert record["caa_pairs"] == f"generic pairs split, first {len(pairs)}"
    assert "caa" in result.output

    too_many = tmp_path / "plan-1000"
    random_plan(tiny_model("llama"), sites=("mlp",)).save(too_many)  # counted 1000 pairs
    result = run_cli(*common[:7], too_many, *common[8:], "--out", tmp_path / "bad")
    assert_one_line_error(result, "--caa-pairs FILE", "--no-caa")
    assert not (tmp_path / "bad").exists()


def test_bad_caa_input_is_refused_in_one_line(tmp_path: Path) -> None:
    model_dir = save_tiny_model("llama", tmp_path / "model")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p.__dict__) + "\n" for p in PAIRS))
    out = tmp_path / "caa.safetensors"
    for options, words in ((["--layer", 3], "layers must lie in 0..2"),
                           (["--layer", -1], "layers must lie in 0..2")):
        assert_one_line_error(run_cli("caa", model_dir, "--pairs", pairs, *options, "--out", out),
                              words)
    result = run_cli("caa", model_dir, "--pairs", pairs, "--layer", 1, "--out", tmp_path / "caa.pt")
    assert_one_line_error(result, "must end in .safetensors")
    assert not out.exists() and not (tmp_path / "caa.pt").exists()


def test_caa_replaces_its_own_vector_file_and_compare_checks_its_options(tmp_path: Path) -> None:
    model_dir = save_tiny_model("llama", tmp_path / "model")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p.__dict__) + "\n" for p in PAIRS))
    out = tmp_path / "caa.safetensors"
    command = ["caa", model_dir, "--pairs", pairs, "--layer", 1, "--out", out]
    assert run_cli(*command).exit_code == 0
    assert_one_line_error(run_cli(*command), "--overwrite")
    assert run_cli(*command, "--overwrite").exit_code == 0
    other = tmp_path / "other.safetensors"
    other.write_bytes(out.read_bytes().replace(b"aufold-caa-vectors", b"someone-elses-vec"))
    result = run_cli("caa", model_dir, "--pairs", pairs, "--layer", 1, "--out", other, "--overwrite")
    assert_one_line_error(result, "only replaces outputs that aufold wrote")

    data = write_generic(tmp_path / "data", generic_splits())
    random_plan(tiny_model("llama"), sites=("mlp",), num_pairs=12).save(tmp_path / "plan")
    common = ["compare", model_dir, "--task", "generic", "--data-dir", data, "--plan",
              tmp_path / "plan", "--site", "mlp", "--out", tmp_path / "cmp"]
    assert_one_line_error(run_cli(*common, "--caa-multipliers", "1e9"),
                          "--caa-multipliers", "lower --caa-multipliers")
    assert_one_line_error(run_cli(*common, "--no-caa", "--caa-layer", 1), "drop the --caa-* options")
    assert not (tmp_path / "cmp").exists()


def test_texts_longer_than_learned_positions_are_cut_to_fit(tmp_path: Path) -> None:
    """GPT-2 has learned positions (256 in the tiny model): longer texts keep their last
    tokens instead of indexing past the table, in localize, CAA and eval alike."""
    from aufold.evaluate import evaluate_items
    from aufold.localize import localize
    from aufold.tasks import Item

    model, tokenizer = tiny_model("gpt2"), tiny_tokenizer()
    long = [ContrastivePair("word " * 400 + "The sky is", " blue", " green"), *PAIRS]
    plan = localize(model, tokenizer, long, ["mlp"], progress=False)
    assert plan.settings["max_length"] == model.config.n_positions
    assert plan.settings["truncated_texts"] == 2
    caa_vectors(model, tokenizer, long, [1], progress=False)
    item = Item(prompt="word " * 400 + "Pick one:", choices=(" a", " b"), answer=" a",
                answer_value=None, id="long")
    assert evaluate_items(model, tokenizer, [item], scorer="loglik", progress=False).n == 1
    math = Item(prompt="word " * 400 + "2 + 2 =", choices=(), answer="4", answer_value=4.0, id="m")
    result = evaluate_items(model, tokenizer, [math], kind="math", max_new_tokens=8, progress=False)
    assert result.n == 1  # the prompt leaves room for the generated tokens
