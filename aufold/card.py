"""The model card (README.md) and the machine-readable provenance of an exported checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from datetime import datetime, timezone
from typing import Any

from aufold.evaluate.cost import MeasuredCost
from aufold.recipe import Component, Recipe
from aufold.source import hub_cache_repo
from aufold.version import __version__

PROVENANCE_FILE = "aufold.json"


def provenance_header(base_model: str) -> dict[str, Any]:
    """The fields that open every aufold.json: what wrote it, when, and from which model."""
    return {
        "format": "aufold-provenance",
        "aufold_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_model": base_model,
    }


@dataclass(frozen=True)
class Artifact:
    """The parts of the card that depend on what was written: checkpoint, adapter or GGUF file."""

    format: str  # as named by ``aufold export --format``
    library_name: str  # the Hub's name for the library that loads it
    summary: str  # the paragraph under the title (markdown)
    usage: str  # the body of the Usage section (markdown)
    written: str  # what the export step did: step 3 of "How it was made"
    settings: tuple[tuple[str, str], ...] = ()  # extra rows for the settings table


@dataclass(frozen=True)
class ExportRecord:
    """Everything the card and the provenance file say about one export."""

    base_model: str
    recipe: Recipe
    dtype: str
    artifact: Artifact | None = None  # None: a standard checkpoint (:func:`checkpoint_artifact`)
    # The GGUF file (path as given) whose dequantized weights the edit was computed on.
    quantized_base: str | None = None
    # Where the export will be loaded from: the hub repo it is pushed to, else its folder;
    # the card's usage lines name it, so that they run as written.
    location: str = "path/or/repo-id"
    # The edit's KL and perplexity ratio on neutral text, or why they were not measured;
    # None where no export step asked (a library call).
    cost: MeasuredCost | None = None

    @property
    def sites(self) -> tuple[str, ...]:
        return self.recipe.sites

    def base_arguments(self) -> str:
        """The ``from_pretrained`` arguments that load the base this export is exact on."""
        if self.quantized_base is not None:
            gguf = Path(self.quantized_base)
            where = hub_cache_repo(gguf.parent) or str(gguf.parent)  # a cached file: its repo
            return f'{json.dumps(where)}, gguf_file={json.dumps(gguf.name)}'
        return json.dumps(self.base_model)

    def provenance(self) -> dict[str, Any]:
        """aufold.json: one component's selection, plan and units at the top level; a
        composed edit lists its components, and its units with the product of factors."""
        components = [_component_record(c) for c in self.recipe.components]
        head = {
            **provenance_header(self.base_model),
            "fingerprint": self.recipe.components[0].plan.fingerprint,
            "method": "AUSteer (arXiv 2602.04428): x_i <- (1 + gamma_i) x_i folded into weights",
        }
        tail = {
            "cost": self.cost.to_dict() if self.cost else None,
            "dtype": self.dtype,
            "output_format": self.artifact.format if self.artifact else "checkpoint",
            "quantized_base": Path(self.quantized_base).name if self.quantized_base else None,
        }
        if not self.recipe.composed:
            return {**head, **{key: components[0][key] for key in ("selection", "plan")},
                    **tail, "units": components[0]["units"]}
        return {**head, "composition": "components applied in order; a unit in several is "
                                       "scaled by the product of their factors",
                "components": components, **tail,
                "units": self.recipe.edit().to_records()}


def _component_record(component: Component) -> dict[str, Any]:
    plan = component.plan
    return {
        "selection": {"k": component.k, "alpha": component.alpha, "sites": list(component.sites)},
        "plan": {"model": plan.model, "fingerprint": plan.fingerprint,
                 "num_pairs": plan.num_pairs, "sites": list(plan.sites),
                 "settings": plan.settings, "aufold_version": plan.aufold_version},
        "units": [{**unit.to_record(), "gamma": unit.gamma(component.alpha)}
                  for unit in component.units()],
    }


def card_files(record: ExportRecord) -> dict[str, str]:
    """The texts every export folder holds, by file name: the card and the provenance."""
    return {"README.md": model_card(record),
            PROVENANCE_FILE: json.dumps(record.provenance(), indent=2) + "\n"}


def units_sentence(record: ExportRecord) -> str:
    """What the edit does, in the words every card uses."""
    sites = list(record.sites)
    where = (f"site {sites[0]}" if len(sites) == 1
             else f"sites {', '.join(sites[:-1])} and {sites[-1]}")
    units = len(record.recipe.edit())
    sentence = (f"{units} atomic units ({where}) are scaled by `1 + gamma`, where "
                f"gamma = alpha x the unit's signed consistency score.")
    if record.recipe.composed:
        sentence += (f" The edit composes {len(record.recipe.components)} plans' edits: a unit "
                     f"that several steer is scaled by the product of their factors.")
    return sentence


def checkpoint_artifact(record: ExportRecord) -> Artifact:
    """The card texts of a standard checkpoint with the edit folded into its weights."""
    return Artifact(
        format="checkpoint",
        library_name="transformers",
        summary=f"""This checkpoint is `{record.base_model}` with fine-grained activation steering
(AUSteer, arXiv 2602.04428) folded into its weights. {units_sentence(record)}
Because the steering is proportional to the activation, it is an exact scaling of
weight columns (unit inputs of `o_proj` / `down_proj`) or rows (outputs of `down_proj`),
so the model keeps its architecture, size and speed.""",
        usage=f"""```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained({json.dumps(record.location)})
tokenizer = AutoTokenizer.from_pretrained({json.dumps(record.location)})
```

No custom code and no aufold install are needed; it runs on any stack that runs the
base model (transformers, vLLM, llama.cpp after conversion).""",
        written=f"""`aufold export`: the matching weight slices were multiplied by `1 + gamma` in float32
   and rounded once{" per component, in order" if record.recipe.composed else ""}; every other
   weight is bitwise unchanged.""",
    )


def exact_on_sentence(record: ExportRecord) -> str:
    """Which weights the export is exact on, when the base was a quantized GGUF file."""
    if record.quantized_base is None:
        return ""
    name = Path(record.quantized_base).name
    if record.artifact is None:
        return f"\n\nIts weights are those of `{name}`, dequantized, with the edit folded in exactly."
    if record.artifact.format == "gguf":
        return ""  # a folded GGUF file says what it is itself
    return f"""

It was made from `{name}`, dequantized, and is exact on those weights (the usage
below loads them so). On the original
weights of `{record.base_model}` it scales the same units by the same factors, so it
matches the folded model there only up to the file's quantization noise."""


def model_card(record: ExportRecord) -> str:
    """A README.md with Hub metadata, what was changed, and how to load the result."""
    artifact = record.artifact or checkpoint_artifact(record)
    sites = ", ".join(record.sites)
    extra_settings = "".join(f"\n| {name} | {value} |" for name, value in artifact.settings)
    header = "\n".join([
        "---",
        f"base_model: {json.dumps(record.base_model)}",
        f"library_name: {artifact.library_name}",
        "tags:",
        "- aufold",
        "- activation-steering",
        "---",
    ])
    components = record.recipe.components
    composed = record.recipe.composed
    column = "| component " if composed else ""
    rows = "\n".join(
        (f"| {number} " if composed else "") +
        f"| {u.site} | {u.layer} | {u.unit} | {u.direction_word()} | {u.score:.3f} | "
        f"{u.gamma(component.alpha):+.4g} |"
        for number, component in enumerate(components, 1) for u in component.units())
    return f"""{header}

# {record.base_model}, steered with aufold

{artifact.summary}{exact_on_sentence(record)}

| setting | value |
|---|---|
| sites | {sites} |
{_selection_rows(record.recipe)}
| dtype | {record.dtype} |{_cost_rows(record)}
| aufold | {__version__} |{extra_settings}
{_components_table(record.recipe)}
## Usage

{artifact.usage}

## How it was made

{_how_it_was_made(record.recipe)}
3. {artifact.written}

`{PROVENANCE_FILE}` records the same in machine-readable form.

## Folded units

{column}| site | layer | unit | direction | score | gamma |
{"|---" if composed else ""}|---|---|---|---|---|---|
{rows}
"""


def _cost_rows(record: ExportRecord) -> str:
    """The edit's cost on neutral text, measured with hooks on the base model (the folded
    model computes the same logits to float32 rounding)."""
    return "" if record.cost is None else "\n" + record.cost.card_rows()


def _selection_rows(recipe: Recipe) -> str:
    if not recipe.composed:
        component = recipe.components[0]
        return (f"| k (units) | {component.k} |\n| alpha | {component.alpha:g} |\n"
                f"| contrastive pairs | {component.plan.num_pairs} |")
    return (f"| components | {len(recipe.components)} (see below) |\n"
            f"| units steered | {len(recipe.edit())} |")


def _components_table(recipe: Recipe) -> str:
    """The components of a composed edit, in the order they apply; nothing for one."""
    if not recipe.composed:
        return ""
    rows = "\n".join(
        f"| {number} | {c.plan.model} | {c.plan.num_pairs} | {', '.join(c.sites)} | {c.k} | "
        f"{c.alpha:g} |" for number, c in enumerate(recipe.components, 1))
    return f"""
## Components

Applied in this order; a unit that several components steer is scaled by the product
of their factors, in hooks and in the folded weights alike.

| component | plan made on | contrastive pairs | sites | k | alpha |
|---|---|---|---|---|---|
{rows}
"""


def _how_it_was_made(recipe: Recipe) -> str:
    if not recipe.composed:
        component = recipe.components[0]
        pairs, top, each = component.plan.num_pairs, f"top {component.k} units", ""
    else:
        pairs = " / ".join(str(c.plan.num_pairs) for c in recipe.components)
        top, each = "top k units of each component", " (for each component)"
    return f"""1. `aufold localize`{each}: {pairs} contrastive pairs; for every unit, the
   fraction of pairs whose activation at the last token was higher (r_pos) or lower
   (r_neg) for the positive text than for the negative one; score = max(r_pos, r_neg).
2. The {top} by score were kept; gamma = alpha x r_pos for units that
   promote, -alpha x r_neg for units that suppress."""
