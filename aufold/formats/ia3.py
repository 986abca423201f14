"""The edit as an exact IA3 adapter: one learned vector per projection, 1 except at the units.

PEFT's IA3 multiplies the *input* of a module listed in ``feedforward_modules`` by
its vector ``ia3_l`` (shape [1, in]) and the *output* of any other target (shape
[out, 1]; merging scales the bias too). So column units (``head``, ``mlp``) make
their projection a feedforward module with ``1 + gamma`` at the units, and row
units (``mlp-out``) a non-feedforward one. A projection with both in one layer
(``mlp`` and ``mlp-out``) would need both, which IA3 cannot express. The vector
holds the very float32 factors the hooks and the fold multiply by, so PEFT's
forward equals the hooks and its merge equals the fold, bitwise in float32.
"""

from __future__ import annotations

import json

import torch
from peft import IA3Config
from transformers import PreTrainedModel

from aufold.card import Artifact, ExportRecord, units_sentence
from aufold.edit import Edit
from aufold.errors import AufoldError
from aufold.formats.adapter import Adapter, adapter_key, check_adapter_targets
from aufold.modeling import check_site_exists, model_architecture
from aufold.sites import check_foldable, site_kind


def ia3_adapter(model: PreTrainedModel, edit: Edit, *, base_model: str) -> Adapter:
    """The edit as a PEFT IA3 adapter over exactly the projections it touches."""
    check_foldable(edit.sites)
    for site in edit.sites:
        check_site_exists(model, site)
    architecture = model_architecture(model)
    check_adapter_targets(architecture, edit, "IA3")
    vectors: dict[str, torch.Tensor] = {}
    feedforward: list[str] = []
    for group in edit.groups():
        module = architecture.module_path(group.site, group.layer)
        scales_input = site_kind(group.site).placement == "input"
        if module in vectors:
            raise AufoldError(f"the edit scales both the inputs and the outputs of {module} "
                              f"(mlp and mlp-out units in layer {group.layer}), and IA3 scales "
                              f"only one of them per module; export --site mlp or --site mlp-out "
                              f"alone (in a recipe, one of them in every component's sites), "
                              f"or use --format lora or checkpoint")
        weight = architecture.out_in(model.get_submodule(module).weight)
        width = weight.shape[1] if scales_input else weight.shape[0]
        if int(group.index.max()) >= width:
            raise AufoldError(f"unit {int(group.index.max())} of site {group.site!r} does not fit "
                              f"{module} ({width} units); the plan was made for another model")
        vector = torch.ones(width).index_copy(0, group.index, group.scale)
        vectors[module] = vector.view(1, -1) if scales_input else vector.view(-1, 1)
        if scales_input:
            feedforward.append(module)
    config = IA3Config(
        target_modules=list(vectors), feedforward_modules=feedforward,
        fan_in_fan_out=architecture.layout == "conv1d", task_type="CAUSAL_LM",
        base_model_name_or_path=base_model, inference_mode=True)
    tensors = {adapter_key(module, "ia3_l"): vector for module, vector in vectors.items()}
    return Adapter(config, tensors)


def ia3_artifact(record: ExportRecord, adapter: Adapter) -> Artifact:
    """The card texts of an IA3 adapter."""
    base = record.base_model
    return Artifact(
        format="ia3",
        library_name="peft",
        summary=f"""This is an exact IA3 adapter for `{base}` that applies fine-grained activation
steering (AUSteer, arXiv 2602.04428). {units_sentence(record)} IA3 multiplies the
input of its feedforward modules and the output of its other modules by a vector; here
that vector is `1 + gamma` at the steered units and 1 everywhere else, so base model +
adapter computes exactly what the steering hooks compute, and merging it gives the folded
checkpoint bitwise (in float32).""",
        usage=f"""With PEFT:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained({record.base_arguments()})
model = PeftModel.from_pretrained(base, {json.dumps(record.location)})
tokenizer = AutoTokenizer.from_pretrained({record.base_arguments()})
merged = model.merge_and_unload()  # optional: the folded checkpoint
```

Serving engines without IA3 support (vLLM among them) can load the LoRA adapter
(`aufold export --format lora`) or the folded checkpoint instead.""",
        written="""`aufold export --format ia3`: one float32 vector per touched projection, `1 + gamma`
   at the steered units and 1 elsewhere.""",
        settings=(("format", "IA3 adapter (PEFT)"),
                  ("target modules", str(len(adapter.config.target_modules or ())))),
    )
