"""The card texts of a folded GGUF file: what was scaled, what was re-encoded, how to run it."""

from __future__ import annotations

import json

import shlex
from pathlib import Path

from aufold.card import Artifact, ExportRecord, units_sentence
from aufold.formats.gguf.fold import GgufFoldReport, TensorFold


def gguf_artifact(record: ExportRecord, file_name: str, report: GgufFoldReport) -> Artifact:
    """The card texts of a folded GGUF file."""
    done = fold_summary(report)
    return Artifact(
        format="gguf",
        library_name="gguf",
        summary=f"""`{file_name}` is {_base_phrase(record.base_model, file_name)} with fine-grained
activation steering (AUSteer, arXiv 2602.04428) folded into its weights. {units_sentence(record)}
{done} Every other tensor, the metadata, and the tensor names and shapes are byte for
byte those of the input file.""",
        usage=f"""With llama.cpp:

```bash
llama-cli {_model_option(record.location, file_name)} -p "Hello"
llama-server {_model_option(record.location, file_name)}
```

With transformers (dequantized on load):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained({json.dumps(record.location)}, gguf_file={json.dumps(file_name)})
tokenizer = AutoTokenizer.from_pretrained({json.dumps(record.location)}, gguf_file={json.dumps(file_name)})
```""",
        written=f"""`aufold export --format gguf`: the edited tensors of the GGUF file were rewritten
   in a copy. {done}""",
        settings=(("format", "GGUF"), ("edited tensor types", ", ".join(report.tensor_types))),
    )


def fold_summary(report: GgufFoldReport) -> str:
    """One sentence per way of folding that the report used."""
    sentences = []
    if scaled := report.by_method("scaled"):
        sentences.append(f"{len(scaled)} float tensors were scaled exactly, with one rounding.")
    if scales := report.by_method("block scales"):
        sentences.append(
            f"In {len(scales)} block-quantized tensors ({_types(scales)}) the float16 scales "
            f"of {sum(fold.blocks for fold in scales)} blocks were multiplied by the units' "
            f"factors: the quantized codes are unchanged and the edit is exact up to the "
            f"float16 rounding of the new scales.")
    if requantized := report.by_method("requantized blocks"):
        sentences.append(
            f"In {len(requantized)} Q8_0 tensors the {sum(f.blocks for f in requantized)} "
            f"blocks that hold a steered column were requantized.")
    if reencoded := report.by_method("re-encoded"):
        written = ", ".join(sorted({fold.written_type for fold in reencoded}))
        sentences.append(
            f"{len(reencoded)} tensors whose columns were steered ({_types(reencoded)}), "
            f"which a block scale cannot express, were re-encoded to {written}: "
            f"{', '.join(fold.name for fold in reencoded[:4])}"
            f"{', ...' if len(reencoded) > 4 else ''}.")
    return " ".join(sentences)


def _types(folds: tuple[TensorFold, ...]) -> str:
    return ", ".join(sorted({fold.source_type for fold in folds}))


def _base_phrase(base_model: str, file_name: str) -> str:
    """How the card names the base: its id, or "the GGUF model of the same name" when all
    that is known of it is the file name."""
    return "the GGUF model of the same name" if base_model == file_name else f"`{base_model}`"


def _model_option(location: str, file_name: str) -> str:
    """llama.cpp's option that names the folded file: its path in the export folder, or
    the hub repo and file it was pushed to."""
    if Path(location).is_absolute():
        return f"-m {shlex.quote(str(Path(location) / file_name))}"
    return f"--hf-repo {shlex.quote(location)} --hf-file {shlex.quote(file_name)}"
