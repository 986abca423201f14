"""Bad input: one line naming the problem and the fix, exit code 2, and nothing on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny_models import save_tiny_model, tiny_model, tiny_tokenizer

import cli
from aufold.errors import AufoldError
from aufold.localize import localize
from aufold.pairs import ContrastivePair, write_pairs

PAIRS = [ContrastivePair(f"{a} plus 2 is", f" {a + 2}", f" {a + 3}") for a in range(6)]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli-errors")
    save_tiny_model("llama", root / "base")
    save_tiny_model("mistral", root / "other")
    write_pairs(PAIRS, root / "pairs.jsonl")
    result = CliRunner().invoke(cli.main, ["localize", str(root / "base"), "--pairs", str(root / "pairs.jsonl"),
                                           "--site", "head", "--site", "residual", "--out", str(root / "plan")])
    assert result.exit_code == 0, result.output
    return root


def snapshot(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def fails_cleanly(root: Path, args: list[str], message: str) -> None:
    before = snapshot(root)
    result = CliRunner().invoke(cli.main, [a.format(root=root) for a in args])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("aufold: error:")]
    assert len(errors) == 1, result.stderr
    assert message in errors[0], errors[0]
    assert snapshot(root) == before, "something was left on disk"


@pytest.mark.parametrize(("content", "message"), [
    (None, "pairs file not found"),
    ("", "holds no pairs"),
    ('{"prompt": "a", "positive": " b", "negative": " c"}\n{oops\n', "line 2: not valid JSON"),
    ('{"prompt": "a", "positive": " b"}\n', "line 1: missing key(s) negative"),
    ('{"prompt": "a", "positive": " b", "negative": " b"}\n', "'positive' equals 'negative'"),
], ids=["missing", "empty", "malformed", "missing-key", "same-answers"])
def test_bad_pairs_files(workspace: Path, tmp_path: Path, content: str | None, message: str) -> None:
    pairs = tmp_path / "pairs.jsonl"
    if content is not None:
        pairs.write_text(content)
    fails_cleanly(workspace, ["localize", "{root}/base", "--pairs", str(pairs), "--site", "mlp",
                              "--out", "{root}/new-plan"], message)


EXPORT = ["export", "{root}/base", "--plan", "{root}/plan", "--out", "{root}/folded"]


@pytest.mark.parametrize(("args", "message"), [
    (["--k", "1000", "--alpha", "1", "--site", "head"], "k=1000 is larger than the 192 units available"),
    (["--k", "4", "--alpha", "nan", "--site", "head"], "alpha must be a finite number"),
    (["--k", "4", "--alpha", "inf", "--site", "head"], "alpha must be a finite number"),
    (["--k", "4", "--alpha", "1"], "site 'residual' cannot be folded into weights"),
    (["--k", "4", "--alpha", "1", "--site", "mlp"], "site 'mlp' is not in this plan"),
], ids=["k-too-large", "nan-alpha", "inf-alpha", "residual", "site-not-in-plan"])
def test_bad_export_selections(workspace: Path, args: list[str], message: str) -> None:
    fails_cleanly(workspace, EXPORT + args, message)


def test_plan_of_another_model_is_refused_unless_forced(workspace: Path) -> None:
    args = ["export", "{root}/other", "--plan", "{root}/plan", "--k", "4", "--alpha", "1", "--site", "head",
            "--out", "{root}/folded-other"]
    fails_cleanly(workspace, args, "the plan was made for another model")


def test_output_inside_the_input_is_refused(workspace: Path) -> None:
    args = ["export", "{root}/base", "--plan", "{root}/plan", "--k", "4", "--alpha", "1", "--site", "head",
            "--out", "{root}/base/folded"]
    fails_cleanly(workspace, args, "lies inside the input")


def test_unknown_model_and_plan(workspace: Path) -> None:
    fails_cleanly(workspace, ["export", "{root}/nowhere", "--plan", "{root}/plan", "--k", "1", "--alpha", "1",
                              "--site", "head", "--out", "{root}/x"], "model not found")
    fails_cleanly(workspace, ["export", "{root}/base", "--plan", "{root}/base", "--k", "1", "--alpha", "1",
                              "--out", "{root}/x"], "is not a plan folder")


def test_unknown_site_and_missing_option_are_one_line(workspace: Path) -> None:
    fails_cleanly(workspace, ["localize", "{root}/base", "--pairs", "{root}/pairs.jsonl", "--site", "attn",
                              "--out", "{root}/p"], "'attn' is not one of")
    fails_cleanly(workspace, ["localize", "{root}/base", "--pairs", "{root}/pairs.jsonl", "--site", "mlp"],
                  "Missing option '--out'")
    fails_cleanly(workspace, ["localize", "{root}/base", "--site", "mlp", "--out", "{root}/p"],
                  "give either --pairs FILE or --task NAME")


@pytest.mark.parametrize(("model_type", "reason"), [
    # Mamba has no attention heads and no MLP: the override table says so.
    ("mamba", "unsupported architecture 'mamba': a state-space model: its layers have neither"),
    # XLM keeps attention and MLP in two parallel lists, and no plan or override names them.
    ("xlm", "unsupported architecture 'xlm': transformers states no tensor-parallel plan"),
])
def test_unsupported_architecture(workspace: Path, model_type: str, reason: str) -> None:
    folder = workspace / model_type
    folder.mkdir(exist_ok=True)
    config = json.loads((workspace / "base" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
    fails_cleanly(workspace, ["localize", f"{{root}}/{model_type}", "--pairs",
                              "{root}/pairs.jsonl", "--site", "mlp", "--out", "{root}/p"], reason)


def test_a_config_transformers_cannot_read(workspace: Path) -> None:
    folder = workspace / "falcon"
    folder.mkdir(exist_ok=True)
    config = json.loads((workspace / "base" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "falcon"}))
    fails_cleanly(workspace, ["localize", "{root}/falcon", "--pairs", "{root}/pairs.jsonl", "--site",
                              "mlp", "--out", "{root}/p"], "could not read the config of")


def test_a_site_the_model_lacks_is_named() -> None:
    model = tiny_model("llama")
    for layer in model.model.layers:
        del layer.mlp.down_proj  # a model without the module the site reads
    with pytest.raises(AufoldError, match=r"layer 0 of llama has no MLP down projection that "
                                          r"transformers' plan names; aufold steers its 'head', "
                                          r"'residual' sites"):
        localize(model, tiny_tokenizer(), PAIRS, ["mlp"], progress=False)
