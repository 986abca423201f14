"""GGUF export: the edit folded into a copy of a GGUF file, keeping quantized codes where it can.

The block-scale table is checked against the gguf package's own dequantizers for
every type it lists. Tiny llama GGUF files (written with the gguf package's tensor
name map) in every float and block type then check the whole fold: row units
(``mlp-out`` in ``ffn_down``, ``mlp`` in the gated ``ffn_up``) move only block
scales, column units (``head``) re-encode ``attn_output`` alone, every other tensor
keeps its bytes, and the folded file matches the hook mode on the dequantized base.
The real SmolLM2 (Q4_1) and Gemma 3 (Q4_K_M) files are in ``test_gguf_real.py``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from edit_helpers import assert_one_line_error, random_plan, run_cli
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFWriter
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from tiny_models import ARCHITECTURES, save_tiny_model, tiny_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from aufold.card import Artifact, ExportRecord, card_files, model_card
from aufold.recipe import Recipe
from aufold.edit import Edit, SteeredUnit
from aufold.export import base_model_name, export, gguf_reference
from aufold.fold import fold_tensor, weight_edits
from aufold.formats.gguf import GgufModel, fold_gguf, gguf_tensors, read_gguf_model
from aufold.formats.gguf.blocks import BLOCK_SCALES, scale_rows
from aufold.safety.outputs import MARKER
from aufold.sites import architecture_for
from aufold.source import hub_cache_repo, resolve_source
from aufold.steer import steer

# Block types whose values are not linear in a float16 scale (power-of-two or fp8 scales),
# or that only exist as intermediate types in ggml: edited by re-encoding, or refused.
NO_FLOAT16_SCALE = {Q.MXFP4, Q.NVFP4, Q.Q8_1, Q.Q8_K, Q.Q1_0}
# The converter's architecture for each model type, to ask gguf's own tensor name map.
GGUF_ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA,
              "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
              "gemma2": gguf.MODEL_ARCH.GEMMA2, "gemma3_text": gguf.MODEL_ARCH.GEMMA3,
              "phi3": gguf.MODEL_ARCH.PHI3, "gpt2": gguf.MODEL_ARCH.GPT2}
IDS = torch.tensor([[17, 99, 43, 250, 8, 77, 120, 301], [200, 31, 9, 150, 42, 7, 330, 18]])
PROJECTIONS = ("attn_output.weight", "ffn_down.weight", "ffn_up.weight")


def scale_field_bytes(kind: Q) -> np.ndarray:
    """A mask over one block's bytes: True on its float16 scale fields (a plain restatement)."""
    mask = np.zeros(GGML_QUANT_SIZES[kind][1], dtype=bool)
    scales = BLOCK_SCALES[kind]
    if scales.packed_at is not None:  # IQ1_M: the top nibble of each of four uint16
        mask[scales.packed_at + 1:scales.packed_at + 8:2] = True
    for at in scales.offsets:
        mask[at:at + 2] = True
    return mask


def random_blocks(kind: Q, shape: tuple[int, int], rng: np.random.Generator,
                  rms: float = 0.05) -> np.ndarray:
    """Random codes of ``kind`` for a [rows, cols] tensor, scaled to weights of about ``rms``."""
    block_size, type_size = GGML_QUANT_SIZES[kind]
    blocks = rng.integers(0, 256, (shape[0], shape[1] // block_size, type_size), dtype=np.uint8)
    scales = BLOCK_SCALES[kind]
    fields = max(1, len(scales.offsets))
    scales.write(blocks, rng.uniform(0.5, 1.0, (*blocks.shape[:2], fields)).astype(np.float32))
    values = dequantize(blocks.reshape(shape[0], -1), kind)
    scales.write(blocks, scales.read(blocks) * np.float32(rms / np.sqrt(np.mean(values ** 2))))
    return blocks.reshape(shape[0], -1)


@pytest.mark.parametrize("kind", list(BLOCK_SCALES), ids=lambda kind: kind.name)
def test_block_scales_scale_whole_rows_as_the_dequantizer_reads_them(kind: Q) -> None:
    rng = np.random.default_rng(int(kind))
    block_size, type_size = GGML_QUANT_SIZES[kind]
    before = random_blocks(kind, (6, 2 * block_size), rng).reshape(6, 2, type_size)
    after = before.copy()
    rows, factors = np.array([1, 4]), np.array([2.5, -0.3], dtype=np.float32)
    scale_rows(after, rows, factors, kind, "t")
    old = dequantize(before.reshape(6, -1), kind)
    new = dequantize(after.reshape(6, -1), kind)
    expected = old.copy()
    expected[rows] *= factors[:, None]
    # Each value is linear in at most two float16 fields, each rounded once (2^-11 relative).
    bound = 2 * 2.0 ** -11 * np.abs(dequantize(np.abs(before).reshape(6, -1), kind)).max()
    assert np.abs(new - expected).max() <= max(bound, 2.0 ** -11 * np.abs(expected).max())
    assert np.array_equal(new[[0, 2, 3, 5]], old[[0, 2, 3, 5]])
    changed = (after != before).any(axis=(0, 1))
    assert not (changed & ~scale_field_bytes(kind)).any()  # the codes never move


def test_every_block_type_is_either_scaled_in_place_or_known_not_to_be() -> None:
    block_types = {kind for kind, (size, _) in GGML_QUANT_SIZES.items() if size > 1}
    assert block_types == set(BLOCK_SCALES) | NO_FLOAT16_SCALE  # a new gguf type is noticed


def test_a_block_scale_beyond_float16_is_refused() -> None:
    blocks = random_blocks(Q.Q4_K, (2, 256), np.random.default_rng(0)).reshape(2, 1, -1)
    BLOCK_SCALES[Q.Q4_K].write(blocks, np.full((2, 1, 2), 60000.0, dtype=np.float32))
    original = blocks.copy()
    with pytest.raises(Exception, match="float16's range"):
        scale_rows(blocks, np.array([0]), np.array([4.0], dtype=np.float32), Q.Q4_K, "t")
    assert np.array_equal(blocks, original)


def write_llama_gguf(model: PreTrainedModel, path: Path, kind: Q, *,
                     source_url: str | None = None, extra: dict[str, str] | None = None) -> Path:
    """A GGUF file of a llama model: attn_output, ffn_down and ffn_up as ``kind``, the rest F32.

    Types with a gguf quantizer encode the model's weights; the others get random codes.
    """
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
    if source_url is not None:
        writer.add_string("general.source.url", source_url)
    for key, value in (extra or {}).items():
        writer.add_string(key, value)
    rng = np.random.default_rng(0)
    for name, tensor in model.state_dict().items():
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:  # lm_head, tied to the embedding
            continue
        array = tensor.numpy()
        if not gguf_name.endswith(PROJECTIONS) or kind == Q.F32:
            writer.add_tensor(gguf_name, array)
        elif kind == Q.F16:
            writer.add_tensor(gguf_name, array.astype(np.float16))
        elif kind == Q.BF16:
            writer.add_tensor(gguf_name, quantize(array, Q.BF16), raw_dtype=Q.BF16)
        elif kind in BLOCK_SCALES and kind not in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1):
            writer.add_tensor(gguf_name, random_blocks(kind, array.shape, rng), raw_dtype=kind)
        else:
            writer.add_tensor(gguf_name, quantize(array, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def super_block_llama() -> PreTrainedModel:
    """A two-layer llama whose projections hold whole 256-value super-blocks per row."""
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                         vocab_size=384, max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def load_gguf(path: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


def tensor_bytes(tensor: gguf.ReaderTensor) -> np.ndarray:
    return np.asarray(tensor.data).view(np.uint8).reshape(-1)


@pytest.fixture(scope="module")
def super_block_model() -> PreTrainedModel:
    return super_block_llama()


TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K,
         Q.Q6_K, Q.IQ2_XXS, Q.IQ3_S, Q.IQ1_M, Q.IQ4_NL, Q.IQ4_XS, Q.TQ2_0, Q.MXFP4]


@pytest.mark.parametrize("kind", TYPES, ids=lambda kind: kind.name)
def test_gguf_fold_moves_scales_reencodes_columns_and_matches_hooks(
        kind: Q, super_block_model: PreTrainedModel, tmp_path: Path) -> None:
    source = write_llama_gguf(super_block_model, tmp_path / "in" / "tiny.gguf", kind)
    base = load_gguf(source)
    out = tmp_path / "folded"
    # F16 re-encoding: the fold is then exact up to float16 roundings, so it is compared
    # with the hooks tightly (Q8_0, the default, is measured on the real models).
    edit = export(source, random_plan(base), k=40, alpha=0.8, out=out, format="gguf",
                  gguf_reencode="f16").edit
    assert {unit.site for unit in edit.units} == {"head", "mlp", "mlp-out"}
    folded_file = out / "tiny.gguf"
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "README.md", "aufold.json", "tiny.gguf"]
    before, after = gguf_tensors(source), gguf_tensors(folded_file)
    assert list(before) == list(after)
    layers = {unit.layer for unit in edit.units}
    for name, old in before.items():
        new = after[name]
        edited = any(name == f"blk.{layer}.{projection}" for layer in layers
                     for projection in PROJECTIONS)
        if not edited:
            assert new.tensor_type == old.tensor_type and np.array_equal(
                tensor_bytes(new), tensor_bytes(old)), name
        elif kind in BLOCK_SCALES and not name.endswith("attn_output.weight"):
            # rows of ffn_down (mlp-out) and of the gated ffn_up (mlp): only block scales move
            assert new.tensor_type == kind, name
            type_size = GGML_QUANT_SIZES[kind][1]
            changed = (tensor_bytes(new) != tensor_bytes(old)).reshape(-1, type_size).any(0)
            assert not (changed & ~scale_field_bytes(kind)).any(), name
        elif kind == Q.MXFP4:  # no float16 scale: the columns of attn_output and ffn_down
            assert new.tensor_type == (kind if name.endswith("ffn_up.weight") else Q.F16), name
        elif kind in BLOCK_SCALES:
            assert new.tensor_type == Q.F16, name  # re-encoded, as asked
    folded = load_gguf(folded_file)
    with torch.no_grad():
        plain = base(IDS).logits
        with steer(base, edit):
            hooked = base(IDS).logits
        error = float((folded(IDS).logits - hooked).norm() / (hooked - plain).norm())
    # F32 and BF16 round each weight once; block scales and F16 re-encoding round once to
    # float16 (2^-11 relative), which against the edit's own effect stays below 0.5%.
    limit = 1e-5 if kind == Q.F32 else 5e-3
    assert error <= limit, f"fold vs hooks, relative to the edit's effect: {error:.2e}"


def test_reencoding_rewrites_only_types_and_offsets_in_the_header(
        super_block_model: PreTrainedModel, tmp_path: Path) -> None:
    source = write_llama_gguf(super_block_model, tmp_path / "in" / "tiny.gguf", Q.Q4_K)
    tensors = gguf_tensors(source)
    edit = Edit.of([SteeredUnit("head", 1, unit, 0.5) for unit in (3, 100)])
    model = GgufModel.read(source, architecture_for("llama"), "unused")
    report = fold_gguf(model, edit, tmp_path / "out.gguf")
    assert [(f.name, f.source_type, f.written_type, f.method) for f in report.folds] == [
        ("blk.1.attn_output.weight", "Q4_K", "Q8_0", "re-encoded")]
    old, new = GGUFReader(source), GGUFReader(tmp_path / "out.gguf")
    assert {k: f.contents() for k, f in old.fields.items()} == {
        k: f.contents() for k, f in new.fields.items()}
    assert old.data_offset == new.data_offset
    header_old = np.asarray(old.data[:old.data_offset]).copy()
    header_new = np.asarray(new.data[:new.data_offset]).copy()
    may_change = np.zeros_like(header_old, dtype=bool)
    for tensor in old.tensors:  # the type (uint32) and data offset (uint64) of each record
        at = tensor.field.offset + sum(int(part.nbytes) for part in tensor.field.parts[:4])
        may_change[at:at + 12] = True
    assert not ((header_old != header_new) & ~may_change).any()
    for tensor in new.tensors:
        assert tensor.data_offset % new.alignment == 0
    reencoded = {t.name: t for t in new.tensors}["blk.1.attn_output.weight"]
    exact = fold_tensor(torch.from_numpy(dequantize(np.asarray(tensors[reencoded.name].data),
                                                    Q.Q4_K)),
                        weight_edits(edit, architecture_for("llama").gguf_naming())[reencoded.name])
    assert np.array_equal(np.asarray(reencoded.data), quantize(exact.numpy(), Q.Q8_0))


def test_the_table_names_tensors_as_the_gguf_converters_do() -> None:
    for model_type in ARCHITECTURES:
        names = gguf.get_tensor_name_map(GGUF_ARCHS[model_type], 4)
        hf, named = architecture_for(model_type), architecture_for(model_type).gguf_naming()
        for site in ("head", "mlp", "mlp-out"):
            module = hf.module_path(site, 3)
            assert names.get_name(module + ".weight", try_suffixes=(".weight",)) == (
                named.module_path(site, 3) + ".weight"), (model_type, site)
        if hf.gguf_mlp_up is not None:  # the gated up projection whose rows hold the neurons
            up = f"{hf.layers}.3.mlp.up_proj.weight"
            assert names.get_name(up, try_suffixes=(".weight",)) == f"blk.3.{hf.gguf_mlp_up}.weight"


def write_two_layer_gguf(path: Path, kinds: dict[str, Q]) -> Path:
    """A synthetic two-layer llama file (hidden 256, MLP 512): the named tensors in ``kinds``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(path, "llama")
    for key, value in (("block_count", 2), ("context_length", 256), ("embedding_length", 256),
                       ("feed_forward_length", 512), ("attention.head_count", 4),
                       ("attention.head_count_kv", 2), ("vocab_size", 100)):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    rng = np.random.default_rng(0)
    shapes = {"attn_output": (256, 256), "ffn_down": (256, 512), "ffn_up": (512, 256),
              "ffn_gate": (512, 256)}
    for layer in range(2):
        for name, shape in shapes.items():
            if name == "ffn_gate" and name not in kinds:
                continue  # an ungated MLP unless asked
            kind = kinds.get(name, Q.F32)
            if kind == Q.F32:
                writer.add_tensor(f"blk.{layer}.{name}.weight",
                                  rng.standard_normal(shape, dtype=np.float32))
            elif kind in BLOCK_SCALES:
                writer.add_tensor(f"blk.{layer}.{name}.weight", random_blocks(kind, shape, rng),
                                  raw_dtype=kind)
            else:  # a type without float16 scales: any bytes
                row = shape[1] // GGML_QUANT_SIZES[kind][0] * GGML_QUANT_SIZES[kind][1]
                writer.add_tensor(f"blk.{layer}.{name}.weight",
                                  rng.integers(0, 255, (shape[0], row), dtype=np.uint8),
                                  raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_refuses_a_column_edit_it_cannot_decode_naming_the_tensor(tmp_path: Path) -> None:
    source = write_two_layer_gguf(tmp_path / "in" / "q1.gguf", {"attn_output": Q.Q1_0})
    edit = Edit.of([SteeredUnit("head", 0, 5, 0.5)])
    model = GgufModel.read(source, architecture_for("llama"), "unused")
    with pytest.raises(Exception, match=r"blk\.0\.attn_output\.weight is Q1_0.*mlp-out"):
        fold_gguf(model, edit, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_gguf_mlp_of_an_ungated_model_reencodes_its_down_projection(tmp_path: Path) -> None:
    """GPT-2's MLP has no gate: its neurons are only columns of ffn_down."""
    source = tmp_path / "gpt2.gguf"
    writer = GGUFWriter(source, "gpt2")
    rng = np.random.default_rng(0)
    writer.add_tensor("blk.0.ffn_down.weight",
                      quantize(rng.standard_normal((64, 256), dtype=np.float32), Q.Q4_1),
                      raw_dtype=Q.Q4_1)
    writer.add_tensor("blk.0.ffn_up.weight",
                      quantize(rng.standard_normal((256, 64), dtype=np.float32), Q.Q4_1),
                      raw_dtype=Q.Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model = GgufModel.read(source, architecture_for("gpt2"), "unused")
    report = fold_gguf(model, Edit.of([SteeredUnit("mlp", 0, 7, 1.0)]), tmp_path / "out.gguf")
    assert [(f.name, f.written_type, f.method) for f in report.folds] == [
        ("blk.0.ffn_down.weight", "Q8_0", "re-encoded")]


def test_gguf_export_k_quant_from_the_cli_and_its_card(super_block_model: PreTrainedModel,
                                                       tmp_path: Path) -> None:
    source = write_llama_gguf(super_block_model, tmp_path / "in" / "tiny.gguf", Q.Q4_K)
    random_plan(load_gguf(source)).save(tmp_path / "plan")
    out = tmp_path / "out"
    result = run_cli("export", source, "--plan", tmp_path / "plan", "--k", 30, "--alpha", 2,
                     "--out", out, "--format", "gguf")
    assert result.exit_code == 0, result.output
    card = (out / "README.md").read_text()
    assert "the float16 scales" in card and "re-encoded to Q8_0" in card, card
    assert "Q4_K" in card
    refused = run_cli("export", source, "--plan", tmp_path / "plan", "--k", 4, "--alpha", 1,
                      "--out", tmp_path / "ckpt", "--gguf-reencode", "f16")
    assert_one_line_error(refused, "--gguf-reencode", "--format gguf")
    assert not (tmp_path / "ckpt").exists()


def test_gguf_format_needs_a_gguf_model(tmp_path: Path) -> None:
    base = save_tiny_model("llama", tmp_path / "base")
    random_plan(tiny_model("llama")).save(tmp_path / "plan")
    result = run_cli("export", base, "--plan", tmp_path / "plan", "--k", 4, "--alpha", 1,
                     "--out", tmp_path / "out", "--format", "gguf")
    assert_one_line_error(result, "not one", ".gguf")
    assert not (tmp_path / "out").exists()


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
    fold_gguf(GgufModel.read(source, architecture_for("gpt2"), "unused"), edit, tmp_path / "out.gguf")
    after = gguf_tensors(tmp_path / "out.gguf")
    edits = weight_edits(edit, architecture_for("gpt2").gguf_naming())
    (name, bias_edit), = [(n, e) for n, e in edits.items() if n.endswith("bias")]
    expected = fold_tensor(torch.from_numpy(np.array(tensors[name].data)), bias_edit)
    assert torch.equal(torch.from_numpy(np.array(after[name].data)), expected)
    rows = dequantize(np.array(after["blk.0.ffn_down.weight"].data), Q.Q8_0)
    scale = np.ones(64, dtype=np.float32)
    scale[[1, 5, 63]] = [1.25, 2.25, 16.75]
    exact = dequantize(np.array(tensors["blk.0.ffn_down.weight"].data), Q.Q8_0) * scale[:, None]
    assert np.allclose(rows, exact, rtol=2.0 ** -11, atol=0)  # only the block scales moved


def test_gguf_exports_name_the_model_the_file_was_converted_from(
        super_block_model: PreTrainedModel, tmp_path: Path) -> None:
    url = "https://huggingface.co/example-org/tiny-llama"
    source = write_llama_gguf(super_block_model, tmp_path / "in" / "tiny.gguf", Q.Q8_0,
                              source_url=url)
    plan = random_plan(load_gguf(source))
    out = tmp_path / "folded"
    export(source, plan, k=8, alpha=1.0, out=out, format="gguf")
    assert json.loads((out / "aufold.json").read_text())["base_model"] == "example-org/tiny-llama"
    assert 'base_model: "example-org/tiny-llama"' in (out / "README.md").read_text()
    # every format asks the same function (adapters write it into adapter_config.json)
    assert base_model_name(resolve_source(source)) == "example-org/tiny-llama"
    plain = write_llama_gguf(super_block_model, tmp_path / "plain" / "tiny.gguf", Q.Q8_0)
    export(plain, plan, k=8, alpha=1.0, out=tmp_path / "unnamed", format="gguf")
    assert json.loads((tmp_path / "unnamed" / "aufold.json").read_text())["base_model"] == "tiny.gguf"


def test_a_hub_cache_path_names_its_repo(tmp_path: Path) -> None:
    snapshot = tmp_path / "hub" / "models--some-org--Some-Model-GGUF" / "snapshots" / "0123"
    assert hub_cache_repo(snapshot / "model.Q4_K_M.gguf") == "some-org/Some-Model-GGUF"
    assert hub_cache_repo(tmp_path / "my-model") is None


def test_cards_of_exports_from_a_gguf_say_which_weights_they_are_exact_on() -> None:
    plan = random_plan(tiny_model("llama"))
    record = ExportRecord(base_model="example-org/tiny-llama",
                          recipe=Recipe.single(plan, 4, 1.0, ("head",)),
                          dtype="float32", quantized_base="tiny.Q4_K_M.gguf")
    adapter = Artifact(format="lora", library_name="peft", summary="S.", usage="U", written="W")
    lora_card = model_card(replace(record, artifact=adapter))
    assert "made from `tiny.Q4_K_M.gguf`, dequantized, and is exact on those weights" in lora_card
    assert "only up to the file's quantization noise" in lora_card
    assert "`tiny.Q4_K_M.gguf`, dequantized, with the edit folded in exactly" in model_card(record)
    assert "dequantized" not in model_card(replace(record, quantized_base=None))
    assert json.loads(card_files(record)["aufold.json"])["quantized_base"] == "tiny.Q4_K_M.gguf"


def test_only_source_metadata_names_the_converted_model(super_block_model: PreTrainedModel,
                                                        tmp_path: Path) -> None:
    """general.base_model.N is the model this one was fine-tuned from, not its source."""
    source = write_llama_gguf(super_block_model, tmp_path / "in" / "tiny.gguf", Q.Q8_0,
                              extra={"general.base_model.0.repo_url":
                                     "https://huggingface.co/example-org/pretrained-parent"})
    assert base_model_name(resolve_source(source)) == "tiny.gguf"


def test_a_rewritten_gguf_pads_its_last_tensor_as_ggml_sizes_it(
        super_block_model: PreTrainedModel, tmp_path: Path) -> None:
    source = write_llama_gguf(super_block_model, tmp_path / "in" / "tiny.gguf", Q.Q4_K)
    fold_gguf(GgufModel.read(source, architecture_for("llama"), "unused"),
              Edit.of([SteeredUnit("head", 1, 3, 0.5)]), tmp_path / "out.gguf")
    reader = GGUFReader(tmp_path / "out.gguf")
    padded = sum(-(-int(t.n_bytes) // reader.alignment) * reader.alignment for t in reader.tensors)
    assert (tmp_path / "out.gguf").stat().st_size == reader.data_offset + padded


@pytest.mark.parametrize("gated", [True, False])
def test_mlp_units_move_to_ffn_up_only_in_a_gated_mlp(gated: bool, tmp_path: Path) -> None:
    kinds = {"ffn_down": Q.Q4_K, "ffn_up": Q.Q4_K, **({"ffn_gate": Q.Q4_K} if gated else {})}
    source = write_two_layer_gguf(tmp_path / "in" / "m.gguf", kinds)
    report = fold_gguf(GgufModel.read(source, architecture_for("llama"), "unused"),
                       Edit.of([SteeredUnit("mlp", 1, 7, 1.0)]), tmp_path / "out.gguf")
    assert [(f.name, f.method) for f in report.folds] == (
        [("blk.1.ffn_up.weight", "block scales")] if gated
        else [("blk.1.ffn_down.weight", "re-encoded")])


def test_an_adapter_from_a_gguf_needs_its_base_models_hub_id(
        super_block_model: PreTrainedModel, tmp_path: Path) -> None:
    source = write_llama_gguf(super_block_model, tmp_path / "in" / "tiny.gguf", Q.Q8_0)
    random_plan(load_gguf(source)).save(tmp_path / "plan")
    result = run_cli("export", source, "--plan", tmp_path / "plan", "--k", 4, "--alpha", 1,
                     "--out", tmp_path / "lora", "--format", "lora")
    assert_one_line_error(result, "--base-model-id", "tiny.gguf")
    assert not (tmp_path / "lora").exists()


def test_a_gguf_in_the_hub_cache_is_named_by_its_repo_and_file(tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--some-org--Tiny-GGUF"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "0a1b2c").write_bytes(b"GGUF")
    (repo / "snapshots" / "main").mkdir(parents=True)
    (repo / "snapshots" / "main" / "tiny.Q4_K_M.gguf").symlink_to(repo / "blobs" / "0a1b2c")
    reference = gguf_reference(resolve_source(repo / "snapshots" / "main" / "tiny.Q4_K_M.gguf"))
    assert reference is not None and reference.endswith("tiny.Q4_K_M.gguf")
    record = ExportRecord(base_model="x", recipe=Recipe.single(random_plan(tiny_model("llama")),
                                                               1, 1.0, ("head",)),
                          dtype="float32", quantized_base=reference)
    assert record.base_arguments() == '"some-org/Tiny-GGUF", gguf_file="tiny.Q4_K_M.gguf"'


def test_a_big_endian_gguf_is_refused_in_one_line(tmp_path: Path) -> None:
    source = tmp_path / "big.gguf"
    writer = GGUFWriter(source, "llama", endianess=gguf.GGUFEndian.BIG)
    writer.add_tensor("blk.0.attn_output.weight", np.ones((32, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(Exception, match="big-endian"):
        read_gguf_model(source)
