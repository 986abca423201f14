"""``aufold fold-vector``: read vectors, fold them into a model's biases, write a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig

from aufold.errors import AufoldError
from aufold.export import base_model_name
from aufold.modeling import load_model, resolve_source
from aufold.safety.outputs import Inputs, atomic_folder, claim_output
from aufold.sites import architecture_for
from aufold.vectors.card import VectorRecord, vector_card_files
from aufold.vectors.fold import VectorFold, check_scale, fold_vectors
from aufold.vectors.read import SteeringVectors, read_vectors


@dataclass(frozen=True)
class VectorExport:
    out: Path
    vectors: SteeringVectors
    fold: VectorFold


def fold_vector_checkpoint(
    model_ref: str | Path,
    vector_path: str | Path,
    *,
    out: str | Path,
    site: str = "residual",
    scale: float = 1.0,
    dtype: str = "auto",
    overwrite: bool = False,
    base_model_id: str | None = None,
    allow_pickle: bool = False,
    allow_extreme: bool = False,
) -> VectorExport:
    """Fold ``scale`` x the vectors at ``site`` into ``model_ref`` and write it to ``out``.

    The scale, the vector file and whether the architecture can hold vectors at
    ``site`` are checked before the model loads, the fit to the model before
    anything is written; the input is only ever read.
    """
    check_scale(scale, allow_extreme=allow_extreme)
    vectors = read_vectors(vector_path)
    source = resolve_source(model_ref)
    try:
        config = AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file)
    except (OSError, ValueError, KeyError) as error:
        raise AufoldError(f"could not read the config of {source.ref!r}: {error}") from None
    architecture_for(config).vector_bias(site, 0)  # refuses before loading weights
    inputs = Inputs.of([*source.input_paths(), vector_path])
    with claim_output(out, overwrite=overwrite, inputs=inputs) as out_dir:
        model, tokenizer, _ = load_model(model_ref, dtype=dtype, allow_pickle=allow_pickle)
        fold = fold_vectors(model, vectors, site, scale, allow_extreme=allow_extreme)
        record = VectorRecord(base_model=base_model_id or base_model_name(source), vectors=vectors,
                              target=site, scale=scale, fold=fold,
                              dtype=str(model.dtype).removeprefix("torch."),
                              location=str(out_dir.resolve()))
        with atomic_folder(out_dir, content="checkpoint") as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            for name, text in vector_card_files(record).items():
                (staging / name).write_text(text)
    return VectorExport(out_dir, vectors, fold)
