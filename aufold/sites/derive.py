"""Find a model's sites from what transformers says about it, checked against its modules.

Each transformers config class states a tensor-parallel plan (``base_model_tp_plan``)
that marks as ``rowwise`` exactly the projections whose *input* is split across
devices: the attention output projection (it reads the concatenated head outputs) and
the MLP down projection (it reads the MLP neurons), or the experts' down projections
of a Mixture-of-Experts block. These are the projections the sites fold into. The plan
is relative to the text decoder, so a multimodal wrapper's vision tower is never
mistaken for it. :mod:`aufold.sites.overrides` supplies the plan where transformers
gives none, and the facts no plan states.

Every entry is checked against the real modules of each decoder layer: a Linear (or
GPT-2's Conv1D) whose output is the model's hidden size, or a stacked [E, ...]
experts tensor one of whose axes is. A layer where a site's module is missing (a hybrid
model's linear-attention layer, a dense layer among experts) is skipped for that site:
the site lives in the layers that have it, and a site no layer has is absent, with
the reason.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from aufold.errors import AufoldError, first_line
from aufold.sites.architecture import (
    BUILT_IN_BIAS,
    Architecture,
    FoldTensor,
    LayerSites,
)
from aufold.sites.overrides import BUILT_IN, Override, Role, override_for

# Tensor-parallel styles that split a projection's input (the others split its output,
# an embedding's rows, or a fused gate and up projection).
_INPUT_SPLIT = ("rowwise", "rowwise_split_input")

# The Llama names, tried where a plan names no projection of a role.
_CONVENTION: Mapping[Role, str] = {"attention_out": "self_attn.o_proj", "mlp_down": "mlp.down_proj"}

_CACHE: weakref.WeakKeyDictionary[nn.Module, Architecture] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class _Entry:
    """One plan entry: the ModuleList of layers it names, the path inside a layer, its role."""

    layers: str
    path: str
    role: Role


def architecture_of(model: nn.Module) -> Architecture:
    """The sites of a loaded (or meta-device) transformers model, derived once per model."""
    found = _CACHE.get(model)
    if found is None:
        found = _derive(model)
        _CACHE[model] = found
    return found


def architecture_for(config: Any) -> Architecture:
    """The sites of a model built from ``config`` (a transformers config, or a model type),
    derived from an empty model on the meta device: no weight is allocated or read."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, str):
        try:
            config = AutoConfig.for_model(config)
        except ValueError:
            raise AufoldError(f"unsupported architecture {config!r}: transformers does not "
                              f"know this model type") from None
    if not isinstance(config, PretrainedConfig):
        raise TypeError(f"expected a transformers config or a model type, got {type(config)}")
    return _architecture_for_json(type(config), config.to_json_string(use_diff=False))


@functools.lru_cache(maxsize=16)
def _architecture_for_json(config_class: type, config_json: str) -> Architecture:
    import json

    import transformers
    from transformers import AutoModelForCausalLM

    # to_json_string writes infinities as {"__float__": "Infinity"} (Bamba's time_step_limit);
    # transformers' own reader turns them back into floats.
    config = config_class.from_dict(config_class._decode_special_floats(json.loads(config_json)))
    # The class the checkpoint was saved from, where transformers has it (a text decoder
    # saved alone, such as MllamaForCausalLM, has a config that the Auto class does not map).
    # aufold loads models with AutoModelForCausalLM; only a config it does not map (a text
    # decoder saved alone, such as MllamaForCausalLM's) is built as the class it names.
    named = getattr(transformers, next(iter(config.architectures or []), ""), None)
    try:
        with torch.device("meta"):
            try:
                model = AutoModelForCausalLM.from_config(config)
            except ValueError:
                if not (isinstance(named, type) and issubclass(named, transformers.PreTrainedModel)):
                    raise
                model = named._from_config(config)
    except ValueError as error:  # no causal-LM class for this config
        raise AufoldError(f"unsupported architecture {config.model_type!r}: transformers has "
                          f"no causal language model class for it ({first_line(error)})"
                          ) from None
    except Exception as error:  # noqa: BLE001 - transformers' own failure on this config
        raise AufoldError(f"unsupported architecture {config.model_type!r}: transformers could "
                          f"not build the model from this config ({type(error).__name__}: "
                          f"{first_line(error)}); check config.json") from None
    return _derive(model)


def _derive(model: nn.Module) -> Architecture:
    config = model.config  # type: ignore[attr-defined]
    text = config.get_text_config(decoder=True)
    model_type = str(config.model_type)
    override = override_for(str(text.model_type))
    if text is not config:
        # A multimodal wrapper: the text decoder's bias flags live on its text config, which
        # vector folding does not switch, so additive vectors are folded in hook mode only.
        override = replace(override, attention_out_bias=None, mlp_down_bias=None)
    entries = _entries(text, override, model_type)
    layers_path = _find_layers(model, text, entries, model_type)
    layers = model.get_submodule(layers_path)
    hidden = _hidden_size(text, model)
    layer_sites = tuple(_layer_sites(layer, entries, hidden) for layer in layers)
    if override.no_expert_neurons:
        layer_sites = tuple(replace(sites, expert_neurons=None) for sites in layer_sites)
    if not layer_sites:
        raise AufoldError(f"unsupported architecture {model_type!r}: its decoder "
                          f"({layers_path}) has no layers")
    absent, skipped = _missing(layer_sites, model_type, override.no_expert_neurons)
    return Architecture(
        model_type=model_type, layers=layers_path, layer_sites=layer_sites,
        layout=_layout(layers, layer_sites, model_type),
        absent=MappingProxyType(absent), skipped=MappingProxyType(skipped),
        attention_out_bias=_bias_flag(override.attention_out_bias),
        mlp_down_bias=_bias_flag(override.mlp_down_bias),
        norm_after_mlp_down=override.norm_after_mlp_down,
        gguf_mlp_up=override.gguf_mlp_up)


def _bias_flag(flag: str | None) -> str | None:
    return BUILT_IN_BIAS if flag == BUILT_IN else flag


def _entries(text: Any, override: Override, model_type: str) -> list[_Entry]:
    """The plan's input-split entries with one ``*`` (the layer index), classified."""
    if override.unsupported:
        raise AufoldError(f"unsupported architecture {model_type!r}: {override.unsupported}")
    plan: Mapping[str, Any] = override.plan or (getattr(text, "base_model_tp_plan", None) or {})
    entries = []
    for pattern, style in plan.items():
        if not override.plan and style not in _INPUT_SPLIT:
            continue
        layers, star, path = pattern.partition(".*.")
        if not star or "*" in path:
            continue
        role = style if override.plan else _role(path)
        entries.append(_Entry(layers, path, role))
    # Some plans name the experts but not the attention (Granite-MoE, Phi-MoE, ...), or name
    # something else first: the Llama names are tried last, kept where the modules confirm.
    known = {(entry.role, entry.path) for entry in entries}
    for role, path in _CONVENTION.items():
        if entries and (role, path) not in known:
            entries.append(_Entry(entries[0].layers, path, role))
    if not entries:
        raise AufoldError(
            f"unsupported architecture {model_type!r}: transformers states no tensor-parallel "
            f"plan for its decoder layers and aufold has no override for it, so aufold cannot "
            f"tell which projection reads the attention heads or the MLP neurons")
    return entries


def _role(path: str) -> Role:
    parts = path.split(".")
    if "experts" in parts:
        return "experts_down"
    if any(part.startswith("shared_expert") for part in parts):
        return "shared_expert_down"
    if "attn" in parts[0] or "attention" in parts[0]:
        return "attention_out"
    return "mlp_down"


def _find_layers(model: nn.Module, text: Any, entries: list[_Entry], model_type: str) -> str:
    """The path of the text decoder's layer list: the plan is relative to the module that
    owns the text config (``model``, ``transformer``, ``model.language_model``, ...)."""
    stacks = {entry.layers for entry in entries}
    if len(stacks) != 1:
        raise AufoldError(f"unsupported architecture {model_type!r}: its plan names more than "
                          f"one stack of decoder layers ({', '.join(sorted(stacks))})")
    stack = stacks.pop()
    owners = [name for name, module in model.named_modules()
              if getattr(module, "config", None) is text]
    owners += [name for name, module in model.named_modules()
               if type(getattr(module, "config", None)) is type(text) and name not in owners]
    for owner in owners:
        path = f"{owner}.{stack}" if owner else stack
        try:
            found = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList):
            return path
    raise AufoldError(f"unsupported architecture {model_type!r}: no list of decoder layers "
                      f"named {stack!r} found in the text model")


def _hidden_size(text: Any, model: nn.Module) -> int:
    size = getattr(text, "hidden_size", None)
    if isinstance(size, int):
        return size
    return int(model.get_input_embeddings().weight.shape[1])  # type: ignore[operator]


def _projection(layer: nn.Module, path: str, hidden: int) -> bool:
    """Whether ``path`` in the layer is a projection that writes the hidden size."""
    from transformers.pytorch_utils import Conv1D

    module = _submodule(layer, path)
    if isinstance(module, nn.Linear):
        return module.out_features == hidden
    if isinstance(module, Conv1D):
        return module.nf == hidden
    return False


def _submodule(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _layer_sites(layer: nn.Module, entries: list[_Entry], hidden: int) -> LayerSites:
    def first(role: Role) -> str | None:
        return next((e.path for e in entries if e.role == role and _projection(layer, e.path, hidden)),
                    None)

    attention_out, mlp_down = first("attention_out"), first("mlp_down")
    if mlp_down is not None:
        return LayerSites(attention_out, mlp_down)
    for entry in entries:
        if entry.role == "experts_down":
            experts = _experts(layer, entry.path, entries, hidden)
            if experts is not None:
                block, outputs, neurons = experts
                norm = _inner_norm(layer.get_submodule(block))
                return LayerSites(attention_out, None, moe_block=block,
                                  expert_outputs=() if norm else outputs,
                                  moe_norm=f"{block}.{norm}" if norm else None,
                                  expert_neurons=neurons)
    return LayerSites(attention_out, None)


def _experts(layer: nn.Module, path: str, entries: list[_Entry], hidden: int
             ) -> tuple[str, tuple[FoldTensor, ...], FoldTensor | None] | None:
    """A Mixture-of-Experts block, the tensors whose slices are its output units, and the
    stacked down projection whose input columns are its (expert, neuron) units.

    ``path`` is the experts' down projection, ``<block>.<experts>.<down>``: a stacked
    [E, out, in] (or, transposed, [E, in, out]) parameter as transformers 5 keeps them,
    or (whose neurons aufold does not read) a list of per-expert projections or an
    [E * in, out] parameter.
    """
    experts_path, _, down = path.rpartition(".")
    block, _, experts_name = experts_path.rpartition(".")
    experts = _submodule(layer, experts_path)
    if experts is None or not block:
        return None
    if _has_weightless_experts(layer.get_submodule(block)):
        return None
    tensors: list[FoldTensor] = []
    neurons = None
    stacked = getattr(experts, down, None)
    if isinstance(stacked, nn.Parameter) and stacked.dim() == 3:
        axis = _expert_axis(experts, stacked, hidden)
        if axis is None:
            return None
        tensors.append(FoldTensor(f"{experts_name}.{down}", axis))
        neurons = FoldTensor(f"{experts_path}.{down}", 3 - axis, expert_axis=0)
        bias = getattr(experts, f"{down}_bias", None)
        if isinstance(bias, nn.Parameter):
            tensors.append(FoldTensor(f"{experts_name}.{down}_bias", 1))
    elif isinstance(stacked, nn.Parameter) and stacked.dim() == 2 and stacked.shape[1] == hidden:
        # The experts' down projections as one [E * in, out] parameter that the forward views
        # per expert (DBRX's): output unit i is column i for every expert. Its neurons are
        # not read (the forward slices a view, which aufold.experts does not follow).
        tensors.append(FoldTensor(f"{experts_name}.{down}", 1))
    elif isinstance(experts, nn.ModuleList):
        for number, expert in enumerate(experts):
            if not _projection(expert, down, hidden):
                return None
            tensors += _dense_output(expert.get_submodule(down), f"{experts_name}.{number}.{down}")
    else:
        return None
    # A shared expert, always on, adds to the same output; some plans name it, others
    # (Qwen2-MoE's) do not, so look for a projection named like the experts' down one.
    shared_names = {entry.path.rpartition(".")[2] for entry in entries
                    if entry.role == "shared_expert_down"} | {down}
    block_module = layer.get_submodule(block)
    for name, module in block_module.named_modules():
        if not name or name.split(".")[0] == experts_name:
            continue
        stacked = getattr(module, down, None)
        if name.rpartition(".")[2].startswith("shared_expert") and isinstance(
                stacked, nn.Parameter) and stacked.dim() == 3:  # shared experts stacked too
            axis = _expert_axis(module, stacked, hidden)
            if axis is not None:
                tensors.append(FoldTensor(f"{name}.{down}", axis))
        elif name.rpartition(".")[2] in shared_names and _projection(block_module, name, hidden):
            tensors += _dense_output(module, name)
    return block, tuple(tensors), neurons


def _inner_norm(block: nn.Module) -> str | None:
    """The norm an experts block applies to its own output (AXK1's ``post_mlp_layernorm``),
    by name; None where it has none. Only such an output norm (a direct ``post_*`` child)
    stops the block's output from being linear in its experts' down projection rows; a
    norm on the block's input does not."""
    for name, module in block.named_children():
        if name.startswith("post_") and ("norm" in type(module).__name__.lower() or "norm" in name):
            return name
    return None


def _has_weightless_experts(block: nn.Module) -> bool:
    """Experts that add their input without a weight (LongCat-Flash's zero-compute, identity
    experts) contribute to the block's output with nothing to scale: no fold is exact."""
    for module in block.modules():
        if int(getattr(module, "zero_expert_num", 0) or 0) > 0:
            return True
        if any("identity" in name or "zero_expert" in name for name, _ in module.named_children()):
            return True
    config = getattr(block, "config", None)
    return int(getattr(config, "zero_expert_num", 0) or 0) > 0


def _dense_output(module: nn.Module, name: str) -> list[FoldTensor]:
    """The weight rows and bias of a dense projection (its output units), named ``name``."""
    from transformers.pytorch_utils import Conv1D

    axis = 1 if isinstance(module, Conv1D) else 0
    tensors = [FoldTensor(f"{name}.weight", axis)]
    if getattr(module, "bias", None) is not None:
        tensors.append(FoldTensor(f"{name}.bias", 0))
    return tensors


def _expert_axis(experts: nn.Module, stacked: torch.Tensor, hidden: int) -> int | None:
    transposed = getattr(experts, "is_transposed", None)
    if isinstance(transposed, bool):
        axis = 2 if transposed else 1
        return axis if stacked.shape[axis] == hidden else None
    axes = [axis for axis in (1, 2) if stacked.shape[axis] == hidden]
    return axes[0] if len(axes) == 1 else None


def _layout(layers: nn.ModuleList, layer_sites: tuple[LayerSites, ...], model_type: str) -> str:
    from transformers.pytorch_utils import Conv1D

    kinds = set()
    for layer, sites in zip(layers, layer_sites):
        for path in (sites.attention_out, sites.mlp_down):
            if path is not None:
                kinds.add("conv1d" if isinstance(layer.get_submodule(path), Conv1D) else "linear")
    if len(kinds) > 1:
        raise AufoldError(f"unsupported architecture {model_type!r}: it mixes Linear and "
                          f"Conv1D projections")
    return kinds.pop() if kinds else "linear"


def _missing(layer_sites: tuple[LayerSites, ...], model_type: str,
             no_expert_neurons: str | None = None
             ) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """Why each site is missing: from every layer (absent), or from some (those are skipped)."""
    reasons: dict[str, str] = {}
    without: dict[str, list[int]] = {}
    for number, sites in enumerate(layer_sites):
        missing = {}
        if sites.attention_out is None:
            missing["head"] = (f"layer {number} of {model_type} has no attention output "
                               f"projection that transformers' plan names")
        if sites.mlp_down is None and sites.expert_neurons is None:
            missing["mlp"] = (f"aufold cannot read the expert neurons of {model_type}: "
                              f"{no_expert_neurons}" if sites.moe_block and no_expert_neurons
                              else f"{model_type} keeps the experts of layer {number} as a list "
                              f"of modules, whose neurons aufold does not read (it reads "
                              f"stacked experts)" if sites.moe_block else
                              f"layer {number} of {model_type} has no MLP down projection that "
                              f"transformers' plan names")
        if sites.mlp_down is None and sites.moe_norm is not None:
            missing["mlp-out"] = (f"the experts block of layer {number} of {model_type} passes "
                                  f"the sum of its experts through a norm ({sites.moe_norm}), "
                                  f"so no weight scales its output")
        elif sites.mlp_down is None and sites.moe_block is None:
            missing["mlp-out"] = (f"layer {number} of {model_type} has no MLP down projection "
                                  f"or experts block that aufold can fold")
        for site, reason in missing.items():
            reasons.setdefault(site, reason)
            without.setdefault(site, []).append(number)
    absent = {site: reasons[site] for site, layers in without.items()
              if len(layers) == len(layer_sites)}
    skipped = {site: tuple(layers) for site, layers in without.items() if site not in absent}
    return absent, skipped
