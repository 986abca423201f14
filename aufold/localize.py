"""Localization: count, per unit, how often the positive text's activation beats the negative's.

For each pair and unit, m = x_pos - x_neg at the last real token of each text;
the plan keeps #(m > 0) and #(m < 0). Only these two integer arrays per site
live across batches, so memory does not grow with the number of pairs, and only
the decoder runs: the LM head is never computed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from aufold.encoding import DEFAULT_MAX_LENGTH, chat_prompt, encode, pad_id, pad_right
from aufold.errors import AufoldError
from aufold.modeling import check_site_exists, fingerprint, input_device, num_layers, site_module, site_width
from aufold.pairs import ContrastivePair, validate_pairs
from aufold.plan import Plan, SiteCounts
from aufold.sites import site_kind

DEFAULT_BATCH_SIZE = 16


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
    progress: bool = True,
    model_id: str | None = None,
) -> Plan:
    """Count the sign of x_pos - x_neg for every unit of ``sites`` in every layer."""
    pairs = validate_pairs(pairs)
    sites = _check_sites(model, sites)
    if batch_size < 1 or max_length < 2:
        raise AufoldError("batch size must be >= 1 and max length >= 2")
    prompts = [chat_prompt(tokenizer, p.prompt) if chat_template else p.prompt for p in pairs]
    texts = [prompt + p.positive for prompt, p in zip(prompts, pairs)]
    texts += [prompt + p.negative for prompt, p in zip(prompts, pairs)]
    # A chat template writes its own special tokens; plain text gets the tokenizer's.
    ids, truncated = encode(tokenizer, texts, max_length=max_length,
                            add_special_tokens=not chat_template)
    n = len(pairs)
    positive_ids, negative_ids = ids[:n], ids[n:]

    device = input_device(model)
    layers = num_layers(model)
    counts = {site: SiteCounts(torch.zeros(layers, site_width(model, site), dtype=torch.long, device=device),
                               torch.zeros(layers, site_width(model, site), dtype=torch.long, device=device))
              for site in sites}
    reader = _LastTokenReader(model, sites, layers)
    # Similar lengths in one batch waste less compute on padding; counts are order-free.
    order = sorted(range(n), key=lambda i: max(len(positive_ids[i]), len(negative_ids[i])))
    with reader, tqdm(total=n, desc="localize", unit="pair", disable=not progress) as bar:
        for start in range(0, n, batch_size):
            chosen = order[start:start + batch_size]
            rows = [positive_ids[i] for i in chosen] + [negative_ids[i] for i in chosen]
            batch = pad_right(rows, pad_id(tokenizer)).to(device)
            reader.last = batch.last
            model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             use_cache=False)
            for site in sites:
                for layer, activations in enumerate(reader.activations[site]):
                    x_pos, x_neg = activations.to(device).split(len(chosen))
                    counts[site].positive[layer] += (x_pos > x_neg).sum(0)
                    counts[site].negative[layer] += (x_pos < x_neg).sum(0)
            bar.update(len(chosen))

    return Plan(
        model=model_id or str(getattr(model.config, "_name_or_path", "")),
        fingerprint=fingerprint(model),
        num_pairs=n,
        counts={site: SiteCounts(c.positive.cpu(), c.negative.cpu()) for site, c in counts.items()},
        settings={"max_length": max_length, "chat_template": chat_template,
                  "truncated_texts": truncated, "dtype": str(model.dtype).removeprefix("torch.")},
    )


def _check_sites(model: PreTrainedModel, sites: Sequence[str]) -> tuple[str, ...]:
    if not sites:
        raise AufoldError("no site given; pass at least one --site (head, mlp, mlp-out, residual)")
    unique = tuple(dict.fromkeys(sites))
    for site in unique:
        site_kind(site)
        check_site_exists(model, site)
    return unique


class _LastTokenReader:
    """Hooks that keep each site's activation at the last real token of every row."""

    def __init__(self, model: PreTrainedModel, sites: Sequence[str], layers: int) -> None:
        self.model = model
        self.sites = sites
        self.layers = layers
        self.last: torch.Tensor | None = None
        self.activations: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> _LastTokenReader:
        for site in self.sites:
            self.activations[site] = [torch.empty(0)] * self.layers
            for layer in range(self.layers):
                module = site_module(self.model, site, layer)
                self._handles.append(self._hook(module, site, layer))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, module: nn.Module, site: str, layer: int) -> torch.utils.hooks.RemovableHandle:
        store = self._store(site, layer)
        if site_kind(site).placement == "input":
            return module.register_forward_pre_hook(
                lambda _m, args, kwargs: store(args[0] if args else next(iter(kwargs.values()))),
                with_kwargs=True)
        return module.register_forward_hook(
            lambda _m, _args, output: store(output[0] if isinstance(output, tuple) else output))

    def _store(self, site: str, layer: int) -> Callable[[torch.Tensor], Any]:
        def store(hidden: torch.Tensor) -> None:
            assert self.last is not None
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            self.activations[site][layer] = hidden[rows, self.last.to(hidden.device)]
        return store
