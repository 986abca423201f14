"""The edit folded into a copy of a GGUF file (``aufold export --format gguf``).

- :mod:`.blocks`: where each block format keeps the float16 scales its values are linear in.
- :mod:`.file`: reading a GGUF model without loading it; writing a copy with tensors replaced.
- :mod:`.fold`: which tensor each unit scales, and the most exact way its type allows.
- :mod:`.card`: the card texts of the folded file.
"""

from aufold.formats.gguf.card import gguf_artifact
from aufold.formats.gguf.file import GgufModel, gguf_tensors, read_gguf_model
from aufold.formats.gguf.fold import REENCODE_TYPES, GgufFoldReport, fold_gguf

__all__ = ["REENCODE_TYPES", "GgufFoldReport", "GgufModel", "fold_gguf", "gguf_artifact",
           "gguf_tensors", "read_gguf_model"]
