"""kill -9 at random points of an export never leaves a half-written --out, never touches the
inputs, and the next run cleans up: benchmarks/kill_export.py on a tiny model (its full run,
12 trials on the real SmolLM2, is in benchmarks/README.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tiny_models import save_tiny_model

REPO = Path(__file__).resolve().parents[1]


def test_kill_9_during_export_leaves_nothing_half_written(tmp_path: Path) -> None:
    model = save_tiny_model("llama", tmp_path / "model")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "kill_export.py"), "--model",
                             str(model), "--trials", "4", "--seed", "1"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4/4 trials ok" in result.stdout, result.stdout
