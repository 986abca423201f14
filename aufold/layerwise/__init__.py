"""Layer streaming: running a model larger than memory one decoder layer at a time.

- :mod:`~aufold.layerwise.skeleton`: the model built with its parameters on the meta
  device, whose parts load from the safetensors checkpoint on demand;
- :mod:`~aufold.layerwise.forward`: one layer over stored hidden states, through the
  model's own forward;
- :mod:`~aufold.layerwise.hidden`: where the hidden states of all texts live;
- :mod:`~aufold.layerwise.localize`: localization in that order.

:func:`open_layerwise` is what the command line calls: it decides whether a model
streams (asked for, or needed because its weights do not fit in memory) and says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from aufold.checkpoint import (
    FLOAT_DTYPES,
    Checkpoint,
    has_safetensors,
    local_checkpoint,
    open_checkpoint,
    pickle_weight_files,
)
from aufold.errors import AufoldError
from aufold.layerwise.hidden import MARGIN_BYTES, available_memory, size_text
from aufold.layerwise.skeleton import LayerwiseModel
from aufold.modeling import DTYPES, load_tokenizer, resolve_source, source_config
from aufold.sites import architecture_for

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from aufold.source import ModelSource

__all__ = ["LayerwiseModel", "StreamingChoice", "load_for_run", "open_layerwise",
           "streaming_choice"]


@dataclass(frozen=True)
class StreamingChoice:
    """Whether a model runs layer by layer, the folder it streams from, and why."""

    folder: Path | None  # None: load the model whole
    reason: str


def streaming_choice(ref: str, *, requested: bool, dtype: str = "auto",
                     device_map: str | None = None, allow_pickle: bool = False) -> StreamingChoice:
    """Stream when asked to (refusing what cannot stream), or when the weights would not
    fit in the memory available; otherwise load the model whole."""
    source = resolve_source(ref)
    if requested:
        if device_map:
            raise AufoldError("give either --layer-streaming or --device-map, not both: layer "
                              "streaming already runs a model larger than memory")
        if source.gguf_file:
            raise AufoldError(f"layer streaming reads safetensors checkpoints, and {ref} is a GGUF "
                              f"file; drop --layer-streaming (GGUF models load dequantized), or "
                              f"stream the original safetensors checkpoint")
        folder = _safetensors_folder(source)
        if folder is not None and not has_safetensors(folder) and pickle_weight_files(folder):
            raise AufoldError(f"layer streaming reads safetensors weights, and {folder} holds "
                              f"pickle weights only ({', '.join(pickle_weight_files(folder)[:3])}); "
                              f"convert the checkpoint to safetensors, or drop --layer-streaming "
                              f"to load it whole with --allow-pickle")
        if folder is None:
            raise AufoldError(f"layer streaming reads a local safetensors checkpoint, and {ref} is "
                              f"neither a folder nor complete in the hub cache; download it first "
                              f"(huggingface-cli download {ref})")
        architecture_for(source_config(source))  # the same order of refusals as loading whole
        open_checkpoint(folder)  # refuses damaged checkpoints
        return StreamingChoice(folder, "layer streaming, as asked (--layer-streaming)")
    if device_map or source.gguf_file:
        return StreamingChoice(None, "")
    folder = _safetensors_folder(source)
    try:
        checkpoint = local_checkpoint(folder, allow_pickle=allow_pickle) if folder else None
    except AufoldError:
        checkpoint = None  # loading it whole says what is wrong, in its own order
    if checkpoint is None:
        return StreamingChoice(None, "")
    weights = _weight_bytes(checkpoint, dtype)
    available = available_memory()
    if weights + MARGIN_BYTES <= available:
        return StreamingChoice(None, "")
    return StreamingChoice(folder, f"layer streaming: the weights need {size_text(weights)} and "
                                   f"the run {size_text(MARGIN_BYTES)} more, but "
                                   f"{size_text(available)} of memory is available, so the layers "
                                   f"load one at a time")


def open_layerwise(folder: Path, *, dtype: str = "auto", device: str | None = None,
                   work_dir: Path | None = None) -> tuple[LayerwiseModel, PreTrainedTokenizerBase]:
    """The model of ``folder`` ready to stream, and its tokenizer."""
    from aufold.modeling import check_device

    if device is not None:
        check_device(device)
    source = resolve_source(str(folder))
    return (LayerwiseModel(folder, dtype=dtype, device=device, work_dir=work_dir),
            load_tokenizer(source))


def load_for_run(ref: str | Path, *, layer_streaming: bool = False, work_dir: Path | None = None,
                 dtype: str = "auto", device: str | None = None, device_map: str | None = None,
                 sites: tuple[str, ...] | list[str] = (), allow_pickle: bool = False,
                 needs_whole_model: str | None = None
                 ) -> tuple[PreTrainedModel | LayerwiseModel, PreTrainedTokenizerBase, ModelSource]:
    """What localize, eval and tune run on: the model loaded whole, or layer by layer when
    asked or when its weights do not fit (said on stderr, with the reason).

    ``needs_whole_model`` says why this run cannot stream (a math task generates token by
    token): streaming is then refused before anything loads, with what to do instead.
    """
    from aufold.modeling import load_model
    from aufold.progress import status

    choice = streaming_choice(str(ref), requested=layer_streaming, dtype=dtype,
                              device_map=device_map, allow_pickle=allow_pickle)
    if choice.folder is None:
        if work_dir is not None:
            raise AufoldError("--work-dir holds the hidden states of layer streaming; add "
                              "--layer-streaming or drop --work-dir")
        return load_model(ref, dtype=dtype, device=device, device_map=device_map, sites=sites,
                          allow_pickle=allow_pickle)
    if needs_whole_model:
        if layer_streaming:
            raise AufoldError(f"layer streaming scores multiple-choice tasks only: "
                              f"{needs_whole_model}; drop --layer-streaming")
        raise AufoldError(f"{choice.reason.removeprefix('layer streaming: ')}; but "
                          f"{needs_whole_model}, so layer streaming cannot run it: spread the "
                          f"model over memory and disk with --device-map auto")
    source = resolve_source(str(ref))
    if work_dir is not None and any(Path(work_dir).resolve().is_relative_to(path)
                                    for path in source.input_paths()):
        raise AufoldError(f"--work-dir {work_dir} is inside the model's folder, which aufold "
                          f"never writes to; choose a folder elsewhere")
    status(choice.reason)
    lm, tokenizer = open_layerwise(choice.folder, dtype=dtype, device=device, work_dir=work_dir)
    lm.architecture.check_sites(sites)
    return lm, tokenizer, source


def _weight_bytes(checkpoint: Checkpoint, dtype: str) -> int:
    """The checkpoint's weights in bytes once loaded as ``dtype`` (floats converted)."""
    wanted = DTYPES.get(dtype)
    total = 0
    for entry in checkpoint.entries():
        if isinstance(wanted, torch.dtype) and entry.dtype in FLOAT_DTYPES:
            total += entry.nbytes // FLOAT_DTYPES[entry.dtype].itemsize * wanted.itemsize
        else:
            total += entry.nbytes
    return total


def _safetensors_folder(source: ModelSource) -> Path | None:
    from aufold.streaming import cached_snapshot

    return source.local_dir or cached_snapshot(source.path)
