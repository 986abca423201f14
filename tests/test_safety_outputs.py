"""Outputs never touch inputs, --overwrite replaces only aufold's own outputs, one writer per
output, partial outputs of dead writers are cleaned up, permissions follow the umask, and
SIGTERM ends a command as cleanly as Ctrl-C.

Each case is the reproduction from issue 10 run through the command line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from edit_helpers import assert_one_line_error, run_cli, tree_digest
from tiny_models import save_tiny_model

from aufold.errors import AufoldError
from aufold.pairs import ContrastivePair, write_pairs
from aufold.safety.outputs import MARKER, Inputs, OutputKind, claim_output, write_file
from aufold.source import resolve_source

REPO = Path(__file__).resolve().parents[1]
PAIRS = [ContrastivePair(f"{a} plus 2 is", f" {a + 2}", f" {a + 3}") for a in range(6)]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """p/model (a tiny llama), p/pairs.jsonl, p/plan (head + mlp), p/notes.txt (unrelated)."""
    root = tmp_path_factory.mktemp("outputs") / "p"
    save_tiny_model("llama", root / "model")
    write_pairs(PAIRS, root / "pairs.jsonl")
    (root / "notes.txt").write_text("the user's own file")
    result = run_cli("localize", root / "model", "--pairs", root / "pairs.jsonl", "--site", "head",
                     "--site", "mlp", "--out", root / "plan")
    assert result.exit_code == 0, result.output
    return root


SELECT = ["--plan", "{p}/plan", "--k", "8", "--alpha", "2"]


@pytest.mark.parametrize("args", [
    # The data loss: --out is the folder that holds the model, the plan and other files.
    ["export", "{p}/model", *SELECT, "--out", "{p}", "--overwrite"],
    ["export", "{p}/model", *SELECT, "--out", "{p}", "--overwrite", "--format", "lora"],
    ["export", "{p}/model", *SELECT, "--out", "{p}", "--overwrite", "--format", "ia3"],
    ["export", "{p}/model", *SELECT, "--out", "{p}/model", "--overwrite"],
    ["export", "{p}/model", *SELECT, "--out", "{p}/plan", "--overwrite"],
    ["export", "{p}/model", *SELECT, "--out", "{p}/model/sub", "--overwrite"],
    ["localize", "{p}/model", "--pairs", "{p}/pairs.jsonl", "--site", "head", "--out", "{p}/model",
     "--overwrite"],
    ["localize", "{p}/model", "--pairs", "{p}/pairs.jsonl", "--site", "head", "--out", "{p}",
     "--overwrite"],
    ["merge-counts", "{p}/plan", "--out", "{p}/plan", "--overwrite"],
    ["tune", "{p}/model", "--task", "copa", "--plan", "{p}/plan", "--out", "{p}/plan", "--overwrite"],
    ["fold-vector", "{p}/model", "--vector", "{p}/notes.txt", "--out", "{p}", "--overwrite"],
    ["eval", "{p}/model", "--task", "copa", "--report", "{p}/model/config.json"],
    ["eval", "{p}/model", "--task", "copa", "--report", "{p}/model/config.json", "--overwrite"],
    ["eval", "{p}/model", "--task", "copa", "--report", "{p}/pairs.jsonl", "--overwrite",
     "--data-dir", "{p}"],
    ["demo", "--model", "{p}/model", "--out", "{p}", "--overwrite"],
], ids=lambda args: " ".join(a.replace("{p}", "p") for a in args[:1] + args[-4:]))
def test_an_output_that_overlaps_an_input_is_refused(project: Path, args: list[str]) -> None:
    before = tree_digest(project.parent)
    result = run_cli(*[a.format(p=project) for a in args])
    assert_one_line_error(result, "never writes over its inputs")
    assert tree_digest(project.parent) == before


def test_overwrite_refuses_a_folder_aufold_did_not_write(project: Path, tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("years of work")
    args = ["localize", project / "model", "--pairs", project / "pairs.jsonl", "--site", "head",
            "--out", theirs]
    assert_one_line_error(run_cli(*args), "already exists", "--overwrite")
    assert_one_line_error(run_cli(*args, "--overwrite"), "only replaces outputs that aufold wrote",
                          MARKER)
    assert [p.name for p in theirs.iterdir()] == ["thesis.tex"]


def test_overwrite_replaces_an_earlier_aufold_output(project: Path, tmp_path: Path) -> None:
    out = tmp_path / "plan"
    args = ["localize", project / "model", "--pairs", project / "pairs.jsonl", "--out", out]
    assert run_cli(*args, "--site", "head").exit_code == 0
    assert json.loads((out / MARKER).read_text())["format"] == "aufold-output"
    result = run_cli(*args, "--site", "mlp", "--overwrite")
    assert result.exit_code == 0, result.output
    assert result.output.count("replacing the earlier aufold output") == 1
    assert json.loads((out / "plan.json").read_text())["sites"] == ["mlp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan"]


def test_a_report_is_replaced_only_with_overwrite_and_only_if_aufold_wrote_it(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    with claim_output(report, kind=OutputKind.FILE):
        write_file(report, b'{"format": "aufold-eval"}\n')
    with pytest.raises(AufoldError, match="already exists"), claim_output(report, kind=OutputKind.FILE):
        pass
    with claim_output(report, kind=OutputKind.FILE, overwrite=True):
        write_file(report, b'{"format": "aufold-eval", "n": 2}\n')
    assert json.loads(report.read_text())["n"] == 2
    mine = tmp_path / "results.json"
    mine.write_text('{"my": "data"}')
    with pytest.raises(AufoldError, match="is not an aufold report"):
        with claim_output(mine, kind=OutputKind.FILE, overwrite=True):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "results.json"]


def test_a_gguf_input_is_its_file_not_its_folder(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    gguf = models / "x.gguf"
    gguf.write_bytes(b"GGUF")
    inputs = Inputs.of(resolve_source(gguf).input_paths())
    # Beside the file is fine (the false refusal); the folder holding it is not.
    with claim_output(models / "x-steered", inputs=inputs) as out:
        assert out == (models / "x-steered").resolve()
    with pytest.raises(AufoldError, match="contains the input"):
        with claim_output(models, inputs=inputs, overwrite=True):
            pass


HOLD_LOCK = """
import sys, time
from aufold.safety.outputs import claim_output
with claim_output(sys.argv[1]):
    print("claimed", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_of_one_output_fails_fast(project: Path, tmp_path: Path) -> None:
    out = tmp_path / "folded"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "claimed"
        started = time.monotonic()
        result = run_cli("export", project / "model", *[a.format(p=project) for a in SELECT],
                         "--out", out)
        assert_one_line_error(result, "another aufold process is writing")
        assert time.monotonic() - started < 10
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # The dead holder's lock file is taken over and removed by the next writer.
    result = run_cli("export", project / "model", *[a.format(p=project) for a in SELECT], "--out", out)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folded"]


def test_the_next_run_removes_what_a_killed_writer_left(project: Path, tmp_path: Path) -> None:
    out = tmp_path / "folded"
    partial = tmp_path / ".folded.aufold-partial-k1ll3d"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 4096)
    (tmp_path / ".folded.aufold-old-x7").mkdir()
    (tmp_path / ".folded.aufold-lock").write_text("12345\n")
    other = tmp_path / ".folded-other.aufold-partial-abc"  # another output's: left alone
    other.mkdir()
    result = run_cli("export", project / "model", *[a.format(p=project) for a in SELECT], "--out", out)
    assert result.exit_code == 0, result.output
    assert "left by an interrupted aufold run" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [".folded-other.aufold-partial-abc", "folded"]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o755), (0o027, 0o750), (0o002, 0o775)])
def test_output_folders_get_the_mode_the_umask_gives(project: Path, tmp_path: Path, umask: int,
                                                     mode: int) -> None:
    old = os.umask(umask)
    try:
        result = run_cli("export", project / "model", *[a.format(p=project) for a in SELECT],
                         "--out", tmp_path / "folded")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "folded").stat().st_mode & 0o777 == mode
    assert (tmp_path / "folded" / "config.json").stat().st_mode & 0o777 == mode & 0o666


# Ctrl-C's default handling, set explicitly: a job started in the background by a
# non-interactive shell (nohup ... &) inherits SIGINT ignored, as does its child here.
SLOW_EXPORT = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
import aufold.streaming as streaming
original = streaming._fold_shard
def slow(*args, **kwargs):
    print("writing", flush=True)
    time.sleep(60)
    return original(*args, **kwargs)
streaming._fold_shard = slow
import cli
cli.main(sys.argv[1:])
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_removes_the_partial_output(project: Path, tmp_path: Path, signum: int) -> None:
    out = tmp_path / "folded"
    args = ["export", str(project / "model"), *[a.format(p=project) for a in SELECT], "--out", str(out)]
    process = subprocess.Popen([sys.executable, "-c", SLOW_EXPORT, *args], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "writing"
    assert any(p.name.startswith(".folded.aufold-partial-") for p in tmp_path.iterdir())
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == (128 + signal.SIGTERM if signum == signal.SIGTERM else 1), stderr
    assert "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


# --- reproductions of a hostile review (aufold's own helper, 410 trials) -------------------

def test_a_planted_lock_link_is_refused_and_its_target_untouched(project: Path, tmp_path: Path) -> None:
    victim = tmp_path / "precious.txt"
    victim.write_text("do not touch")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".x.aufold-lock").symlink_to(victim)
    result = run_cli("export", project / "model", *[a.format(p=project) for a in SELECT],
                     "--out", tmp_path / "out" / "x")
    assert_one_line_error(result, "is a symbolic link, not aufold's lock file")
    assert victim.read_text() == "do not touch"


def test_a_link_inside_an_input_that_points_into_out_makes_out_an_input(project: Path,
                                                                        tmp_path: Path) -> None:
    ours = tmp_path / "ours"
    assert run_cli("export", project / "model", *[a.format(p=project) for a in SELECT],
                   "--out", ours).exit_code == 0
    linked = tmp_path / "linked"
    linked.mkdir()
    for item in (project / "model").iterdir():
        (linked / item.name).symlink_to(ours / item.name if item.name == "model.safetensors" else item)
    before = tree_digest(ours)
    result = run_cli("export", linked, *[a.format(p=project) for a in SELECT], "--alpha", "3",
                     "--out", ours, "--overwrite")
    assert_one_line_error(result, "never writes over its inputs")
    assert tree_digest(ours) == before


def test_a_report_replaces_only_an_eval_report(project: Path, tmp_path: Path) -> None:
    plan = tmp_path / "plan-copy"
    assert run_cli("localize", project / "model", "--pairs", project / "pairs.jsonl", "--site", "head",
                   "--out", plan).exit_code == 0
    for target in (plan / "plan.json", plan / MARKER):
        before = target.read_bytes()
        result = run_cli("eval", project / "model", "--task", "copa", "--limit", "2", "--report",
                         target, "--overwrite")
        assert_one_line_error(result, "is not an aufold report")
        assert target.read_bytes() == before


def test_an_empty_output_path_is_refused(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("mine")
    result = run_cli("export", project / "model", *[a.format(p=project) for a in SELECT], "--out", "")
    assert_one_line_error(result, "is empty; give a file or folder name")
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_a_kill_between_the_renames_of_a_replacement_is_repaired(project: Path, tmp_path: Path) -> None:
    """kill -9 after the earlier output was moved aside and before the new one took its
    place: the next writer restores the earlier output instead of deleting it."""
    out = tmp_path / "folded"
    assert run_cli("export", project / "model", *[a.format(p=project) for a in SELECT],
                   "--out", out).exit_code == 0
    before = tree_digest(out)
    retired = tmp_path / ".folded.aufold-old-k1ll3d"
    retired.mkdir()
    out.rename(retired / "folded")
    (tmp_path / ".folded.aufold-partial-n3w").mkdir()
    result = run_cli("export", project / "model", *[a.format(p=project) for a in SELECT],
                     "--out", out)  # no --overwrite: the restored output must make it refuse
    assert "restoring" in result.output
    assert_one_line_error(result, "already exists")
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folded"]


SIGNAL_AT_RENAME = """
import os, signal, sys
import aufold.safety.outputs as outputs
original = os.rename
def rename(source, target):
    original(source, target)
    if ".aufold-old-" in str(target):  # the earlier output was just moved aside
        os.kill(os.getpid(), signal.SIGTERM)
outputs.os.rename = rename
import cli
cli.main(sys.argv[1:])
"""


def test_sigterm_between_the_renames_waits_for_the_replacement(project: Path, tmp_path: Path) -> None:
    out = tmp_path / "folded"
    args = ["export", str(project / "model"), *[a.format(p=project) for a in SELECT], "--out", str(out)]
    assert run_cli(*args).exit_code == 0
    stronger = [a if a != "2" else "3" for a in args]  # the same export at alpha 3
    result = subprocess.run([sys.executable, "-c", SIGNAL_AT_RENAME, *stronger, "--overwrite"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert json.loads((out / "aufold.json").read_text())["selection"]["alpha"] == 3  # replaced whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folded"]
