"""Layer streaming: localization one decoder layer at a time equals the in-memory localization.

The specification: the same counts, unit for unit (the batches, prompt sharing and
tie rule are the in-memory localization's own, so on one device they agree
bitwise), on every tiny architecture and on SmolLM2, with the hidden states in
memory or spilled to a file; never more than one decoder layer in memory; the
LM head never read; shards and merge-counts as before; bad input refused in one
line with nothing left behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from edit_helpers import assert_one_line_error, run_cli, tree_digest
from test_localize import _varied_pairs
from test_shards import assert_same_counts
from tiny_models import ARCHITECTURES, MOE_ARCHITECTURES, save_tiny_model, tiny_model, tiny_tokenizer

from aufold.errors import AufoldError
from aufold.layerwise import LayerwiseModel, streaming_choice
from aufold.layerwise import hidden as hidden_module
from aufold.layerwise.forward import LayerRunner
from aufold.layerwise.localize import localize_layerwise
from aufold.localize import localize
from aufold.pairs import ContrastivePair, write_pairs
from aufold.plan import Plan
from aufold.shards import localize_shard, merge_counts
from aufold.sites import architecture_for
from aufold.source import smollm2_gguf_path

DENSE_SITES = ("head", "mlp", "mlp-out", "residual")
MOE_SITES = DENSE_SITES  # an experts block's neurons (mlp) and output (mlp-out) stream too


def _pairs() -> list[ContrastivePair]:
    # Shared prompts of varied lengths, and pairs that run as two full texts (empty prompt).
    pairs = _varied_pairs(13)
    pairs += [ContrastivePair("", f"full text {i} one", f"other text {i} two three") for i in range(3)]
    return pairs


def _sites(model_type: str) -> tuple[str, ...]:
    return MOE_SITES if model_type in MOE_ARCHITECTURES else DENSE_SITES


@pytest.mark.parametrize("model_type", ARCHITECTURES + MOE_ARCHITECTURES)
def test_counts_equal_the_in_memory_localization(model_type: str, tmp_path: Path) -> None:
    folder = save_tiny_model(model_type, tmp_path / "model")
    tokenizer, pairs, sites = tiny_tokenizer(), _pairs(), _sites(model_type)
    want = localize(tiny_model(model_type), tokenizer, pairs, sites, batch_size=4, progress=False,
                    model_id="m")
    got = localize_layerwise(LayerwiseModel(folder), tokenizer, pairs, sites, batch_size=4,
                             progress=False, model_id="m")
    assert_same_counts(got, want)
    assert got.fingerprint == want.fingerprint and got.settings == want.settings
    assert got.settings["full_text_pairs"] == 3


def test_a_model_that_reads_cached_answers_otherwise_streams_whole_texts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MPT's ALiBi counts the padding between a prompt and its answers as distance, so the
    in-memory probe runs its pairs as whole texts. The streamed pass carries the same probe
    along, finds the same, and counts again from whole texts: the plans agree. Trusting the
    shared prompts instead would change 47 head and 265 mlp counts of this model."""
    import conformance

    import aufold.layerwise.localize as layerwise_localize
    from aufold.localize import prompt_cache_works

    model, tokenizer, pairs = conformance.tiny("mpt"), tiny_tokenizer(), _pairs()
    assert not prompt_cache_works(model)
    folder = tmp_path / "mpt"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    want = localize(model, tokenizer, pairs, ("head", "mlp"), batch_size=4, progress=False,
                    model_id="m")
    got = localize_layerwise(LayerwiseModel(folder), tokenizer, pairs, ("head", "mlp"),
                             batch_size=4, progress=False, model_id="m")
    assert_same_counts(got, want)
    assert got.settings == want.settings and got.settings["full_text_pairs"] == len(pairs)

    monkeypatch.setattr(layerwise_localize, "same_reading", lambda *_: True)
    trusting = localize_layerwise(LayerwiseModel(folder), tokenizer, pairs, ("head", "mlp"),
                                  batch_size=4, progress=False, model_id="m")
    assert trusting.settings["full_text_pairs"] == 3
    assert not torch.equal(trusting.counts["mlp"].positive, want.counts["mlp"].positive)


def test_bfloat16_checkpoint_and_spilled_hidden_states(tmp_path: Path) -> None:
    folder = save_tiny_model("gemma3_text", tmp_path / "model", dtype=torch.bfloat16)
    work = tmp_path / "work"
    work.mkdir()
    tokenizer, pairs = tiny_tokenizer(), _pairs()
    want = localize(tiny_model("gemma3_text", dtype=torch.bfloat16), tokenizer, pairs, DENSE_SITES,
                    batch_size=5, progress=False)
    lm = LayerwiseModel(folder, work_dir=work)
    lm.spill = True
    got = localize_layerwise(lm, tokenizer, pairs, DENSE_SITES, batch_size=5, progress=False)
    assert_same_counts(got, want)
    assert got.settings["dtype"] == "bfloat16"
    assert list(work.iterdir()) == []  # the spill file is gone


def test_one_layer_in_memory_and_no_lm_head(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = save_tiny_model("mistral", tmp_path / "model")  # untied LM head
    lm = LayerwiseModel(folder)
    loaded_layers: list[int] = []
    run = LayerRunner.run

    def watched(self: LayerRunner, *args: object, **kwargs: object) -> torch.Tensor:
        loaded_layers.append(sum(any(not p.is_meta for p in layer.parameters())
                                 for layer in lm.layers))
        assert lm.model.get_output_embeddings().weight.is_meta
        return run(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(LayerRunner, "run", watched)
    localize_layerwise(lm, tiny_tokenizer(), _pairs(), ("mlp",), batch_size=4, progress=False)
    assert loaded_layers and max(loaded_layers) == 1
    assert all(p.is_meta for p in lm.model.parameters())  # everything unloaded afterwards


def test_shards_merge_to_the_whole(tmp_path: Path) -> None:
    folder = save_tiny_model("qwen3", tmp_path / "model")
    tokenizer, pairs = tiny_tokenizer(), _pairs()
    lm = LayerwiseModel(folder)
    whole = localize_layerwise(lm, tokenizer, pairs, ("head", "mlp"), batch_size=4, progress=False)
    parts = [localize_shard(lm, tokenizer, pairs, ("head", "mlp"), index=i, count=2, batch_size=4,
                            progress=False) for i in (1, 0)]
    assert_same_counts(merge_counts(parts), whole)


def test_smollm2_counts_equal_the_in_memory_localization(smollm2_dir: Path, smollm2) -> None:  # type: ignore[no-untyped-def]
    from aufold.tasks import read_pairs_or_task

    model, tokenizer = smollm2
    pairs = read_pairs_or_task(None, "copa", None, limit=24)
    want = localize(model, tokenizer, pairs, ("head", "mlp", "mlp-out"), batch_size=8,
                    progress=False)
    got = localize_layerwise(LayerwiseModel(smollm2_dir), tokenizer, pairs, ("head", "mlp", "mlp-out"),
                             batch_size=8, progress=False)
    assert_same_counts(got, want)
    assert got.ranking(k=100) == want.ranking(k=100)


def test_cli_streams_when_asked_and_equals_the_in_memory_plan(tmp_path: Path) -> None:
    folder = save_tiny_model("llama", tmp_path / "model")
    pairs = tmp_path / "pairs.jsonl"
    write_pairs(_pairs(), pairs)
    before = tree_digest(folder)
    for name, flags in (("memory", ()), ("stream", ("--layer-streaming",))):
        result = run_cli("localize", folder, "--pairs", pairs, "--site", "head", "--site", "mlp",
                         "--batch-size", 4, "--out", tmp_path / name, *flags)
        assert result.exit_code == 0, result.output
    assert "layer streaming, as asked" in result.output
    assert_same_counts(Plan.load(tmp_path / "stream"), Plan.load(tmp_path / "memory"))
    assert tree_digest(folder) == before


def test_streams_by_itself_when_the_weights_do_not_fit(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    folder = save_tiny_model("llama", tmp_path / "model")
    assert streaming_choice(str(folder), requested=False).folder is None
    monkeypatch.setattr("aufold.layerwise.available_memory", lambda: 1000)
    choice = streaming_choice(str(folder), requested=False)
    assert choice.folder == folder.resolve() and "of memory is available" in choice.reason
    # A dtype conversion counts: float32 weights that do not fit can fit as bfloat16.
    weights = (folder / "model.safetensors").stat().st_size
    monkeypatch.setattr("aufold.layerwise.available_memory",
                        lambda: hidden_module.MARGIN_BYTES + weights * 3 // 4)
    assert streaming_choice(str(folder), requested=False, dtype="bfloat16").folder is None
    assert streaming_choice(str(folder), requested=False, dtype="float32").folder is not None


# --- bad input ---------------------------------------------------------------------------------


def test_refusals_in_one_line(tmp_path: Path) -> None:
    folder = save_tiny_model("llama", tmp_path / "model")
    pairs = tmp_path / "pairs.jsonl"
    write_pairs(_pairs(), pairs)
    out = tmp_path / "plan"
    base = ("localize", "--pairs", pairs, "--site", "head", "--out", out)
    cases = [
        ((folder, "--layer-streaming", "--device-map", "auto"), ("--device-map",)),
        ((smollm2_gguf_path(), "--layer-streaming"), ("GGUF",)),
        ((folder, "--work-dir", tmp_path), ("--layer-streaming",)),
    ]
    for args, words in cases:
        result = run_cli(*base[:1], *args, *base[1:])
        assert_one_line_error(result, *words)
        assert not out.exists()
    pickled = tmp_path / "pickled"
    shutil.copytree(folder, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save({}, pickled / "pytorch_model.bin")
    result = run_cli("localize", pickled, *base[1:], "--layer-streaming")
    assert_one_line_error(result, "pickle")
    result = run_cli("localize", pickled, *base[1:], "--layer-streaming", "--allow-pickle")
    assert_one_line_error(result, "pickle weights only", "convert", "drop --layer-streaming")
    assert not out.exists()


def test_missing_shard_and_missing_layer_weights(tmp_path: Path) -> None:
    folder = save_tiny_model("llama", tmp_path / "model")
    pairs = tmp_path / "pairs.jsonl"
    write_pairs(_pairs(), pairs)
    sharded = tmp_path / "sharded"
    tiny_model("llama").save_pretrained(sharded, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(sharded)
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.unlink()
    result = run_cli("localize", sharded, "--pairs", pairs, "--site", "head", "--out",
                     tmp_path / "plan", "--layer-streaming")
    assert_one_line_error(result, shard.name, "missing")
    assert not (tmp_path / "plan").exists()

    # Layers that do not hold what config.json describes are refused before any layer runs:
    # a tensor missing, and a config that names more layers than the weights have.
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.2.mlp.down_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AufoldError, match="decoder layer 2 with"):
        LayerwiseModel(folder)
    deeper = save_tiny_model("llama", tmp_path / "deeper")
    config = json.loads((deeper / "config.json").read_text())
    config["num_hidden_layers"] = 5
    (deeper / "config.json").write_text(json.dumps(config))
    with pytest.raises(AufoldError, match="decoder layer 3 .* has no weights for it"):
        LayerwiseModel(deeper)
    config["num_hidden_layers"] = 2
    (deeper / "config.json").write_text(json.dumps(config))
    with pytest.raises(AufoldError, match=r"holds model\.layers\.2\..*beyond the 2 layers"):
        LayerwiseModel(deeper)


def test_work_dir_checked_before_the_first_layer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = save_tiny_model("llama", tmp_path / "model")
    lm = LayerwiseModel(folder)
    pairs = _pairs()
    monkeypatch.setattr(hidden_module, "available_memory", lambda: 10)
    with pytest.raises(AufoldError, match=r"--work-dir DIR on a disk with"):
        localize_layerwise(lm, tiny_tokenizer(), pairs, ("head",), progress=False)

    class Usage:
        free = 100

    work = tmp_path / "work"
    work.mkdir()
    started = []
    monkeypatch.setattr(LayerRunner, "run", lambda *a, **k: started.append(1))
    with monkeypatch.context() as patch:
        patch.setattr(hidden_module.shutil, "disk_usage", lambda _path: Usage())
        lm.work_dir = work
        with pytest.raises(AufoldError, match=r"has 0\.0 MB free, but the hidden states need"):
            localize_layerwise(lm, tiny_tokenizer(), pairs, ("head",), progress=False)
    lm.work_dir = tmp_path / "absent"
    with pytest.raises(AufoldError, match="not a folder"):
        localize_layerwise(lm, tiny_tokenizer(), pairs, ("head",), progress=False)
    # A disk that cannot hold the reservation: refused in one line, no file left behind.
    lm.work_dir = work

    def no_space(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hidden_module.os, "posix_fallocate", no_space)
    with pytest.raises(AufoldError, match=r"cannot reserve .*\(No space left on device\)"):
        localize_layerwise(lm, tiny_tokenizer(), pairs, ("head",), progress=False)
    assert not started and list(work.iterdir()) == []


def test_architecture_from_the_sites_table(tmp_path: Path) -> None:
    # Which tensors form a layer comes from the layer path aufold.sites finds, for GPT-2's
    # ``transformer.h`` as for ``model.layers``.
    folder = save_tiny_model("gpt2", tmp_path / "model")
    lm = LayerwiseModel(folder)
    assert architecture_for("gpt2").layers == "transformer.h"
    assert lm.num_layers == 3 and lm.layer_bytes(0) > 0
    with lm.loaded(1) as layer:
        assert not any(p.is_meta for p in layer.parameters())
        assert all(p.is_meta for p in lm.layers[0].parameters())
    assert all(p.is_meta for p in lm.model.parameters())
    assert json.loads((folder / "config.json").read_text())["model_type"] == "gpt2"
    assert os.path.exists(folder / "model.safetensors")


# --- evaluation and tuning, one layer at a time ---------------------------------------------


@pytest.mark.parametrize("model_type", ARCHITECTURES + MOE_ARCHITECTURES)
def test_evaluation_equals_the_in_memory_sweep(model_type: str, tmp_path: Path) -> None:
    # The unsteered model and edits starting at every layer, both choice scorers: the same
    # items, predictions and log-likelihood scores (exactly), as the in-memory evaluation.
    from test_tune import layered_plan, tiny_items

    from aufold.evaluate.edits import evaluate_edits

    # Residual edits too: their hooks on a layer's output must run before its output is read.
    folder = save_tiny_model(model_type, tmp_path / "model")
    model, tokenizer = tiny_model(model_type), tiny_tokenizer()
    moe = model_type in MOE_ARCHITECTURES
    sites = ["head", "residual"] if moe else ["head", "mlp-out", "residual"]
    plan = layered_plan(model, sites)
    ks = (1, 150, 300) if moe else (1, 250, 450)  # first steered layers 2, 1 and 0
    edits = {(k, alpha): plan.select(k, alpha, sites) for k in ks for alpha in (2.0, 30.0)}
    lm = LayerwiseModel(folder)
    for scorer in ("loglik", "first-token"):
        want = evaluate_edits(model, tokenizer, tiny_items(), edits, scorer=scorer, batch_size=5,
                              progress=False)
        got = evaluate_edits(lm, tokenizer, tiny_items(), edits, scorer=scorer, batch_size=5,
                             progress=False)
        assert got.base.items == want.base.items
        for key in edits:
            assert got.steered[key].items == want.steered[key].items, (scorer, key)
        assert got.start_layers == want.start_layers and set(got.start_layers.values()) == {0, 1, 2}
    assert all(p.is_meta for p in lm.model.parameters())


def test_evaluate_items_and_math_refusal(tmp_path: Path) -> None:
    from test_tune import layered_plan, tiny_items

    from aufold.evaluate import evaluate_items
    from aufold.tasks import Item

    folder = save_tiny_model("gemma2", tmp_path / "model")  # tied head, soft-capped logits
    model, tokenizer, lm = tiny_model("gemma2"), tiny_tokenizer(), LayerwiseModel(folder)
    edit = layered_plan(model, ["mlp"]).select(40, 10.0, ["mlp"])
    for each in (None, edit):
        want = evaluate_items(model, tokenizer, tiny_items(), scorer="loglik", edit=each,
                              progress=False)
        got = evaluate_items(lm, tokenizer, tiny_items(), scorer="loglik", edit=each, progress=False)
        assert got.items == want.items
        assert got.settings["steered_units"] == want.settings["steered_units"]
    with pytest.raises(AufoldError, match="multiple-choice tasks only"):
        evaluate_items(lm, tokenizer, [Item("2 + 3 =", (), "5", 5.0, "sum-0")], kind="math",
                       progress=False)


@pytest.mark.parametrize("model_type", MOE_ARCHITECTURES)
def test_experts_edits_evaluate_as_in_memory(model_type: str, tmp_path: Path) -> None:
    """Expert hooks on a streamed layer find the weights it loads, as in memory."""
    from test_tune import layered_plan, tiny_items

    from aufold.evaluate import evaluate_items

    folder = save_tiny_model(model_type, tmp_path / "model")
    model, tokenizer, lm = tiny_model(model_type), tiny_tokenizer(), LayerwiseModel(folder)
    for site in ("mlp", "mlp-out"):
        edit = layered_plan(model, [site]).select(40, 10.0, [site])
        want = evaluate_items(model, tokenizer, tiny_items(), scorer="loglik", edit=edit,
                              progress=False)
        got = evaluate_items(lm, tokenizer, tiny_items(), scorer="loglik", edit=edit,
                             progress=False)
        assert got.items == want.items, site


def test_math_tasks_are_refused_before_anything_loads(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from aufold.tasks import default_data_dir

    if not (default_data_dir() / "svamp").is_dir():
        pytest.skip("needs ../shared/data")
    folder = save_tiny_model("llama", tmp_path / "model")
    loads = []
    monkeypatch.setattr(LayerwiseModel, "__init__", lambda *a, **k: loads.append(1))
    result = run_cli("eval", folder, "--task", "svamp", "--limit", 2, "--layer-streaming")
    assert_one_line_error(result, "multiple-choice tasks only", "drop --layer-streaming")
    result = run_cli("tune", folder, "--task", "svamp", "--site", "mlp", "--limit", 2,
                     "--layer-streaming", "--out", tmp_path / "tuned")
    assert_one_line_error(result, "multiple-choice tasks only")
    assert not (tmp_path / "tuned").exists()
    # Streaming chosen because the weights do not fit: the way out is --device-map auto.
    monkeypatch.setattr("aufold.layerwise.available_memory", lambda: 1000)
    result = run_cli("eval", folder, "--task", "svamp", "--limit", 2)
    assert_one_line_error(result, "token by token", "--device-map auto")
    assert not loads


def test_smollm2_evaluation_equals_the_in_memory_one(smollm2_dir: Path, smollm2) -> None:  # type: ignore[no-untyped-def]
    from aufold.evaluate.edits import evaluate_edits
    from aufold.tasks import load_split

    model, tokenizer = smollm2
    items = load_split("copa", "test", None, size=16)
    plan = localize(model, tokenizer, __import__("aufold.tasks", fromlist=["task_pairs"]).task_pairs(
        "copa", None, size=16), ("head", "mlp"), progress=False)
    edits = {alpha: plan.select(20, alpha, ("head", "mlp")) for alpha in (5.0, 40.0)}
    want = evaluate_edits(model, tokenizer, items, edits, scorer="loglik", batch_size=8, progress=False)
    got = evaluate_edits(LayerwiseModel(smollm2_dir), tokenizer, items, edits, scorer="loglik",
                         batch_size=8, progress=False)
    assert got.base.items == want.base.items
    for alpha in edits:
        assert got.steered[alpha].items == want.steered[alpha].items


def test_cli_eval_and_tune_stream_and_equal_the_in_memory_runs(tmp_path: Path) -> None:
    from eval_helpers import generic_splits, write_generic

    folder = save_tiny_model("qwen2", tmp_path / "model")
    data = tmp_path / "data"
    write_generic(data, generic_splits())
    before = tree_digest(folder)
    common = ("--task", "generic", "--data-dir", data, "--scorer", "loglik", "--no-cost")
    for name, flags in (("memory", ()), ("stream", ("--layer-streaming",))):
        result = run_cli("tune", folder, *common, "--site", "head", "--site", "mlp", "--k-grid",
                         "2,8", "--alpha-grid", "5,50", "--no-plot", "--out", tmp_path / f"tune-{name}",
                         *flags)
        assert result.exit_code == 0, result.output
        result = run_cli("eval", folder, *common, "--tuned", tmp_path / f"tune-{name}" / "tune.json",
                         "--report", tmp_path / f"eval-{name}.json", *flags)
        assert result.exit_code == 0, result.output
    assert "layer streaming, as asked" in result.output
    memory = json.loads((tmp_path / "tune-memory" / "tune.json").read_text())
    stream = json.loads((tmp_path / "tune-stream" / "tune.json").read_text())
    assert stream["tune"]["grid"] == memory["tune"]["grid"] and stream["best"] == memory["best"]
    assert stream["test"] == memory["test"]
    assert Plan.load(tmp_path / "tune-stream" / "plan").counts.keys() == {"head", "mlp"}
    reports = [json.loads((tmp_path / f"eval-{name}.json").read_text()) for name in ("memory", "stream")]
    assert reports[0]["items"] == reports[1]["items"]
    assert reports[0]["unsteered"] == reports[1]["unsteered"]
    assert tree_digest(folder) == before
