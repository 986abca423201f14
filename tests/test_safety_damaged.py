"""Damaged input of every kind ends in one line, exit code 2, nothing written, inputs unchanged:
plans, pairs and task files, GGUF and safetensors files, indexes, disks, devices.

The last tests are property-based: hypothesis damages a valid plan or pairs file at random
(every mutation is one that no valid file survives) and the command line must still refuse
it cleanly.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from edit_helpers import assert_one_line_error, random_plan, run_cli, tree_digest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from tiny_models import save_tiny_model, tiny_model

from aufold.checkpoint import INDEX_FILE
from aufold.pairs import ContrastivePair, write_pairs
from aufold.plan import SiteCounts

PAIRS = [ContrastivePair(f"{a} plus 2 is", f" {a + 2}", f" {a + 3}") for a in range(6)]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("damaged")
    save_tiny_model("llama", root / "model")
    random_plan(tiny_model("llama"), num_pairs=10).save(root / "plan")
    write_pairs(PAIRS, root / "pairs.jsonl")
    return root


def _refused(world: Path, args: list[object], *words: str) -> None:
    before = tree_digest(world)
    assert_one_line_error(run_cli(*args), *words)
    assert tree_digest(world) == before


def _export(world: Path, model: Path, plan: Path) -> list[object]:
    return ["export", model, "--plan", plan, "--k", "4", "--alpha", "2", "--out", world / "out"]


# --- plans ---------------------------------------------------------------------------------

PLAN_DAMAGE = {
    "no-model": (lambda m: m.pop("model"), "has no 'model'"),
    "no-sites": (lambda m: m.pop("sites"), "has no 'sites'"),
    "sites-not-a-list": (lambda m: m.update(sites="head"), "'sites' in plan.json must be a list"),
    "unknown-site": (lambda m: m.update(sites=["head", "bogus"]), "unknown site 'bogus'"),
    "zero-pairs": (lambda m: m.update(num_pairs=0), "num_pairs must be at least 1"),
    "fractional-pairs": (lambda m: m.update(num_pairs=7.5), "'num_pairs' in plan.json must be a int"),
    "string-pairs": (lambda m: m.update(num_pairs="10"), "must be a int"),
    "bool-pairs": (lambda m: m.update(num_pairs=True), "must be a int"),
    "shape-mismatch": (lambda m: m["shapes"].update(head=[1, 1]), "gives site head the shape"),
    "settings-list": (lambda m: m.update(settings=[]), "'settings' in plan.json must be an object"),
}


@pytest.mark.parametrize("damage", list(PLAN_DAMAGE))
def test_a_damaged_plan_json_is_refused(world: Path, tmp_path: Path, damage: str) -> None:
    plan = shutil.copytree(world / "plan", tmp_path / "plan")
    meta = json.loads((plan / "plan.json").read_text())
    mutate, message = PLAN_DAMAGE[damage]
    mutate(meta)
    (plan / "plan.json").write_text(json.dumps(meta))
    _refused(tmp_path, _export(tmp_path, world / "model", plan), "is damaged", message)


@pytest.mark.parametrize(("content", "message"), [
    (b"\xff\xfe{}", "not readable JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b"{", "not readable JSON"),
])
def test_an_unreadable_plan_json_is_refused(world: Path, tmp_path: Path, content: bytes,
                                            message: str) -> None:
    plan = shutil.copytree(world / "plan", tmp_path / "plan")
    (plan / "plan.json").write_bytes(content)
    _refused(tmp_path, _export(tmp_path, world / "model", plan), message)


@pytest.mark.parametrize("keep", [0, 7, 100, -1])
def test_a_truncated_counts_file_is_refused(world: Path, tmp_path: Path, keep: int) -> None:
    plan = shutil.copytree(world / "plan", tmp_path / "plan")
    data = (plan / "counts.safetensors").read_bytes()
    (plan / "counts.safetensors").write_bytes(data[:keep])
    _refused(tmp_path, _export(tmp_path, world / "model", plan), "counts.safetensors is not readable")


def test_counts_of_the_wrong_dtype_or_rank_are_refused(world: Path, tmp_path: Path) -> None:
    for name, change, message in (("float", lambda t: t.float(), "2-D int64"),
                                  ("flat", lambda t: t.flatten(), "2-D int64")):
        plan = shutil.copytree(world / "plan", tmp_path / name)
        tensors = load_file(plan / "counts.safetensors")
        tensors["head.positive"] = change(tensors["head.positive"])
        save_file(tensors, plan / "counts.safetensors")
        _refused(tmp_path, _export(tmp_path, world / "model", plan), message)


# --- pairs and task files ------------------------------------------------------------------

def test_a_pairs_file_that_is_not_utf8_is_refused_with_its_line(world: Path, tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_bytes(b'{"prompt": "a", "positive": " b", "negative": " c"}\n{"prompt": "\xe9t\xe9"}\n')
    _refused(tmp_path, ["localize", world / "model", "--pairs", pairs, "--site", "head",
                        "--out", tmp_path / "plan"], "line 2: not UTF-8")


@pytest.mark.parametrize("split", ["pairs", "tune", "test"])
def test_a_task_file_that_is_not_utf8_is_refused(world: Path, tmp_path: Path, split: str) -> None:
    data = tmp_path / "data"
    data.mkdir()
    good = '{"prompt": "2 + 2 =", "choices": [" 4", " 5"], "answer": " 4"}\n'
    for name in ("pairs", "tune", "test"):
        (data / f"{name}.jsonl").write_text(good * 3)
    (data / f"{split}.jsonl").write_bytes(good.encode() + b'{"prompt": "caf\xe9"}\n')
    if split == "pairs":
        args = ["localize", world / "model", "--task", "generic", "--data-dir", data, "--site", "head",
                "--out", tmp_path / "plan"]
    else:
        args = ["eval", world / "model", "--task", "generic", "--data-dir", data, "--split", split]
    _refused(tmp_path, args, "line 2: not UTF-8")


# --- weights -------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [4, 20, 300, -100])
def test_a_truncated_gguf_file_is_refused(world: Path, tmp_path: Path, keep: int) -> None:
    """A GGUF header written by the gguf package itself, cut short."""
    from gguf import GGUFWriter

    full = tmp_path / "full.gguf"
    writer = GGUFWriter(str(full), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", tiny_model("llama").model.embed_tokens.weight.detach().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    cut = tmp_path / "model.gguf"
    cut.write_bytes(full.read_bytes()[:keep])
    full.unlink()
    for args in (["localize", cut, "--pairs", world / "pairs.jsonl", "--site", "head", "--out",
                  tmp_path / "plan"],
                 ["export", cut, "--plan", world / "plan", "--k", "4", "--alpha", "1",
                  "--format", "gguf", "--out", tmp_path / "out"]):
        _refused(tmp_path, args, "GGUF")


def _damaged_copy(world: Path, tmp_path: Path) -> Path:
    return shutil.copytree(world / "model", tmp_path / "model")


@pytest.mark.parametrize("command", ["localize", "export", "eval", "generate"])
def test_a_truncated_safetensors_file_is_refused(world: Path, tmp_path: Path, command: str) -> None:
    model = _damaged_copy(world, tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    args = {
        "localize": ["localize", model, "--pairs", world / "pairs.jsonl", "--site", "head",
                     "--out", tmp_path / "plan"],
        "export": _export(tmp_path, model, world / "plan"),
        "eval": ["eval", model, "--task", "copa", "--limit", "2"],
        "generate": ["generate", model, "--plan", world / "plan", "--k", "2", "--alpha", "1",
                     "--prompt", "hi"],
    }[command]
    _refused(tmp_path, args, "not a valid safetensors file")


def _sharded(world: Path, tmp_path: Path) -> Path:
    """The tiny model split into two shards with an index."""
    model = _damaged_copy(world, tmp_path)
    tensors = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, members in halves.items():
        save_file({n: tensors[n] for n in members}, model / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in members})
    (model / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return model


@pytest.mark.parametrize(("damage", "message"), [
    ("outside", "names a shard outside the folder"),
    ("unlisted", "which model.safetensors.index.json does not list"),
    ("misplaced", "which does not hold it"),
    ("missing", "is missing from"),
])
@pytest.mark.parametrize("command", ["localize", "export"])
def test_an_inconsistent_index_is_refused(world: Path, tmp_path: Path, damage: str, message: str,
                                          command: str) -> None:
    model = _sharded(world, tmp_path)
    index = json.loads((model / INDEX_FILE).read_text())
    weight_map = index["weight_map"]
    first = sorted(weight_map)[0]
    if damage == "outside":
        shutil.copy(model / weight_map[first], tmp_path / "elsewhere.safetensors")
        weight_map[first] = "../elsewhere.safetensors"
    elif damage == "unlisted":
        del weight_map[first]
    elif damage == "misplaced":
        weight_map[first] = next(f for f in weight_map.values() if f != weight_map[first])
    else:
        (model / weight_map[first]).unlink()
    (model / INDEX_FILE).write_text(json.dumps(index))
    args = (["localize", model, "--pairs", world / "pairs.jsonl", "--site", "head", "--out",
             tmp_path / "plan"] if command == "localize" else _export(tmp_path, model, world / "plan"))
    _refused(tmp_path, args, message)


# --- disks and devices ---------------------------------------------------------------------

@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_full_or_read_only_disk_at_localize_is_one_line(world: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          code: int) -> None:
    import aufold.plan

    def fail(*_args: object, **_kwargs: object) -> None:
        raise OSError(code, f"simulated {errno.errorcode[code]}")

    monkeypatch.setattr(aufold.plan, "save_file", fail)
    _refused(tmp_path, ["localize", world / "model", "--pairs", world / "pairs.jsonl", "--site",
                        "head", "--out", tmp_path / "plan"], "cannot write", "nothing was written")


def test_an_output_folder_that_cannot_be_created_is_one_line(world: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    _refused(tmp_path, ["localize", world / "model", "--pairs", world / "pairs.jsonl", "--site", "head",
                        "--out", blocker / "plan"], "cannot write")


@pytest.mark.parametrize("device", ["bogus", "cuda", "cuda:7", "mps", ""])
def test_an_unknown_or_missing_device_is_one_line(world: Path, tmp_path: Path, device: str) -> None:
    _refused(tmp_path, ["localize", world / "model", "--pairs", world / "pairs.jsonl", "--site", "head",
                        "--out", tmp_path / "plan", "--device", device], f"device {device!r}")


# --- property-based: random damage ---------------------------------------------------------

WRONG_VALUES = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False), st.text(max_size=5),
                         st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2),
                                                                             st.integers(), max_size=2))


@st.composite
def damaged_plans(draw: st.DrawFn) -> tuple[str, object]:
    """One mutation of a valid plan that no valid plan survives."""
    kind = draw(st.sampled_from(["drop-key", "wrong-type", "bad-pairs", "bad-site", "truncate",
                                 "bytes", "count"]))
    if kind == "drop-key":
        return kind, draw(st.sampled_from(["model", "fingerprint", "aufold_version", "sites",
                                           "num_pairs"]))
    if kind == "wrong-type":
        key = draw(st.sampled_from(["model", "fingerprint", "sites", "num_pairs"]))
        wrong = {"num_pairs": WRONG_VALUES.filter(lambda v: not isinstance(v, int) or isinstance(v, bool)),
                 "sites": WRONG_VALUES.filter(lambda v: not isinstance(v, list) or v != ["head", "mlp", "mlp-out"]),
                 }.get(key, WRONG_VALUES.filter(lambda v: not isinstance(v, str)))
        value = draw(wrong)
        if key == "sites" and isinstance(value, list):
            value = [*value, "bogus"]  # any list with a non-site is wrong
        return kind, (key, value)
    if kind == "bad-pairs":
        return kind, draw(st.integers(max_value=0))
    if kind == "bad-site":
        return kind, draw(st.text(min_size=1, max_size=8).filter(
            lambda s: s not in ("head", "mlp", "mlp-out", "residual")))
    if kind == "truncate":
        return kind, draw(st.floats(min_value=0.0, max_value=0.99))
    if kind == "bytes":
        return kind, draw(st.binary(max_size=64).filter(lambda b: not b.strip().startswith(b"{")))
    return kind, (draw(st.sampled_from(["positive", "negative"])), draw(st.one_of(
        st.integers(min_value=11, max_value=2**63 - 1), st.integers(min_value=-2**63, max_value=-1))))


def _apply(plan: Path, damage: tuple[str, object]) -> None:
    kind, value = damage
    meta_path, counts_path = plan / "plan.json", plan / "counts.safetensors"
    meta = json.loads(meta_path.read_text())
    if kind == "drop-key":
        del meta[value]  # type: ignore[arg-type]
    elif kind == "wrong-type":
        key, wrong = value  # type: ignore[misc]
        meta[key] = wrong
    elif kind == "bad-pairs":
        meta["num_pairs"] = value
    elif kind == "bad-site":
        meta["sites"] = [*meta["sites"], value]
    elif kind == "truncate":
        data = counts_path.read_bytes()
        counts_path.write_bytes(data[:int(len(data) * value)])  # type: ignore[operator]
    elif kind == "bytes":
        meta_path.write_bytes(value)  # type: ignore[arg-type]
        return
    else:
        sign, count = value  # type: ignore[misc]
        tensors = load_file(counts_path)
        tensors[f"mlp.{sign}"][0, 0] = count
        save_file(tensors, counts_path)
    meta_path.write_text(json.dumps(meta))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage=damaged_plans())
def test_any_damaged_plan_is_refused_cleanly(world: Path, tmp_path: Path, damage: tuple[str, object]) -> None:
    case = tmp_path / "case"
    shutil.rmtree(case, ignore_errors=True)
    plan = shutil.copytree(world / "plan", case / "plan")
    _apply(plan, damage)
    _refused(case, _export(case, world / "model", plan))
    _refused(case, ["eval", world / "model", "--task", "copa", "--plan", plan, "--k", "2",
                    "--alpha", "1", "--report", case / "r.json"])


PAIR_KEYS = ("prompt", "positive", "negative")


@st.composite
def damaged_pairs(draw: st.DrawFn) -> bytes:
    """A valid pairs file with one line broken in a way no valid file allows."""
    records = [{"prompt": p.prompt, "positive": p.positive, "negative": p.negative} for p in PAIRS]
    lines = [json.dumps(r).encode() for r in records]
    index = draw(st.integers(0, len(lines) - 1))
    kind = draw(st.sampled_from(["not-utf8", "cut", "drop-key", "wrong-type", "same", "not-object",
                                 "empty"]))
    record = dict(records[index])
    if kind == "not-utf8":
        lines[index] = lines[index][:-2] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xe9"])) + b'"}'
    elif kind == "cut":
        lines[index] = lines[index][:draw(st.integers(1, len(lines[index]) - 1))]
    elif kind == "drop-key":
        del record[draw(st.sampled_from(PAIR_KEYS))]
        lines[index] = json.dumps(record).encode()
    elif kind == "wrong-type":
        record[draw(st.sampled_from(PAIR_KEYS))] = draw(WRONG_VALUES.filter(lambda v: not isinstance(v, str)))
        lines[index] = json.dumps(record).encode()
    elif kind == "same":
        record["negative"] = record["positive"]
        lines[index] = json.dumps(record).encode()
    elif kind == "not-object":
        lines[index] = json.dumps(draw(st.lists(st.integers(), max_size=3))).encode()
    else:
        lines = [b" "] * draw(st.integers(0, 3))
    return b"\n".join(lines) + b"\n"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=damaged_pairs())
def test_any_damaged_pairs_file_is_refused_cleanly(world: Path, tmp_path: Path, content: bytes) -> None:
    case = tmp_path / "case"
    shutil.rmtree(case, ignore_errors=True)
    case.mkdir()
    (case / "pairs.jsonl").write_bytes(content)
    _refused(case, ["localize", world / "model", "--pairs", case / "pairs.jsonl", "--site", "head",
                    "--out", case / "plan"])


# --- reproductions of a hostile review (aufold's own helper, 410 trials) -------------------

def test_more_damaged_inputs_are_one_line(world: Path, tmp_path: Path) -> None:
    model = _damaged_copy(world, tmp_path)
    (model / "tokenizer.json").write_text("{not json")
    _refused(tmp_path, ["localize", model, "--pairs", world / "pairs.jsonl", "--site", "head",
                        "--out", tmp_path / "plan"], "tokenizer")
    plan = shutil.copytree(world / "plan", tmp_path / "nested")
    meta = json.loads((plan / "plan.json").read_text())
    meta["sites"] = [["head"], "mlp"]
    (plan / "plan.json").write_text(json.dumps(meta))
    _refused(tmp_path, _export(tmp_path, world / "model", plan), "list of site names")
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100000 + "]" * 100000 + "\n")
    _refused(tmp_path, ["localize", world / "model", "--pairs", deep, "--site", "head", "--out",
                        tmp_path / "p"], "nested too deeply")
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text('{"prompt": "a \\ud800 b", "positive": " c", "negative": " d"}\n')
    _refused(tmp_path, ["localize", world / "model", "--pairs", surrogate, "--site", "head", "--out",
                        tmp_path / "p"], "lone surrogate")
    for prompt in ("", "   "):
        _refused(tmp_path, ["generate", world / "model", "--plan", world / "plan", "--k", "2", "--alpha",
                            "1", "--prompt", prompt], "--prompt is empty")
    tuned = tmp_path / "tune.json"
    tuned.write_text('{"format": "aufold-tune", "plan": "plan", "best": {"k": 1e400, "alpha": 1, '
                     '"site": "head"}}')
    _refused(tmp_path, ["export", world / "model", "--tuned", tuned, "--out", tmp_path / "o"],
             "is not a tune result")
    tuned.write_text('{"format": "aufold-tune", "plan": "plan", "best": {"k": 2.9, "alpha": 1, '
                     '"site": "head"}}')
    _refused(tmp_path, ["export", world / "model", "--tuned", tuned, "--out", tmp_path / "o"],
             "k must be an integer")


def test_a_checkpoint_whose_weights_do_not_match_its_config_is_refused(world: Path, tmp_path: Path) -> None:
    for layers, what in ((4, "missing"), (2, "left unused")):
        model = shutil.copytree(world / "model", tmp_path / f"m{layers}")
        config = json.loads((model / "config.json").read_text())
        config["num_hidden_layers"] = layers
        (model / "config.json").write_text(json.dumps(config))
        _refused(tmp_path, ["localize", model, "--pairs", world / "pairs.jsonl", "--site", "head",
                            "--out", tmp_path / "plan"], "do not match its config.json", what)


def test_counts_that_would_overflow_their_sum_are_refused(world: Path, tmp_path: Path) -> None:
    plan = shutil.copytree(world / "plan", tmp_path / "plan")
    tensors = load_file(plan / "counts.safetensors")
    tensors["head.positive"][0, 0] = 2**62
    tensors["head.negative"][0, 0] = 2**62
    save_file(tensors, plan / "counts.safetensors")
    _refused(tmp_path, _export(tmp_path, world / "model", plan), "more than the plan's num_pairs")


def test_a_steered_unit_beyond_the_model_is_refused_in_hook_mode(world: Path, tmp_path: Path) -> None:
    from aufold.plan import Plan

    plan = Plan.load(world / "plan")
    wide = {site: SiteCounts(torch.cat([c.positive, c.positive * 0 + 10], dim=1),
                             torch.cat([c.negative, c.negative * 0], dim=1))
            for site, c in plan.counts.items()}
    Plan(plan.model, plan.fingerprint, plan.num_pairs, wide).save(tmp_path / "wide")
    _refused(tmp_path, ["generate", world / "model", "--plan", tmp_path / "wide", "--k", "1000",
                        "--alpha", "1", "--prompt", "hi"], "the plan was made for another model")


@pytest.mark.parametrize("device", ["meta"])
def test_the_meta_device_is_one_line(world: Path, tmp_path: Path, device: str) -> None:
    _refused(tmp_path, ["localize", world / "model", "--pairs", world / "pairs.jsonl", "--site", "head",
                        "--out", tmp_path / "plan", "--device", device], "meta device")
    _refused(tmp_path, ["localize", world / "model", "--pairs", world / "pairs.jsonl", "--site", "head",
                        "--out", tmp_path / "plan", "--device-map", "cuda"], "device 'cuda'")
