"""Tests for aufold.tasks on the real benchmark files in ../shared/data.

Tests that need the data skip cleanly when the folder is absent; the rest use
small hand-made files.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from aufold.encoding import chat_prompt
from aufold.errors import AufoldError
from aufold.tasks import (
    SPLITS,
    Item,
    default_data_dir,
    format_number,
    get_task,
    task_names,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

BENCHMARK_NAMES = ("copa", "boolq", "winogrande", "svamp", "mawps")

# The split sizes fixed by /work/shared/data/README.md.
EXPECTED_SIZES = {
    "copa": {"pairs": 800, "tune": 100, "test": 500},
    "boolq": {"pairs": 1000, "tune": 100, "test": 2170},
    "winogrande": {"pairs": 500, "tune": 100, "test": 667},
    "svamp": {"pairs": 600, "tune": 100, "test": 300},
    "mawps": {"pairs": 1000, "tune": 100, "test": 238},
}


@pytest.fixture
def data_dir() -> Path:
    found = default_data_dir()
    if found is None:
        pytest.skip("benchmark data not found at ../shared/data")
    return found


@lru_cache(maxsize=None)
def _load(name: str, split: str, data_dir: Path) -> tuple[Item, ...]:
    # Cached so the many tests over the same split read each file once.
    return tuple(get_task(name).load(split, data_dir))


def _item(name: str, split: str, data_dir: Path, item_id: str) -> Item:
    return next(item for item in _load(name, split, data_dir) if item.id == item_id)


# --- data location -------------------------------------------------------------

def test_default_data_dir_is_shared_data_beside_the_repo(data_dir: Path) -> None:
    repo_root = Path(__file__).resolve().parents[1]
    assert data_dir == repo_root.parent / "shared" / "data"
    assert (data_dir / "README.md").is_file()


# --- split sizes and gold answers ----------------------------------------------

@pytest.mark.parametrize("name", BENCHMARK_NAMES)
@pytest.mark.parametrize("split", SPLITS)
def test_split_sizes_match_the_readme(name: str, split: str, data_dir: Path) -> None:
    assert len(_load(name, split, data_dir)) == EXPECTED_SIZES[name][split]


@pytest.mark.parametrize("name", BENCHMARK_NAMES)
def test_splits_are_disjoint_and_ids_unique(name: str, data_dir: Path) -> None:
    ids = [item.id for split in SPLITS for item in _load(name, split, data_dir)]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("name", BENCHMARK_NAMES)
@pytest.mark.parametrize("split", SPLITS)
def test_gold_answers_are_valid(name: str, split: str, data_dir: Path) -> None:
    task = get_task(name)
    for item in _load(name, split, data_dir):
        assert item.prompt
        if task.kind == "choice":
            expected = (" yes", " no") if name == "boolq" else ("A", "B")
            assert item.choices == expected
            assert item.answer in item.choices
            assert item.answer_value is None
        else:
            assert item.choices == ()
            assert item.answer_value is not None
            assert item.answer == format_number(item.answer_value)


def test_copa_splits_follow_the_xml_ids(data_dir: Path) -> None:
    def numbers(split: str) -> set[int]:
        return {int(item.id.removeprefix("copa-")) for item in _load("copa", split, data_dir)}

    assert numbers("pairs") == set(range(1, 401)) | set(range(1001, 1401))
    assert numbers("tune") == set(range(401, 501))
    assert numbers("test") == set(range(501, 1001))


def test_choice_answers_are_not_all_the_same(data_dir: Path) -> None:
    # A label mapping bug would typically make every gold answer identical.
    for name in ("copa", "boolq", "winogrande"):
        answers = {item.answer for item in _load(name, "pairs", data_dir)}
        assert len(answers) == 2, name


# --- prompt templates ----------------------------------------------------------

def test_copa_prompt(data_dir: Path) -> None:
    item = _item("copa", "test", data_dir, "copa-501")
    assert item.prompt == (
        "Question:\nThe item was packaged in bubble wrap. Based on the previous passage, "
        "choose the most reasonable cause.\nA:It was fragile.\nB:It was small.\n\nAnswer:\n")
    assert item.answer == "A"


def test_copa_xml_text_is_stripped(data_dir: Path) -> None:
    # Item 1010's premise ends with a stray space in the XML.
    item = _item("copa", "pairs", data_dir, "copa-1010")
    assert item.prompt == (
        "Question:\nThe sales associate sent another invoice to the customer. Based on the "
        "previous passage, choose the most reasonable cause.\nA:The sales associate "
        "undercharged the customer.\nB:The sales associate acted rude to the customer."
        "\n\nAnswer:\n")


def test_boolq_prompt(data_dir: Path) -> None:
    item = _item("boolq", "test", data_dir, "boolq-2644")
    assert item.prompt == (
        "Is the answer to the question encapsulated in the passage? Please confirm with "
        "'yes' or 'no'.\n\nPassage: The Punisher (season 2) -- The season is set for "
        "release in 2019.\n\nQuestion: are they going to make a punisher season 2\n\nAnswer:")
    assert item.answer == " yes"


def test_winogrande_prompt(data_dir: Path) -> None:
    item = _item("winogrande", "test", data_dir, "winogrande-601")
    assert item.prompt == (
        "Please fill in the blanks. Write A or B as the answer.\n\nSentence: Neil told "
        "Lawrence that he was training to be a race car driver.  _ was excited.\n"
        "A. Neil\nB. Lawrence\nAnswer:")
    assert item.answer == "A"


def test_svamp_prompt(data_dir: Path) -> None:
    item = _item("svamp", "test", data_dir, "svamp-chal-701")
    assert item.prompt == (
        "Answer the following grade-school math word problem. Reply with only the final "
        "answer as a number.\nQuestion: Every day Ryan spends 6 hours on learning english "
        "and 2 hours on learning chinese. How many more hours does he spend on learning "
        "english than he does on learning chinese?\nAnswer:")
    assert (item.answer, item.answer_value) == ("4", 4.0)


def test_mawps_prompt(data_dir: Path) -> None:
    item = _item("mawps", "test", data_dir, "mawps-926")
    assert item.prompt == (
        "Answer the grade school math word problem below, using step-by-step "
        "problem-solving process. Print the final answer after \"####\".\nQuestion: "
        "Nicole found an orange caterpillar and a green caterpillar in her backyard . The "
        "green caterpillar was 3 inches long and the orange caterpillar was "
        "1.1666666666666667 inches long . How much longer was the green caterpillar than "
        "the orange caterpillar ?\nAnswer:")
    assert item.answer == "1.8333"


# --- contrastive pairs -----------------------------------------------------------

@pytest.mark.parametrize("name", BENCHMARK_NAMES)
def test_pairs_on_real_data(name: str, data_dir: Path) -> None:
    task = get_task(name)
    items = _load(name, "pairs", data_dir)
    pairs = task.contrastive_pairs(items)
    assert len(pairs) == len(items)
    for item, pair in zip(items, pairs):
        assert pair.prompt == item.prompt
        assert pair.positive != pair.negative
        if task.kind == "choice":
            assert pair.positive == item.answer
            assert pair.negative in item.choices
        else:
            assert pair.positive == " " + item.answer
            assert pair.negative.startswith(" ")


def _math_items(*values: float) -> list[Item]:
    return [Item(prompt=f"Q{i}\nAnswer:", choices=(), answer=format_number(value),
                 answer_value=value, id=f"m{i}") for i, value in enumerate(values)]


def test_math_pairs_take_the_nearest_different_answer() -> None:
    items = _math_items(10, 12, 13, 14, 14, 2.5)
    negatives = [pair.negative for pair in get_task("svamp").contrastive_pairs(items)]
    # 10 -> 12; 12 -> 13 (1 away, 10 is 2 away); 13 -> 12 (tie with 14, smaller wins);
    # 14 -> 13 (the other 14 is the same answer); 2.5 -> 10.
    assert negatives == [" 12", " 13", " 12", " 13", " 13", " 10"]
    positives = [pair.positive for pair in get_task("svamp").contrastive_pairs(items)]
    assert positives == [" 10", " 12", " 13", " 14", " 14", " 2.5"]


def test_math_pairs_treat_answers_that_read_the_same_as_equal() -> None:
    # 0.83333 and 0.833333 both read "0.8333", so neither may be the other's negative.
    items = _math_items(0.83333, 0.833333, 1)
    negatives = [pair.negative for pair in get_task("mawps").contrastive_pairs(items)]
    assert negatives == [" 1", " 1", " 0.8333"]


def test_math_pairs_need_two_different_answers() -> None:
    with pytest.raises(AufoldError, match="same answer 7"):
        get_task("svamp").contrastive_pairs(_math_items(7, 7.0))


def test_choice_pairs_take_the_other_option() -> None:
    item = Item(prompt="P", choices=(" yes", " no"), answer=" no", answer_value=None, id="x")
    (pair,) = get_task("boolq").contrastive_pairs([item])
    assert (pair.positive, pair.negative) == (" no", " yes")


def test_format_number() -> None:
    assert format_number(12.0) == "12"
    assert format_number(-3.0) == "-3"
    assert format_number(0.5) == "0.5"
    assert format_number(1.8333333333333335) == "1.8333"
    assert format_number(14760.87) == "14760.87"
    assert format_number(0.00001) == "1e-05"


# --- generic task ----------------------------------------------------------------

def _write_jsonl(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_generic_task_loads_a_users_file(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "pairs.jsonl", [
        json.dumps({"prompt": "2 + 2 =", "choices": [" 4", " 5", " 6"], "answer": " 4"}),
        "",
        json.dumps({"prompt": "Sky is", "choices": [" green", " blue"], "answer": " blue"}),
    ])
    task = get_task("generic")
    items = task.load("pairs", tmp_path)
    assert task.kind == "choice"
    assert items == [
        Item(prompt="2 + 2 =", choices=(" 4", " 5", " 6"), answer=" 4", answer_value=None,
             id="pairs-1"),
        Item(prompt="Sky is", choices=(" green", " blue"), answer=" blue", answer_value=None,
             id="pairs-3"),
    ]
    pairs = task.contrastive_pairs(items)
    assert [(p.positive, p.negative) for p in pairs] == [(" 4", " 5"), (" blue", " green")]


def test_generic_answer_not_in_choices_names_the_line(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "tune.jsonl", [
        json.dumps({"prompt": "a", "choices": ["x", "y"], "answer": "x"}),
        json.dumps({"prompt": "b", "choices": ["x", "y"], "answer": "z"}),
    ])
    with pytest.raises(AufoldError, match=r"tune\.jsonl, line 2: 'answer' 'z' is not one of"):
        get_task("generic").load("tune", tmp_path)


def test_generic_bad_json_names_the_line(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "test.jsonl", ['{"prompt": "a", "choices": ["x", "y"], '
                                           '"answer": "x"}', "{not json"])
    with pytest.raises(AufoldError, match="line 2: not valid JSON"):
        get_task("generic").load("test", tmp_path)


def test_generic_missing_split_file(tmp_path: Path) -> None:
    with pytest.raises(AufoldError, match=re.escape(f"looked for {tmp_path / 'test.jsonl'}")):
        get_task("generic").load("test", tmp_path)


# --- errors ----------------------------------------------------------------------

def test_unknown_task_lists_the_known_ones() -> None:
    with pytest.raises(AufoldError) as raised:
        get_task("copa2")
    message = str(raised.value)
    assert "'copa2'" in message
    for name in (*BENCHMARK_NAMES, "generic"):
        assert name in message
    assert task_names() == [*BENCHMARK_NAMES, "generic"]


def test_unknown_split() -> None:
    with pytest.raises(AufoldError, match="unknown split 'train'; choose one of pairs, tune, test"):
        get_task("boolq").load("train", Path("."))


def test_missing_data_file_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(AufoldError) as raised:
        get_task("winogrande").load("pairs", tmp_path)
    message = str(raised.value)
    assert "winogrande/dev_reconstructed.jsonl" in message
    assert str(tmp_path / "winogrande" / "dev_reconstructed.jsonl") in message


def test_missing_data_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(AufoldError, match=re.escape(f"data folder {missing} does not exist")):
        get_task("mawps").load("test", missing)


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    # A short file must not silently yield a smaller split.
    (tmp_path / "boolq").mkdir()
    record = {"question": "q", "passage": "p", "idx": 0, "label": "true"}
    _write_jsonl(tmp_path / "boolq" / "val.jsonl", [json.dumps(record)] * 5)
    with pytest.raises(AufoldError, match="expected 1000 items"):
        get_task("boolq").load("pairs", tmp_path)


# --- chat template ---------------------------------------------------------------

def _tiny_tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tokenizer.chat_template = chat_template
    return tokenizer


def test_chat_prompt_wraps_one_user_message() -> None:
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
                "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    wrapped = chat_prompt(_tiny_tokenizer(template), "Question:\nWhy?")
    assert wrapped == "<|user|>Question:\nWhy?<|end|><|assistant|>"


def test_chat_prompt_without_a_template() -> None:
    with pytest.raises(AufoldError, match="has no chat template"):
        chat_prompt(_tiny_tokenizer(None), "Hi")
