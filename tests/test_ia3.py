"""IA3 export: PEFT's IA3 with vectors 1 + gamma at the units is the edit, bitwise in float32.

Column units make their projection an IA3 feedforward module (input scaled), row
units a non-feedforward one (output and bias scaled); PEFT's forward then equals
the hooks and its merge equals aufold's fold, bit for bit, on every architecture.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from edit_helpers import assert_one_line_error, logits, random_plan, run_cli
from peft import PeftModel
from tiny_models import ARCHITECTURES, save_tiny_model, tiny_model
from transformers import PreTrainedModel

from aufold.edit import Edit
from aufold.export import export
from aufold.fold import fold_model
from aufold.modeling import load_model, model_architecture
from aufold.steer import steer


def peft_model(base: PreTrainedModel, folder: Path) -> PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about fan_in_fan_out on GPT-2's Conv1D
        return PeftModel.from_pretrained(base, folder).eval()


def assert_same_parameters(actual: PreTrainedModel, expected: PreTrainedModel) -> None:
    expected_parameters = dict(expected.named_parameters())
    for name, parameter in actual.named_parameters():
        assert torch.equal(parameter, expected_parameters[name]), name


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny_model(arch, root / arch) for arch in ARCHITECTURES}


@pytest.mark.parametrize("sites", [("head",), ("mlp",), ("mlp-out",), ("head", "mlp-out")],
                         ids=["head", "mlp", "mlp-out", "head+mlp-out"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_ia3_adapter_is_the_edit_bitwise(arch: str, sites: tuple[str, ...],
                                         tiny_folders: dict[str, Path], tmp_path: Path) -> None:
    base = tiny_model(arch)
    out = tmp_path / "ia3"
    edit = export(tiny_folders[arch], random_plan(base), k=24, alpha=0.8, sites=sites, out=out,
                  format="ia3").edit
    config = json.loads((out / "adapter_config.json").read_text())
    architecture = model_architecture(base)
    columns = {architecture.module_path(u.site, u.layer) for u in edit.units if u.site != "mlp-out"}
    rows = {architecture.module_path(u.site, u.layer) for u in edit.units if u.site == "mlp-out"}
    assert config["peft_type"] == "IA3"
    assert set(config["target_modules"]) == columns | rows
    assert set(config["feedforward_modules"]) == columns
    check_adapter(base, out, edit)


def check_adapter(base: PreTrainedModel, folder: Path, edit: Edit) -> None:
    with steer(base, edit):
        hooked = logits(base)
    model = peft_model(base, folder)
    assert torch.equal(logits(model), hooked)
    folded = tiny_model(base.config.model_type)
    fold_model(folded, edit)
    assert_same_parameters(model.merge_and_unload(), folded)


@pytest.mark.slow
def test_ia3_on_smollm2(smollm2_dir: Path, smollm2, tmp_path: Path) -> None:
    base, tokenizer = smollm2
    out = tmp_path / "ia3"
    edit = export(smollm2_dir, random_plan(base, sites=("head", "mlp")), k=32, alpha=0.8, out=out,
                  format="ia3").edit
    batch = tokenizer(["The capital of France is", "def fibonacci(n):"], return_tensors="pt",
                      padding=True)
    with torch.no_grad(), steer(base, edit):
        hooked = base(**batch).logits
    model = peft_model(load_model(smollm2_dir, dtype="float32")[0], out)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, hooked)
    folded = load_model(smollm2_dir, dtype="float32")[0]
    fold_model(folded, edit)
    assert_same_parameters(model.merge_and_unload(), folded)
    print(f"\nSmolLM2 k=32 IA3: adapter {(out / 'adapter_model.safetensors').stat().st_size / 1e6:.2f} MB")


def test_ia3_refuses_inputs_and_outputs_of_one_projection(tiny_folders: dict[str, Path],
                                                          tmp_path: Path) -> None:
    plan = random_plan(tiny_model("llama"), sites=("mlp", "mlp-out"))
    plan.save(tmp_path / "plan")
    out = tmp_path / "ia3"
    result = run_cli("export", tiny_folders["llama"], "--plan", tmp_path / "plan", "--k", 40,
                     "--alpha", 1, "--out", out, "--format", "ia3")
    assert_one_line_error(result, "both the inputs and the outputs", "mlp.down_proj", "--format lora")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan"]
