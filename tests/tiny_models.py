"""Tiny random causal LMs and a tiny real tokenizer, built offline for tests.

Every architecture gets the same shape (3 layers, hidden 64, 4 query heads of
head_dim 16, 2 KV heads where the architecture has GQA, MLP 128, 256 positions)
and the same tokenizer, so tests can loop over ``ARCHITECTURES`` and compare.

Weights are re-drawn from a seeded generator after construction (see
``_randomize``) so that nothing is exactly zero or exactly one: biases and norm
weights are random too, which makes bias and norm folding observable. The draw
is always in float32 and then cast, so one seed gives the same weights (up to
rounding) in every dtype.

The Mixture-of-Experts architectures (``MOE_ARCHITECTURES``: 4 experts, 2 per token)
are kept apart, since they have the head and residual sites only.

Embedding tying follows the small real checkpoints of each family (SmolLM2 /
Llama-3.2, Qwen2.5-0.5B, Qwen3-0.6B, Gemma and GPT-2 tie; Mistral and Phi-3 do
not), so both layouts are covered.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

ARCHITECTURES: tuple[str, ...] = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "phi3",
    "gpt2",
)

_CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "gemma2": Gemma2Config,
    "gemma3_text": Gemma3TextConfig,  # text-only Gemma3ForCausalLM
    "phi3": Phi3Config,
    "gpt2": GPT2Config,
    "mixtral": MixtralConfig,
    "qwen2_moe": Qwen2MoeConfig,
    "qwen3_moe": Qwen3MoeConfig,
}

MOE_ARCHITECTURES: tuple[str, ...] = ("mixtral", "qwen2_moe", "qwen3_moe")
NUM_EXPERTS = 4
EXPERTS_PER_TOKEN = 2
EXPERT_INTERMEDIATE = 32  # Qwen MoE experts (Mixtral's use INTERMEDIATE)
SHARED_EXPERT_INTERMEDIATE = 48  # Qwen2-MoE's always-on shared expert

NUM_LAYERS = 3
HIDDEN = 64
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = 16
INTERMEDIATE = 128
MAX_POSITIONS = 256
SLIDING_WINDOW = 32  # small enough that prompts longer than 32 tokens feel it

# Init scales: matrices/embeddings, biases, and noise added around the norm centre.
WEIGHT_STD = 0.1
BIAS_STD = 0.05
NORM_STD = 0.1

# --- tokenizer -------------------------------------------------------------

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (UNK, BOS, EOS, PAD, IM_START, IM_END)  # ids 0..5
VOCAB_SIZE = 384  # 256 byte symbols + 6 specials + 122 merges

# ChatML, as in SmolLM2 / Qwen: no BOS, each turn closed by <|im_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Fixed training text; BPE training on it is deterministic.
_CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today? I am fine, thank you.",
    "The weather is nice and the sun is shining in the sky.",
    "She said that he would come back to the house in the evening.",
    "I love this movie. I hate this movie. It was good. It was bad.",
    "The answer is yes. The answer is no. Please tell me the truth.",
    "You are a helpful assistant. What is the capital of France? Paris.",
    "We went to the market and bought apples, bread, milk and cheese.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 20 42 100 256 1000 2024 3.14",
    "Count with me: one, two, three, four, five, six, seven, eight, nine, ten.",
)


# GPT-4 / Qwen2 style split: contractions, words, single digits, punctuation, spaces.
_SPLIT_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the byte-level BPE once per process; returns its serialized form.

    The pipeline is exactly the one transformers' Qwen2Tokenizer rebuilds on load:
    transformers 5.x ignores ``tokenizer_class`` for model_type "qwen2" and forces
    that class, so any other pipeline would tokenize differently once reloaded.
    """
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_CORPUS) * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh ~384-token byte-level BPE tokenizer with a ChatML chat template.

    Training is cached; each call returns a new wrapper so a test that changes
    e.g. ``padding_side`` cannot leak into other tests. No special tokens are
    added on encode (like GPT-2 / Qwen / SmolLM2); text is NFC-normalized, so
    decode(encode(text)) == text for NFC text.
    """
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )


# --- models ----------------------------------------------------------------


def _config(model_type: str) -> PretrainedConfig:
    """The tiny config for one architecture, with its per-family quirks."""
    tok = tiny_tokenizer()
    ids: dict[str, Any] = dict(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        initializer_range=WEIGHT_STD,  # only informative: _randomize redraws everything
    )
    config_cls = _CONFIG_CLASSES[model_type]
    if model_type == "gpt2":
        return config_cls(
            n_layer=NUM_LAYERS,
            n_embd=HIDDEN,
            n_head=NUM_HEADS,
            n_inner=INTERMEDIATE,
            n_positions=MAX_POSITIONS,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
            tie_word_embeddings=True,
            **ids,
        )
    common: dict[str, Any] = dict(
        num_hidden_layers=NUM_LAYERS,
        hidden_size=HIDDEN,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=MAX_POSITIONS,
        **ids,
    )
    if model_type == "phi3":
        # Fused qkv_proj / gate_up_proj; head_dim is derived as hidden / heads.
        # pad_token_id comes from ids (Phi-3's default 32000 is out of range here).
        return config_cls(original_max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False, **common)
    common["head_dim"] = HEAD_DIM
    if model_type == "mixtral":
        return config_cls(num_local_experts=NUM_EXPERTS, num_experts_per_tok=EXPERTS_PER_TOKEN,
                          tie_word_embeddings=False, **common)
    if model_type in ("qwen2_moe", "qwen3_moe"):
        if model_type == "qwen2_moe":
            common["shared_expert_intermediate_size"] = SHARED_EXPERT_INTERMEDIATE
        return config_cls(num_experts=NUM_EXPERTS, num_experts_per_tok=EXPERTS_PER_TOKEN,
                          moe_intermediate_size=EXPERT_INTERMEDIATE, tie_word_embeddings=False,
                          **common)
    if model_type == "mistral":
        return config_cls(sliding_window=None, tie_word_embeddings=False, **common)
    if model_type in ("llama", "qwen2", "qwen3"):
        # Qwen2 always has q/k/v biases; Qwen3 has q_norm/k_norm instead.
        return config_cls(tie_word_embeddings=True, **common)
    # Gemma: (1 + w) RMSNorm, scaled embeddings, extra post-norms, local/global layers.
    layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    if model_type == "gemma3_text":
        layer_types = ["sliding_attention", "sliding_attention", "full_attention"]
    return config_cls(
        query_pre_attn_scalar=HEAD_DIM,
        sliding_window=SLIDING_WINDOW,
        layer_types=layer_types,
        tie_word_embeddings=True,
        **common,
    )


def _is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.LayerNorm) or "Norm" in type(module).__name__


@torch.no_grad()
def _randomize(model: PreTrainedModel, seed: int) -> None:
    """Redraw every parameter from a seeded generator (drawn in float32, in a fixed order).

    Matrices and embeddings: N(0, WEIGHT_STD). Biases: N(0, BIAS_STD). Norm
    weights keep their centre (1 for x * w, 0 for Gemma's x * (1 + w)) plus
    N(0, NORM_STD) noise. Tied parameters are visited once.
    """
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    for module in model.modules():
        norm = _is_norm(module)
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            if norm and name == "weight":
                param.copy_(param.float() + noise * NORM_STD)
            else:
                param.copy_(noise * (WEIGHT_STD if param.ndim >= 2 else BIAS_STD))


def tiny_model(model_type: str, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> PreTrainedModel:
    """A tiny random causal LM of ``model_type`` (in ``ARCHITECTURES`` or ``MOE_ARCHITECTURES``),
    in eval mode."""
    if model_type not in _CONFIG_CLASSES:
        raise ValueError(f"unknown model_type {model_type!r}; expected one of "
                         f"{ARCHITECTURES + MOE_ARCHITECTURES}")
    config = _config(model_type)
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
        torch.manual_seed(seed)
        # Built directly in dtype, as from_pretrained does: RoPE buffers stay float32
        # (model.to(dtype) would round them) and config.dtype is recorded.
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _randomize(model, seed)
    gen = model.generation_config
    gen.bos_token_id, gen.pad_token_id = config.bos_token_id, config.pad_token_id
    gen.eos_token_id = [config.eos_token_id, tiny_tokenizer().convert_tokens_to_ids(IM_END)]
    return model.eval()


def save_tiny_model(
    model_type: str, folder: Path, *, dtype: torch.dtype = torch.float32, seed: int = 0
) -> Path:
    """Save a tiny model (safetensors), its tokenizer and generation config into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tiny_model(model_type, dtype=dtype, seed=seed).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
