"""The model card and provenance of a checkpoint with steering vectors folded into its biases."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aufold.card import PROVENANCE_FILE, provenance_header
from aufold.sites import vector_target
from aufold.vectors.fold import VectorFold
from aufold.vectors.read import SteeringVectors
from aufold.version import __version__


@dataclass(frozen=True)
class VectorRecord:
    """Everything the card and the provenance file say about one vector fold."""

    base_model: str
    vectors: SteeringVectors
    target: str
    scale: float
    fold: VectorFold
    dtype: str
    location: str = "path/or/repo-id"  # where the card says to load the checkpoint from

    def provenance(self) -> dict[str, Any]:
        return {
            **provenance_header(self.base_model),
            "method": "additive steering h <- h + scale * v folded into biases",
            "vectors": {"source": Path(self.vectors.source).name, "format": self.vectors.format,
                        "layers": self.vectors.layers},
            "site": self.target,
            "scale": self.scale,
            "biases": list(self.fold.modules),
            "config_flags_switched_on": list(self.fold.flags),
            "dtype": self.dtype,
            "output_format": "checkpoint",
        }


def vector_card_files(record: VectorRecord) -> dict[str, str]:
    """README.md and the provenance file, by name."""
    return {"README.md": _card(record),
            PROVENANCE_FILE: json.dumps(record.provenance(), indent=2) + "\n"}


def _card(record: VectorRecord) -> str:
    site = vector_target(record.target)
    names = ", ".join(f"`{flag}`" for flag in record.fold.flags)
    flags = (f" Switching on the config flag {names} gave the projections biases; those that "
             f"hold no vector are zero." if names else "")
    layers = ", ".join(str(layer) for layer in record.vectors.layers)
    return f"""---
base_model: {json.dumps(record.base_model)}
library_name: transformers
tags:
- aufold
- activation-steering
- steering-vector
---

# {record.base_model}, steered with aufold

This checkpoint is `{record.base_model}` with an additive steering vector folded into its
biases: at every token, `{record.scale:g} x v` is added to {site.description}, in layers
{layers}. A constant added to the output of a projection `y = W x + b` is a change of its
bias, so the model keeps its class, size and speed.{flags}

| setting | value |
|---|---|
| vectors | `{Path(record.vectors.source).name}` ({record.vectors.format}) |
| site | {record.target} |
| scale | {record.scale:g} |
| layers | {layers} |
| dtype | {record.dtype} |
| aufold | {__version__} |

## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained({json.dumps(record.location)})
tokenizer = AutoTokenizer.from_pretrained({json.dumps(record.location)})
```

No custom code and no aufold install are needed.

`{PROVENANCE_FILE}` records the same in machine-readable form.
"""
