"""Localization: count, per unit, how often the positive text's activation beats the negative's.

For each pair and unit, m = x_pos - x_neg at the last real token of each text;
the plan keeps #(m > 0) and #(m < 0). Only these two integer arrays per site
live across batches, on the model's device, copied back once at the end, so
memory does not grow with the number of pairs.

A difference at the level of float rounding is a tie (:func:`signs`): some units
(a head that only attends to the first token, say) read the same value for both
texts, and the sign of the rounding-level difference they show then depends on
batch size, padding and kernels, not on the texts. Without the tolerance the
counts of such a unit drift between batched and batch-1 runs (by 3 of 800 pairs
on SmolLM2); ``tie_tolerance=0`` restores the strict comparison.

The forward passes do the least work the method needs:

- only the decoder runs (never the LM head), in padded batches, and each pass
  stops right after the last site it reads (:class:`_Stop`);
- the two texts of a pair share their prompt: when the tokens of ``prompt +
  answer`` begin with the tokens of ``prompt`` for both answers, the prompt runs
  once and both answers run on its cached keys and values. Other pairs (a
  tokenizer that merges across the boundary, or a text cut by ``max_length``)
  run as two full texts; the plan's settings say how many did.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedTokenizerBase

from aufold.defaults import LOCALIZE_BATCH_SIZE, TIE_TOLERANCE
from aufold.encoding import (
    DEFAULT_MAX_LENGTH,
    Batch,
    chat_prompt,
    encode,
    pad_id,
    pad_right,
)
from aufold.errors import AufoldError
from aufold.experts import ExpertNeurons, StackedExperts, register_expert_hook
from aufold.modeling import (
    check_site_exists,
    fingerprint,
    fitted_length,
    input_device,
    layer_widths,
    model_architecture,
    num_layers,
    shaped,
    site_module,
    site_width,
)
from aufold.pairs import ContrastivePair, validate_pairs
from aufold.plan import LAYERS_WITHOUT, UNITS_PER_LAYER, Plan, SiteCounts
from aufold.progress import bar as progress_bar
from aufold.sites import SITE_ORDER, FoldTensor, site_kind

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DEFAULT_BATCH_SIZE = LOCALIZE_BATCH_SIZE
DEFAULT_TIE_TOLERANCE = TIE_TOLERANCE  # why this value: aufold.defaults


@torch.inference_mode()
def localize(
    model: PreTrainedModel,
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
    """Count the sign of x_pos - x_neg for every unit of ``sites`` in every layer."""
    pairs = validate_pairs(pairs)
    sites = check_sites(model, sites)
    check_options(batch_size, max_length, tie_tolerance)
    max_length = fitted_length(model, max_length)
    encoded, truncated = encode_pairs(tokenizer, pairs, max_length=max_length,
                                      chat_template=chat_template)
    device = input_device(model)
    counts = new_counts(sites, num_layers(model), lambda site: site_width(model, site), device)
    for activations in last_token_activations(model, encoded, sites, batch_size=batch_size,
                                              padding=pad_id(tokenizer), progress=progress):
        for site, per_layer in activations.items():
            for layer, rows in enumerate(per_layer):
                if rows.numel():  # empty: a layer without the site
                    count_layer(counts[site], layer, rows.to(device), tie_tolerance)

    return counted_plan(model_id or str(getattr(model.config, "_name_or_path", "")),
                        fingerprint(model), len(pairs), counts,
                        {"max_length": max_length, "chat_template": chat_template,
                         "tie_tolerance": tie_tolerance, "truncated_texts": truncated,
                         "dtype": str(model.dtype).removeprefix("torch."),
                         "full_text_pairs": sum(1 for pair in encoded if not pair.prompt)
                         if prompt_cache_works(model) else len(encoded),
                         **layers_without(model, sites)})


def check_options(batch_size: int, max_length: int, tie_tolerance: float) -> None:
    if batch_size < 1 or max_length < 2:
        raise AufoldError("batch size must be >= 1 and max length >= 2")
    if not 0 <= tie_tolerance < 1:
        raise AufoldError(f"tie tolerance must be in [0, 1), got {tie_tolerance}; "
                          f"the default is {DEFAULT_TIE_TOLERANCE}")


def new_counts(sites: Sequence[str], layers: int, width: Callable[[str], int],
               device: torch.device) -> dict[str, SiteCounts]:
    """Zeroed counters per site, [layers, units], on the device the activations come from."""
    return {site: SiteCounts(torch.zeros(layers, width(site), dtype=torch.long, device=device),
                             torch.zeros(layers, width(site), dtype=torch.long, device=device))
            for site in sites}


def layers_without(model: PreTrainedModel, sites: Sequence[str]) -> dict[str, Any]:
    """The plan's record of layers that lack a site it counts, and of the units per layer of a
    site whose layers differ in width (nothing where every layer has the site alike)."""
    architecture = model_architecture(shaped(model))
    record: dict[str, Any] = {}
    skipped = {site: list(architecture.skipped[site]) for site in sites
               if site in architecture.skipped}
    if skipped:
        record[LAYERS_WITHOUT] = skipped
    widths = {site: layer_widths(model, site) for site in sites}
    uneven = {site: units for site, units in widths.items()
              if len({units[layer] for layer in architecture.site_layers(site)}) > 1}
    if uneven:
        record[UNITS_PER_LAYER] = uneven
    return record


def counted_plan(model_id: str, model_fingerprint: str, num_pairs: int,
                 counts: dict[str, SiteCounts], settings: dict[str, Any]) -> Plan:
    return Plan(model=model_id, fingerprint=model_fingerprint, num_pairs=num_pairs,
                counts={site: SiteCounts(c.positive.cpu(), c.negative.cpu())
                        for site, c in counts.items()},
                settings=settings)


@dataclass(frozen=True)
class EncodedPair:
    """A pair's token ids: a shared prompt and two answer suffixes, or (no prompt) two full texts."""

    prompt: list[int]  # empty when the pair runs as two full texts
    positive: list[int]
    negative: list[int]

    def whole(self) -> EncodedPair:
        """The same pair as two full texts, read without a shared prompt."""
        return EncodedPair([], self.prompt + self.positive, self.prompt + self.negative)


def encode_pairs(tokenizer: PreTrainedTokenizerBase, pairs: Sequence[ContrastivePair], *,
                 max_length: int = DEFAULT_MAX_LENGTH, chat_template: bool = False
                 ) -> tuple[list[EncodedPair], int]:
    """Split each pair into prompt and answer tokens where its tokenization allows; count cut texts.

    The full texts are tokenized exactly as without sharing, so a shared pair
    reads the same tokens: its prompt's tokens are a prefix of both texts' tokens,
    both answers add at least one token, and neither text was cut.
    """
    prompts = [chat_prompt(tokenizer, p.prompt) if chat_template else p.prompt for p in pairs]
    texts = [prompt + p.positive for prompt, p in zip(prompts, pairs)]
    texts += [prompt + p.negative for prompt, p in zip(prompts, pairs)]
    # A chat template writes its own special tokens; plain text gets the tokenizer's.
    special = not chat_template
    ids, truncated = encode(tokenizer, texts, max_length=max_length, add_special_tokens=special)
    prompt_ids = tokenizer(prompts, add_special_tokens=special)["input_ids"]
    n = len(pairs)
    encoded = []
    for prompt, positive, negative in zip(prompt_ids, ids[:n], ids[n:]):
        cut = max(len(positive), len(negative)) >= max_length
        if prompt and not cut and all(len(text) > len(prompt) and text[:len(prompt)] == prompt
                                      for text in (positive, negative)):
            encoded.append(EncodedPair(prompt, positive[len(prompt):], negative[len(prompt):]))
        else:
            encoded.append(EncodedPair([], positive, negative))
    return encoded, truncated


def last_token_activations(model: PreTrainedModel, encoded: Sequence[EncodedPair],
                           sites: Sequence[str], *, batch_size: int, padding: int,
                           progress: bool = True, desc: str = "localize"
                           ) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Per batch of pairs, each site's activations at the last real token of every text, by
    layer: rows interleave each pair's positive and negative text. Pairs share their prompt
    where their tokens allow (:func:`encode_pairs`). Localization counts signs over this
    stream; contrastive activation addition (:mod:`aufold.vectors.caa`) averages it.

    A layer's tensor is [texts, that layer's units]: widths may differ between layers (a
    dense MLP beside experts), and an expert's neurons read NaN in a text whose last token
    the router did not send to it (:func:`last_token_hooks`)."""
    device = input_device(model)
    window = getattr(model.config, "sliding_window", None)
    if not prompt_cache_works(model):  # every text runs whole: slower, the same counts
        encoded = [pair.whole() for pair in encoded]
    shared = [pair for pair in encoded if pair.prompt]
    full = [pair for pair in encoded if not pair.prompt]
    with _LastTokenReader(model, sites, num_layers(model)) as reader, \
            progress_bar(total=len(encoded), desc=desc, unit="pair", enabled=progress) as bar:
        for chunk in shared_batches(shared, batch_size, window):
            _run_shared(model, reader, chunk, padding, device)
            yield {site: list(rows) for site, rows in reader.activations.items()}
            bar.update(len(chunk))
        for chunk in full_batches(full, batch_size):
            _run_full(model, reader, chunk, padding, device)
            yield {site: list(rows) for site, rows in reader.activations.items()}
            bar.update(len(chunk))


_PROMPT_CACHE_WORKS: weakref.WeakKeyDictionary[nn.Module, tuple[torch.dtype, bool]] = \
    weakref.WeakKeyDictionary()
# Two pairs with prompts of different lengths, right-padded in one batch as real ones are;
# token ids every vocabulary has.
PROBE = (EncodedPair([1, 2], [3], [4, 5]), EncodedPair([1, 2, 3, 4], [5, 6], [7]))


@torch.no_grad()
def prompt_cache_works(model: PreTrainedModel) -> bool:
    """Whether this model reads answers on a cache of their prompt as it reads whole texts.

    Probed once per model (and dtype) through the real paths: two pairs whose prompts
    differ in length, read with a shared prompt cache and as whole texts, must give the
    same last layer's output at each text's last token. Models whose cache is not a
    key-value cache (linear attention, state spaces), that cannot take one, or that place
    positions their own way fail; their pairs then run as whole texts.
    """
    known = _PROMPT_CACHE_WORKS.get(model)
    if known is not None and known[0] == model.dtype:
        return known[1]
    device = input_device(model)
    whole = [pair.whole() for pair in PROBE]
    try:
        with _LastTokenReader(model, ["residual"], num_layers(model)) as reader:
            _run_shared(model, reader, list(PROBE), 0, device)
            shared = reader.activations["residual"][-1].float().clone()
            _run_full(model, reader, whole, 0, device)
            full = reader.activations["residual"][-1].float()
        works = same_reading(shared, full, model.dtype)
    except Exception:  # noqa: BLE001 - any failure means: do not share prompts
        works = False
    _PROMPT_CACHE_WORKS[model] = (model.dtype, works)
    return works


def same_reading(shared: torch.Tensor, whole: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the probe's last-layer outputs read with a shared prompt and as whole texts
    agree, to within what the dtype's rounding in two kernels explains."""
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    return bool((shared.float() - whole.float()).abs().max() <= tolerance * whole.float().abs().max())


def shared_batches(pairs: list[EncodedPair], batch_size: int,
                    window: int | None) -> Iterator[list[EncodedPair]]:
    """Batches of similar prompt length (less padding). With sliding-window attention, prompts
    of different lengths share a batch only while every text fits in the window, since the
    window counts cached positions, padding included."""
    batch: list[EncodedPair] = []
    longest = 0
    for pair in sorted(pairs, key=lambda p: (len(p.prompt), max(len(p.positive), len(p.negative)))):
        total = len(pair.prompt) + max(len(pair.positive), len(pair.negative))
        mixed = bool(batch) and len(pair.prompt) != len(batch[0].prompt)
        if batch and (len(batch) == batch_size or (window is not None and mixed
                                                     and max(longest, total) >= window)):
            yield batch
            batch, longest = [], 0
        batch.append(pair)
        longest = max(longest, total)
    if batch:
        yield batch


def full_batches(pairs: list[EncodedPair], batch_size: int) -> Iterator[list[EncodedPair]]:
    # Similar lengths in one batch waste less compute on padding; counts are order-free.
    ordered = sorted(pairs, key=lambda p: max(len(p.positive), len(p.negative)))
    for start in range(0, len(ordered), batch_size):
        yield ordered[start:start + batch_size]


@dataclass(frozen=True)
class SharedInputs:
    """A batch of shared-prompt pairs as tensors: the prompts, then both answers of each pair.

    Rows of the answers interleave positive and negative (2i, 2i + 1). Prompts are
    right-padded; the answers carry their true positions and a mask that covers the
    prompt too and hides the padding between prompt and answer.
    """

    prompts: Batch
    answers: Batch  # attention_mask spans prompt and answer
    positions: torch.Tensor


def shared_inputs(chunk: list[EncodedPair], padding: int, device: torch.device) -> SharedInputs:
    prompts = pad_right([pair.prompt for pair in chunk], padding).to(device)
    answers = pad_right([ids for pair in chunk for ids in (pair.positive, pair.negative)],
                        padding).to(device)
    prompt_mask = prompts.attention_mask.repeat_interleave(2, dim=0)
    start = (prompts.last + 1).repeat_interleave(2)
    positions = start[:, None] + torch.arange(answers.input_ids.shape[1], device=device)
    mask = torch.cat([prompt_mask, answers.attention_mask], dim=1)
    return SharedInputs(prompts, Batch(answers.input_ids, mask, answers.last), positions)


def full_inputs(chunk: list[EncodedPair], padding: int, device: torch.device) -> Batch:
    """A batch of pairs that run as two full texts; rows interleave positive and negative."""
    return pad_right([ids for pair in chunk for ids in (pair.positive, pair.negative)],
                     padding).to(device)


def _run_shared(model: PreTrainedModel, reader: _LastTokenReader, chunk: list[EncodedPair],
                padding: int, device: torch.device) -> None:
    """The prompts once, filling a cache; then both answers of every pair on that cache."""
    inputs = shared_inputs(chunk, padding, device)
    prompt_length = inputs.prompts.input_ids.shape[1]
    cache = DynamicCache(config=model.config)
    reader.run(model, inputs.prompts, cache=cache, capture=False)
    check_cache_filled(cache, prompt_length)
    cache.batch_repeat_interleave(2)
    reader.run(model, inputs.answers, cache=cache, position_ids=inputs.positions)
    check_cache_filled(cache, prompt_length + inputs.positions.shape[1])


def check_cache_filled(cache: DynamicCache, tokens: int, layer: int = 0) -> None:
    """Fail loudly if the model did not write the keys and values it was given a cache for.

    The answers are read on the prompt's cache; a transformers version that ignored the
    cache argument would silently change every count (the answers would run without
    their prompt), so the cache's length after each pass is checked.
    """
    if cache.get_seq_length(layer) != tokens:
        raise AufoldError(f"the model did not use the prompt cache (it holds "
                          f"{cache.get_seq_length(layer)} tokens, not {tokens}); this transformers "
                          f"version is not one aufold supports: install the version that "
                          f"pyproject.toml names")


def _run_full(model: PreTrainedModel, reader: _LastTokenReader, chunk: list[EncodedPair],
              padding: int, device: torch.device) -> None:
    reader.run(model, full_inputs(chunk, padding, device))


def signs(x_pos: torch.Tensor, x_neg: torch.Tensor,
          tie_tolerance: float = DEFAULT_TIE_TOLERANCE) -> tuple[torch.Tensor, torch.Tensor]:
    """(m > 0, m < 0) per unit for m = x_pos - x_neg, rows of units at one site and layer.

    |m| up to ``tie_tolerance`` times the larger root-mean-square of the two rows
    is a tie (neither). The scale is the whole row's, not the unit's own value, because
    rounding error comes from the sums that made the row, so a unit near zero is as
    noisy as any other. A unit that reads NaN in either text (an expert the router did
    not pick there) is a tie, and the scale is over the units that were read.
    """
    x_pos, x_neg = x_pos.float(), x_neg.float()
    m = x_pos - x_neg
    if tie_tolerance == 0:
        return m > 0, m < 0
    rms = torch.maximum(x_pos.square().nanmean(-1, keepdim=True),
                        x_neg.square().nanmean(-1, keepdim=True)).sqrt()
    tie = tie_tolerance * rms
    return m > tie, m < -tie


def count_layer(counts: SiteCounts, layer: int, activations: torch.Tensor,
                tie_tolerance: float) -> None:
    """Add one layer's signs for a batch whose rows are (positive, negative) pairs; a layer
    narrower than the site's widest (dense beside experts) fills its first units."""
    pairs = activations.unflatten(0, (-1, 2))
    above, below = signs(pairs[:, 0], pairs[:, 1], tie_tolerance)
    width = above.shape[-1]
    counts.positive[layer, :width] += above.sum(0)
    counts.negative[layer, :width] += below.sum(0)


def check_sites(model: PreTrainedModel, sites: Sequence[str]) -> tuple[str, ...]:
    """The sites, each once, refused in one line if unknown or missing from the model."""
    if not sites:
        raise AufoldError("no site given; pass at least one --site (head, mlp, mlp-out, residual)")
    unique = tuple(dict.fromkeys(sites))
    for site in unique:
        site_kind(site)
        check_site_exists(model, site)
    return unique


def at_last_token(hidden: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Each row's activation at its last real token: [batch, width] from [batch, tokens, width],
    or from [batch * tokens, width] where a block flattens them (OPT's MLP, Llama 4's experts)."""
    if hidden.dim() == 2:
        hidden = hidden.view(len(last), -1, hidden.shape[-1])
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, last.to(hidden.device)]


Handle = Any  # a hook's handle: anything with remove()


def last_token_hooks(model: PreTrainedModel, site: str, layer: int,
                     last: Callable[[], torch.Tensor | None],
                     store: Callable[[torch.Tensor], Any]) -> list[Handle]:
    """Hooks that pass ``store`` a site's activations in ``layer`` at each row's last real
    token, [rows, units], in every forward pass where ``last()`` gives those tokens.

    The neurons of stacked experts are read inside their experts (:mod:`aufold.experts`):
    a unit whose expert the router did not pick for a row's last token has no activation
    there and reads NaN, so every pair where either text lacks it is a tie (:func:`signs`).
    """
    neurons = model_architecture(model).expert_neurons(site, layer)
    if neurons is not None:
        return _expert_neuron_hooks(model, neurons, last, store)
    module = site_module(model, site, layer)

    def read(hidden: torch.Tensor) -> None:
        rows = last()
        if rows is not None:
            store(at_last_token(hidden, rows))

    if site_kind(site).placement == "input":
        return [module.register_forward_pre_hook(
            lambda _m, args, kwargs: read(args[0] if args else next(iter(kwargs.values()))),
            with_kwargs=True)]
    return [module.register_forward_hook(
        lambda _m, _args, output: read(output[0] if isinstance(output, tuple) else output))]


def _expert_neuron_hooks(model: PreTrainedModel, neurons: FoldTensor,
                         last: Callable[[], torch.Tensor | None],
                         store: Callable[[torch.Tensor], Any]) -> list[Handle]:
    """Read every expert's neurons at the last tokens: NaN where the expert did not run."""
    experts = StackedExperts.of(model, neurons)
    state: dict[str, torch.Tensor] = {}

    def start(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        state.clear()
        rows = last()
        if rows is None:
            return
        hidden = args[0] if args else next(iter(kwargs.values()))
        if hidden.shape[0] % len(rows):
            raise AufoldError(f"the experts of {experts.path} take {hidden.shape[0]} rows, not a whole "
                              f"number of tokens for each of {len(rows)} texts")
        tokens = hidden.shape[0] // len(rows)
        state["flat"] = torch.arange(len(rows), device=hidden.device) * tokens \
            + rows.to(hidden.device)
        state["read"] = torch.full((len(rows), experts.units), float("nan"),
                                   dtype=hidden.dtype, device=hidden.device)

    def collect(call: ExpertNeurons) -> None:
        if "flat" not in state:
            return
        row, text = (call.tokens.to(state["flat"].device)[:, None] == state["flat"]).nonzero(
            as_tuple=True)
        first = call.expert * experts.per_expert
        state["read"][text, first:first + experts.per_expert] = call.neurons[row].to(state["read"].dtype)

    def finish(_module: nn.Module, _args: Any, _output: Any) -> None:
        if "read" in state:
            store(state.pop("read"))

    return [experts.module.register_forward_pre_hook(start, with_kwargs=True),
            register_expert_hook(experts.module, experts.down, collect),
            experts.module.register_forward_hook(finish)]


class _Stop(Exception):
    """Raised by a hook once a forward pass has computed everything that will be read."""


class _LastTokenReader:
    """Hooks that keep each site's activation at the last real token of every row.

    A forward pass stops right after the last site read (the last layer's, in the
    order a layer computes them: head, mlp, mlp-out, residual). A pass that only
    fills a cache stops once the last layer's attention has written its keys and
    values, i.e. at the input of its output projection.
    """

    def __init__(self, model: PreTrainedModel, sites: Sequence[str], layers: int) -> None:
        self.model = model
        self.sites = sites
        self.layers = layers
        self.last: torch.Tensor | None = None
        self.capture = True
        self.activations: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
        self._architecture = model_architecture(model)
        # A hybrid model's layers may lack a site: those stay empty. The pass stops at the
        # last read, the last layer that has some site, at its last site in layer order.
        self._layers_of = {site: self._architecture.site_layers(site) for site in sites}
        self._final_layer = max(max(layers) for layers in self._layers_of.values())
        self._final = max((site for site in sites if self._final_layer in self._layers_of[site]),
                          key=SITE_ORDER.__getitem__)
        self._handles: list[Handle] = []

    def __enter__(self) -> _LastTokenReader:
        for site in self.sites:
            self.activations[site] = [torch.empty(0)] * self.layers
            for layer in self._layers_of[site]:
                self._handles += last_token_hooks(self.model, site, layer, self._last,
                                                  self._store(site, layer))
        last_layer = self.layers - 1
        if "head" in self._architecture.sites \
                and last_layer in self._architecture.site_layers("head"):
            attention_out = site_module(self.model, "head", last_layer)
            self._handles.append(attention_out.register_forward_pre_hook(self._stop_filling))
        else:  # a layer without one (a hybrid model's): stop once the last layer has run
            last = site_module(self.model, "residual", self.layers - 1)
            self._handles.append(last.register_forward_hook(
                lambda module, args, _output: self._stop_filling(module, args)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def run(self, model: PreTrainedModel, batch: Batch, *, cache: DynamicCache | None = None,
            position_ids: torch.Tensor | None = None, capture: bool = True) -> None:
        """One decoder forward pass, read at ``batch.last`` (or only filling ``cache``)."""
        self.last, self.capture = batch.last, capture
        extra: dict[str, Any] = {"position_ids": position_ids} if position_ids is not None else {}
        try:
            model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             cache=cache, use_cache=cache is not None, **extra)
        except _Stop:
            pass

    def _stop_filling(self, _module: nn.Module, _args: Any) -> None:
        if not self.capture:
            raise _Stop

    def _store(self, site: str, layer: int) -> Callable[[torch.Tensor], Any]:
        final = site == self._final and layer == self._final_layer

        def store(activations: torch.Tensor) -> None:
            self.activations[site][layer] = activations
            if final:
                raise _Stop
        return store

    def _last(self) -> torch.Tensor | None:
        return self.last if self.capture else None
