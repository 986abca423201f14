"""Helpers shared by the tests: plans that fit a model, logits, the CLI, checkpoint tensors."""

from __future__ import annotations

from pathlib import Path

import torch
from click.testing import CliRunner, Result
from safetensors.torch import load_file
from transformers import PreTrainedModel

import cli
from aufold.modeling import fingerprint, num_layers, site_width
from aufold.plan import Plan, SiteCounts

SITES = ("head", "mlp", "mlp-out")
PROMPT_IDS = torch.tensor([[17, 99, 43, 250, 8, 77, 120, 301, 66, 12],
                           [200, 31, 9, 150, 42, 42, 7, 330, 18, 95]])


def random_plan(model: PreTrainedModel, *, seed: int = 0, num_pairs: int = 1000,
                sites: tuple[str, ...] = SITES) -> Plan:
    """A plan for ``model`` with random counts: distinct enough scores to spread over layers."""
    generator = torch.Generator().manual_seed(seed)
    counts = {}
    for site in sites:
        shape = (num_layers(model), site_width(model, site))
        positive = torch.randint(0, num_pairs + 1, shape, generator=generator)
        negative = (num_pairs - positive) * torch.randint(0, 2, shape, generator=generator)
        counts[site] = SiteCounts(positive, negative)
    return Plan(model="test", fingerprint=fingerprint(model), num_pairs=num_pairs, counts=counts)


def logits(model: PreTrainedModel, ids: torch.Tensor = PROMPT_IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def relative_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def run_cli(*args: object) -> Result:
    return CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result: Result, *words: str) -> None:
    """Exit code 2 and one ``aufold: error:`` line, no traceback, that mentions every word.

    Other lines on stderr can only be transformers' loading progress bars.
    """
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("aufold: error: ")]
    assert len(errors) == 1, result.output
    assert result.output.rstrip().endswith(errors[0]), result.output
    for word in words:
        assert word in errors[0], (word, errors[0])


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, across its safetensors shards."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor, for bitwise comparison."""
    return tensor.contiguous().view(torch.uint8)


def tree_digest(root: Path) -> dict[str, str]:
    """Every file and folder below ``root`` by relative path: a file's sha256, 'dir' for a folder.

    Equal digests before and after a command mean it changed, added and removed nothing.
    """
    import hashlib

    digest = {}
    for path in sorted(Path(root).rglob("*")):
        key = str(path.relative_to(root))
        digest[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return digest
