"""``aufold fold-vector``: additive steering folded into biases equals adding the vector by hook.

On tiny random models of every architecture and each vector site, the folded
checkpoint reloads in plain transformers as the same class and matches the hook
(float32 relative 1e-5), or the command refuses with the reason. On SmolLM2 a
repeng control vector round-trips through its GGUF format. Every vector format
reads to the same vectors; bad input gets a one-line error and writes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from edit_helpers import assert_one_line_error, logits, relative_diff, run_cli
from safetensors.torch import save_file
from tiny_models import ARCHITECTURES, save_tiny_model, tiny_model
from transformers import AutoModelForCausalLM

from aufold.sites import architecture_for
from aufold.sites import VECTOR_SITES
from aufold.vectors import add_vectors, read_vectors
from aufold.vectors.read import SteeringVectors

HIDDEN = 64
LAYERS = 3


def random_vectors(layers: list[int], width: int = HIDDEN, seed: int = 0) -> dict[int, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {layer: torch.randn(width, generator=generator) for layer in layers}


def write_repeng_gguf(vectors: dict[int, torch.Tensor], path: Path, model_type: str) -> Path:
    """What repeng's ControlVector.export_gguf writes."""
    writer = gguf.GGUFWriter(path, "controlvector")
    writer.add_string("controlvector.model_hint", model_type)
    writer.add_uint32("controlvector.layer_count", len(vectors))
    for layer, vector in vectors.items():
        writer.add_tensor(f"direction.{layer}", vector.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def can_fold(model_type: str, site: str) -> bool:
    """A restatement of the table: a bias switch exists, and for residual vectors no norm."""
    arch = architecture_for(model_type)
    switch = arch.attention_out_bias if site == "attention-out" else arch.mlp_down_bias
    return switch is not None and not (site == "residual" and arch.norm_after_mlp_down)


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny_model(arch, root / arch) for arch in ARCHITECTURES}


@pytest.mark.parametrize("site", list(VECTOR_SITES))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_folded_vectors_equal_the_hook(arch: str, site: str, tiny_folders: dict[str, Path],
                                       tmp_path: Path) -> None:
    vectors = random_vectors([0, 2])
    vector_file = tmp_path / "v.safetensors"
    save_file({str(layer): v for layer, v in vectors.items()}, vector_file)
    out = tmp_path / "out"
    result = run_cli("fold-vector", tiny_folders[arch], "--vector", vector_file, "--site", site,
                     "--scale", 0.7, "--out", out)
    if not can_fold(arch, site):
        reason = "post_feedforward_layernorm" if site == "residual" and arch.startswith("gemma") \
            else "no config flag"
        assert_one_line_error(result, reason)
        assert not out.exists()
        return
    assert result.exit_code == 0, result.output
    base = tiny_model(arch)
    with add_vectors(base, read_vectors(vector_file), site, 0.7):
        hooked = logits(base)
    folded = AutoModelForCausalLM.from_pretrained(out)
    assert type(folded) is type(base)
    assert relative_diff(logits(folded), hooked) <= 1e-5
    provenance = json.loads((out / "aufold.json").read_text())
    for flag in provenance["config_flags_switched_on"]:
        assert getattr(folded.config, flag) is True


def test_vector_formats_read_the_same(tmp_path: Path) -> None:
    vectors = random_vectors(list(range(LAYERS)))
    stacked = torch.stack([vectors[layer] for layer in range(LAYERS)])
    save_file({f"direction.{layer}": v for layer, v in vectors.items()}, tmp_path / "keyed.safetensors")
    save_file({"vectors": stacked}, tmp_path / "stacked.safetensors")
    (tmp_path / "dict.json").write_text(json.dumps({"layers": {str(k): v.tolist() for k, v in vectors.items()}}))
    (tmp_path / "list.json").write_text(json.dumps(stacked.tolist()))
    caa = tmp_path / "caa"
    caa.mkdir()
    for layer, vector in vectors.items():
        np.save(caa / f"vec_layer_{layer}_Llama-2-7b-chat-hf.npy", vector.numpy())
    write_repeng_gguf(vectors, tmp_path / "repeng.gguf", "llama")
    for name in ("keyed.safetensors", "stacked.safetensors", "dict.json", "list.json", "caa",
                 "repeng.gguf"):
        read = read_vectors(tmp_path / name)
        assert read.layers == list(range(LAYERS)), name
        for layer, vector in vectors.items():
            assert torch.equal(read.vectors[layer], vector), name  # float32 in, float32 out


@pytest.mark.slow
def test_repeng_vector_round_trips_on_smollm2(smollm2_dir: Path, smollm2, tmp_path: Path) -> None:
    base, tokenizer = smollm2
    vectors = random_vectors([4, 10, 11, 20], width=base.config.hidden_size, seed=1)
    vector_file = write_repeng_gguf(vectors, tmp_path / "happy.gguf", "llama")
    read = read_vectors(vector_file)
    assert read.format == "repeng-gguf" and read.layers == [4, 10, 11, 20]
    assert all(torch.equal(read.vectors[layer], v) for layer, v in vectors.items())
    out = tmp_path / "folded"
    result = run_cli("fold-vector", smollm2_dir, "--vector", vector_file, "--scale", 2.5,
                     "--out", out)
    assert result.exit_code == 0, result.output
    batch = tokenizer(["I feel", "The weather today is"], return_tensors="pt", padding=True)
    with torch.no_grad(), add_vectors(base, read, "residual", 2.5):
        hooked = base(**batch).logits
    folded = AutoModelForCausalLM.from_pretrained(out)
    assert type(folded) is type(base) and folded.config.mlp_bias is True
    with torch.no_grad():
        assert relative_diff(folded(**batch).logits, hooked) <= 1e-5


def bad_vector_files(tmp_path: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    wrong_width = tmp_path / "wide.safetensors"
    save_file({"1": torch.randn(HIDDEN + 1)}, wrong_width)
    too_few = tmp_path / "two_layers.json"
    too_few.write_text(json.dumps([[0.1] * HIDDEN, [0.2] * HIDDEN]))
    beyond = tmp_path / "layer5.safetensors"
    save_file({"direction.5": torch.randn(HIDDEN)}, beyond)
    pickle = tmp_path / "vec_layer_1.pt"
    pickle.write_bytes(b"not read")
    return {
        "width": (wrong_width, ("65 values", "hidden size is 64")),
        "count": (too_few, ("2 per-layer vectors", "3 layers")),
        "layer": (beyond, ("layer 5", "3 layers")),
        "pickle": (pickle, ("pickle", "safetensors")),
    }


@pytest.mark.parametrize("case", ["width", "count", "layer", "pickle"])
def test_bad_vectors_are_refused(case: str, tiny_folders: dict[str, Path], tmp_path: Path) -> None:
    vector_file, words = bad_vector_files(tmp_path)[case]
    out = tmp_path / "out"
    result = run_cli("fold-vector", tiny_folders["llama"], "--vector", vector_file, "--out", out)
    assert_one_line_error(result, *words)
    assert not out.exists()


@pytest.mark.parametrize("scale", ["nan", "inf", "-inf"])
def test_non_finite_scale_is_refused(scale: str, tiny_folders: dict[str, Path], tmp_path: Path) -> None:
    vector_file = tmp_path / "v.safetensors"
    save_file({"1": torch.randn(HIDDEN)}, vector_file)
    out = tmp_path / "out"
    result = run_cli("fold-vector", tiny_folders["llama"], "--vector", vector_file, "--scale", scale,
                     "--out", out)
    assert_one_line_error(result, "scale must be a finite number")
    assert not out.exists()


def test_hooks_leave_the_model_unchanged() -> None:
    model = tiny_model("llama")
    before = logits(model)
    vectors = SteeringVectors(random_vectors([1]), "memory", "test")
    with add_vectors(model, vectors, "residual", 1.0):
        assert not torch.equal(logits(model), before)
    assert torch.equal(logits(model), before)
