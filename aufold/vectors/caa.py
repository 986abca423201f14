"""Contrastive activation addition (CAA, Rimsky et al. 2024): the baseline AUSteer argues against.

From the same contrastive pairs as a plan, the steering vector of layer L is the mean
over pairs of ``residual_pos - residual_neg``, the residual stream after decoder layer
L at the last token of each text (read by localization's own forward passes,
:func:`aufold.localize.last_token_activations`). It is added, times a multiplier, at
every token: in hook mode with :func:`aufold.vectors.hooks.add_vectors`, or folded into
a bias with ``aufold fold-vector --site residual`` where the architecture allows it
exactly (:mod:`aufold.vectors.fold`). Every dimension of the residual moves, where
AUSteer scales a few units.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save
from transformers import PreTrainedTokenizerBase

from aufold.encoding import DEFAULT_MAX_LENGTH, pad_id
from aufold.errors import AufoldError
from aufold.safety.outputs import SAFETENSORS_MARKER
from aufold.localize import DEFAULT_BATCH_SIZE, check_options, encode_pairs, last_token_activations
from aufold.modeling import fitted_length, num_layers
from aufold.pairs import ContrastivePair, validate_pairs
from aufold.vectors.read import SteeringVectors

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CAA_SITE = "residual"  # the decoder-layer output (aufold.sites), where add_vectors adds
CAA_VECTORS_FORMAT = "aufold-caa-vectors"  # marks a vector file aufold wrote (and may replace)


@dataclass(frozen=True)
class VectorEdit:
    """Additive steering: ``scale`` times each layer's vector added to the residual stream after
    that layer, at every token. Hooks (:func:`aufold.steer.steer`) and costs take it as they
    take an :class:`~aufold.edit.Edit`."""

    vectors: SteeringVectors
    scale: float
    target: str = CAA_SITE

    def __len__(self) -> int:
        """The dimensions it moves: every one of each steered layer's residual."""
        return sum(int(vector.numel()) for vector in self.vectors.vectors.values())

    @property
    def first_layer(self) -> int:
        return min(self.vectors.layers)


@torch.inference_mode()
def caa_vectors(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                pairs: Sequence[ContrastivePair], layers: Sequence[int], *,
                batch_size: int = DEFAULT_BATCH_SIZE, max_length: int = DEFAULT_MAX_LENGTH,
                chat_template: bool = False, progress: bool = True) -> SteeringVectors:
    """The CAA vector of each of ``layers``: mean over pairs of the last-token residual of the
    positive text minus the negative one's, accumulated in float64."""
    pairs = validate_pairs(pairs)
    check_options(batch_size, max_length, 0.0)
    count = num_layers(model)
    wanted = sorted(set(layers))
    if not wanted or wanted[0] < 0 or wanted[-1] >= count:
        raise AufoldError(f"CAA layers must lie in 0..{count - 1} (this model has {count} "
                          f"layers), got {list(layers)}")
    encoded, _ = encode_pairs(tokenizer, pairs, max_length=fitted_length(model, max_length),
                              chat_template=chat_template)
    sums: dict[int, torch.Tensor] = {}
    for activations in last_token_activations(model, encoded, (CAA_SITE,), batch_size=batch_size,
                                              padding=pad_id(tokenizer), progress=progress,
                                              desc="caa"):
        for layer in wanted:
            rows = activations[CAA_SITE][layer].double().unflatten(0, (-1, 2))
            difference = (rows[:, 0] - rows[:, 1]).sum(0).cpu()
            sums[layer] = sums[layer] + difference if layer in sums else difference
    return SteeringVectors({layer: (sums[layer] / len(pairs)).float() for layer in wanted},
                           source=f"CAA over {len(pairs)} pairs", format="caa")


def vectors_bytes(vectors: SteeringVectors) -> bytes:
    """The vectors as ``aufold fold-vector`` reads them: a safetensors file with one tensor per
    layer, named by it."""
    return save({str(layer): vectors.vectors[layer].contiguous() for layer in vectors.layers},
                metadata={"format": "pt", "source": vectors.source,
                          SAFETENSORS_MARKER: CAA_VECTORS_FORMAT})
