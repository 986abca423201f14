"""The conformance suite: every model type that transformers gives a causal-LM class, proven.

For each model type in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (decoder-only models and the
multimodal wrappers that generate text), build a tiny random model from its own config
class, resolve its sites (:func:`aufold.sites.architecture_of`), and for every site it
resolves:

1. localize a few contrastive pairs, select the top units and steer them with hooks;
2. fold the same edit into a copy and check fold == hooks: float32 logits within a
   relative 1e-5, bfloat16 within 3 times bfloat16's own noise floor (the distance
   between the unsteered model in bfloat16 and in float32);
3. check that every tensor the fold does not name is bitwise unchanged;

and then export the plan of all its sites from a saved checkpoint with ``aufold.export``
and reload it in plain transformers: the same class, with the hooked logits.

A model type that cannot be built tiny, or whose sites aufold cannot find, is listed with
the reason. ``python tests/conformance.py --write`` regenerates ``docs/architectures.md``
from these results; ``tests/test_conformance.py`` runs the suite and checks that the
committed page says what the suite finds.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_models import _randomize, tiny_tokenizer
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from aufold.errors import AufoldError
from aufold.fold import fold_model, weight_edits
from aufold.pairs import ContrastivePair
from aufold.sites import architecture_of
from aufold.steer import steer

DOCS = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"
FOLD_SITES = ("head", "mlp", "mlp-out")
PASS = "pass"
K = 12
ALPHA = 4.0
FP32_TOLERANCE = 1e-5
BF16_NOISE_FACTOR = 3.0
PAIRS = [ContrastivePair(f"{a} plus 2 is", f" {a + 2}", f" {a + 3}") for a in range(4)]
PROMPT = torch.tensor([[5, 17, 99, 230, 41, 7, 300, 12, 64, 150]])

# Small sizes, set wherever a config has the attribute (its attribute_map routes
# hidden_size to n_embd, d_model, ... where a family names it otherwise).
SIZES: dict[str, Any] = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, intermediate_size=96, vocab_size=384, max_position_embeddings=256,
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=32, shared_expert_intermediate_size=48, n_shared_experts=1,
    first_k_dense_replace=1, sliding_window=32, kv_lora_rank=16, q_lora_rank=16,
    qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, n_group=1, topk_group=1,
    rotary_dim=8, n_positions=256,
    # Hybrid models: a full-attention layer among the first two, so both kinds are there.
    full_attention_interval=2, attn_layer_period=2, attn_layer_offset=1)
TOKEN_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

# Model types that build and whose sites resolve, but where a check fails: what fails.
# tests/test_conformance.py fails when one starts to pass, so the list stays true.
_ROUTER_FLIP = ("bfloat16 only: fold and hooks round differently, which flips the router's "
                "top-k choice for some token, so the logits of a site (whichever the units "
                "drawn make it) differ beyond 3x the noise floor; float32 is exact")
KNOWN_FAILURES: dict[str, str] = {
    "mimo_v2_flash": _ROUTER_FLIP,
    "sarvam_moe": _ROUTER_FLIP,
    "lfm2_moe": _ROUTER_FLIP,
    "inkling2_text": "transformers cannot reload its tiny saved checkpoint (a negative "
                     "tensor dimension on from_pretrained)",
    "inkling2_loop_text": "transformers cannot reload its tiny saved checkpoint (a negative "
                          "tensor dimension on from_pretrained)",
}


@dataclass
class Outcome:
    """What the suite found for one model type."""

    model_type: str
    model_class: str = ""
    experts: bool = False
    sites: dict[str, str] = field(default_factory=dict)  # site -> PASS or why not
    absent: set[str] = field(default_factory=set)  # sites the model does not have (said why)
    skipped: dict[str, tuple[int, ...]] = field(default_factory=dict)  # layers without a site
    reloads: str = ""  # PASS or why not
    reason: str = ""  # why the model type is not supported at all
    seconds: float = 0.0

    def passes(self, site: str) -> bool:
        return self.sites.get(site) == PASS

    def failures(self) -> list[str]:
        """What failed, as opposed to what the model does not have."""
        found = [f"{site}: {result}" for site, result in self.sites.items()
                 if result != PASS and site not in self.absent]
        if any(self.passes(site) for site in FOLD_SITES) and self.reloads != PASS:
            found.append(f"export: {self.reloads}")
        return found


def model_types() -> list[str]:
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_config(model_type: str) -> PretrainedConfig:
    """The model type's own config class, built with small sizes (so that whatever it derives
    from them, per-layer lists included, is derived from the small sizes)."""
    config_class = CONFIG_MAPPING[model_type]
    default = config_class()
    if getattr(default, "is_encoder_decoder", False):
        raise Unsupported("an encoder-decoder model: aufold steers decoder-only language models")
    kwargs = _small(default)
    for key, value in EXTRA_ARGUMENTS.get(model_type, {}).items():
        kwargs[key] = {**kwargs.get(key, {}), **value} if isinstance(value, dict) else value
    return config_class(**kwargs)


_QWEN4_EXP_INDEXER = dict(indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16,
                          indexer_budget=8, indexer_compress_ratio=2)
# Constructor arguments that some config classes need to build at all, beyond small sizes:
# their defaults leave None a size that the model reads (Dots1's shared experts, LFM2-MoE's
# layer kinds, Qwen4-Exp's sparse-attention indexer, DBRX's rotary base), or spell out the
# full-size layer pattern (GPT-Neo's, LFM2-MoE's dense layers).
EXTRA_ARGUMENTS: dict[str, dict[str, Any]] = {
    "dots1": dict(n_shared_experts=1, num_experts_per_tok=2),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]]),
    "dbrx": dict(attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(ffn_hidden_size=32, moe_top_k=2),
                 d_model=SIZES["hidden_size"]),  # read before hidden_size is mapped to it
    "qwen4_exp": dict(text_config=_QWEN4_EXP_INDEXER),
    "qwen4_exp_text": _QWEN4_EXP_INDEXER,
    # Hybrid models whose default layer pattern starts with two layers without attention.
    "bamba": dict(attn_layer_indices=[1]),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"]),
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention"]),
}


class Unsupported(Exception):
    """A model type the suite does not check, with the reason."""


def _small(config: PretrainedConfig) -> dict[str, Any]:
    """Constructor arguments that shrink ``config``: the sizes it has, its sub-configs too."""
    kwargs: dict[str, Any] = {}
    for key, value in {**SIZES, **TOKEN_IDS}.items():
        if _read_only(config, key):  # derived from other sizes (Falcon's head_dim)
            continue
        current = _attribute(config, key)
        if (current is None and not _needed(config, key)) or (
                key in TOKEN_IDS and not isinstance(current, int)):
            continue
        kwargs[key] = value
    if _attribute(config, "kv_lora_rank") is not None and "num_key_value_heads" in kwargs:
        # Multi-head latent attention expands keys and values to every head from a latent.
        kwargs["num_key_value_heads"] = SIZES["num_attention_heads"]
    kinds = getattr(config, "layer_types", None)
    if isinstance(kinds, list) and len(kinds) >= SIZES["num_hidden_layers"] and "layer_types" in config.to_dict():
        # The default pattern's last layers (which end with a full-attention one), so that
        # a hybrid model's small version still has both kinds of layer.
        kwargs["layer_types"] = kinds[-SIZES["num_hidden_layers"]:]
    for key in getattr(config, "sub_configs", {}):
        sub = getattr(config, key, None)
        if isinstance(sub, PretrainedConfig):
            kwargs[key] = {**sub.to_dict(), **_small(sub)}
            if "layer_types" not in _small(sub):
                kwargs[key].pop("layer_types", None)  # derived again from the small layer count
            kwargs[key].pop("per_layer_config", None)  # the same (Gemma 4's)
    return kwargs


# Sizes that some configs leave None by default although their model needs them (Ministral's
# head_dim, Nemotron's key-value heads, Dots1's experts); elsewhere None means "off" (no
# sliding window, no query LoRA) and stays.
_NEEDED_WHEN_NONE = ("head_dim", "num_key_value_heads", "n_routed_experts")


def _read_only(config: PretrainedConfig, key: str) -> bool:
    """Whether the config class derives ``key`` (a property without a setter)."""
    attribute = getattr(type(config), config.attribute_map.get(key, key), None)
    return isinstance(attribute, property) and attribute.fset is None


def _attribute(config: PretrainedConfig, key: str) -> Any:
    """A config attribute, None where it has none or keeps it per layer (Gemma 4's head_dim,
    which the default per-layer configs then set)."""
    try:
        return getattr(config, key, None)
    except Exception:  # noqa: BLE001 - transformers' AmbiguousGlobalPerLayerAttributeError
        return None


def _needed(config: PretrainedConfig, key: str) -> bool:
    """Whether an attribute the config has but leaves None must be set to build the model."""
    try:
        if not hasattr(config, key):
            return False
    except Exception:  # noqa: BLE001 - a per-layer attribute
        return False
    if key == "num_experts_per_tok":  # routed experts with no default top-k (DeepSeek-V2's)
        return any(getattr(config, name, None) for name in ("n_routed_experts", "num_local_experts"))
    return key in _NEEDED_WHEN_NONE


def tiny(model_type: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> PreTrainedModel:
    config = tiny_config(model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _randomize(model, seed)
    return model.eval()


def logits(model: PreTrainedModel) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROMPT, use_cache=False).logits.float()


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(error).__name__}: {text}"[:200]


def check(model_type: str) -> Outcome:
    """Run the whole suite on one model type; never raises."""
    started = time.perf_counter()
    outcome = Outcome(model_type)
    try:
        model = tiny(model_type)
        outcome.model_class = type(model).__name__
        plain = logits(model)
        if not torch.isfinite(plain).all():
            raise Unsupported("its tiny random model gives non-finite logits")
    except Unsupported as error:
        outcome.reason = str(error)
        return _timed(outcome, started)
    except Exception as error:  # noqa: BLE001 - a model type that cannot be built tiny
        outcome.reason = f"cannot be built tiny here ({first_line(error)})"
        return _timed(outcome, started)
    check_sites(outcome, model, lambda: tiny(model_type, torch.bfloat16), tiny_tokenizer())
    return _timed(outcome, started)


def check_real(name: str, folder: Path) -> Outcome:
    """The same checks on a real checkpoint folder, exported from that folder itself."""
    from aufold.modeling import load_model

    started = time.perf_counter()
    model, tokenizer, _ = load_model(folder, dtype="float32")
    outcome = Outcome(name, type(model).__name__)
    check_sites(outcome, model, lambda: load_model(folder, dtype="bfloat16")[0], tokenizer,
                source=folder)
    return _timed(outcome, started)


def check_sites(outcome: Outcome, model: PreTrainedModel, low_model: Any, tokenizer: Any,
                source: Path | None = None) -> None:
    """Resolve the sites, localize, check each site and the export; fills ``outcome``."""
    from aufold.localize import localize

    plain = logits(model)
    try:
        architecture = architecture_of(model)
    except AufoldError as error:
        outcome.reason = str(error)
        return
    outcome.experts = architecture.has_experts
    outcome.skipped = dict(architecture.skipped)
    sites = [site for site in FOLD_SITES if site in architecture.sites]
    for site in FOLD_SITES:
        if site not in sites:
            outcome.sites[site] = architecture.absent[site]
            outcome.absent.add(site)
    if not sites:
        return
    try:
        plan = localize(model, tokenizer, PAIRS, sites, progress=False)
    except Exception as error:  # noqa: BLE001
        for site in sites:
            outcome.sites[site] = f"localize failed ({first_line(error)})"
        return
    for site in list(sites):  # the plan says which layers it skipped, and ranks none of theirs
        if plan.layers_without(site) != architecture.skipped.get(site, ()) or any(
                unit.layer in plan.layers_without(site) for unit in plan.ranking([site])):
            outcome.sites[site] = "the plan does not skip exactly the layers without the site"
            sites.remove(site)
    low = low_model()
    noise = relative(logits(low), plain)
    for site in sites:
        try:
            outcome.sites[site] = _check_site(model, low, plan.select(K, ALPHA, [site]), plain,
                                              noise)
        except Exception as error:  # noqa: BLE001
            outcome.sites[site] = first_line(error)
    passing = [site for site in sites if outcome.passes(site)]
    if passing:
        try:
            outcome.reloads = _check_export(model, tokenizer, plan, passing, source)
        except Exception as error:  # noqa: BLE001
            outcome.reloads = first_line(error)


def _timed(outcome: Outcome, started: float) -> Outcome:
    outcome.seconds = time.perf_counter() - started
    return outcome


def _check_site(model: PreTrainedModel, low: PreTrainedModel, edit: Any, plain: torch.Tensor,
                noise: float) -> str:
    with steer(model, edit):
        hooked = logits(model)
    if relative(hooked, plain) < 1e-4:
        return "the edit does not change the logits"
    folded = copy.deepcopy(model)
    fold_model(folded, edit)
    error = relative(logits(folded), hooked)
    if error > FP32_TOLERANCE:
        return f"fold differs from hooks by {error:.1e} in float32"
    touched = set(weight_edits(edit, architecture_of(model)))
    before = dict(model.state_dict())
    for name, tensor in folded.state_dict().items():
        if name not in touched and not torch.equal(tensor, before[name]):
            return f"the fold changed {name}, which it does not name"
    with steer(low, edit):
        hooked_low = logits(low)
    folded_low = copy.deepcopy(low)
    fold_model(folded_low, edit)
    error = relative(logits(folded_low), hooked_low)
    if error > BF16_NOISE_FACTOR * noise:
        return (f"fold differs from hooks by {error:.1e} in bfloat16, beyond "
                f"{BF16_NOISE_FACTOR:g}x its noise floor {noise:.1e}")
    return PASS


def _check_export(model: PreTrainedModel, tokenizer: Any, plan: Any, sites: list[str],
                  source: Path | None = None) -> str:
    from aufold.export import export

    with tempfile.TemporaryDirectory() as folder:
        if source is None:
            source = Path(folder) / "source"
            model.save_pretrained(source)
            tokenizer.save_pretrained(source)
        result = export(source, plan, k=K, alpha=ALPHA, sites=sites, out=Path(folder) / "out",
                        cost=False)
        with steer(model, result.edit):
            hooked = logits(model)
        # The class the export's config names, as transformers resolves it when loading.
        saved = AutoConfig.from_pretrained(result.out)
        named = getattr(transformers, next(iter(saved.architectures or []), ""), None)
        if named is not type(model):
            return f"the export names class {named.__name__ if named else None}"
        reloaded = named.from_pretrained(result.out, dtype=torch.float32)
        error = relative(logits(reloaded.eval()), hooked)
        if error > FP32_TOLERANCE:
            return f"the reloaded export differs from hooks by {error:.1e}"
    return PASS


def run(types: list[str] | None = None) -> Iterator[Outcome]:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model_type in types or model_types():
            yield check(model_type)


def markdown(outcomes: list[Outcome]) -> str:
    """docs/architectures.md: one row per model type."""
    full = [o for o in outcomes if all(o.passes(site) for site in FOLD_SITES)]
    moe = [o for o in outcomes if o.experts]
    lines = [
        "# Supported architectures",
        "",
        "Generated by `python tests/conformance.py --write` from the conformance suite "
        "(`tests/test_conformance.py`, which also checks that this page is current) on "
        f"transformers {_transformers_version()}. Every model type that transformers gives a "
        "causal-LM class is built tiny from its own config class with random weights. For "
        "each site aufold finds in it, a few contrastive pairs are localized and the top "
        f"{K} units steered (alpha {ALPHA:g}); the fold must equal the hooks (float32 logits "
        f"within relative {FP32_TOLERANCE:g}; bfloat16 within {BF16_NOISE_FACTOR:g}x its own "
        "noise floor), leave every other tensor bitwise unchanged, and the export of all its "
        "sites must reload in plain transformers as the same class with the hooked logits.",
        "",
        f"- model types checked: {len(outcomes)}",
        f"- pass head, mlp and mlp-out: {len(full)}",
        f"- pass head: {sum(o.passes('head') for o in outcomes)}; mlp: "
        f"{sum(o.passes('mlp') for o in outcomes)}; mlp-out: "
        f"{sum(o.passes('mlp-out') for o in outcomes)}",
        f"- Mixture-of-Experts model types built: {len(moe)}; pass head: "
        f"{sum(o.passes('head') for o in moe)}, mlp (each expert's neurons): "
        f"{sum(o.passes('mlp') for o in moe)}, mlp-out: {sum(o.passes('mlp-out') for o in moe)}",
        "",
        "Real weights: SmolLM2-135M-Instruct (Llama) and Gemma 3 270M, dequantized from their "
        "GGUF files, pass the same checks for head, mlp and mlp-out "
        "(`test_real_weights_pass_the_same_checks`).",
        "",
        "Sites come from transformers' tensor-parallel plan (`base_model_tp_plan`), checked "
        "against each decoder layer's modules, plus a small override table "
        "(`aufold/sites/overrides.py`). `residual` (hook mode) is available wherever the "
        "decoder layers are found. A site that fails or is absent says why; the real "
        "reason is in the cell.",
        "",
        "| model type | class | experts | head | mlp | mlp-out | export reloads |",
        "|---|---|---|---|---|---|---|",
    ]
    for outcome in outcomes:
        if outcome.reason:
            lines.append(f"| {outcome.model_type} | {outcome.model_class or '-'} | | "
                         f"not supported: {_cell(outcome.reason)} | | | |")
            continue
        cells = [_cell(outcome.sites.get(site, "")) + _skipped(outcome, site)
                 for site in FOLD_SITES]
        lines.append(f"| {outcome.model_type} | {outcome.model_class} | "
                     f"{'yes' if outcome.experts else ''} | {' | '.join(cells)} | "
                     f"{_cell(outcome.reloads)} |")
    return "\n".join(lines) + "\n"


def _skipped(outcome: Outcome, site: str) -> str:
    layers = outcome.skipped.get(site)
    if not layers or not outcome.passes(site):
        return ""
    return f" (layers {', '.join(map(str, layers))} have none)"


def _cell(text: str) -> str:
    text = re.sub(r"/tmp/\S+?/(source|out)\b", r"<\1>", text)  # no run-dependent paths
    return "pass" if text == PASS else text.replace("|", "/").replace("\n", " ")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {DOCS}")
    parser.add_argument("types", nargs="*", help="model types (default: all)")
    args = parser.parse_args()
    outcomes = []
    for outcome in run(args.types or None):
        outcomes.append(outcome)
        status = outcome.reason or ", ".join(f"{s}: {v}" for s, v in outcome.sites.items())
        print(f"{outcome.model_type} ({outcome.seconds:.1f} s): {status}; "
              f"export: {outcome.reloads}", flush=True)
    if args.write:
        DOCS.write_text(markdown(outcomes))
        print(f"wrote {DOCS}")


if __name__ == "__main__":
    main()
