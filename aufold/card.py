"""The model card (README.md) and the machine-readable provenance of an exported checkpoint."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from aufold.plan import Plan, RankedUnit
from aufold.version import __version__

PROVENANCE_FILE = "aufold.json"


@dataclass(frozen=True)
class ExportRecord:
    """Everything the card and the provenance file say about one export."""

    base_model: str
    plan: Plan
    units: Sequence[RankedUnit]
    k: int
    alpha: float
    sites: Sequence[str]
    dtype: str

    def provenance(self) -> dict[str, Any]:
        return {
            "format": "aufold-provenance",
            "aufold_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "base_model": self.base_model,
            "fingerprint": self.plan.fingerprint,
            "method": "AUSteer (arXiv 2602.04428): x_i <- (1 + gamma_i) x_i folded into weights",
            "selection": {"k": self.k, "alpha": self.alpha, "sites": list(self.sites)},
            "plan": {"model": self.plan.model, "num_pairs": self.plan.num_pairs,
                     "sites": list(self.plan.sites), "settings": self.plan.settings,
                     "aufold_version": self.plan.aufold_version},
            "dtype": self.dtype,
            "units": [{**unit.to_record(), "gamma": unit.gamma(self.alpha)} for unit in self.units],
        }


def model_card(record: ExportRecord) -> str:
    """A README.md with Hub metadata, what was changed, and how to load the result."""
    sites = ", ".join(record.sites)
    header = "\n".join([
        "---",
        f"base_model: {json.dumps(record.base_model)}",
        "library_name: transformers",
        "tags:",
        "- aufold",
        "- activation-steering",
        "---",
    ])
    rows = "\n".join(
        f"| {u.site} | {u.layer} | {u.unit} | {u.direction_word()} | {u.score:.3f} | "
        f"{u.gamma(record.alpha):+.4g} |" for u in record.units)
    return f"""{header}

# {record.base_model}, steered with aufold

This checkpoint is `{record.base_model}` with fine-grained activation steering
(AUSteer, arXiv 2602.04428) folded into its weights. {len(record.units)} atomic units
(site {sites}) are scaled by `1 + gamma`, where gamma = alpha x the unit's signed
consistency score. Because the steering is proportional to the activation, it is an
exact scaling of weight columns (unit inputs of `o_proj` / `down_proj`) or rows
(outputs of `down_proj`), so the model keeps its architecture, size and speed.

| setting | value |
|---|---|
| sites | {sites} |
| k (units) | {record.k} |
| alpha | {record.alpha:g} |
| contrastive pairs | {record.plan.num_pairs} |
| dtype | {record.dtype} |
| aufold | {__version__} |

## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/or/repo-id")
tokenizer = AutoTokenizer.from_pretrained("path/or/repo-id")
```

No custom code and no aufold install are needed; it runs on any stack that runs the
base model (transformers, vLLM, llama.cpp after conversion).

## How it was made

1. `aufold localize`: {record.plan.num_pairs} contrastive pairs; for every unit, the
   fraction of pairs whose activation at the last token was higher (r_pos) or lower
   (r_neg) for the positive text than for the negative one; score = max(r_pos, r_neg).
2. The top {record.k} units by score were kept; gamma = alpha x r_pos for units that
   promote, -alpha x r_neg for units that suppress.
3. `aufold export`: the matching weight slices were multiplied by `1 + gamma` in float32
   and rounded once; every other weight is bitwise unchanged.

`{PROVENANCE_FILE}` records the same in machine-readable form.

## Folded units

| site | layer | unit | direction | score | gamma |
|---|---|---|---|---|---|
{rows}
"""
