"""Where each GGUF block format keeps the scales that multiply all of a block's values.

Every block of a quantized GGUF type decodes as ``value = d * f(codes) [- dmin * g(codes)]``:
linear in one or two float16 super-scales (``d``, and ``dmin`` or ``m`` where the type has
an offset). Scaling those fields by ``s`` scales every decoded value of the block by
``s``, up to the float16 rounding of the new fields, and leaves the codes untouched. A
row of a ``[out, in]`` weight is a run of whole blocks, so scaling a row (an ``mlp-out``
unit of ``ffn_down``, an ``mlp`` unit of a gated ``ffn_up``) needs no requantization.

The byte offsets follow ggml's block structs (``ggml-common.h``); the test suite checks
every entry against the gguf package's own dequantizers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as Q

from aufold.errors import AufoldError


@dataclass(frozen=True)
class BlockScales:
    """The float16 fields of one block that every value of the block is linear in."""

    offsets: tuple[int, ...]  # byte offsets of float16 fields inside a block
    # IQ1_M keeps its float16 scale in the top 4 bits of four uint16 at this offset.
    packed_at: int | None = None

    def read(self, blocks: np.ndarray) -> np.ndarray:
        """The fields of ``blocks`` (``[..., type_size]`` uint8) as float32 ``[..., fields]``."""
        if self.packed_at is not None:
            words = _packed_words(blocks, self.packed_at)
            nibbles = (words & np.uint16(0xF000)) >> np.array([12, 8, 4, 0], dtype=np.uint16)
            bits = nibbles[..., 0] | nibbles[..., 1] | nibbles[..., 2] | nibbles[..., 3]
            return bits.view(np.float16).astype(np.float32)[..., None]
        return np.stack([_half(blocks, at).astype(np.float32) for at in self.offsets], axis=-1)

    def write(self, blocks: np.ndarray, values: np.ndarray) -> None:
        """Store float32 ``values`` (``[..., fields]``) into the fields of ``blocks``, in place."""
        halves = values.astype(np.float16)
        if self.packed_at is not None:
            bits = halves[..., 0].view(np.uint16)[..., None]
            spread = (bits << np.array([12, 8, 4, 0], dtype=np.uint16)) & np.uint16(0xF000)
            words = _packed_words(blocks, self.packed_at)
            words = (words & np.uint16(0x0FFF)) | spread
            blocks[..., self.packed_at:self.packed_at + 8] = words.view(np.uint8).reshape(
                *blocks.shape[:-1], 8)
            return
        for field, at in enumerate(self.offsets):
            blocks[..., at:at + 2] = halves[..., field:field + 1].view(np.uint8)


def _half(blocks: np.ndarray, at: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[..., at:at + 2]).view(np.float16)[..., 0]


def _packed_words(blocks: np.ndarray, at: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[..., at:at + 8]).view(np.uint16)


QK_K = 256  # the super-block of the K-quants and IQ types

BLOCK_SCALES: Mapping[Q, BlockScales] = {
    Q.Q4_0: BlockScales((0,)),  # d, qs[16]
    Q.Q4_1: BlockScales((0, 2)),  # d, m, qs[16]
    Q.Q5_0: BlockScales((0,)),  # d, qh[4], qs[16]
    Q.Q5_1: BlockScales((0, 2)),  # d, m, qh[4], qs[16]
    Q.Q8_0: BlockScales((0,)),  # d, qs[32]
    Q.Q2_K: BlockScales((QK_K // 16 + QK_K // 4, QK_K // 16 + QK_K // 4 + 2)),  # scales, qs, d, dmin
    Q.Q3_K: BlockScales((QK_K // 8 + QK_K // 4 + 12,)),  # hmask, qs, scales[12], d
    Q.Q4_K: BlockScales((0, 2)),  # d, dmin, scales[12], qs
    Q.Q5_K: BlockScales((0, 2)),  # d, dmin, scales[12], qh, qs
    Q.Q6_K: BlockScales((QK_K // 2 + QK_K // 4 + QK_K // 16,)),  # ql, qh, scales[16], d
    Q.IQ2_XXS: BlockScales((0,)),
    Q.IQ2_XS: BlockScales((0,)),
    Q.IQ2_S: BlockScales((0,)),
    Q.IQ3_XXS: BlockScales((0,)),
    Q.IQ3_S: BlockScales((0,)),
    Q.IQ1_S: BlockScales((0,)),
    Q.IQ1_M: BlockScales((), packed_at=QK_K // 8 + QK_K // 16),  # qs, qh, scales[8]
    Q.IQ4_NL: BlockScales((0,)),
    Q.IQ4_XS: BlockScales((0,)),
    Q.TQ1_0: BlockScales(((QK_K - 4 * QK_K // 64) // 5 + QK_K // 64,)),  # qs, qh, d
    Q.TQ2_0: BlockScales((QK_K // 4,)),  # qs, d
}


def scale_rows(blocks: np.ndarray, rows: np.ndarray, factors: np.ndarray, kind: Q,
               name: str) -> None:
    """Scale whole rows of a block-quantized tensor in place, through their block scales.

    ``blocks`` is the tensor as ``[rows, blocks per row, type_size]`` uint8; ``rows`` are
    row indices and ``factors`` their float32 scale factors. Only the scale fields of those
    rows' blocks change. A factor that overflows float16 is refused before anything changes.
    """
    scales = BLOCK_SCALES[kind]
    selected = blocks[rows]
    values = scales.read(selected) * factors.astype(np.float32)[:, None, None]
    with np.errstate(over="ignore"):  # an overflow is refused just below
        fits = np.isfinite(values.astype(np.float16)).all()
    if not fits:
        raise AufoldError(f"{name} ({kind.name}) would hold a block scale beyond float16's range "
                          f"after the edit (it overflows); nothing was written: use a smaller "
                          f"--alpha")
    scales.write(selected, values)
    blocks[rows] = selected
