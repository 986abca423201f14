"""One decoder layer at a time, through the model's own forward.

To run layer ``l`` on stored hidden states, the model's forward runs as usual, so
that the attention masks, positions and rotary embeddings of every layer type come
from transformers and not from code of ours; but the embeddings return zeros
(cheap, and of the right shape), every other layer passes its input through, layer
``l``'s input is swapped for the stored hidden states, and the pass stops as soon as
layer ``l`` has returned. The embedding stage (``layer=None``) stops at the input of
layer 0 instead, which is what it stores.

The two texts of a pair share their prompt as in the in-memory localization: the
prompt runs first, filling layer ``l``'s keys and values in a cache, and the answers
run on them. The cache's other layers only need the prompt's *length*, which the
masks read, so they are filled with placeholders of that length.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from aufold.errors import AufoldError
from aufold.layerwise.skeleton import LayerwiseModel


class _Stop(Exception):
    """Raised once the layer a pass runs for has returned (or, first, at layer 0's input)."""


class LayerRunner:
    """Runs stored hidden states through one decoder layer, selected by :meth:`stage`."""

    def __init__(self, lm: LayerwiseModel) -> None:
        self.lm = lm
        self.layer: int | None = None
        self._hidden_in: torch.Tensor | None = None
        self._hidden_out: torch.Tensor | None = None
        self._returns_tuple = False

    @contextmanager
    def stage(self, layer: int | None) -> Iterator[LayerRunner]:
        """Passes run through ``layer`` (loaded by the caller), or only embed when None."""
        self.layer = layer
        handles = []
        patched: list[nn.Module] = []
        try:
            if layer is None:
                handles.append(self.lm.layers[0].register_forward_pre_hook(
                    self._read_input, with_kwargs=True))
            else:
                embeddings = self.lm.model.get_input_embeddings()
                embeddings.forward = self._zeros  # type: ignore[method-assign]
                patched.append(embeddings)
                for index, module in enumerate(self.lm.layers):
                    if index != layer:
                        module.forward = self._pass_through  # type: ignore[method-assign]
                        patched.append(module)
                # First of the layer's pre-hooks: every other one sees the stored input.
                handles.append(self.lm.layers[layer].register_forward_pre_hook(
                    self._swap_input, with_kwargs=True, prepend=True))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for module in patched:
                del module.forward  # back to the class's own forward
            self.layer = None

    @contextmanager
    def head_stage(self) -> Iterator[LayerRunner]:
        """Passes of the whole causal LM whose last decoder layer returns the stored hidden
        states, so that the model's own final norm, LM head and logit soft-capping apply."""
        last = len(self.lm.layers) - 1
        patched: list[nn.Module] = [self.lm.model.get_input_embeddings()]
        patched[0].forward = self._zeros  # type: ignore[method-assign]
        for index, module in enumerate(self.lm.layers):
            module.forward = self._stored if index == last else self._pass_through  # type: ignore[method-assign]
            patched.append(module)
        try:
            yield self
        finally:
            for module in patched:
                del module.forward

    def logits(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               position_ids: torch.Tensor, keep: int) -> torch.Tensor:
        """Float32 logits at the last ``keep`` positions, from final hidden states (head stage)."""
        self._hidden_in = hidden
        try:
            output = self.lm.model(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids, use_cache=False, logits_to_keep=keep)
        finally:
            self._hidden_in = None
        return output.logits.float()

    def run(self, hidden: torch.Tensor | None, input_ids: torch.Tensor,
            attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None, *,
            cache: DynamicCache | None = None) -> torch.Tensor:
        """One pass; returns the layer's output (or, in the embedding stage, layer 0's input)."""
        self._hidden_in, self._hidden_out = hidden, None
        extra: dict[str, Any] = {"position_ids": position_ids} if position_ids is not None else {}
        # The output is read by a hook added now, after any steering hook on the layer's
        # output (a residual edit), so that it reads the steered output.
        reading = (self.lm.layers[self.layer].register_forward_hook(self._read_output)
                   if self.layer is not None else None)
        try:
            self.lm.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                     cache=cache, use_cache=cache is not None, **extra)
        except _Stop:
            pass
        finally:
            if reading is not None:
                reading.remove()
        self._hidden_in = None
        if self._hidden_out is None:
            raise AufoldError(f"the {self.lm.config.model_type} model's forward did not reach "
                              f"decoder layer {self.layer or 0}; layer streaming cannot run it")
        return self._hidden_out

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.lm.config)

    def fill_other_layers(self, cache: DynamicCache, batch: int, tokens: int) -> None:
        """Give every cache layer but this stage's the prompt's length (and nothing else)."""
        placeholder = torch.zeros(batch, 1, tokens, 1, dtype=self.lm.dtype, device=self.lm.device)
        for index in range(len(self.lm.layers)):
            if index != self.layer:
                cache.update(placeholder, placeholder, index)

    # --- hooks and stand-ins ------------------------------------------------------------

    def _read_input(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._hidden_out = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    def _swap_input(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        assert self._hidden_in is not None
        hidden = self._hidden_in.to(self.lm.device)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def _read_output(self, _module: nn.Module, _args: Any, output: Any) -> None:
        self._returns_tuple = isinstance(output, tuple)
        self._hidden_out = output[0] if self._returns_tuple else output
        raise _Stop

    def _pass_through(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) if self._returns_tuple else hidden

    def _stored(self, *_args: Any, **_kwargs: Any) -> Any:
        assert self._hidden_in is not None
        hidden = self._hidden_in.to(self.lm.device)
        return (hidden,) if self._returns_tuple else hidden

    def _zeros(self, input_ids: torch.Tensor, *_args: Any, **_kwargs: Any) -> torch.Tensor:
        return torch.zeros(*input_ids.shape, self.lm.config.hidden_size, dtype=self.lm.dtype,
                           device=input_ids.device)
