"""Fault injection: `kill -9` an `aufold export` at random points, then check what is left.

For each trial, an export of MODEL (the real SmolLM2-135M-Instruct by default, the test
suite's float32 safetensors copy) runs as its own process and is killed with SIGKILL.
Even trials kill it at a random point of the whole run (0 to 1.2x its duration, start-up
included); odd trials wait until its partial folder appears and kill it at a random
point of the writing (0 to 1.2x the time the writing takes), where a kill can do harm.
After each kill:

- `--out` is either absent or complete (the files of an export that finished, every
  weight file bitwise; the card and aufold.json carry the export's time), never
  half-written;
- the input model folder and the plan are bitwise unchanged (sha256 of every file);
- a rerun of the same export succeeds, and afterwards nothing but `--out` is left in its
  parent folder: the partial folder and the lock file of the killed writer are gone.

It prints one line per trial and a summary, and exits 1 if any check failed.

    python benchmarks/kill_export.py                     # 12 trials on SmolLM2
    python benchmarks/kill_export.py --model DIR --trials 3
"""

from __future__ import annotations

import argparse
import hashlib
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MARKER = ".aufold-output"  # aufold.safety.outputs.MARKER; this process imports neither torch nor aufold
TIMESTAMPED = ("aufold.json", "README.md")  # hold the export's creation time
POLL = 0.005


@dataclass(frozen=True)
class Trial:
    during_write: bool
    delay: float
    finished_before_kill: bool
    out_state: str  # "absent" or "complete"
    leftovers_before_rerun: tuple[str, ...]
    inputs_unchanged: bool
    clean_after_rerun: bool

    @property
    def ok(self) -> bool:
        return self.out_state in ("absent", "complete") and self.inputs_unchanged and self.clean_after_rerun


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def comparable(folder: Path) -> dict[str, str]:
    """A folder's files as an export is compared: timestamped texts by name only."""
    files = digest(folder)
    files.pop(MARKER, None)
    return {name: "" if name in TIMESTAMPED else sha for name, sha in files.items()}


def wait_for_partial(parent: Path, process: subprocess.Popen[bytes]) -> float:
    """Wait until the export's partial folder appears beside --out; return when it did."""
    while process.poll() is None:
        if any(".aufold-partial-" in p.name for p in parent.iterdir()):
            return time.monotonic()
        time.sleep(POLL)
    return time.monotonic()


def aufold(*args: object) -> list[str]:
    return [sys.executable, str(REPO / "cli.py"), *map(str, args)]


def export_command(model: Path, plan: Path, out: Path) -> list[str]:
    return aufold("export", model, "--plan", plan, "--k", 32, "--alpha", 5, "--out", out, "--no-cost")


def run_trials(model: Path, trials: int, seed: int, work: Path) -> list[Trial]:
    pairs = work / "pairs.jsonl"
    pairs.write_text("".join(f'{{"prompt": "{a} + {a} =", "positive": " {2 * a}", "negative": '
                             f'" {2 * a + 1}"}}\n' for a in range(8)))
    plan = work / "plan"
    subprocess.run(aufold("localize", model, "--pairs", pairs, "--site", "head", "--site", "mlp",
                          "--out", plan), check=True, capture_output=True)
    inputs = {"model": digest(model), "plan": digest(plan)}

    started = time.monotonic()
    process = subprocess.Popen(export_command(model, plan, work / "reference"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    writing = wait_for_partial(work, process)
    if process.wait() != 0:
        raise SystemExit("the reference export failed")
    duration, write = time.monotonic() - started, time.monotonic() - writing
    reference = comparable(work / "reference")
    print(f"a whole export takes {duration:.1f} s, of which {write:.2f} s writing")

    rng = random.Random(seed)
    results = []
    for trial in range(trials):
        parent = work / f"trial-{trial}"
        parent.mkdir()
        out = parent / "out"
        during_write = trial % 2 == 1
        process = subprocess.Popen(export_command(model, plan, out), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        if during_write:
            wait_for_partial(parent, process)
        delay = rng.uniform(0, 1.2 * (write if during_write else duration))
        time.sleep(delay)
        finished = process.poll() is not None
        process.kill()  # SIGKILL: no handler, no cleanup can run
        process.wait()
        if out.exists():
            state = "complete" if comparable(out) == reference else "HALF-WRITTEN"
        else:
            state = "absent"
        leftovers = tuple(sorted(p.name for p in parent.iterdir() if p.name != "out"))
        unchanged = {"model": digest(model), "plan": digest(plan)} == inputs
        rerun = export_command(model, plan, out) + (["--overwrite"] if out.exists() else [])
        subprocess.run(rerun, check=True, capture_output=True)
        clean = [p.name for p in parent.iterdir()] == ["out"] and comparable(out) == reference
        results.append(Trial(during_write, delay, finished, state, leftovers, unchanged, clean))
        result = results[-1]
        when = "into the writing" if during_write else "after the start"
        print(f"trial {trial:>2}: killed {delay:5.2f} s {when}{' (already done)' if finished else ''}; "
              f"--out {state}; left beside it: {', '.join(leftovers) or 'nothing'}; inputs "
              f"{'unchanged' if unchanged else 'CHANGED'}; after rerun "
              f"{'clean' if clean else 'NOT CLEAN'} -> {'ok' if result.ok else 'FAIL'}")
        shutil.rmtree(parent)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="Safetensors model folder (default: the test suite's SmolLM2 copy).")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = args.model
    if model is None:
        from aufold.source import SMOLLM2_CACHE

        model = REPO / SMOLLM2_CACHE
        if not (model / "config.json").is_file():
            print(f"no SmolLM2 copy at {model}; run the test suite once (it makes it) or pass --model")
            return 2
    with tempfile.TemporaryDirectory(prefix="aufold-kill-") as scratch:
        results = run_trials(model.resolve(), args.trials, args.seed, Path(scratch))
    killed = sum(not r.finished_before_kill for r in results)
    complete = sum(r.out_state == "complete" for r in results)
    absent = sum(r.out_state == "absent" for r in results)
    with_leftovers = sum(bool(r.leftovers_before_rerun) for r in results)
    print(f"{sum(r.ok for r in results)}/{len(results)} trials ok; {killed} processes killed before "
          f"they exited; --out complete after {complete} kills (after the rename), absent after "
          f"{absent}; {with_leftovers} kills left a partial folder and lock beside --out, which "
          f"the rerun removed")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
