"""Realizations of an Edit other than a folded checkpoint: exact PEFT adapters and GGUF files.

- :mod:`aufold.formats.lora`: the edit as an exact LoRA adapter (B @ A = W' - W).
- :mod:`aufold.formats.ia3`: the edit as an exact IA3 adapter (1 + gamma per unit).
- :mod:`aufold.formats.gguf`: the edit folded into a copy of a GGUF file.
- :mod:`aufold.formats.export`: ``aufold export --format``: picks one and writes its folder.
"""

from __future__ import annotations

from aufold.defaults import GGUF_REENCODE_NAMES
from aufold.errors import AufoldError

CHECKPOINT = "checkpoint"
FORMATS: tuple[str, ...] = (CHECKPOINT, "lora", "ia3", "gguf")


def check_gguf_reencode(name: str) -> str:
    """The ``--gguf-reencode`` type in lower case, or an error that lists the choices."""
    if name.lower() not in GGUF_REENCODE_NAMES:
        raise AufoldError(f"unknown --gguf-reencode type {name!r}; choose from: "
                          f"{', '.join(GGUF_REENCODE_NAMES)}")
    return name.lower()


def check_format(name: str) -> None:
    if name not in FORMATS:
        raise AufoldError(f"unknown export format {name!r}; choose from: {', '.join(FORMATS)}")
