"""GGUF export: the edit folded into a copy of a GGUF file, changing only the edited blocks.

Tiny llama GGUF files (written here with the gguf package's own tensor name map)
cover every supported tensor type: float tensors equal the fold rounded once,
quantized tensors change only in the blocks that hold an edited unit, and every
other byte of the file is the input's. SmolLM2's packaged Q4_1 file, loaded back
by transformers, matches the hook mode on the dequantized base within the
quantization noise, measured on the same blocks.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from edit_helpers import assert_one_line_error, random_plan, relative_diff, run_cli
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, ReaderTensor
from gguf.quants import dequantize, quantize
from tiny_models import ARCHITECTURES, save_tiny_model, tiny_model
from transformers import AutoModelForCausalLM, PreTrainedModel

from aufold.edit import Edit, SteeredUnit
from aufold.export import export
from aufold.fold import TensorEdit, fold_tensor, weight_edits
from aufold.formats.gguf import GgufModel, fold_gguf, gguf_tensors, read_gguf_model
from aufold.modeling import load_model, smollm2_gguf_path
from aufold.plan import Plan, SiteCounts
from aufold.safety.outputs import MARKER
from aufold.sites import ARCHITECTURES as TABLE
from aufold.steer import steer

FLOAT_TYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
BLOCK_TYPES = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)
# The converter's architecture for each model type, to ask gguf's own tensor name map.
GGUF_ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA,
              "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
              "gemma2": gguf.MODEL_ARCH.GEMMA2, "gemma3_text": gguf.MODEL_ARCH.GEMMA3,
              "phi3": gguf.MODEL_ARCH.PHI3, "gpt2": gguf.MODEL_ARCH.GPT2}
IDS = torch.tensor([[17, 99, 43, 250, 8, 77, 120, 301], [200, 31, 9, 150, 42, 7, 330, 18]])


def write_llama_gguf(model: PreTrainedModel, path: Path, projections: Q) -> Path:
    """A GGUF file of a llama model: o_proj and down_proj as ``projections``, the rest F32."""
    path.parent.mkdir(parents=True, exist_ok=True)
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    writer = GGUFWriter(path, "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    for name, tensor in model.state_dict().items():
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:  # lm_head, tied to the embedding
            continue
        array = tensor.numpy()
        kind = projections if gguf_name.endswith(("attn_output.weight", "ffn_down.weight")) else Q.F32
        if kind == Q.F32:
            writer.add_tensor(gguf_name, array)
        elif kind == Q.F16:
            writer.add_tensor(gguf_name, array.astype(np.float16))
        else:
            writer.add_tensor(gguf_name, quantize(array, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def load_gguf(path: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


def gguf_edits(edit: Edit, model_type: str) -> dict[str, TensorEdit]:
    return weight_edits(edit, TABLE[model_type].gguf_naming())


def touched_blocks(shape: tuple[int, ...], tensor_edit: TensorEdit, block_size: int) -> np.ndarray:
    """Which blocks of a [out, in] tensor hold an edited element: a plain restatement."""
    out, width = shape
    touched = np.zeros((out, width // block_size), dtype=bool)
    for axis, (index, _) in tensor_edit.axes.items():
        if axis == 1:
            touched[:, np.unique(index.numpy() // block_size)] = True
        else:
            touched[index.numpy(), :] = True
    return touched


def quantization_step(blocks: np.ndarray, kind: Q) -> np.ndarray:
    """The grid spacing each block's type gives it (its d), from the exact values."""
    low, high = blocks.min(-1), blocks.max(-1)
    largest = np.abs(blocks).max(-1)
    return {Q.Q8_0: largest / 127, Q.Q4_0: largest / 8, Q.Q5_0: largest / 16,
            Q.Q4_1: (high - low) / 15, Q.Q5_1: (high - low) / 31}[kind]


def changed_byte_ranges(source: Path, tensors: dict[str, ReaderTensor],
                        edited: dict[str, np.ndarray]) -> np.ndarray:
    """A mask over the file's bytes: True where the fold may write (the edited blocks)."""
    mask = np.zeros(source.stat().st_size, dtype=bool)
    for tensor in tensors.values():
        if tensor.name in edited:
            block_bytes = gguf.GGML_QUANT_SIZES[tensor.tensor_type][1]
            per_byte = np.repeat(edited[tensor.name].reshape(-1), block_bytes)
            mask[tensor.data_offset:tensor.data_offset + tensor.n_bytes] = per_byte
    return mask


def differing_bytes(a: Path, b: Path) -> np.ndarray:
    return np.fromfile(a, dtype=np.uint8) != np.fromfile(b, dtype=np.uint8)


def test_the_table_names_tensors_as_the_gguf_converters_do() -> None:
    for model_type in ARCHITECTURES:
        names = gguf.get_tensor_name_map(GGUF_ARCHS[model_type], 4)
        hf, named = TABLE[model_type], TABLE[model_type].gguf_naming()
        for site in ("head", "mlp", "mlp-out"):
            module = hf.module_path(site, 3)
            assert names.get_name(module + ".weight", try_suffixes=(".weight",)) == (
                named.module_path(site, 3) + ".weight"), (model_type, site)


@pytest.mark.parametrize("kind", [*FLOAT_TYPES, *BLOCK_TYPES], ids=lambda kind: kind.name)
def test_gguf_fold_changes_only_the_edited_blocks(kind: Q, tmp_path: Path) -> None:
    source = write_llama_gguf(tiny_model("llama"), tmp_path / "in" / "tiny.gguf", kind)
    base = load_gguf(source)
    out = tmp_path / "folded"
    # the export refuses a plan whose fingerprint differs from read_gguf_model's
    edit = export(source, random_plan(base), k=24, alpha=0.8, out=out, format="gguf").edit
    folded_file = out / "tiny.gguf"
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "README.md", "aufold.json", "tiny.gguf"]
    before, after = gguf_tensors(source), gguf_tensors(folded_file)
    edits = gguf_edits(edit, "llama")
    allowed: dict[str, np.ndarray] = {}
    for name, tensor_edit in edits.items():
        if name not in before:  # an optional bias this model has none of
            continue
        old, new = before[name], after[name]
        shape = tuple(int(n) for n in reversed(old.shape))
        if kind in FLOAT_TYPES:
            original = torch.from_numpy(np.array(old.data).view(np.uint8)).view(FLOAT_TYPES[kind])
            expected = fold_tensor(original.reshape(shape), tensor_edit)
            actual = torch.from_numpy(np.array(new.data).view(np.uint8)).view(FLOAT_TYPES[kind])
            assert torch.equal(actual.reshape(shape), expected), name  # scaled, rounded once
            allowed[name] = touched_blocks(shape, tensor_edit, 1)  # the edited elements
            continue
        block_size, _ = gguf.GGML_QUANT_SIZES[kind]
        touched = touched_blocks(shape, tensor_edit, block_size)
        exact = fold_tensor(torch.from_numpy(dequantize(np.array(old.data), kind)), tensor_edit)
        exact_blocks = exact.numpy().reshape(shape[0], -1, block_size)[touched]
        new_blocks = dequantize(np.array(new.data), kind).reshape(shape[0], -1, block_size)[touched]
        step = quantization_step(exact_blocks, kind)[:, None]
        assert (np.abs(new_blocks - exact_blocks) <= step * 1.01 + 1e-12).all(), name
        allowed[name] = touched
    changed = differing_bytes(source, folded_file)
    assert not (changed & ~changed_byte_ranges(source, before, allowed)).any()
    if kind == Q.F32:
        with steer(base, edit), torch.no_grad():
            hooked = base(IDS).logits
        with torch.no_grad():
            assert relative_diff(load_gguf(folded_file)(IDS).logits, hooked) <= 1e-5


def test_gguf_refuses_k_quants_naming_the_tensor(tmp_path: Path) -> None:
    source = tmp_path / "in" / "kquant.gguf"
    source.parent.mkdir()
    writer = GGUFWriter(source, "llama")
    for key, value in (("block_count", 2), ("context_length", 256), ("embedding_length", 64),
                       ("feed_forward_length", 256), ("attention.head_count", 4),
                       ("attention.head_count_kv", 2), ("vocab_size", 100)):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    rng = np.random.default_rng(0)
    q4k_row = 256 // 256 * gguf.GGML_QUANT_SIZES[Q.Q4_K][1]
    for layer in range(2):
        writer.add_tensor(f"blk.{layer}.attn_output.weight",
                          rng.standard_normal((64, 64), dtype=np.float32))
        writer.add_tensor(f"blk.{layer}.ffn_down.weight",
                          rng.integers(0, 255, (64, q4k_row), dtype=np.uint8), raw_dtype=Q.Q4_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model = read_gguf_model(source)
    plan = random_plan_for_shapes(model.fingerprint)
    plan.save(tmp_path / "plan")
    out = tmp_path / "out"
    result = run_cli("export", source, "--plan", tmp_path / "plan", "--k", 4, "--alpha", 1,
                     "--site", "mlp", "--out", out, "--format", "gguf")
    assert_one_line_error(result, "ffn_down.weight", "Q4_K", "Q4_1", "Q8_0", "BF16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "plan"]


def random_plan_for_shapes(model_fingerprint: str) -> Plan:
    """A plan for the synthetic two-layer file: hidden 64, MLP 256."""
    counts = {site: SiteCounts(torch.randint(0, 11, (2, width)), torch.zeros(2, width, dtype=torch.long))
              for site, width in (("head", 64), ("mlp", 256))}
    return Plan("synthetic", model_fingerprint, 10, counts)


def test_gguf_format_needs_a_gguf_model(tmp_path: Path) -> None:
    base = save_tiny_model("llama", tmp_path / "base")
    random_plan(tiny_model("llama")).save(tmp_path / "plan")
    result = run_cli("export", base, "--plan", tmp_path / "plan", "--k", 4, "--alpha", 1,
                     "--out", tmp_path / "out", "--format", "gguf")
    assert_one_line_error(result, "not one", ".gguf")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def smollm2_folded(smollm2, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """SmolLM2's Q4_1 GGUF with a k=32 edit over all three sites, and the folded model loaded."""
    base, _ = smollm2
    out = tmp_path_factory.mktemp("gguf") / "folded"
    edit = export(smollm2_gguf_path(), random_plan(base), k=32, alpha=0.5, out=out,
                  format="gguf").edit
    folded_file = out / smollm2_gguf_path().name
    return edit, folded_file, load_model(folded_file, dtype="float32")[0], gguf_tensors(smollm2_gguf_path())


@pytest.mark.slow
def test_smollm2_gguf_matches_hooks_within_the_noise_floor(smollm2, smollm2_dir: Path,
                                                           smollm2_folded) -> None:
    base, tokenizer = smollm2
    edit, _, folded, tensors = smollm2_folded
    batch = tokenizer(["The capital of France is", "def fibonacci(n):\n    if n < 2:"],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        plain = base(**batch).logits
        with steer(base, edit):
            hooked = base(**batch).logits
        folded_logits = folded(**batch).logits
        fold_error = float((folded_logits - hooked).abs().max())
        # The noise floor: the same blocks of the untouched model requantized the same way.
        # Requantizing them as they are is lossless (checked below), so requantize a model
        # that is the untouched one in exact arithmetic: scaled by 1 + gamma, requantized,
        # scaled back by 1 / (1 + gamma), requantized again.
        round_trip = load_model(smollm2_dir, dtype="float32")[0]
        hf_edits = weight_edits(edit, TABLE["llama"])  # both from edit.groups(), in one order
        for (hf_name, tensor_edit), gguf_name in zip(hf_edits.items(), gguf_edits(edit, "llama")):
            if not hf_name.endswith(".weight"):
                continue
            tensor = tensors[gguf_name]
            kind = tensor.tensor_type
            original = np.array(tensor.data)
            assert np.array_equal(quantize(dequantize(original, kind), kind), original)  # lossless
            inverse = TensorEdit({axis: (index, 1 / scale) for axis, (index, scale)
                                  in tensor_edit.axes.items()})
            there = requantized(fold_tensor(torch.from_numpy(dequantize(original, kind)), tensor_edit), kind)
            back = requantized(fold_tensor(there, inverse), kind)
            round_trip.get_parameter(hf_name).data = back
        noise_floor = float((round_trip(**batch).logits - plain).abs().max())
    edit_effect = float((hooked - plain).abs().max())
    agreement = float((folded_logits.argmax(-1) == hooked.argmax(-1)).float().mean())
    print(f"\nSmolLM2 Q4_1 k=32: max |logit| {float(hooked.abs().max()):.2f}, edit effect "
          f"{edit_effect:.3f}, fold error {fold_error:.3f}, noise floor (requantization round "
          f"trip) {noise_floor:.3f}, top-1 agreement {agreement:.3f}")
    assert fold_error <= 1.5 * noise_floor
    assert agreement >= 0.9


def requantized(values: torch.Tensor, kind: Q) -> torch.Tensor:
    return torch.from_numpy(dequantize(quantize(values.numpy(), kind), kind))


@pytest.mark.slow
def test_smollm2_gguf_keeps_every_other_byte(smollm2_folded) -> None:
    edit, folded_file, _, tensors = smollm2_folded
    source = smollm2_gguf_path()
    allowed = {}
    for name, tensor_edit in gguf_edits(edit, "llama").items():
        if name in tensors:
            shape = tuple(int(n) for n in reversed(tensors[name].shape))
            block_size = gguf.GGML_QUANT_SIZES[tensors[name].tensor_type][0]
            allowed[name] = touched_blocks(shape, tensor_edit, block_size)
    changed = differing_bytes(source, folded_file)
    assert changed.any() and not (changed & ~changed_byte_ranges(source, tensors, allowed)).any()
    first_data = min(t.data_offset for t in tensors.values())
    assert not changed[:first_data].any()  # metadata, tensor names, shapes, types, offsets
    assert folded_file.stat().st_size == source.stat().st_size


def test_gguf_fold_scales_the_bias_of_a_row_edit(tmp_path: Path) -> None:
    """GPT-2's down projection has a bias; GGUF stores its weight [out, in] like any other."""
    source = tmp_path / "gpt2.gguf"
    writer = GGUFWriter(source, "gpt2")
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 128), dtype=np.float32)
    writer.add_tensor("blk.0.ffn_down.weight", quantize(weight, Q.Q8_0), raw_dtype=Q.Q8_0)
    writer.add_tensor("blk.0.ffn_down.bias", rng.standard_normal(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensors = gguf_tensors(source)
    edit = Edit.of([SteeredUnit("mlp-out", 0, unit, 0.25 * unit) for unit in (1, 5, 63)])
    fold_gguf(GgufModel(source, TABLE["gpt2"], "unused", tensors), edit, tmp_path / "out.gguf")
    after = gguf_tensors(tmp_path / "out.gguf")
    (name, bias_edit), = [(n, e) for n, e in gguf_edits(edit, "gpt2").items() if n.endswith("bias")]
    expected = fold_tensor(torch.from_numpy(np.array(tensors[name].data)), bias_edit)
    assert torch.equal(torch.from_numpy(np.array(after[name].data)), expected)
    rows = dequantize(np.array(after["blk.0.ffn_down.weight"].data), Q.Q8_0)
    scale = np.ones(64, dtype=np.float32)
    scale[[1, 5, 63]] = [1.25, 2.25, 16.75]
    exact = dequantize(np.array(tensors["blk.0.ffn_down.weight"].data), Q.Q8_0) * scale[:, None]
    assert np.allclose(rows, exact, rtol=0, atol=np.abs(exact).max() / 127)
