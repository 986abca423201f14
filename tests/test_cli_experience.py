"""A newcomer's first hour: instant help, one-line usage errors, progress on stderr (silenced
by --quiet), `aufold inspect`, eval's side-by-side line, one option vocabulary, honest notes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from edit_helpers import random_plan, run_cli
from test_evaluate import generic_splits, write_generic
from tiny_models import save_tiny_model, tiny_model

import cli
from aufold.card import ExportRecord, units_sentence
from aufold.recipe import Recipe
from aufold.export import gguf_dequantization_note
from aufold.modeling import fingerprint
from aufold.pairs import ContrastivePair, write_pairs
from aufold.plan import Plan, SiteCounts
from aufold.safety.outputs import is_aufold_output

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import sys, resource
sys.argv = ["aufold", *sys.argv[1:]]
import cli
code = 0
try:
    cli.main()
except SystemExit as stop:
    code = stop.code
heavy = sorted(m for m in ("torch", "transformers", "safetensors", "numpy") if m in sys.modules)
usage = resource.getrusage(resource.RUSAGE_SELF)
print("HEAVY", heavy, "CPU", usage.ru_utime + usage.ru_stime, "EXIT", code, file=sys.stderr)
"""


def _probe(*args: str) -> tuple[subprocess.CompletedProcess[str], list[str], float, int]:
    result = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    line = next(line for line in result.stderr.splitlines() if line.startswith("HEAVY"))
    heavy = line.split("[", 1)[1].split("]", 1)[0]
    cpu = float(line.split("CPU ")[1].split()[0])
    code = int(line.split("EXIT ")[1])
    return result, [h.strip(" '") for h in heavy.split(",") if h.strip()], cpu, code


@pytest.mark.parametrize("args", [["--help"], ["localize", "--help"], ["export", "--help"],
                                  ["inspect", "--help"], ["localize", "m", "--pairs", "p", "--out", "o"],
                                  ["eval", "m", "--task", "nope"], ["bogus-command"]])
def test_help_and_usage_errors_answer_without_loading_torch(args: list[str]) -> None:
    result, heavy, cpu, code = _probe(*args)
    assert heavy == [], heavy  # what makes them fast: no torch, transformers, numpy
    assert cpu < 2.0, cpu  # about 0.15 s here; generous, so that a busy machine cannot fail it
    if "--help" not in args:
        assert code == 2
        errors = [line for line in result.stderr.splitlines() if not line.startswith("HEAVY")]
        assert len(errors) == 1 and errors[0].startswith("aufold: error: "), result.stderr


def test_the_command_list_gives_whole_summaries() -> None:
    result = run_cli("--help")
    flat = " ".join(result.output.split())
    for name, command in cli.main.commands.items():
        summary = " ".join(command.help.split("\n\n")[0].split())
        assert summary in flat, (name, summary)
    commands = result.output.split("Commands:")[1]
    assert "..." not in commands


def test_every_option_has_help_text() -> None:
    missing = [f"{name} {param.opts[0]}" for name, command in cli.main.commands.items()
               for param in command.params
               if isinstance(param, cli.click.Option) and not param.help]
    assert missing == []


def test_task_choices_are_listed() -> None:
    result = run_cli("tune", "--help")
    assert "copa|boolq|winogrande|svamp|mawps|generic" in result.output


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("experience")
    save_tiny_model("llama", root / "model")
    write_generic(root / "data", generic_splits())
    write_pairs([ContrastivePair(f"{a} plus 2 is", f" {a + 2}", f" {a + 3}") for a in range(8)],
                root / "pairs.jsonl")
    assert run_cli("localize", root / "model", "--pairs", root / "pairs.jsonl", "--site", "head",
                   "--site", "mlp", "--out", root / "plan").exit_code == 0
    assert run_cli("export", root / "model", "--plan", root / "plan", "--k", 6, "--alpha", 3,
                   "--out", root / "folded").exit_code == 0
    return root


STEER = ["--plan", "{r}/plan", "--k", "6", "--alpha", "3"]
# Each long command, with the word its progress shows; {o} is a fresh output path.
LONG_STEPS = {
    "localize": (["localize", "{r}/model", "--pairs", "{r}/pairs.jsonl", "--site", "head", "--out",
                  "{o}"], "localize"),
    "eval": (["eval", "{r}/model", "--task", "generic", "--data-dir", "{r}/data", *STEER], "eval"),
    "export": (["export", "{r}/model", *STEER, "--out", "{o}"], "export"),
    "verify": (["verify", "{r}/model", *STEER, "--folded", "{r}/folded"], "verify"),
    "generate": (["generate", "{r}/model", *STEER, "--prompt", "1 plus 2 is", "--max-new-tokens", "3"],
                 "unsteered"),
    "tune": (["tune", "{r}/model", "--task", "generic", "--data-dir", "{r}/data", "--plan", "{r}/plan",
              "--k-grid", "2,4", "--alpha-grid", "1", "--no-plot", "--out", "{o}"], "tune"),
}


@pytest.mark.parametrize("command", list(LONG_STEPS))
def test_long_commands_show_progress_on_stderr_and_quiet_silences_it(world: Path, tmp_path: Path,
                                                                     command: str) -> None:
    args, label = LONG_STEPS[command]
    loud = run_cli(*[a.format(r=world, o=tmp_path / "loud") for a in args])
    assert loud.exit_code == 0, loud.output
    assert label in loud.stderr and "%|" in loud.stderr, loud.stderr  # a tqdm bar with counts
    quiet = run_cli(*[a.format(r=world, o=tmp_path / "quiet") for a in args], "--quiet")
    assert quiet.exit_code == 0, quiet.output
    # Notes about the result stay (like "no configuration beat the unsteered model").
    assert all(line.startswith("note:") for line in quiet.stderr.splitlines()), quiet.stderr
    assert quiet.stdout == loud.stdout.replace(str(tmp_path / "loud"), str(tmp_path / "quiet"))


def test_json_output_is_clean_of_progress(world: Path) -> None:
    result = run_cli("verify", world / "model", *[a.format(r=world) for a in STEER], "--folded",
                     world / "folded", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["passed"] is True
    assert "verify" in result.stderr


def test_eval_prints_unsteered_and_steered_side_by_side(world: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    result = run_cli("eval", world / "model", "--task", "generic", "--data-dir", world / "data",
                     "--scorer", "loglik", *[a.format(r=world) for a in STEER], "--report", report)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    unsteered = next(line for line in lines if line.strip().startswith("unsteered"))
    steered = next(line for line in lines if line.strip().startswith("steered (k=6, alpha=3)"))
    difference = next(line for line in lines if line.strip().startswith("difference"))
    assert "95% CI" in unsteered and "95% CI" in steered
    data = json.loads(report.read_text())
    gain = data["accuracy"] - data["unsteered"]["accuracy"]
    assert data["gain"] == pytest.approx(gain) and f"{gain:+.4f}" in difference
    assert len(data["unsteered"]["predictions"]) == data["n"] == 10
    # The unsteered side equals a plain unsteered run.
    plain = run_cli("eval", world / "model", "--task", "generic", "--data-dir", world / "data",
                    "--scorer", "loglik", "--report", tmp_path / "plain.json")
    assert plain.exit_code == 0
    assert json.loads((tmp_path / "plain.json").read_text())["accuracy"] == data["unsteered"]["accuracy"]


def test_verify_and_generate_take_tuned(world: Path, tmp_path: Path) -> None:
    assert run_cli("tune", world / "model", "--task", "generic", "--data-dir", world / "data", "--plan",
                   world / "plan", "--k-grid", "6", "--alpha-grid", "3", "--site", "head", "--no-plot",
                   "--out", tmp_path / "tuned").exit_code == 0
    tuned = tmp_path / "tuned" / "tune.json"
    assert run_cli("export", world / "model", "--tuned", tuned, "--out", tmp_path / "f").exit_code == 0
    result = run_cli("verify", world / "model", "--tuned", tuned, "--folded", tmp_path / "f")
    assert result.exit_code == 0 and "PASS" in result.stdout, result.output
    result = run_cli("generate", world / "model", "--tuned", tuned, "--prompt", "1 plus", "--max-new-tokens", 2)
    assert result.exit_code == 0 and "--- steered (k=6, alpha=3) ---" in result.stdout, result.output


def test_limit_caps_the_pairs_of_localize_and_the_splits_of_tune(world: Path, tmp_path: Path) -> None:
    result = run_cli("localize", world / "model", "--pairs", world / "pairs.jsonl", "--site", "head",
                     "--limit", 3, "--out", tmp_path / "plan")
    assert result.exit_code == 0, result.output
    assert Plan.load(tmp_path / "plan").num_pairs == 3
    result = run_cli("localize", world / "model", "--pairs", world / "pairs.jsonl", "--site", "head",
                     "--limit", 99, "--out", tmp_path / "plan2")
    assert result.exit_code == 2 and "fewer than --limit 99" in result.output
    result = run_cli("tune", world / "model", "--task", "generic", "--data-dir", world / "data",
                     "--site", "head", "--k-grid", "2", "--alpha-grid", "1", "--limit", 4, "--no-plot",
                     "--out", tmp_path / "tuned")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "tuned" / "tune.json").read_text())
    assert record["test"]["n"] == 4 and Plan.load(tmp_path / "tuned" / "plan").num_pairs == 4


def test_a_shard_says_it_is_partial_and_how_to_merge(world: Path, tmp_path: Path) -> None:
    result = run_cli("localize", world / "model", "--pairs", world / "pairs.jsonl", "--site", "head",
                     "--shard", "0/2", "--out", tmp_path / "part0")
    assert result.exit_code == 0, result.output
    assert "partial plan" in result.stdout and "aufold merge-counts" in result.stdout
    assert "top units" not in result.stdout


# --- inspect ---------------------------------------------------------------------------

def _known_plan() -> Plan:
    """20 pairs; head units: layer 1 unit 3 scores 1.0 (suppress), layer 0 unit 5 scores 0.9."""
    model = tiny_model("llama")
    head = torch.zeros(model.config.num_hidden_layers, 64, dtype=torch.long)
    positive, negative = head.clone(), head.clone()
    positive[0, 5], negative[1, 3], positive[2, 7] = 18, 20, 12
    mlp = torch.zeros(model.config.num_hidden_layers, 128, dtype=torch.long)
    mlp_positive = mlp.clone()
    mlp_positive[1, 9] = 19
    return Plan("known", fingerprint(model), 20, {"head": SiteCounts(positive, negative),
                                                   "mlp": SiteCounts(mlp_positive, mlp.clone())})


def test_inspect_lists_ranked_units_placement_and_gammas(tmp_path: Path) -> None:
    _known_plan().save(tmp_path / "plan")
    result = run_cli("inspect", tmp_path / "plan", "--limit", 3, "--k", 2, "--alpha", 10)
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    ranked = [row for row in rows if len(row) >= 8]
    assert [r[:4] for r in ranked] == [["1", "head", "1", "3"], ["2", "mlp", "1", "9"],
                                       ["3", "head", "0", "5"]]
    assert ranked[0][7:] == ["suppress", "-10.000"] and ranked[1][7:] == ["promote", "+9.500"]
    assert ranked[2][7:] == ["promote"]  # rank 3 > k: not in the edit
    placement = [row for row in rows if len(row) == 3]
    assert placement == [["0", "1", "0"], ["1", "1", "1"]]

    as_json = json.loads(run_cli("inspect", tmp_path / "plan", "--site", "head", "--layer", 2,
                                 "--json").stdout)
    assert [(u["layer"], u["unit"], u["rank"]) for u in as_json["units"][:1]] == [(2, 7, 3)]
    assert as_json["sites"] == ["head"]


def test_inspect_plot_writes_a_marked_png_and_replaces_only_its_own(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    _known_plan().save(tmp_path / "plan")
    plot = tmp_path / "map.png"
    assert run_cli("inspect", tmp_path / "plan", "--plot", plot).exit_code == 0
    assert plot.read_bytes().startswith(b"\x89PNG") and is_aufold_output(plot)
    assert run_cli("inspect", tmp_path / "plan", "--plot", plot).exit_code == 2  # exists
    assert run_cli("inspect", tmp_path / "plan", "--plot", plot, "--overwrite").exit_code == 0
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"\x89PNG\r\n\x1a\n not ours")
    result = run_cli("inspect", tmp_path / "plan", "--plot", photo, "--overwrite")
    assert result.exit_code == 2 and photo.read_bytes().endswith(b"not ours")
    result = run_cli("inspect", tmp_path / "plan", "--plot", tmp_path / "plan" / "map.png")
    assert result.exit_code == 2 and "never writes over its inputs" in result.output


def test_inspect_bad_input(tmp_path: Path) -> None:
    _known_plan().save(tmp_path / "plan")
    for args, message in ((["--k", "2"], "--k and --alpha together"),
                          (["--layer", "9"], "--layer 9 is not a layer"),
                          (["--site", "mlp-out"], "site 'mlp-out' is not in this plan")):
        result = run_cli("inspect", tmp_path / "plan", *args)
        assert result.exit_code == 2 and message in result.output, result.output


# --- honest outputs --------------------------------------------------------------------

def test_cards_name_their_sites_in_words() -> None:
    plan = random_plan(tiny_model("llama"))
    two_sites = ExportRecord("x", Recipe.single(plan, 32, 1.0, ("head", "mlp")), "float32")
    assert units_sentence(two_sites).startswith("32 atomic units (sites head and mlp) are")
    one_site = ExportRecord("x", Recipe.single(plan, 32, 1.0, ("head",)), "float32")
    assert "(site head)" in units_sentence(one_site)


def test_a_gguf_export_says_what_it_becomes() -> None:
    from aufold.source import smollm2_gguf_path

    loud = gguf_dequantization_note(smollm2_gguf_path(), "auto")
    halved = gguf_dequantization_note(smollm2_gguf_path(), "bfloat16")
    assert "Q4_1" in loud and "float32" in loud and "5.5x the file" in loud and "--dtype bfloat16" in loud
    assert "bfloat16" in halved and "2.7x the file" in halved and "pass --dtype" not in halved


def test_demo_output_is_ignored_by_git() -> None:
    assert "aufold-demo/" in (REPO / ".gitignore").read_text().split()
