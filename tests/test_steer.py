"""Hook mode: what the hooks do to activations, and that they always come off."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHITECTURES, tiny_model, tiny_tokenizer

from aufold.edit import Edit, SteeredUnit
from aufold.errors import AufoldError
from aufold.sites import architecture_for
from aufold.steer import steer


def _hidden_states(model: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    batch = tiny_tokenizer()(["a short steering test"], return_tensors="pt")
    with torch.no_grad():
        return model(**batch, output_hidden_states=True).hidden_states


def _layer_inputs(model: torch.nn.Module) -> list[torch.Tensor]:
    """The hidden states entering each decoder layer, read by pre-hooks of our own."""
    layers = model.get_submodule(architecture_for(model.config.model_type).layers)
    seen: list[torch.Tensor] = []
    handles = [layer.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).clone()),
        with_kwargs=True) for layer in layers]
    try:
        _hidden_states(model)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_residual_steering_scales_exactly_that_unit_after_that_layer(arch: str) -> None:
    model = tiny_model(arch)
    plain = _layer_inputs(model)
    layer, unit, gamma = 1, 7, 0.75
    with steer(model, Edit.of([SteeredUnit("residual", layer, unit, gamma)])):
        steered = _layer_inputs(model)
    for before in range(layer + 1):
        assert torch.equal(steered[before], plain[before])
    expected = plain[layer + 1].clone()
    expected[..., unit] = expected[..., unit] * torch.tensor(1 + gamma, dtype=torch.float32)
    assert torch.equal(steered[layer + 1], expected)


def test_hooks_are_removed_when_the_block_raises() -> None:
    model = tiny_model("qwen3")
    plain = _hidden_states(model)[-1]
    hooks_before = _hook_count(model)
    with pytest.raises(RuntimeError, match="boom"):
        with steer(model, Edit.of([SteeredUnit("head", 0, 3, 2.0)])):
            assert not torch.equal(_hidden_states(model)[-1], plain)
            raise RuntimeError("boom")
    assert torch.equal(_hidden_states(model)[-1], plain)
    assert _hook_count(model) == hooks_before


def _hook_count(model: torch.nn.Module) -> int:
    # transformers keeps hooks of its own (to capture outputs); count, don't expect zero.
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_zero_gamma_changes_nothing() -> None:
    model = tiny_model("mistral")
    plain = _hidden_states(model)[-1]
    with steer(model, Edit.of([SteeredUnit("mlp", 1, 5, 0.0), SteeredUnit("head", 2, 9, 0.0)])):
        assert torch.equal(_hidden_states(model)[-1], plain)


def test_edit_rejects_duplicates_and_non_finite_gammas() -> None:
    with pytest.raises(AufoldError, match="appears twice"):
        Edit.of([SteeredUnit("mlp", 0, 1, 1.0), SteeredUnit("mlp", 0, 1, 2.0)])
    with pytest.raises(AufoldError, match="not finite"):
        Edit.of([SteeredUnit("mlp", 0, 1, float("nan"))])
    with pytest.raises(AufoldError, match="unknown site 'attn'"):
        Edit.of([SteeredUnit("attn", 0, 1, 1.0)])
