"""The five benchmarks of the AUSteer paper, as data: files, fixed splits, templates.

``data_dir`` for these tasks is the shared data root, the folder that holds
``copa/``, ``boolq/``, ``winogrande/``, ``svamp/`` and ``mawps/``. Split sizes and
ranges are those of the data README; item positions count from 1 in file order.
"""

from __future__ import annotations

from aufold.tasks import templates
from aufold.tasks.benchmark import BenchmarkTask, Split
from aufold.tasks.copa_xml import read_copa_xml
from aufold.tasks.files import Record, read_json_list
from aufold.tasks.item import Item
from aufold.tasks.numbers import format_number

LETTERS = ("A", "B")
YES_NO = (" yes", " no")


def _copa_item(record: Record, number: int) -> Item:
    # Some XML texts carry a stray trailing space; stripping keeps the template's
    # own spacing exact for every item.
    fields = {key: record[key].strip() for key in ("premise", "choice1", "choice2", "question")}
    return Item(prompt=templates.COPA.format(**fields), choices=LETTERS,
                answer={0: "A", 1: "B"}[int(record["label"])], answer_value=None,
                id=f"copa-{record['idx']}")


def _boolq_item(record: Record, number: int) -> Item:
    label = str(record["label"]).lower()
    if label not in ("true", "false"):
        raise ValueError(f"label must be true or false, got {record['label']!r}")
    return Item(prompt=templates.BOOLQ.format(passage=record["passage"],
                                              question=record["question"]),
                choices=YES_NO, answer=YES_NO[0] if label == "true" else YES_NO[1],
                answer_value=None, id=f"boolq-{record['idx']}")


def _winogrande_item(record: Record, number: int) -> Item:
    # The rebuilt dev file has no ids, so the line number names the item.
    answer = {"1": "A", "2": "B"}[str(record["answer"])]
    return Item(prompt=templates.WINOGRANDE.format(sentence=record["sentence"],
                                                   option1=record["option1"],
                                                   option2=record["option2"]),
                choices=LETTERS, answer=answer, answer_value=None,
                id=f"winogrande-{number}")


def _svamp_item(record: Record, number: int) -> Item:
    value = float(record["Answer"])
    return Item(prompt=templates.SVAMP.format(Body=record["Body"], Question=record["Question"]),
                choices=(), answer=format_number(value), answer_value=value,
                id=f"svamp-{record['ID']}")


def _mawps_item(record: Record, number: int) -> Item:
    # Some answers are stored as strings ("12", "523.0"); float() reads both kinds.
    value = float(record["ans"])
    return Item(prompt=templates.MAWPS.format(question=record["original_text"]),
                choices=(), answer=format_number(value), answer_value=value,
                id=f"mawps-{record['id']}")


COPA = BenchmarkTask(
    name="copa", kind="choice", build_item=_copa_item,
    splits={
        # XML ids 1-500 are the original dev set, 1001-1500 their mirrored twins;
        # ids 401-500 are held out for tuning, and their twins 1401-1500 are dropped.
        "pairs": Split("copa/balacopa-dev-all.xml", 800, ids=((1, 400), (1001, 1400)),
                       read=read_copa_xml),
        "tune": Split("copa/balacopa-dev-all.xml", 100, ids=((401, 500),), read=read_copa_xml),
        "test": Split("copa/derived_copa_test_500.jsonl", 500),
    },
)

BOOLQ = BenchmarkTask(
    name="boolq", kind="choice", build_item=_boolq_item,
    splits={
        "pairs": Split("boolq/val.jsonl", 1000, rows=(1, 1000)),
        "tune": Split("boolq/val.jsonl", 100, rows=(1001, 1100)),
        "test": Split("boolq/val.jsonl", 2170, rows=(1101, 3270)),
    },
)

WINOGRANDE = BenchmarkTask(
    name="winogrande", kind="choice", build_item=_winogrande_item,
    splits={
        "pairs": Split("winogrande/dev_reconstructed.jsonl", 500, rows=(1, 500)),
        "tune": Split("winogrande/dev_reconstructed.jsonl", 100, rows=(501, 600)),
        "test": Split("winogrande/dev_reconstructed.jsonl", 667, rows=(601, 1267)),
    },
)

SVAMP = BenchmarkTask(
    name="svamp", kind="math", build_item=_svamp_item,
    splits={
        "pairs": Split("svamp/SVAMP.json", 600, rows=(1, 600), read=read_json_list),
        "tune": Split("svamp/SVAMP.json", 100, rows=(601, 700), read=read_json_list),
        "test": Split("svamp/SVAMP.json", 300, rows=(701, 1000), read=read_json_list),
    },
)

MAWPS = BenchmarkTask(
    name="mawps", kind="math", build_item=_mawps_item,
    splits={
        "pairs": Split("mawps/trainset.json", 1000, rows=(1, 1000), read=read_json_list),
        "tune": Split("mawps/validset.json", 100, rows=(1, 100), read=read_json_list),
        "test": Split("mawps/testset.json", 238, read=read_json_list),
    },
)

BENCHMARKS: tuple[BenchmarkTask, ...] = (COPA, BOOLQ, WINOGRANDE, SVAMP, MAWPS)
