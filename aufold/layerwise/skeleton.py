"""A causal LM built without its weights, whose parts load from disk one at a time.

transformers builds the model from its config as usual, except that every parameter
is created on the meta device (no memory) while buffers, such as rotary frequencies,
are real. A part (the modules outside the decoder layers, or one decoder layer) is
then loaded from the safetensors checkpoint by transformers' own loading code, which
applies the same renamings and conversions as ``from_pretrained`` (per-expert tensors
on disk fused into one expert tensor in memory, for example), and unloaded back to
meta when done. No architecture is described here: which tensors belong to a layer
comes from the path of the decoder layers that aufold.sites finds.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import torch
from torch import nn

from aufold.checkpoint import FLOAT_DTYPES, Checkpoint, open_checkpoint, read_tensor
from aufold.errors import AufoldError, first_line
from aufold.modeling import DTYPES, fingerprint_from
from aufold.sites import Architecture, architecture_of

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

OUTSIDE = "outside"  # the part of a model that is not in its decoder layers
EXTRA = "extra"  # tensors of decoder layers beyond the config's count


class LayerwiseModel:
    """A causal LM whose weights stay on disk until :meth:`loaded` brings in a part.

    ``model`` is a real transformers model (its class, config, buffers and forward), so
    hooks and aufold.sites work on it as on a loaded model; only the parameters of
    the parts not loaded are on the meta device.
    """

    def __init__(self, folder: Path, *, dtype: str = "auto", device: str | None = None,
                 work_dir: Path | None = None) -> None:
        from transformers import AutoConfig

        self.checkpoint: Checkpoint = open_checkpoint(folder)  # refuses pickle and damage
        checkpoint = self.checkpoint
        try:
            self.config: PretrainedConfig = AutoConfig.from_pretrained(folder)
        except (OSError, ValueError, KeyError) as error:
            raise AufoldError(f"could not read the config of {folder}: {first_line(error)}") from None
        self.dtype: torch.dtype = _resolve_dtype(dtype, self.config, checkpoint)
        self.device = torch.device(device or "cpu")
        self.model: PreTrainedModel = _skeleton(self.config, self.dtype)
        self.architecture: Architecture = architecture_of(self.model)
        self.layers: nn.ModuleList = self.model.get_submodule(self.architecture.layers)
        self._parts = _tensors_by_part(checkpoint, self.architecture.layers, len(self.layers))
        self._check_layers()
        # Where hidden states spill when they do not fit in memory (None: refuse instead),
        # and a test's way to force the choice (:func:`aufold.layerwise.hidden.choose_spill`).
        self.work_dir = work_dir
        self.spill: bool | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_bytes(self, layer: int) -> int:
        """Bytes of one decoder layer's weights in this model's dtype."""
        return sum(_numel(self.checkpoint, name) for name in self._parts[layer]) * self.dtype.itemsize

    def largest_part_bytes(self) -> int:
        """Bytes of the largest part ever loaded: a decoder layer, or everything outside them
        (the embeddings and LM head, which a large vocabulary makes bigger than a layer)."""
        outside = sum(_numel(self.checkpoint, name) for name in self._parts[OUTSIDE])
        layers = max((self.layer_bytes(layer) for layer in range(self.num_layers)), default=0)
        return max(layers, outside * self.dtype.itemsize)

    def fingerprint(self) -> str:
        """The same fingerprint as the model loaded whole (:func:`aufold.modeling.fingerprint`)."""
        return fingerprint_from(self.config.to_dict(), self.architecture, self.num_layers,
                                lambda name: self.model.get_parameter(name).shape)

    @property
    def embeddings(self) -> str:
        """The input embeddings' module path."""
        return self.module_name(self.model.get_input_embeddings())

    @property
    def head(self) -> str:
        """The LM head's module path."""
        return self.module_name(self.model.get_output_embeddings())

    @property
    def head_source(self) -> str:
        """What to load for the LM head: itself, or the embeddings it is tied to."""
        return self.embeddings if getattr(self.config, "tie_word_embeddings", False) else self.head

    def _check_layers(self) -> None:
        """Refuse, before any layer runs, a checkpoint whose layers do not hold what the config
        describes. Loading may rename, fuse or stack tensors, but never changes how many
        numbers a layer has, so each layer's count is compared with the model's."""
        for layer, module in enumerate(self.layers):
            wanted = sum(p.numel() for p in module.parameters())
            stored = sum(_numel(self.checkpoint, name) for name in self._parts[layer])
            if wanted != stored:
                held = (f"holds {stored:,} numbers for it" if stored else "has no weights for it")
                raise AufoldError(f"config.json describes decoder layer {layer} with {wanted:,} "
                                  f"weights, but {self.checkpoint.folder} {held}; the checkpoint "
                                  f"does not match its config.json: download it again")
        extra = self._parts.get(EXTRA)
        if extra:
            raise AufoldError(f"{self.checkpoint.folder} holds {extra[0]}, beyond the "
                              f"{self.num_layers} layers of its config.json; the checkpoint does "
                              f"not match its config.json: download it again")

    def module_name(self, module: nn.Module) -> str:
        """The dotted path of a module of the model (``lm_head``, ``model.embed_tokens``)."""
        return next(name for name, candidate in self.model.named_modules() if candidate is module)

    @contextmanager
    def loaded(self, part: int | str, *, skip: tuple[str, ...] = (),
               only: tuple[str, ...] = ()) -> Iterator[nn.Module]:
        """Load one decoder layer (an index) or :data:`OUTSIDE`, and unload it afterwards.

        Module paths in ``only`` narrow the part to those modules; those in ``skip`` stay
        on the meta device, their tensors not even read (the LM head, when only the
        decoder runs). Exactly what this call loaded is unloaded when it ends.
        """
        outside = part == OUTSIDE
        module = self.model if outside else self.layers[int(part)]
        prefix = "" if outside else f"{self.architecture.layers}.{part}."

        def wanted(name: str) -> bool:
            return ((not only or any(_under(name, path) for path in only))
                    and not any(_under(name, path) for path in skip))

        before = {id(p) for p in module.parameters() if not p.is_meta}
        try:
            self._load([name for name in self._parts[part] if wanted(name)])
            if outside and getattr(self.config, "tie_word_embeddings", False):
                self.model.tie_weights()  # the LM head is the embeddings loaded just now
            missing = [prefix + name for name, p in _own_parameters(module, outside, self.layers)
                       if p.is_meta and wanted(prefix + name)]
            if missing:
                where = "outside the decoder layers" if outside else f"in layer {part}"
                raise AufoldError(f"{self.checkpoint.folder} has no weights for {missing[0]} "
                                  f"{where} ({len(missing)} parameter(s) missing); the checkpoint "
                                  f"does not match its config.json: download it again")
            yield module
        finally:
            layers = {id(p) for p in self.layers.parameters()} if outside else set()
            _unload(module, keep=before | layers)

    def _load(self, names: list[str]) -> None:
        """Read the named tensors and let transformers place them into the model."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
        from transformers.utils import logging

        state_dict = {}
        handles: dict[str, BinaryIO] = {}
        try:
            for name in names:
                file = self.checkpoint.weight_map[name]
                if file not in handles:
                    handles[file] = (self.checkpoint.folder / file).open("rb")
                with _ordinary_tensors():
                    state_dict[name] = read_tensor(handles[file], self.checkpoint.entry(name))
        finally:
            for handle in handles.values():
                handle.close()
        config = LoadStateDictConfig(device_map={"": str(self.device)}, dtype=self.dtype,
                                     weight_mapping=get_model_conversion_mapping(self.model))
        bars = logging.is_progress_bar_enabled()
        logging.disable_progress_bar()
        try:
            with _ordinary_tensors():
                info, _ = convert_and_load_state_dict_in_model(self.model, state_dict, config)
        finally:
            if bars:
                logging.enable_progress_bar()
        problems = [*info.mismatched_keys, *info.error_msgs, *info.conversion_errors]
        if problems:
            raise AufoldError(f"transformers could not load {min(map(str, problems))} from "
                              f"{self.checkpoint.folder}; the checkpoint does not match its "
                              f"config.json")


@contextmanager
def _ordinary_tensors() -> Iterator[None]:
    """Weights as from_pretrained makes them, even when loaded under inference mode.

    torch picks other matmul kernels for inference tensors (a 3D input that is not
    contiguous, as an LM head reading the last positions gets, is folded into 2D
    first), which would change logits in their last bits against the model loaded whole.
    """
    with torch.inference_mode(False), torch.no_grad():
        yield


def _resolve_dtype(dtype: str, config: PretrainedConfig, checkpoint: Checkpoint) -> torch.dtype:
    """The dtype to run in: the one asked for, else the config's, else the stored one
    (what ``from_pretrained(dtype="auto")`` picks)."""
    if dtype not in DTYPES:
        raise AufoldError(f"unknown dtype {dtype!r}; choose from: {', '.join(DTYPES)}")
    if dtype != "auto":
        return DTYPES[dtype]  # type: ignore[return-value]
    configured = getattr(config, "dtype", None)
    if isinstance(configured, torch.dtype):
        return configured
    if isinstance(configured, str) and isinstance(getattr(torch, configured, None), torch.dtype):
        return getattr(torch, configured)
    stored = next((FLOAT_DTYPES[e.dtype] for e in checkpoint.entries() if e.dtype in FLOAT_DTYPES),
                  torch.float32)
    return stored


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered meanwhile goes to the meta device; buffers stay real.

    A parameter moves at registration, before its module initializes it, so building
    even a 70B model allocates nothing and runs no initializer on real memory.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, parameter: nn.Parameter | None) -> None:
        if parameter is not None and not parameter.is_meta:
            parameter = nn.Parameter(parameter.to("meta"), requires_grad=False)
        register(module, name, parameter)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _skeleton(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.requires_grad_(False)
    return model.eval()


def _tensors_by_part(checkpoint: Checkpoint, layers_path: str, count: int
                     ) -> dict[int | str, list[str]]:
    """The checkpoint's tensor names of each decoder layer and of the rest (:data:`OUTSIDE`).

    A layer's tensors are those under its path, with or without the base model prefix
    (``model.layers.3.`` or ``layers.3.``; GPT-2's ``h.3.``), whatever they are called below it.
    """
    short = layers_path.split(".", 1)[-1]
    pattern = re.compile(rf"^(?:{re.escape(layers_path)}|{re.escape(short)})\.(\d+)\.")
    parts: dict[int | str, list[str]] = {index: [] for index in range(count)}
    parts[OUTSIDE] = []
    parts[EXTRA] = []
    for name in checkpoint.weight_map:
        match = pattern.match(name)
        index = int(match.group(1)) if match else None
        parts[OUTSIDE if index is None else index if index < count else EXTRA].append(name)
    return parts


def _own_parameters(module: nn.Module, outside: bool, layers: nn.ModuleList
                    ) -> Iterator[tuple[str, nn.Parameter]]:
    """The parameters of a part: a layer's, or the model's outside its decoder layers."""
    inside = {id(p) for p in layers.parameters()} if outside else set()
    for name, parameter in module.named_parameters():
        if id(parameter) not in inside:
            yield name, parameter


def _unload(module: nn.Module, keep: set[int]) -> None:
    """Put the module's parameters back on the meta device, except those in ``keep``."""
    for submodule in module.modules():
        for name, parameter in list(submodule._parameters.items()):
            if parameter is not None and not parameter.is_meta and id(parameter) not in keep:
                submodule._parameters[name] = nn.Parameter(parameter.to("meta"),
                                                           requires_grad=False)


def _under(name: str, path: str) -> bool:
    """Whether a tensor name lies under a module path, with or without the base model prefix."""
    short = path.split(".", 1)[-1]
    return name.startswith((f"{path}.", f"{short}."))


def _numel(checkpoint: Checkpoint, name: str) -> int:
    numel = 1
    for dim in checkpoint.entry(name).shape:
        numel *= dim
    return numel
