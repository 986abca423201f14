"""The README's Quickstart commands, run exactly as written."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_commands() -> list[str]:
    section = README.read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith("aufold ")]


def test_quickstart_has_the_main_command() -> None:
    assert quickstart_commands() == ["aufold demo --out aufold-demo"]


@pytest.mark.slow
def test_quickstart_runs(tmp_path: Path) -> None:
    for command in quickstart_commands():
        result = subprocess.run(shlex.split(command), cwd=tmp_path, capture_output=True, text=True,
                                timeout=1800)  # a bound for a hung run, not a speed check
        assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "aufold-demo" / "report.json").read_text())
    assert report["verify"]["passed"] is True
    assert report["verify"]["top1_agreement"] == 1.0
    assert 0.0 <= report["test_accuracy_base"] <= 1.0 and report["test_items"] == 200
    assert "PASS" in result.stdout and "held-out test" in result.stdout
    assert (tmp_path / "aufold-demo" / "model" / "model.safetensors").is_file()
