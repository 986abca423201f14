"""The reproduction script of examples/, end to end on a few items of two tasks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aufold.tasks import default_data_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    data_dir = default_data_dir()
    if data_dir is None:
        pytest.skip("benchmark data not found at ../shared/data")
    out = tmp_path_factory.mktemp("reproduce") / "results.md"
    # A choice task and a math task, 4 items of each split, one configuration per site.
    subprocess.run([sys.executable, str(REPO / "examples" / "reproduce_paper.py"),
                    "--model", str(smollm2_dir), "--tasks", "copa", "svamp", "--limit", "4",
                    "--small-grid", "--neutral-tokens", "256", "--out", str(out)],
                   check=True, timeout=1800)
    return out


def test_the_report_has_every_section_and_says_it_subsampled(report: Path) -> None:
    text = report.read_text()
    for heading in ("## Vanilla vs AUSteer on test", "## Ablations on test", "## Tune grids",
                    "## Sizes and time", "## Findings"):
        assert heading in text
    assert "| copa | 4 |" in text and "| svamp | 4 |" in text
    assert "pairs 4 of 800, tune 4 of 100, test 4 of 500" in text
    assert "Subsampled to fit the one-hour budget" in text


def test_the_raw_numbers_agree_with_the_protocol(report: Path) -> None:
    records = {r["task"]: r for r in json.loads(report.with_suffix(".json").read_text())}
    for task in ("copa", "svamp"):
        record = records[task]
        chosen = record["chosen"]
        assert chosen["k"] == 2 and chosen["alpha"] == 5.0 and len(chosen["units"]) == 2
        assert all(unit["site"] == chosen["site"] for unit in chosen["units"])
        assert len(record["tune"]["grid"]) == 3  # one configuration per site
        assert len(record["test"]["random_units"]) == 5
        assert all(r["n"] == 4 for r in record["test"]["random_units"])
        assert record["test"]["vanilla"]["n"] == record["test"]["austeer"]["n"] == 4
        # Every test edit is priced on neutral text: AUSteer, fixed strength, 5 random seeds.
        assert set(record["cost"]) == {"austeer", "fixed", *(f"random-{s}" for s in range(5))}
        assert all(c["kl"] >= 0 and c["tokens"] > 200 for c in record["cost"].values())
    assert "| KL on neutral text | perplexity ratio |" in report.read_text()


def test_the_figures_are_written_when_matplotlib_is_installed(report: Path) -> None:
    from aufold.plotting import matplotlib_available

    folder = report.parent / "results"
    if not matplotlib_available():
        assert not folder.exists()
        return
    names = sorted(path.name for path in folder.iterdir())
    assert "copa-units.png" in names and "svamp-tune-mlp-out.png" in names
    assert "](results/copa-units.png)" in report.read_text()
