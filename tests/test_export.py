"""Export end to end through the CLI: a complete checkpoint that plain transformers loads.

The folded folder must load with no aufold import (checked in a subprocess that
never imports it), as the same class, and compute what the hook mode computes;
its weights must differ from the input's only in the edited slices.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from edit_helpers import run_cli
from safetensors.torch import load_file
from tiny_models import save_tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

import cli
from aufold.fold import fold_tensor, weight_edits
from aufold.localize import localize
from aufold.modeling import load_model
from aufold.pairs import ContrastivePair, write_pairs
from aufold.plan import Plan
from aufold.safety.outputs import MARKER
from aufold.sites import architecture_for
from aufold.steer import steer

PROMPTS = ["The cat sat on the mat.", "12 + 30 = 42"]
PAIRS = [ContrastivePair(f"{a} plus {b} is", f" {a + b}", f" {a + b + 1}") for a in range(3, 9) for b in (2, 5)]

PLAIN_TRANSFORMERS = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, out = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder)
tokenizer = AutoTokenizer.from_pretrained(folder)
batch = tokenizer({prompts!r}, return_tensors="pt", padding=True)
with torch.no_grad():
    logits = model(**batch).logits
torch.save({{"class": type(model).__name__, "logits": logits, "mask": batch["attention_mask"]}}, out)
assert "aufold" not in sys.modules
"""


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def base_and_plan(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, Path]:
    arch, dtype = getattr(request, "param", ("llama", torch.float32))
    base = save_tiny_model(arch, tmp_path / "base", dtype=dtype)
    pairs_file = tmp_path / "pairs.jsonl"
    write_pairs(PAIRS, pairs_file)
    result = run_cli("localize", base, "--pairs", pairs_file, "--site", "head", "--site", "mlp",
                     "--site", "mlp-out", "--out", tmp_path / "plan")
    assert result.exit_code == 0, result.output
    return base, tmp_path / "plan"


@pytest.mark.parametrize("base_and_plan", [("llama", torch.float32), ("gpt2", torch.float32),
                                           ("qwen3", torch.bfloat16)], indirect=True,
                         ids=["llama-fp32", "gpt2-fp32", "qwen3-bf16"])
def test_export_writes_a_checkpoint_plain_transformers_loads(base_and_plan: tuple[Path, Path],
                                                             tmp_path: Path) -> None:
    base, plan_dir = base_and_plan
    before = folder_digest(base)
    out = tmp_path / "folded"
    result = run_cli("export", base, "--plan", plan_dir, "--k", 12, "--alpha", 4, "--out", out)
    assert result.exit_code == 0, result.output
    assert folder_digest(base) == before  # the input is only read

    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "README.md", "aufold.json"} <= names
    assert not list(tmp_path.glob(".folded*"))  # no staging folder left behind

    plan = Plan.load(plan_dir)
    edit = plan.select(12, 4.0)
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: ")
    assert "- aufold\n- activation-steering\n" in card
    for unit in plan.ranking(k=12):
        assert f"| {unit.site} | {unit.layer} | {unit.unit} |" in card
    provenance = json.loads((out / "aufold.json").read_text())
    assert provenance["selection"]["k"] == 12 and len(provenance["units"]) == 12
    assert provenance["fingerprint"] == plan.fingerprint

    # Weights: the edited slices are the original times (1 + gamma), all else is bitwise equal.
    original = load_file(base / "model.safetensors")
    folded = load_file(out / "model.safetensors")
    assert original.keys() == folded.keys()
    config = json.loads((base / "config.json").read_text())
    edits = weight_edits(edit, architecture_for(config["model_type"]))
    for name, tensor in original.items():
        assert folded[name].dtype == tensor.dtype
        if name in edits:  # test_fold checks fold_tensor against a plain re-statement
            assert torch.equal(folded[name], fold_tensor(tensor, edits[name])), name
            assert not torch.equal(folded[name], tensor)
        else:
            assert torch.equal(folded[name], tensor), name

    # Plain transformers, without aufold, against the hook mode on the base model.
    saved = tmp_path / "plain.pt"
    subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS.format(prompts=PROMPTS), str(out), str(saved)],
                   check=True, cwd=tmp_path)
    plain = torch.load(saved)
    model, _, _ = load_model(base)
    assert plain["class"] == type(model).__name__
    batch = tiny_tokenizer()(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad(), steer(model, edit):
        hooked = model(**batch).logits
    mask = batch["attention_mask"].bool()
    diff = (hooked[mask].float() - plain["logits"][mask].float()).abs().max()
    if model.dtype == torch.float32:
        assert diff <= 1e-5 * hooked.abs().max()
    else:
        reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        with torch.no_grad():
            noise = (model(**batch).logits[mask].float() - reference(**batch).logits[mask]).abs().max()
        assert diff <= 3 * noise

    # aufold verify agrees, and fails for a folder folded with another alpha.
    result = run_cli("verify", base, "--plan", plan_dir, "--k", 12, "--alpha", 4, "--folded", out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["passed"] is True
    result = run_cli("verify", base, "--plan", plan_dir, "--k", 12, "--alpha", 3, "--folded", out)
    assert result.exit_code == 1 and "FAIL" in result.output


def test_export_replaces_only_its_own_earlier_output(base_and_plan: tuple[Path, Path],
                                                     tmp_path: Path) -> None:
    base, plan_dir = base_and_plan
    out = tmp_path / "folded"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    export = ["export", str(base), "--plan", str(plan_dir), "--k", "4", "--alpha", "1", "--out", str(out)]
    result = CliRunner().invoke(cli.main, export)
    assert result.exit_code == 2 and "--overwrite" in result.output
    # A folder aufold did not write is never replaced, even with --overwrite.
    result = CliRunner().invoke(cli.main, [*export, "--overwrite"])
    assert result.exit_code == 2 and "only replaces outputs that aufold wrote" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    ours = tmp_path / "ours"
    assert run_cli(*export[:-1], ours).exit_code == 0
    assert (ours / MARKER).is_file()
    again = [a if a != "1" else "2" for a in export[:-1]]  # the same export at alpha 2
    result = run_cli(*again, ours, "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads((ours / "aufold.json").read_text())["selection"]["alpha"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers


def test_localize_writes_a_readable_plan(base_and_plan: tuple[Path, Path]) -> None:
    base, plan_dir = base_and_plan
    summary = json.loads((plan_dir / "plan.json").read_text())
    plan = Plan.load(plan_dir)
    assert summary["sites"] == ["head", "mlp", "mlp-out"] and summary["num_pairs"] == len(PAIRS)
    assert summary["model"] == str(base)
    assert summary["top_units"][0] == plan.ranking(k=1)[0].to_record()
    model, tokenizer, _ = load_model(base)
    direct = localize(model, tokenizer, PAIRS, ["head", "mlp", "mlp-out"], progress=False)
    for site in plan.sites:
        assert torch.equal(direct.counts[site].positive, plan.counts[site].positive)


def test_a_config_holding_an_infinity_resolves_its_sites(tmp_path: Path) -> None:
    """Bamba's time_step_limit is (0, inf): config.json spells inf {"__float__": "Infinity"},
    which the sites of a checkpoint on disk (the streamed export) must read back as a float."""
    from conformance import tiny_config

    config = tiny_config("bamba")
    assert config.time_step_limit[1] == float("inf")
    config.save_pretrained(tmp_path)
    assert "__float__" in (tmp_path / "config.json").read_text()
    from transformers import AutoConfig

    architecture = architecture_for(AutoConfig.from_pretrained(tmp_path))
    assert [layer.attention_out for layer in architecture.layer_sites] == [None, "self_attn.o_proj"]
