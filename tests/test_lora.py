"""LoRA export: the adapter PEFT loads computes the hook mode, and merges into aufold's fold.

Every supported architecture and each foldable site (plus all three at once, which
puts row and column scalings on one down projection) on tiny random models, and
SmolLM2-135M. The adapter's key names and config are checked against what PEFT
itself saves, and the bad inputs against the CLI's one-line errors.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from edit_helpers import SITES, assert_one_line_error, logits, random_plan, relative_diff, run_cli
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from tiny_models import ARCHITECTURES, save_tiny_model, tiny_model
from transformers import PreTrainedModel

from aufold.edit import Edit, SteeredUnit
from aufold.errors import AufoldError
from aufold.export import export
from aufold.fold import fold_model
from aufold.formats.lora import ADAPTER_RANKS, lora_adapter
from aufold.modeling import load_model, model_architecture
from aufold.plan import Plan, SiteCounts
from aufold.steer import steer
from aufold.vectors import SteeringVectors, fold_vectors

FLOAT32_EPS = torch.finfo(torch.float32).eps


def peft_model(base: PreTrainedModel, folder: Path) -> PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about fan_in_fan_out on GPT-2's Conv1D
        return PeftModel.from_pretrained(base, folder).eval()


def check_adapter(base: PreTrainedModel, folder: Path, edit: Edit) -> None:
    """PEFT-loaded logits = hooks (fp32 rel 1e-5); merged weights = fold (to fp32 rounding)."""
    with steer(base, edit):
        hooked = logits(base)
    model = peft_model(base, folder)
    assert relative_diff(logits(model), hooked) <= 1e-5
    merged = model.merge_and_unload()
    folded = tiny_like(merged, edit)
    expected = dict(folded.named_parameters())
    for name, parameter in merged.named_parameters():
        scale = expected[name].abs().max().clamp_min(1e-30)
        assert (parameter - expected[name]).abs().max() <= 4 * FLOAT32_EPS * scale, name


def tiny_like(model: PreTrainedModel, edit: Edit) -> PreTrainedModel:
    fresh = tiny_model(model.config.model_type)
    fold_model(fresh, edit)
    return fresh


def adapter_config(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny_model(arch, root / arch) for arch in ARCHITECTURES}


@pytest.mark.parametrize("sites", [("head",), ("mlp",), ("mlp-out",), SITES],
                         ids=["head", "mlp", "mlp-out", "all"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_lora_adapter_equals_hooks_and_merges_into_the_fold(
        arch: str, sites: tuple[str, ...], tiny_folders: dict[str, Path], tmp_path: Path) -> None:
    base = tiny_model(arch)
    out = tmp_path / "lora"
    result = export(tiny_folders[arch], random_plan(base), k=24, alpha=0.8, sites=sites, out=out,
                    format="lora")
    config = adapter_config(out)
    assert config["peft_type"] == "LORA" and config["r"] in ADAPTER_RANKS
    assert config["lora_alpha"] == config["r"]
    assert not config["use_rslora"] and not config["use_dora"]
    assert config["bias"] == "none" and config["modules_to_save"] is None
    architecture = model_architecture(base)
    touched = {architecture.module_path(u.site, u.layer) for u in result.edit.units}
    assert set(config["target_modules"]) == touched  # modules with no unit are left out
    check_adapter(base, out, result.edit)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_keys_and_shapes_are_those_peft_saves(arch: str, tiny_folders: dict[str, Path],
                                                   tmp_path: Path) -> None:
    base = tiny_model(arch)
    result = export(tiny_folders[arch], random_plan(base), k=24, alpha=0.8, out=tmp_path / "ours",
                    format="lora")
    ours = adapter_config(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = get_peft_model(tiny_model(arch), LoraConfig(
            r=ours["r"], lora_alpha=ours["r"], target_modules=ours["target_modules"],
            lora_bias=ours["lora_bias"], fan_in_fan_out=ours["fan_in_fan_out"]))
        reference.save_pretrained(tmp_path / "peft")  # PEFT mistakes lora_B.bias for a shard
    assert _shapes(tmp_path / "ours") == _shapes(tmp_path / "peft")
    assert len(result.edit) == 24


def _shapes(folder: Path) -> dict[str, list[int]]:
    with safe_open(folder / "adapter_model.safetensors", "pt") as tensors:
        return {key: list(tensors.get_slice(key).get_shape()) for key in tensors.keys()}


@pytest.mark.slow
def test_lora_on_smollm2_and_its_size(smollm2_dir: Path, smollm2, tmp_path: Path) -> None:
    base, tokenizer = smollm2
    out = tmp_path / "lora"
    result = export(smollm2_dir, random_plan(base), k=32, alpha=0.8, out=out, format="lora")
    batch = tokenizer(["The capital of France is", "def fibonacci(n):"], return_tensors="pt",
                      padding=True)
    with torch.no_grad(), steer(base, result.edit):
        hooked = base(**batch).logits
    model = peft_model(load_model(smollm2_dir, dtype="float32")[0], out)
    with torch.no_grad():
        adapted = model(**batch).logits
    assert relative_diff(adapted, hooked) <= 1e-5
    merged = model.merge_and_unload()
    folded = load_model(smollm2_dir, dtype="float32")[0]
    fold_model(folded, result.edit)
    expected = dict(folded.named_parameters())
    for name, parameter in merged.named_parameters():
        scale = expected[name].abs().max()
        assert (parameter - expected[name]).abs().max() <= 4 * FLOAT32_EPS * scale, name
    adapter_bytes = (out / "adapter_model.safetensors").stat().st_size
    checkpoint_bytes = (smollm2_dir / "model.safetensors").stat().st_size
    print(f"\nSmolLM2 k=32 LoRA rank {adapter_config(out)['r']}: adapter {adapter_bytes / 1e6:.2f} MB "
          f"vs full float32 checkpoint {checkpoint_bytes / 1e6:.1f} MB")
    assert adapter_bytes < checkpoint_bytes / 20


@pytest.mark.slow
def test_rank_above_256_is_refused(smollm2_dir: Path, smollm2, tmp_path: Path) -> None:
    base, _ = smollm2
    plan = random_plan(base, sites=("mlp",))
    positive = plan.counts["mlp"].positive.clone()
    negative = plan.counts["mlp"].negative.clone()
    positive[3, :300] = plan.num_pairs + 1  # 300 top units, all in layer 3's down projection
    negative[3, :300] = 0
    plan = Plan(plan.model, plan.fingerprint, plan.num_pairs + 1, {"mlp": SiteCounts(positive, negative)})
    plan.save(tmp_path / "plan")
    out = tmp_path / "lora"
    result = run_cli("export", smollm2_dir, "--plan", tmp_path / "plan", "--k", 300, "--alpha", 1,
                     "--out", out, "--format", "lora")
    assert_one_line_error(result, "300 units", "model.layers.3.mlp.down_proj", "256",
                          "smaller k", "checkpoint")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["plan"]


def test_lora_refuses_a_bias_change_where_some_target_has_no_bias() -> None:
    model = tiny_model("llama")
    vectors = SteeringVectors({1: torch.randn(64)}, "memory", "test")
    fold_vectors(model, vectors, "mlp-out")  # down_proj now has biases, o_proj none
    edit = Edit.of([SteeredUnit("head", 1, 3, 0.5), SteeredUnit("mlp-out", 1, 7, 0.5)])
    with pytest.raises(AufoldError, match="model.layers.1.self_attn.o_proj has no bias"):
        lora_adapter(model, edit, base_model="tiny")
