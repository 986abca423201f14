"""The fold against the hooks, and against a plain re-statement of which slice changes.

Every supported architecture, every foldable site, float32 and bfloat16: the
folded model's logits match the hooked model's, the edited slices equal the
original times (1 + gamma) rounded once, and every other element of every
tensor is bitwise unchanged.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from tiny_models import ARCHITECTURES, tiny_model, tiny_tokenizer
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from aufold.edit import Edit, SteeredUnit
from aufold.fold import fold_model
from aufold.modeling import site_module, site_width
from aufold.steer import steer

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "12 + 30 = 42, and 7 * 6"]


def random_edit(model: PreTrainedModel, sites: tuple[str, ...], per_layer: int = 3, seed: int = 0) -> Edit:
    rng = random.Random(seed)
    layers = model.config.num_hidden_layers
    units = []
    for site in sites:
        for layer in range(layers):
            for unit in rng.sample(range(site_width(model, site)), per_layer):
                units.append(SteeredUnit(site, layer, unit, rng.uniform(-0.9, 3.0)))
    return Edit.of(units)


def logits(model: PreTrainedModel) -> torch.Tensor:
    tokenizer = tiny_tokenizer()
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch).logits.float()
    return out[batch["attention_mask"].bool()]


def expected_weight(module: torch.nn.Module, edit: Edit, site: str, layer: int) -> torch.Tensor:
    """W' = W with columns (input sites) or rows (output sites) of y = W x scaled, in float32."""
    stored = module.weight.detach().float().clone()
    math_view = stored.T if isinstance(module, Conv1D) else stored  # [out, in], shares storage
    for unit in edit.units:
        if unit.site == site and unit.layer == layer:
            factor = torch.tensor(1.0 + unit.gamma, dtype=torch.float32)
            if site == "mlp-out":
                math_view[unit.unit, :] *= factor
            else:
                math_view[:, unit.unit] *= factor
    return stored.to(module.weight.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("site", ["head", "mlp", "mlp-out"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_fold_matches_hooks_and_changes_only_the_slices(arch: str, site: str, dtype: torch.dtype) -> None:
    model = tiny_model(arch, dtype=dtype)
    edit = random_edit(model, (site,))
    with steer(model, edit):
        hooked = logits(model)
    folded = copy.deepcopy(model)
    fold_model(folded, edit)
    result = logits(folded)

    diff = (hooked - result).abs().max().item()
    if dtype == torch.float32:
        assert diff <= 1e-5 * hooked.abs().max().item()
    else:
        reference = copy.deepcopy(model).float()  # the same weights, computed in float32
        noise_floor = (logits(model) - logits(reference)).abs().max().item()
        assert diff <= 3 * noise_floor

    original = dict(model.named_parameters())
    changed = {}
    for layer in range(model.config.num_hidden_layers):
        module = site_module(folded, site, layer)
        original_module = site_module(model, site, layer)
        assert torch.equal(module.weight, expected_weight(original_module, edit, site, layer))
        name = next(n for n, p in folded.named_parameters() if p is module.weight)
        changed[name] = module.weight
        if site == "mlp-out" and module.bias is not None:
            bias = original_module.bias.detach().float().clone()
            for unit in edit.units:
                if unit.layer == layer:
                    bias[unit.unit] *= torch.tensor(1.0 + unit.gamma, dtype=torch.float32)
            assert torch.equal(module.bias, bias.to(module.bias.dtype))
            changed[name.removesuffix("weight") + "bias"] = module.bias
    for name, parameter in folded.named_parameters():
        if name not in changed:
            assert torch.equal(parameter, original[name]), name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mlp_and_mlp_out_together_in_one_weight(arch: str) -> None:
    model = tiny_model(arch)
    edit = Edit.of(random_edit(model, ("mlp",), seed=1).units + random_edit(model, ("mlp-out",), seed=2).units)
    with steer(model, edit):
        hooked = logits(model)
    folded = copy.deepcopy(model)
    fold_model(folded, edit)
    assert (hooked - logits(folded)).abs().max() <= 1e-5 * hooked.abs().max()


def test_input_model_is_untouched_by_hooks() -> None:
    model = tiny_model("llama")
    before = {n: p.clone() for n, p in model.named_parameters()}
    plain = logits(model)
    with steer(model, random_edit(model, ("head", "mlp", "mlp-out", "residual"))):
        assert not torch.equal(logits(model), plain)
    assert torch.equal(logits(model), plain)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
