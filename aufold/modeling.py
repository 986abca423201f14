"""Loading models (hub id, local folder or GGUF file) and finding their atomic-unit sites."""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from aufold.checkpoint import local_checkpoint
from aufold.defaults import DTYPE_NAMES
from aufold.errors import AufoldError, first_line
from aufold.sites import Architecture, architecture_for, architecture_of, site_kind
from aufold.source import (  # noqa: F401  (re-exported: the model-loading API)
    SMOLLM2_CACHE,
    SMOLLM2_GGUF,
    ModelSource,
    local_smollm2,
    resolve_source,
    smollm2_gguf_path,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

DTYPES: Mapping[str, torch.dtype | str] = {
    name: "auto" if name == "auto" else getattr(torch, name) for name in DTYPE_NAMES
}


# Config keys that shape the computation; the fingerprint keeps only these so that
# the same model saved by another library version (or dequantized from GGUF)
# keeps its fingerprint, while another architecture or size does not.
_FINGERPRINT_CONFIG_KEYS = (
    "model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
    "n_layer", "n_embd", "n_head", "n_inner",
    # Mixture of Experts (no other architecture's config has these, so theirs is unchanged).
    "num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
    "shared_expert_intermediate_size",
)
# The sites whose weight shapes the fingerprint hashes, where an architecture has them.
_FINGERPRINT_SITES = ("head", "mlp")


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    except (OSError, ValueError, TypeError) as error:
        raise AufoldError(f"could not load the tokenizer of {source.ref!r}: "
                          f"{first_line(error)}") from None


def load_model(
    ref: str | Path,
    *,
    dtype: str = "auto",
    device: str | None = None,
    device_map: str | None = None,
    sites: Sequence[str] = (),
    allow_pickle: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelSource]:
    """Load a causal LM and its tokenizer in eval mode; GGUF files are dequantized.

    Every command loads models through here. Before any weight loads: ``sites`` that the
    architecture lacks are refused, a local checkpoint's safetensors headers and index are
    checked (:func:`aufold.checkpoint.local_checkpoint`), and pickle weights, which can run
    code when unpickled, are refused unless ``allow_pickle``.
    """
    source = resolve_source(ref)
    if dtype not in DTYPES:
        raise AufoldError(f"unknown dtype {dtype!r}; choose from: {', '.join(DTYPES)}")
    if device and device_map:
        raise AufoldError("give either --device or --device-map, not both")
    if device is not None:
        check_device(device)
    if device_map is not None and device_map not in _DEVICE_MAP_STRATEGIES:
        check_device(device_map)
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype]}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
        check_gguf_file(source)
    architecture_for(source_config(source)).check_sites(sites)  # fail before loading any weights
    if source.local_dir is not None:  # checked before loading; pickle only when allowed
        kwargs["use_safetensors"] = local_checkpoint(source.local_dir,
                                                     allow_pickle=allow_pickle) is not None
    elif not source.gguf_file:  # a hub repo: transformers picks the files
        kwargs["use_safetensors"] = not allow_pickle
    if device_map:
        kwargs["device_map"] = device_map
    try:
        model, loading = AutoModelForCausalLM.from_pretrained(source.path, output_loading_info=True,
                                                              **kwargs)
    except pickle.UnpicklingError as error:
        raise AufoldError(f"torch's safe loader refused the pickle weights of {source.ref!r} "
                          f"({first_line(error)}); convert the model to safetensors from a "
                          f"source you trust") from None
    except (OSError, ValueError) as error:
        raise AufoldError(f"could not load model {source.ref!r}: {first_line(error)}") from None
    if source.gguf_file:
        _forget_gguf_quantization(model)
    else:
        _check_complete(source, loading)
    if device and not device_map:
        model.to(device)
    model.eval()
    return model, load_tokenizer(source), source


def _check_complete(source: ModelSource, loading: Mapping[str, Any]) -> None:
    """Refuse a checkpoint that does not hold the weights its config describes: transformers
    would fill missing ones with random values (a config with more layers than weights) or
    drop the surplus (fewer), and either way aufold would edit another model."""
    problems = {"missing": loading.get("missing_keys") or [],
                "of another shape": loading.get("mismatched_keys") or [],
                "left unused": loading.get("unexpected_keys") or []}
    for what, names in problems.items():
        if names:
            first = sorted(str(name) for name in names)[0]
            raise AufoldError(f"the weights of {source.ref!r} do not match its config.json: "
                              f"{len(names)} weight(s) {what}, e.g. {first}; fix the config or "
                              f"download the checkpoint again")


def check_device(device: str) -> None:
    """Refuse a device name torch does not know, or a device this machine lacks, in one line."""
    try:
        if not device.strip():
            raise ValueError("the name is empty")
        if torch.device(device).type == "meta":
            raise ValueError("the meta device holds shapes, not weights")
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError) as error:
        raise AufoldError(f"device {device!r} cannot be used here ({first_line(error)}); "
                          f"pass --device cpu, or a device this machine has") from None


# accelerate's placement strategies; any other --device-map value names one device.
_DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def check_gguf_file(source: ModelSource) -> None:
    """Refuse a truncated or damaged GGUF file before transformers parses it."""
    from aufold.formats.gguf import gguf_tensors  # gguf is imported only for GGUF models

    assert source.gguf_path is not None
    gguf_tensors(source.gguf_path)


def source_config(source: ModelSource) -> PretrainedConfig:
    """The model's config, read before any weight loads."""
    if source.local_dir is not None:
        try:
            json.loads((source.local_dir / "config.json").read_text())["model_type"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as error:
            raise AufoldError(f"{source.local_dir}/config.json is not a valid model config "
                              f"({type(error).__name__}: {error}); re-save the model with "
                              f"save_pretrained") from None
    try:
        return AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file)
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as error:
        raise AufoldError(f"could not read the config of {source.ref!r}: {first_line(error)}") from None


def _forget_gguf_quantization(model: PreTrainedModel) -> None:
    # transformers dequantizes GGUF weights at load time but keeps a quantization
    # marker that makes save_pretrained refuse; the weights in memory are plain.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None


def is_layerwise(model: object) -> bool:
    """Whether ``model`` streams layer by layer (:class:`aufold.layerwise.LayerwiseModel`)
    rather than being a transformers model loaded whole."""
    from aufold.layerwise.skeleton import LayerwiseModel

    return isinstance(model, LayerwiseModel)


def model_architecture(model: PreTrainedModel) -> Architecture:
    """Where the model's sites are, derived from the model itself (once per model)."""
    return architecture_of(model)


def shaped(model: Any) -> PreTrainedModel:
    """The transformers model that knows the shapes: itself, or a streamed model's skeleton
    (whose parameters are on the meta device but have their shapes)."""
    return model.model if is_layerwise(model) else model  # type: ignore[no-any-return]


def num_layers(model: PreTrainedModel) -> int:
    model = shaped(model)
    return len(model.get_submodule(model_architecture(model).layers))


def site_module(model: PreTrainedModel, site: str, layer: int) -> nn.Module:
    return model.get_submodule(model_architecture(model).module_path(site, layer))


def site_width(model: PreTrainedModel, site: str) -> int:
    """How many units a site has in its widest layer, read from the weights themselves."""
    return max(layer_widths(model, site))


def layer_widths(model: PreTrainedModel, site: str) -> list[int]:
    """How many units a site has in each layer: 0 where a layer lacks it, and more in an
    experts layer (E x neurons) than in a dense one where a model mixes them."""
    model = shaped(model)
    kind = site_kind(site)
    architecture = model_architecture(model)
    if kind.projection == "layer":
        return [int(model.get_input_embeddings().weight.shape[1])] * num_layers(model)
    widths = [0] * architecture.num_layers
    for layer in architecture.site_layers(site):
        first = architecture.fold_tensors(site, layer)[0]
        widths[layer] = first.units(model.get_parameter(first.name).shape)
    return widths


def check_site_exists(model: PreTrainedModel, site: str) -> None:
    """Refuse a site whose module this model lacks, naming the module looked for."""
    architecture = model_architecture(model)
    path = architecture.module_path(site, architecture.site_layers(site)[0])
    try:
        model.get_submodule(path)
    except AttributeError:
        raise AufoldError(f"site {site!r} is not in this {model.config.model_type} model "
                          f"(no module {path}); choose another site") from None


def input_device(model: PreTrainedModel) -> torch.device:
    return model.get_input_embeddings().weight.device


def fingerprint(model: PreTrainedModel) -> str:
    """A hash of the model's shape: key config values and the weights sites fold into."""
    model = shaped(model)
    return fingerprint_from(model.config.to_dict(), model_architecture(model), num_layers(model),
                            lambda name: model.get_parameter(name).shape)


def fingerprint_from(config: Mapping[str, Any], architecture: Architecture, layers: int,
                     shape_of: Callable[[str], Sequence[int]]) -> str:
    """The fingerprint from a config dict and the shape of each weight, looked up by its name
    in the model: the same for a loaded model and for a checkpoint's file headers."""
    shapes = {}
    for layer in range(layers):
        for site in fingerprint_sites(architecture):
            name = architecture.module_path(site, layer) + ".weight"
            shapes[name] = list(shape_of(name))
    return fingerprint_of(config, shapes)


def fingerprint_sites(architecture: Architecture) -> tuple[str, ...]:
    """The sites whose weights the fingerprint hashes: head and mlp where every layer has
    them in one projection (a Mixture-of-Experts model has no single MLP down projection)."""
    return tuple(site for site in _FINGERPRINT_SITES
                 if site in architecture.sites and site not in architecture.skipped
                 and not any(architecture.expert_neurons(site, layer)
                             for layer in range(architecture.num_layers)))


def fingerprint_of(config: Mapping[str, Any], shapes: Mapping[str, list[int]]) -> str:
    """The fingerprint from a config dict and weight shapes, usable without a model."""
    payload = {
        "config": {key: config[key] for key in _FINGERPRINT_CONFIG_KEYS if key in config},
        "shapes": dict(sorted(shapes.items())),
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return f"sha256:{digest[:32]}"


def fitted_length(model: Any, max_length: int) -> int:
    """``max_length`` capped at the positions a model with learned absolute position embeddings
    has (GPT-2's ``n_positions``): a longer text would index past them. Texts are cut from
    the left, so the answer is kept."""
    limit = getattr(getattr(model, "config", None), "n_positions", None)
    return min(max_length, int(limit)) if isinstance(limit, int) and limit > 0 else max_length
