"""Checks on the test-support module ``tiny_models``: build, save, reload, tokenize."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel

from tiny_models import (
    ARCHITECTURES,
    IM_END,
    IM_START,
    save_tiny_model,
    tiny_model,
    tiny_tokenizer,
)

EXPECTED_CLASS: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}

TEXT = "The quick brown fox jumps over the lazy dog. Hello world! I am 42, café ✓"


def _logits(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids).logits


def test_architectures_match_expected_classes() -> None:
    assert set(ARCHITECTURES) == set(EXPECTED_CLASS)
    assert len(ARCHITECTURES) == len(set(ARCHITECTURES))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_save_and_reload_with_auto_classes(model_type: str, dtype: torch.dtype, tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    model = tiny_model(model_type, dtype=dtype)
    assert type(model).__name__ == EXPECTED_CLASS[model_type]
    assert model.config.model_type == model_type
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model.config.vocab_size == len(tok)
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (
        tok.pad_token_id,
        tok.bos_token_id,
        tok.eos_token_id,
    )

    assert save_tiny_model(model_type, tmp_path, dtype=dtype) == tmp_path
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded).__name__ == EXPECTED_CLASS[model_type]
    assert loaded.dtype == dtype

    ids = torch.tensor([loaded_tok(TEXT)["input_ids"]])
    assert ids.tolist()[0] == tok(TEXT)["input_ids"]
    expected = _logits(model, ids)
    assert expected.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(expected).all()
    assert torch.equal(_logits(loaded.eval(), ids), expected)

    gen = GenerationConfig.from_pretrained(tmp_path)
    assert gen.eos_token_id == [tok.eos_token_id, tok.convert_tokens_to_ids(IM_END)]


@pytest.mark.parametrize("model_type", ARCHITECTURES)
def test_shapes_seeds_and_nonzero_init(model_type: str) -> None:
    model = tiny_model(model_type)
    cfg = model.config
    assert cfg.num_hidden_layers == 3 and cfg.hidden_size == 64 and cfg.num_attention_heads == 4
    if model_type != "gpt2":
        assert cfg.intermediate_size == 128 and cfg.max_position_embeddings == 256
        assert cfg.num_key_value_heads == 2
    for name, param in model.named_parameters():
        assert (param != 0).all(), f"{name} has exact zeros"
        assert not torch.isclose(param, torch.ones_like(param)).all(), f"{name} is all ones"

    again = tiny_model(model_type).state_dict()
    other = tiny_model(model_type, seed=1).state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, again[key]), key
    assert any(not torch.equal(v, other[k]) for k, v in model.state_dict().items())

    # Activations have a sane scale (not vanishing, not exploding).
    ids = torch.tensor([tiny_tokenizer()(TEXT)["input_ids"]])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == 4
    for hidden in out.hidden_states[1:]:
        assert 0.05 < hidden.float().std().item() < 50
    assert out.logits.std().item() > 0.3


def test_gpt2_has_random_biases() -> None:
    model = tiny_model("gpt2")
    for block in model.transformer.h:
        for bias in (block.attn.c_attn.bias, block.attn.c_proj.bias, block.mlp.c_fc.bias, block.mlp.c_proj.bias):
            assert bias.abs().min() > 0 and bias.std() > 0.01


def test_gemma_local_global_layers() -> None:
    g2, g3 = tiny_model("gemma2").config, tiny_model("gemma3_text").config
    assert g2.sliding_window == g3.sliding_window == 32
    assert g2.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert g3.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    assert g2.head_dim == g3.head_dim == g2.query_pre_attn_scalar == 16


def test_model_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_model("llama", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_model_type() -> None:
    with pytest.raises(ValueError, match="unknown model_type"):
        tiny_model("bert")


def test_tokenizer_round_trip_and_specials() -> None:
    tok = tiny_tokenizer()
    assert 256 <= len(tok) <= 512
    specials = {tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    assert None not in specials and len(specials) == 4
    for text in (TEXT, "  leading spaces\nand newlines\t1234567890", "Ünïcödé 日本語 🙂"):
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
        assert max(ids) < len(tok)
    # Merges were learned, and no special tokens are added on encode.
    assert len(tok("the answer")["input_ids"]) < len("the answer")
    assert tok.bos_token_id not in tok(TEXT)["input_ids"]


def test_tokenizer_is_deterministic_and_fresh() -> None:
    a, b = tiny_tokenizer(), tiny_tokenizer()
    assert a is not b and a.get_vocab() == b.get_vocab()
    a.padding_side = "left"
    assert tiny_tokenizer().padding_side == "right"


def test_chat_template(tmp_path: Path) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    tok = tiny_tokenizer()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        f"{IM_START}system\nBe brief.{IM_END}\n{IM_START}user\nHi there{IM_END}\n{IM_START}assistant\n"
    )
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids == tok(text)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids(IM_START)
    assert ids.count(tok.convert_tokens_to_ids(IM_END)) == 2

    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
    assert reloaded(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
