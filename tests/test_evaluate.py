"""Evaluation: the scorers against simple reference loops, the report, the eval command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from eval_helpers import generic_splits, write_generic
from tiny_models import save_tiny_model, tiny_model, tiny_tokenizer

import cli
from aufold.demo import arithmetic_items
from aufold.errors import AufoldError
from aufold.evaluate import EvalResult, ItemResult, evaluate_items, resolve_scorer, wilson_interval, write_report
from aufold.evaluate.choices import prepare_choices
from aufold.evaluate.core import CHOICE_SCORERS
from aufold.evaluate.math import extract_number, same_number
from aufold.localize import localize
from aufold.tasks import Item, default_data_dir, load_split
from aufold.tasks.contrast import choice_pairs

DATA = default_data_dir()
needs_data = pytest.mark.skipif(DATA is None, reason="benchmark data not found at ../shared/data")


# --- the report --------------------------------------------------------------------

def test_wilson_interval_matches_published_values() -> None:
    # 81/263 is the worked example of Newcombe (1998); 5/10 and 0/10 are worked by hand.
    for (correct, n), expected in {(5, 10): (0.2366, 0.7634), (0, 10): (0.0, 0.2775),
                                   (81, 263): (0.2553, 0.3662)}.items():
        low, high = wilson_interval(correct, n)
        assert (round(low, 4), round(high, 4)) == expected
    with pytest.raises(AufoldError):
        wilson_interval(0, 0)


def test_report_writer(tmp_path: Path) -> None:
    items = (ItemResult("a", "A", "A", True, {"token_id": 7}), ItemResult("b", "A", "B", False),
             ItemResult("c", "B", "B", True))
    result = EvalResult("first-token", items, {"task": "copa", "split": "test"})
    path = write_report(result, tmp_path / "out" / "report.json")
    report = json.loads(path.read_text())
    assert report["accuracy"] == pytest.approx(2 / 3) and report["n"] == 3 and report["correct"] == 2
    assert report["ci95"] == pytest.approx(list(wilson_interval(2, 3)))
    assert report["scorer"] == "first-token" and report["settings"]["task"] == "copa"
    assert report["items"][0] == {"id": "a", "prediction": "A", "answer": "A", "correct": True, "token_id": 7}
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]  # no staging file left
    with pytest.raises(AufoldError, match="is a folder"):
        write_report(result, tmp_path)


# --- scorer choice and math answers ------------------------------------------------

def test_scorer_defaults_and_mismatches() -> None:
    assert resolve_scorer("choice", None) == "first-token"
    assert resolve_scorer("math", None) == "math"
    assert resolve_scorer("choice", "loglik") == "loglik"
    with pytest.raises(AufoldError, match="does not fit a math task"):
        resolve_scorer("math", "loglik")
    with pytest.raises(AufoldError, match="does not fit a choice task"):
        resolve_scorer("choice", "math")


@pytest.mark.parametrize(("text", "value"), [
    (" 42", 42.0), ("The answer is 3.5 apples.", 3.5), ("1,200 then 7", 7.0), ("we get 1,200", 1200.0),
    ("5 + 3 = 8\n#### 8\nQuestion: 12", 8.0), ("#### -2.50", -2.5), ("no number", None),
    ("#### none", None), ("-.5", -0.5),
])
def test_extract_number(text: str, value: float | None) -> None:
    assert extract_number(text) == value


def test_same_number_reads_four_decimals() -> None:
    assert same_number(1.8333, 1.8333333333333335) and same_number(12.0, 12)
    assert not same_number(1.83, 1.8333333333333335) and not same_number(None, 1.0)


# --- the scorers against reference loops on SmolLM2 ----------------------------------

def smollm2_items() -> list[Item]:
    """50 real items: short arithmetic (two-token choices) and COPA (one-token choices)."""
    items = arithmetic_items("test")[:40]
    if DATA is not None:
        return items + load_split("copa", "tune", DATA)[:10]
    return items + arithmetic_items("test")[40:50]


@pytest.mark.slow
@torch.inference_mode()
def test_first_token_matches_a_generate_loop_on_smollm2(smollm2: Any) -> None:
    model, tokenizer = smollm2
    items = smollm2_items()
    result = evaluate_items(model, tokenizer, items, scorer="first-token", batch_size=16, progress=False)
    reference = []
    for item in items:
        inputs = tokenizer(item.prompt, return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=1, do_sample=False,
                                pad_token_id=tokenizer.eos_token_id)
        reference.append(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    assert len(items) == 50
    assert result.predictions() == reference
    expected = [r.strip().lower() == i.answer.strip().lower() for r, i in zip(reference, items)]
    assert [item.correct for item in result.items] == expected


@pytest.mark.slow
@torch.inference_mode()
def test_loglik_matches_a_reference_loop_on_smollm2(smollm2: Any) -> None:
    model, tokenizer = smollm2
    items = smollm2_items()
    result = evaluate_items(model, tokenizer, items, scorer="loglik", batch_size=16, progress=False)
    for item, got in zip(items, result.items):
        prompt = tokenizer(item.prompt)["input_ids"]
        scores = []
        for choice in item.choices:
            full = tokenizer(item.prompt + choice)["input_ids"]
            assert full[:len(prompt)] == prompt  # true for these items; the scorer handles the rest
            logprobs = model(torch.tensor([full])).logits[0].float().log_softmax(-1)
            scores.append(float(sum(logprobs[i - 1, full[i]] for i in range(len(prompt), len(full)))))
        best = max(range(len(scores)), key=scores.__getitem__)
        assert got.prediction == item.choices[best], item.id
        assert got.detail["scores"] == pytest.approx(scores, abs=1e-3)


@needs_data
def test_choice_tasks_run_one_row_per_item_with_the_head_on_the_last_position() -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    items = load_split("copa", "tune", DATA)[:9]  # answers "A"/"B" after "Answer:\n": one token each
    for name, scorer in CHOICE_SCORERS.items():
        prepared = prepare_choices(scorer, tokenizer, items, chat_template=False, max_length=4096,
                                   batch_size=4)
        assert [query.item for query in prepared.queries] == list(range(len(items))), name
    shapes = []
    handle = model.lm_head.register_forward_pre_hook(lambda _m, args: shapes.append(args[0].shape[1]))
    try:
        evaluate_items(model, tokenizer, items, scorer="loglik", batch_size=4, progress=False)
    finally:
        handle.remove()
    assert shapes == [1, 1, 1]


def test_multi_token_choices_score_every_answer_token() -> None:
    model, tokenizer = tiny_model("qwen2"), tiny_tokenizer()
    items = [Item("The weather is", (" nice and the sun", " bad"), " bad", None, "w"),
             Item("I love this", (" movie.", " house in the evening"), " movie.", None, "m")]
    result = evaluate_items(model, tokenizer, items, scorer="loglik", progress=False)
    with torch.inference_mode():
        for item, got in zip(items, result.items):
            prompt = tokenizer(item.prompt)["input_ids"]
            expected = []
            for choice in item.choices:
                full = tokenizer(item.prompt + choice)["input_ids"]
                logprobs = model(torch.tensor([full])).logits[0].log_softmax(-1)
                expected.append(float(sum(logprobs[i - 1, full[i]] for i in range(len(prompt), len(full)))))
            assert got.detail["scores"] == pytest.approx(expected, abs=1e-4)


@needs_data
@torch.inference_mode()
def test_math_scorer_matches_an_unbatched_generate_loop() -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    items = load_split("svamp", "tune", DATA)[:5]
    result = evaluate_items(model, tokenizer, items, kind="math", batch_size=3, max_new_tokens=6,
                            progress=False)
    assert result.scorer == "math"
    for item, got in zip(items, result.items):
        inputs = tokenizer(item.prompt, return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=6, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        assert got.detail["output"] == text
        assert got.correct == same_number(extract_number(text), item.answer_value or 0.0)


# --- the eval command --------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    save_tiny_model("llama", root / "model")
    write_generic(root / "data", generic_splits())
    plan = localize(tiny_model("llama"), tiny_tokenizer(), choice_pairs(generic_splits()["pairs"]),
                    ["head", "mlp"], progress=False)
    plan.save(root / "plan")
    return root


def run(args: list[str]) -> Any:
    return CliRunner().invoke(cli.main, args)


def test_eval_writes_a_report_with_every_prediction(workspace: Path) -> None:
    report = workspace / "base.json"
    result = run(["eval", str(workspace / "model"), "--task", "generic", "--data-dir",
                  str(workspace / "data"), "--split", "test", "--scorer", "loglik", "--report", str(report)])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["n"] == 10 and 0.0 <= data["accuracy"] <= 1.0 and len(data["items"]) == 10
    assert f"accuracy {data['accuracy']:.4f}" in result.stdout and "10 items" in result.stdout
    assert data["settings"]["steering"] is None and data["settings"]["task"] == "generic"

    steered = workspace / "steered.json"
    result = run(["eval", str(workspace / "model"), "--task", "generic", "--data-dir", str(workspace / "data"),
                  "--scorer", "loglik", "--plan", str(workspace / "plan"), "--k", "4", "--alpha", "50",
                  "--report", str(steered)])
    assert result.exit_code == 0, result.output
    data = json.loads(steered.read_text())
    assert data["settings"]["steering"]["k"] == 4 and data["settings"]["steered_units"] == 4


@needs_data
def test_eval_on_a_builtin_task(workspace: Path) -> None:
    report = workspace / "copa.json"
    result = run(["eval", str(workspace / "model"), "--task", "copa", "--split", "tune", "--limit", "5",
                  "--report", str(report)])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["n"] == 5 and data["scorer"] == "first-token"
    assert [item["id"] for item in data["items"]] == [f"copa-{i}" for i in range(401, 406)]


def fails(args: list[str], message: str) -> None:
    result = run(args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("aufold: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr


def test_eval_bad_input(workspace: Path, tmp_path: Path) -> None:
    model, data = str(workspace / "model"), str(workspace / "data")
    fails(["eval", model, "--task", "nope"], "'nope' is not one of 'copa', 'boolq'")
    fails(["eval", model, "--task", "copa", "--data-dir", str(tmp_path / "missing")],
          f"data folder {tmp_path / 'missing'} does not exist")
    fails(["eval", model, "--task", "copa", "--data-dir", str(tmp_path)],
          f"data file copa/derived_copa_test_500.jsonl not found (looked for {tmp_path}")
    fails(["eval", model, "--task", "generic", "--data-dir", data, "--limit", "11"],
          "the test split of generic has 10 items, fewer than --limit 11")
    fails(["eval", model, "--task", "generic", "--data-dir", data, "--scorer", "math"],
          "does not fit a choice task")
    fails(["eval", model, "--task", "generic", "--data-dir", data, "--plan", str(workspace / "plan")],
          "missing --k, --alpha")
    fails(["eval", model, "--task", "generic", "--data-dir", data, "--plan", str(workspace / "plan"),
           "--k", "100000", "--alpha", "1"], "k=100000 is larger than")
    fails(["eval", model, "--task", "generic", "--data-dir", data, "--tuned", str(tmp_path / "t.json"),
           "--k", "2"], "give one of --plan/--k/--alpha, --tuned or --recipe")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "test.jsonl").write_text('{"prompt": "a", "choices": [" b", " c"], "answer": " b"}\n'
                                    '{"prompt": "a", "choices": [" b", " c"], "answer": " d"}\n')
    fails(["eval", model, "--task", "generic", "--data-dir", str(bad)], "line 2: 'answer' ' d' is not one")


@torch.inference_mode()
def test_chat_template_wraps_each_prompt_as_a_user_turn() -> None:
    model, tokenizer = tiny_model("qwen3"), tiny_tokenizer()
    items = arithmetic_items("tune")[:4]
    result = evaluate_items(model, tokenizer, items, scorer="first-token", chat_template=True, progress=False)
    for item, got in zip(items, result.items):
        text = tokenizer.apply_chat_template([{"role": "user", "content": item.prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        assert got.detail["token_id"] == int(model(ids).logits[0, -1].argmax())


@needs_data
def test_evaluate_a_task_split_by_name() -> None:
    from aufold.evaluate import evaluate

    result = evaluate(tiny_model("llama"), tiny_tokenizer(), "copa", "tune", "loglik", data_dir=DATA, limit=3,
                      progress=False)
    assert result.n == 3 and result.scorer == "loglik"
    assert result.settings["task"] == "copa" and result.settings["split"] == "tune"
