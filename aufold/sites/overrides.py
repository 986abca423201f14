"""The few facts about architectures that transformers does not state, or states otherwise.

Everything else comes from the model itself (:mod:`aufold.sites.derive`): transformers'
tensor-parallel plan marks the projections that read the head outputs and the MLP
neurons as ``rowwise``, and the modules confirm it. This table only adds:

- ``plan``: the input-split projections of a model type whose plan lacks them or says
  something else, as tensor-parallel-plan entries (``layers.*.self_attn.o_proj``)
  mapped to their role;
- the config flags that give a projection a bias and the norm after the MLP, which
  folding an additive vector needs (a model type absent here folds vectors in hook
  mode only);
- the GGUF tensor names that differ from llama.cpp's usual ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["attention_out", "mlp_down", "experts_down", "shared_expert_down"]

BUILT_IN = "built-in"  # the projection always has a bias (GPT-2's Conv1D)


@dataclass(frozen=True)
class Override:
    """What aufold adds to, or corrects in, what transformers states about one model type."""

    plan: Mapping[str, Role] = field(default_factory=dict)  # replaces transformers' plan
    attention_out_bias: str | None = None
    mlp_down_bias: str | None = None
    norm_after_mlp_down: str | None = None
    gguf_mlp_up: str | None = "ffn_up"
    # Why the neurons of this model's stacked experts cannot be read one expert at a time
    # (aufold.experts needs a per-expert slice of the down projection); None: they can.
    no_expert_neurons: str | None = None
    # Why aufold cannot steer this model type at all; None: it can, where its sites are found.
    unsupported: str | None = None


def _plan(layers: str, attention_out: str, mlp_down: str) -> Mapping[str, Role]:
    return {f"{layers}.*.{attention_out}": "attention_out", f"{layers}.*.{mlp_down}": "mlp_down"}


# The BERT family's causal-LM decoders: the attention output dense reads the heads, the
# output dense the intermediate neurons.
_BERT = Override(plan=_plan("encoder.layer", "attention.output.dense", "output.dense"))
_LLAMA_NAMES = _plan("layers", "self_attn.o_proj", "mlp.down_proj")
_FC2 = _plan("layers", "self_attn.out_proj", "fc2")
_BLOOM = _plan("h", "self_attention.dense", "mlp.dense_4h_to_h")
_GPT2 = Override(plan=_plan("h", "attn.c_proj", "mlp.c_proj"), attention_out_bias=BUILT_IN,
                 mlp_down_bias=BUILT_IN, gguf_mlp_up=None)

OVERRIDES: Mapping[str, Override] = {
    # Bias flags and norms for folding additive vectors (checked by tests/test_fold_vector.py).
    "llama": Override(attention_out_bias="attention_bias", mlp_down_bias="mlp_bias"),
    "qwen3": Override(attention_out_bias="attention_bias"),
    "qwen3_moe": Override(attention_out_bias="attention_bias"),
    "gemma2": Override(attention_out_bias="attention_bias",
                       norm_after_mlp_down="post_feedforward_layernorm"),
    "gemma3_text": Override(attention_out_bias="attention_bias",
                            norm_after_mlp_down="post_feedforward_layernorm"),
    "phi3": Override(gguf_mlp_up=None),  # gate and up are one fused tensor
    # No tensor-parallel plan in transformers (or one that lists only embeddings).
    "gpt2": _GPT2,
    "gpt-sw3": _GPT2,
    "openai-gpt": Override(plan=_plan("h", "attn.c_proj", "mlp.c_proj")),
    "gpt_neo": Override(plan=_plan("h", "attn.attention.out_proj", "mlp.c_proj")),
    "gpt_bigcode": Override(plan=_plan("h", "attn.c_proj", "mlp.c_proj")),
    "bloom": Override(plan=_BLOOM),
    "falcon": Override(plan=_BLOOM),
    "opt": Override(plan=_FC2),
    "biogpt": Override(plan=_FC2),
    "xglm": Override(plan=_FC2),
    "persimmon": Override(plan=_plan("layers", "self_attn.dense", "mlp.dense_4h_to_h")),
    "mpt": Override(plan=_plan("blocks", "attn.out_proj", "ffn.down_proj")),
    "ctrl": Override(plan=_plan("h", "multi_head_attention.dense", "ffn.2")),
    "stablelm": Override(plan=_LLAMA_NAMES),
    "bitnet": Override(plan=_LLAMA_NAMES),
    "diffllama": Override(plan=_LLAMA_NAMES),
    "hunyuan_v1_dense": Override(plan=_LLAMA_NAMES),
    "dory": Override(plan=_LLAMA_NAMES),
    "lfm2": Override(plan=_plan("layers", "self_attn.out_proj", "feed_forward.w2")),
    "lfm2_moe": Override(plan={**_plan("layers", "self_attn.out_proj", "feed_forward.w2"),
                               "layers.*.feed_forward.experts.down_proj": "experts_down"}),
    "lfm3": Override(plan=_plan("layers", "self_attn.o_proj", "feed_forward.w2")),
    "bamba": Override(plan=_plan("layers", "self_attn.o_proj", "feed_forward.down_proj")),
    "falcon_h1": Override(plan=_plan("layers", "self_attn.o_proj", "feed_forward.down_proj")),
    "recurrent_gemma": Override(plan=_plan("layers", "temporal_block.o_proj",
                                           "mlp_block.down_proj")),
    "modernbert-decoder": Override(plan=_plan("layers", "attn.Wo", "mlp.Wo")),
    "gpt_neox_japanese": Override(plan=_plan("layers", "attention.dense", "mlp.dense_4h_to_h")),
    "moshi": Override(plan=_plan("layers", "self_attn.o_proj.linear", "mlp.fc2")),
    "trocr": Override(plan=_FC2),
    "cpmant": Override(plan=_plan("encoder.layers", "self_att.self_attention.attention_out",
                                  "ffn.ffn.w_out")),
    "mllama_text_model": Override(plan=_LLAMA_NAMES),
    "emu3_text_model": Override(plan=_LLAMA_NAMES),
    # Plans that name the experts' fused gate-up projection but not their down projection.
    "llama4_text": Override(plan={"layers.*.self_attn.o_proj": "attention_out",
                                  "layers.*.feed_forward.down_proj": "mlp_down",
                                  "layers.*.feed_forward.experts.down_proj": "experts_down",
                                  "layers.*.feed_forward.shared_expert.down_proj":
                                      "shared_expert_down"},
                            no_expert_neurons="its experts run as one batched product over every "
                                              "expert and token, with no per-expert slice"),
    "aria_text": Override(plan={"layers.*.self_attn.o_proj": "attention_out",
                                "layers.*.mlp.experts.down_proj": "experts_down",
                                "layers.*.mlp.shared_experts.down_proj": "shared_expert_down"}),
    # The head outputs are gated by a sigmoid of the layer input inside o_proj, then read by
    # o_proj.linear: the gated head outputs are the head site.
    **{model_type: Override(plan={"layers.*.self_attn.o_proj.linear": "attention_out",
                                  "layers.*.mlp.experts.down_proj": "experts_down"})
       for model_type in ("inkling2_text", "inkling2_loop_text")},
    # DBRX keeps its experts' down projections as one [E * ffn, hidden] parameter.
    "dbrx": Override(plan={"blocks.*.norm_attn_norm.attn.out_proj": "attention_out",
                           "blocks.*.ffn.experts.mlp.w2": "experts_down"},
                     no_expert_neurons="it keeps its experts' down projections as one "
                                       "[E * ffn, hidden] parameter that its forward views per "
                                       "expert, which aufold does not follow"),
    # Every layer has one mixer: Mamba, attention, a dense MLP or experts.
    "nemotron_h": Override(plan={"layers.*.mixer.o_proj": "attention_out",
                                 "layers.*.mixer.down_proj": "mlp_down",
                                 "layers.*.mixer.experts.down_proj": "experts_down",
                                 "layers.*.mixer.shared_experts.down_proj": "shared_expert_down"}),
    "gpt_oss": Override(plan={"layers.*.self_attn.o_proj": "attention_out",
                              "layers.*.mlp.experts.down_proj": "experts_down"}),
    "hunyuan_v1_moe": Override(plan={"layers.*.self_attn.o_proj": "attention_out",
                                     "layers.*.mlp.experts.down_proj": "experts_down",
                                     "layers.*.mlp.shared_mlp.down_proj": "shared_expert_down"}),
    # Model types aufold cannot steer, and why.
    **{model_type: Override(unsupported="a state-space model: its layers have neither "
                                        "attention heads nor an MLP, only a Mamba mixer")
       for model_type in ("mamba", "mamba2", "falcon_mamba")},
    # Recurrent models: the projection that reads the time-mixing (RWKV) or mLSTM (xLSTM)
    # outputs takes the place of the attention output projection.
    "rwkv": Override(plan=_plan("blocks", "attention.output", "feed_forward.value")),
    "xlstm": Override(plan=_plan("blocks", "mlstm_layer.out_proj", "ffn.proj_down")),
    "jetmoe": Override(unsupported="its attention heads and MLP neurons are mixtures of experts "
                                   "of its own kind (ParallelExperts, routed per token), which "
                                   "no site of aufold's describes"),
    "longcat_flash": Override(unsupported="each layer has two attention blocks and two MLPs "
                                          "(self_attn.0 and .1, mlps.0 and .1), and its experts "
                                          "include identity experts that no weight scales; "
                                          "aufold's sites hold one projection per layer"),
    **{model_type: _BERT for model_type in (
        "bert", "bert-generation", "roberta", "roberta-prelayernorm", "camembert",
        "xlm-roberta", "data2vec-text", "electra", "ernie", "rembert", "roc_bert",
        "megatron-bert", "big_bird", "xmod", "roformer", "xlm-roberta-xl", "git")},
}


def override_for(model_type: str) -> Override:
    return OVERRIDES.get(model_type, Override())
