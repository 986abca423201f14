"""Localization one decoder layer at a time, for models larger than memory.

The same counts as :func:`aufold.localize.localize`, computed in the other order:
every pair goes through layer 0, its hidden states are kept, layer 0 is freed and
layer 1 is loaded, and so on (the calibration pass of GPTQ or llm-compressor). The
batches, the prompt sharing, the tokens read and the tie rule are the in-memory
localization's own, so on the same device the counts agree with it exactly. The LM
head is never read; the embeddings are loaded for the first pass only.

Memory: one layer, the hidden states of every text in the model's dtype (or a
memory-mapped file, see :mod:`aufold.layerwise.hidden`) and the counters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from aufold.encoding import DEFAULT_MAX_LENGTH, Batch, pad_id
from aufold.layerwise.forward import LayerRunner
from aufold.layerwise.hidden import HiddenStore, open_store
from aufold.layerwise.skeleton import OUTSIDE, LayerwiseModel
from aufold.localize import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_TIE_TOLERANCE,
    SharedInputs,
    at_last_token,
    check_cache_filled,
    PROBE,
    EncodedPair,
    check_options,
    check_sites,
    count_layer,
    counted_plan,
    encode_pairs,
    full_batches,
    Handle,
    full_inputs,
    last_token_hooks,
    layers_without,
    new_counts,
    shared_batches,
    same_reading,
    shared_inputs,
)
from aufold.modeling import fitted_length, site_width
from aufold.pairs import ContrastivePair, validate_pairs
from aufold.plan import Plan, SiteCounts
from aufold.progress import bar as progress_bar
from aufold.sites import site_kind

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class _Group:
    """One batch of pairs and where its hidden states live in the store."""

    shared: SharedInputs | None  # prompt and answers, or
    full: Batch | None  # two full texts per pair
    blocks: tuple[int, ...]  # store indices: (prompt, answers) or (full,)


@torch.inference_mode()
def localize_layerwise(
    lm: LayerwiseModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[ContrastivePair],
    sites: Sequence[str],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int = DEFAULT_MAX_LENGTH,
    chat_template: bool = False,
    tie_tolerance: float = DEFAULT_TIE_TOLERANCE,
    progress: bool = True,
    model_id: str | None = None,
) -> Plan:
    """Count the sign of x_pos - x_neg for every unit of ``sites`` in every layer, layer by layer.

    The hidden states spill to ``lm.work_dir`` when they do not fit in memory.
    """
    pairs = validate_pairs(pairs)
    sites = check_sites(lm.model, sites)  # the skeleton has every module, on meta
    check_options(batch_size, max_length, tie_tolerance)
    max_length = fitted_length(lm, max_length)
    encoded, truncated = encode_pairs(tokenizer, pairs, max_length=max_length,
                                      chat_template=chat_template)
    padding = pad_id(tokenizer)
    counts = _count(lm, encoded, sites, batch_size, padding, tie_tolerance, progress)
    if counts is None:  # answers read on a prompt's cache differ here: every text runs whole
        encoded = [pair.whole() for pair in encoded]
        counts = _count(lm, encoded, sites, batch_size, padding, tie_tolerance, progress)
        assert counts is not None
    return counted_plan(model_id or str(lm.checkpoint.folder), lm.fingerprint(), len(pairs), counts,
                        {"max_length": max_length, "chat_template": chat_template,
                         "tie_tolerance": tie_tolerance, "truncated_texts": truncated,
                         "dtype": str(lm.dtype).removeprefix("torch."),
                         "full_text_pairs": sum(1 for pair in encoded if not pair.prompt),
                         **layers_without(lm, sites)})


def _count(lm: LayerwiseModel, encoded: list[EncodedPair], sites: Sequence[str],
           batch_size: int, padding: int, tie_tolerance: float, progress: bool
           ) -> dict[str, SiteCounts] | None:
    """The counts, one pass over the layers. Pairs that share a prompt carry the in-memory
    probe along (:func:`aufold.localize.prompt_cache_works`): its two pairs run with a shared
    prompt and as whole texts, uncounted, and where the last layer reads them differently
    the counts are discarded (None), to be made again from whole texts."""
    shared = [pair for pair in encoded if pair.prompt]
    full = [pair for pair in encoded if not pair.prompt]
    groups, shapes = _groups(lm, shared, full, batch_size, padding)
    probes = _probe_groups(lm, first_block=len(shapes)) if shared else ([], [])
    shapes += probes[1]
    read: list[torch.Tensor] = []  # the probe's last layer, shared then whole

    counts = new_counts(sites, lm.num_layers, lambda site: site_width(lm.model, site), lm.device)
    runner = LayerRunner(lm)
    with open_store(lm, shapes, f"{len(encoded)} pairs") as store, \
            lm.loaded(OUTSIDE, skip=(lm.head, lm.embeddings)), \
            progress_bar(total=lm.num_layers + 1, desc="localize (layer streaming)", unit="layer",
                         enabled=progress) as bar:
        with lm.loaded(OUTSIDE, only=(lm.embeddings,)), runner.stage(None):
            for group in groups + probes[0]:
                _embed(runner, group, store)
        bar.update(1)
        for layer in range(lm.num_layers):
            last_layer = layer == lm.num_layers - 1
            with lm.loaded(layer), runner.stage(layer), _SiteReader(lm, sites, layer) as reader:
                for group in groups:
                    _run_layer(runner, reader, group, store, keep=not last_layer)
                    for site, activations in reader.take().items():
                        count_layer(counts[site], layer, activations.to(lm.device), tie_tolerance)
                for group in probes[0]:
                    _run_layer(runner, reader, group, store, keep=not last_layer)
                    reader.take()
                    if last_layer:
                        assert reader.output is not None and reader.last is not None
                        read.append(at_last_token(reader.output, reader.last).float())
            bar.update(1)
    if read and not same_reading(read[0], read[1], lm.dtype):
        return None
    return counts


def _probe_groups(lm: LayerwiseModel, first_block: int
                  ) -> tuple[list[_Group], list[tuple[int, ...]]]:
    """The in-memory probe's two pairs as one batch with a shared prompt, then as one batch of
    whole texts, in the same rows, padded with token 0 as there."""
    cpu = torch.device("cpu")
    hidden = lm.config.hidden_size
    inputs = shared_inputs(list(PROBE), 0, cpu)
    whole = full_inputs([pair.whole() for pair in PROBE], 0, cpu)
    groups = [_Group(inputs, None, (first_block, first_block + 1)),
              _Group(None, whole, (first_block + 2,))]
    shapes = [(*inputs.prompts.input_ids.shape, hidden), (*inputs.answers.input_ids.shape, hidden),
              (*whole.input_ids.shape, hidden)]
    return groups, shapes


def _groups(lm: LayerwiseModel, shared: list[EncodedPair], full: list[EncodedPair],
            batch_size: int, padding: int) -> tuple[list[_Group], list[tuple[int, ...]]]:
    """The batches of pairs, and the shapes of their hidden states in the store."""
    cpu = torch.device("cpu")
    groups: list[_Group] = []
    shapes: list[tuple[int, ...]] = []
    hidden = lm.config.hidden_size
    for chunk in shared_batches(shared, batch_size, getattr(lm.config, "sliding_window", None)):
        inputs = shared_inputs(chunk, padding, cpu)
        block = len(shapes)
        groups.append(_Group(inputs, None, (block, block + 1)))
        shapes += [(*inputs.prompts.input_ids.shape, hidden), (*inputs.answers.input_ids.shape, hidden)]
    for chunk in full_batches(full, batch_size):
        batch = full_inputs(chunk, padding, cpu)
        groups.append(_Group(None, batch, (len(shapes),)))
        shapes.append((*batch.input_ids.shape, hidden))
    return groups, shapes


def _embed(runner: LayerRunner, group: _Group, store: HiddenStore) -> None:
    """Layer 0's input for every text of a group."""
    device = runner.lm.device
    if group.shared is not None:
        prompts, answers = group.shared.prompts.to(device), group.shared.answers.to(device)
        cache = runner.new_cache()
        store[group.blocks[0]].copy_(runner.run(None, prompts.input_ids, prompts.attention_mask,
                                                cache=cache))
        runner.fill_other_layers(cache, *prompts.input_ids.shape)
        cache.batch_repeat_interleave(2)
        store[group.blocks[1]].copy_(runner.run(None, answers.input_ids, answers.attention_mask,
                                                position_ids=group.shared.positions.to(device),
                                                cache=cache))
    else:
        assert group.full is not None
        batch = group.full.to(device)
        store[group.blocks[0]].copy_(runner.run(None, batch.input_ids, batch.attention_mask))


def _run_layer(runner: LayerRunner, reader: _SiteReader, group: _Group, store: HiddenStore, *,
               keep: bool) -> None:
    """One layer over a group: its output replaces its input in the store (unless last)."""
    device = runner.lm.device
    layer = runner.layer
    assert layer is not None
    if group.shared is not None:
        prompts, answers = group.shared.prompts.to(device), group.shared.answers.to(device)
        prompt_length = prompts.input_ids.shape[1]
        cache = runner.new_cache()
        reader.last = None
        output = runner.run(store[group.blocks[0]], prompts.input_ids, prompts.attention_mask,
                            cache=cache)
        check_cache_filled(cache, prompt_length, layer)
        if keep:
            store[group.blocks[0]].copy_(output)
        runner.fill_other_layers(cache, prompts.input_ids.shape[0], prompt_length)
        cache.batch_repeat_interleave(2)
        reader.last = answers.last
        output = runner.run(store[group.blocks[1]], answers.input_ids, answers.attention_mask,
                            position_ids=group.shared.positions.to(device), cache=cache)
        check_cache_filled(cache, prompt_length + answers.input_ids.shape[1], layer)
        block = group.blocks[1]
    else:
        assert group.full is not None
        batch = group.full.to(device)
        reader.last = batch.last
        output = runner.run(store[group.blocks[0]], batch.input_ids, batch.attention_mask)
        block = group.blocks[0]
    reader.output = output
    if keep:
        store[block].copy_(output)


class _SiteReader:
    """Hooks on one layer's site modules that keep each row's activation at its last token."""

    def __init__(self, lm: LayerwiseModel, sites: Sequence[str], layer: int) -> None:
        self.lm, self.sites, self.layer = lm, sites, layer
        self.last: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self._read: dict[str, torch.Tensor] = {}
        self._handles: list[Handle] = []

    def __enter__(self) -> _SiteReader:
        for site in self.sites:
            if site_kind(site).projection == "layer":
                continue  # the layer's output, which the runner returns
            if self.layer not in self.lm.architecture.site_layers(site):
                continue  # a hybrid model's layer without this site
            self._handles += last_token_hooks(self.lm.model, site, self.layer, lambda: self.last,
                                              lambda read, site=site: self._read.update({site: read}))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def take(self) -> dict[str, torch.Tensor]:
        """This pass's last-token activations per site, once."""
        read, self._read = self._read, {}
        if any(site_kind(site).projection == "layer" for site in self.sites):
            assert self.output is not None and self.last is not None
            read.update({site: at_last_token(self.output, self.last) for site in self.sites
                         if site_kind(site).projection == "layer"})
        return read

