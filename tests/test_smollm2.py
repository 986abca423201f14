"""The real model end to end: localize on SmolLM2, export straight from its GGUF file, verify."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import cli
from aufold.demo import arithmetic_items
from aufold.localize import localize
from aufold.modeling import smollm2_gguf_path
from aufold.tasks.contrast import choice_pairs

pytestmark = pytest.mark.slow


def test_gguf_export_verifies_against_hooks(smollm2, smollm2_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = smollm2
    pairs = choice_pairs(arithmetic_items("pairs")[:24])
    plan = localize(model, tokenizer, pairs, ["head", "mlp", "mlp-out"], progress=False)
    plan.save(tmp_path / "plan")

    # A plan made on the safetensors copy applies to the GGUF file: same fingerprint.
    gguf = smollm2_gguf_path()
    out = tmp_path / "folded"
    result = CliRunner().invoke(cli.main, ["export", str(gguf), "--plan", str(tmp_path / "plan"), "--k", "48",
                                           "--alpha", "10", "--out", str(out)])
    assert result.exit_code == 0, result.output
    provenance = json.loads((out / "aufold.json").read_text())
    assert {unit["site"] for unit in provenance["units"]} <= {"head", "mlp", "mlp-out"}

    result = CliRunner().invoke(cli.main, ["verify", str(smollm2_dir), "--plan", str(tmp_path / "plan"),
                                           "--k", "48", "--alpha", "10", "--folded", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] and report["relative_diff"] <= 1e-5 and report["top1_agreement"] == 1.0
