"""Writing a PEFT adapter folder: adapter_config.json, adapter_model.safetensors, card, provenance.

PEFT saves a module's adapter weights under ``base_model.model.<module path>.<name>``
(its wrapper's path, without the adapter's own name); PEFT, vLLM and the Hub all
read that layout, so both adapter formats write it through here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftConfig
from safetensors.torch import save_file

from aufold.card import ExportRecord, card_files
from aufold.edit import Edit
from aufold.errors import AufoldError
from aufold.safety.limits import check_finite
from aufold.safety.outputs import atomic_folder
from aufold.sites import Architecture

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # what PeftModel prefixes the base model's parameter names with


@dataclass(frozen=True)
class Adapter:
    """A complete adapter: its PEFT config and its tensors, by the names PEFT saves."""

    config: PeftConfig
    tensors: dict[str, torch.Tensor]


def adapter_key(module: str, name: str) -> str:
    """The saved name of an adapter tensor: ``base_model.model.<module>.lora_A.weight``, ..."""
    return f"{PEFT_PREFIX}{module}.{name}"


def check_adapter_targets(architecture: Architecture, edit: Edit, format_name: str) -> None:
    """Refuse units inside a Mixture-of-Experts block: PEFT adapts a Linear module, and no
    single one produces the block's output (every expert's down projection does) or reads
    its neurons (they are columns of one stacked experts tensor)."""
    for group in edit.groups():
        if group.site not in ("mlp", "mlp-out") or not 0 <= group.layer < architecture.num_layers \
                or architecture.layer_sites[group.layer].mlp_down is not None:
            continue
        what = ("the output of a Mixture-of-Experts block, which no single Linear module "
                "produces" if group.site == "mlp-out" else
                "neurons of a Mixture-of-Experts block's experts, which are columns of one "
                "stacked experts tensor, not the input of a Linear module")
        raise AufoldError(f"{format_name} adapters cannot hold {group.site!r} units of layer "
                          f"{group.layer}: they are {what} for PEFT to adapt; export --format "
                          f"checkpoint instead")


def write_adapter(adapter: Adapter, record: ExportRecord, out: Path) -> None:
    """The adapter folder, with card and provenance, written atomically; every tensor is
    checked finite first."""
    tensors = {name: tensor.contiguous() for name, tensor in adapter.tensors.items()}
    for name, tensor in tensors.items():
        check_finite(name, tensor)
    with atomic_folder(out, content="adapter") as staging:
        adapter.config.save_pretrained(str(staging))
        save_file(tensors, staging / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        for name, text in card_files(record).items():
            (staging / name).write_text(text)
