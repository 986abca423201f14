"""Data-parallel localization: parts counted apart and added equal one run over all pairs.

``--shard I/N`` + ``merge-counts`` in one process, and two torchrun processes
(gloo) that all-reduce their counters; plus merge-counts' refusals.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_localize import _varied_pairs
from tiny_models import save_tiny_model, tiny_model, tiny_tokenizer

import cli
from aufold.errors import AufoldError
from aufold.localize import localize
from aufold.pairs import write_pairs
from aufold.plan import Plan
from aufold.shards import localize_shard, merge_counts, parse_shard, shard_pairs

REPO = Path(__file__).resolve().parents[1]
SITES = ("head", "mlp")


def assert_same_counts(got: Plan, want: Plan) -> None:
    assert got.sites == want.sites and got.num_pairs == want.num_pairs
    for site in want.sites:
        assert torch.equal(got.counts[site].positive, want.counts[site].positive), site
        assert torch.equal(got.counts[site].negative, want.counts[site].negative), site


def test_parse_and_split() -> None:
    assert parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(AufoldError, match="shard"):
            parse_shard(bad)
    pairs = _varied_pairs(10)
    parts = [shard_pairs(pairs, i, 3) for i in range(3)]
    assert [len(p) for p in parts] == [3, 3, 4] and sum(parts, []) == pairs


def test_merged_parts_equal_one_run() -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    pairs = _varied_pairs(13)
    whole = localize(model, tokenizer, pairs, SITES, batch_size=4, progress=False)
    parts = [localize_shard(model, tokenizer, pairs, SITES, index=i, count=3, batch_size=4,
                            progress=False) for i in (2, 0, 1)]
    assert [p.num_pairs for p in parts] == [5, 4, 4]
    merged = merge_counts(parts)
    assert_same_counts(merged, whole)
    assert merged.settings == whole.settings
    assert merged.fingerprint == whole.fingerprint


def test_merge_refuses_parts_that_do_not_belong_together() -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    pairs = _varied_pairs(8)

    def part(index: int, count: int = 2, **options):  # type: ignore[no-untyped-def]
        options = {"progress": False, **options}
        return localize_shard(model, tokenizer, options.pop("pairs", pairs), options.pop("sites", SITES),
                              index=index, count=count, **options)

    first, second = part(0), part(1)
    with pytest.raises(AufoldError, match=r"each of the 2 parts exactly once; missing: \[1\]"):
        merge_counts([first])
    with pytest.raises(AufoldError, match=r"repeated: \[0\]"):
        merge_counts([first, first])
    with pytest.raises(AufoldError, match="different sites"):
        merge_counts([first, part(1, sites=("head",))])
    with pytest.raises(AufoldError, match="different settings"):
        merge_counts([first, part(1, max_length=64)])
    with pytest.raises(AufoldError, match="different settings"):
        merge_counts([first, part(1, tie_tolerance=0)])
    with pytest.raises(AufoldError, match="different pair files"):
        merge_counts([first, part(1, pairs=_varied_pairs(8, seed=9))])
    with pytest.raises(AufoldError, match="different pair files or into different numbers"):
        merge_counts([first, part(1, count=3)])
    other = localize_shard(tiny_model("qwen2"), tokenizer, pairs, SITES, index=1, count=2, progress=False)
    with pytest.raises(AufoldError, match="different models"):
        merge_counts([first, other])
    whole = localize(model, tokenizer, pairs, SITES, progress=False)
    with pytest.raises(AufoldError, match="holds no partial counts"):
        merge_counts([first, whole])
    assert merge_counts([second, first]).num_pairs == 8


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("shards")
    model_dir = save_tiny_model("llama", folder / "model")
    write_pairs(_varied_pairs(11), folder / "pairs.jsonl")
    return model_dir, folder / "pairs.jsonl"


def _localize_args(model_dir: Path, pairs: Path, out: Path) -> list[str]:
    return ["localize", str(model_dir), "--pairs", str(pairs), "--site", "head", "--site", "mlp",
            "--batch-size", "3", "--out", str(out)]


def test_cli_shards_and_merge_counts(tiny_folder: tuple[Path, Path], tmp_path: Path) -> None:
    model_dir, pairs = tiny_folder
    runner = CliRunner()
    for index in range(2):
        result = runner.invoke(cli.main, [*_localize_args(model_dir, pairs, tmp_path / f"part{index}"),
                                          "--shard", f"{index}/2"])
        assert result.exit_code == 0, result.output
    result = runner.invoke(cli.main, ["merge-counts", str(tmp_path / "part0"), str(tmp_path / "part1"),
                                      "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    assert "merged 2 parts: 11 pairs" in result.output
    result = runner.invoke(cli.main, _localize_args(model_dir, pairs, tmp_path / "whole"))
    assert result.exit_code == 0, result.output
    assert_same_counts(Plan.load(tmp_path / "merged"), Plan.load(tmp_path / "whole"))
    result = runner.invoke(cli.main, ["merge-counts", str(tmp_path / "part0"), "--out",
                                      str(tmp_path / "bad")])
    assert result.exit_code == 2 and "missing: [1]" in result.output


@pytest.mark.parametrize("flags", [(), ("--layer-streaming",)], ids=["loaded", "layer-streaming"])
def test_torchrun_two_gloo_processes_equal_one_run(tiny_folder: tuple[Path, Path], tmp_path: Path,
                                                   flags: tuple[str, ...]) -> None:
    model_dir, pairs = tiny_folder
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(REPO / "cli.py"), *_localize_args(model_dir, pairs, tmp_path / "distributed"),
               *flags]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("plan written to") == 1  # rank 0 alone writes
    runner = CliRunner()
    single = runner.invoke(cli.main, _localize_args(model_dir, pairs, tmp_path / "single"))
    assert single.exit_code == 0, single.output
    distributed, whole = Plan.load(tmp_path / "distributed"), Plan.load(tmp_path / "single")
    assert_same_counts(distributed, whole)
    assert distributed.settings == whole.settings
