"""No pickle is unpickled without --allow-pickle, on any command that loads a model; with it,
torch's safe loader still refuses a malicious file, in one line."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from edit_helpers import assert_one_line_error, run_cli, tree_digest
from tiny_models import save_tiny_model, tiny_model, tiny_tokenizer

from aufold.pairs import ContrastivePair, write_pairs

PAIRS = [ContrastivePair(f"{a} plus 2 is", f" {a + 2}", f" {a + 3}") for a in range(6)]


class _Payload:
    """Unpickling this runs a shell command that leaves a file behind: proof of execution."""

    def __init__(self, proof: Path) -> None:
        self.proof = proof

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.proof}",)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """safe/ (safetensors), plain/ (honest pickle weights), evil/ (a code-running pickle), a plan."""
    root = tmp_path_factory.mktemp("pickle")
    save_tiny_model("llama", root / "safe")
    for name in ("plain", "evil"):
        tiny_model("llama").config.save_pretrained(root / name)
        tiny_tokenizer().save_pretrained(root / name)
    torch.save(tiny_model("llama").state_dict(), root / "plain" / "pytorch_model.bin")
    with open(root / "evil" / "pytorch_model.bin", "wb") as handle:
        pickle.dump(_Payload(root / "PWNED"), handle)
    write_pairs(PAIRS, root / "pairs.jsonl")
    hidden = tiny_model("llama").config.hidden_size
    (root / "v.json").write_text(json.dumps({"0": [0.01] * hidden}))
    assert run_cli("localize", root / "safe", "--pairs", root / "pairs.jsonl", "--site", "head",
                   "--out", root / "plan").exit_code == 0
    return root


SELECT = ["--plan", "{r}/plan", "--k", "4", "--alpha", "2"]
COMMANDS = {
    "localize": ["localize", "{m}", "--pairs", "{r}/pairs.jsonl", "--site", "head", "--out", "{r}/o"],
    "export": ["export", "{m}", *SELECT, "--out", "{r}/o"],
    "export-lora": ["export", "{m}", *SELECT, "--out", "{r}/o", "--format", "lora"],
    "export-ia3": ["export", "{m}", *SELECT, "--out", "{r}/o", "--format", "ia3"],
    "generate": ["generate", "{m}", *SELECT, "--prompt", "1 plus 2 is", "--max-new-tokens", "2"],
    "verify": ["verify", "{m}", *SELECT, "--folded", "{r}/safe"],
    "verify-folded": ["verify", "{r}/safe", *SELECT, "--folded", "{m}"],
    "eval": ["eval", "{m}", "--task", "copa", "--limit", "2"],
    "tune": ["tune", "{m}", "--task", "copa", "--plan", "{r}/plan", "--out", "{r}/o"],
    "fold-vector": ["fold-vector", "{m}", "--vector", "{r}/v.json", "--out", "{r}/o"],
    "demo": ["demo", "--model", "{m}", "--out", "{r}/o"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("model", ["plain", "evil"])
def test_pickle_weights_are_refused_without_allow_pickle(world: Path, command: str, model: str) -> None:
    before = tree_digest(world)
    args = [a.format(r=world, m=world / model) for a in COMMANDS[command]]
    assert_one_line_error(run_cli(*args), "pickle", "--allow-pickle")
    assert tree_digest(world) == before
    assert not (world / "PWNED").exists()


def test_allow_pickle_loads_honest_weights(world: Path, tmp_path: Path) -> None:
    result = run_cli("localize", world / "plain", "--pairs", world / "pairs.jsonl", "--site", "head",
                     "--out", tmp_path / "plan", "--allow-pickle")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "plan" / "plan.json").is_file()


@pytest.mark.parametrize("command", ["localize", "export-lora", "generate", "eval"])
def test_allow_pickle_still_never_runs_a_malicious_pickle(world: Path, command: str) -> None:
    before = tree_digest(world)
    args = [a.format(r=world, m=world / "evil") for a in COMMANDS[command]]
    assert_one_line_error(run_cli(*args, "--allow-pickle"), "safe loader refused")
    assert not (world / "PWNED").exists()
    assert tree_digest(world) == before
