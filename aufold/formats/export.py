"""``aufold export --format lora|ia3|gguf``: realize a plan's edit in one format and write its folder.

Called by :func:`aufold.export.export` once the plan, k, alpha, sites and the output
folder have been checked. Every check that can still fail (fingerprint, adapter
rank, GGUF tensor types) runs before the folder is written, atomically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from aufold.card import Artifact, ExportRecord, card_files
from aufold.defaults import GGUF_REENCODE
from aufold.edit import Edit
from aufold.errors import AufoldError
from aufold.evaluate.cost import CostRequest, MeasuredCost, measure_cost
from aufold.export import ExportResult, gguf_reference, measure_cost_unloaded
from aufold.formats import check_format
from aufold.formats.adapter import Adapter, write_adapter
from aufold.formats.gguf import fold_gguf, gguf_artifact, read_gguf_model
from aufold.formats.ia3 import ia3_adapter, ia3_artifact
from aufold.formats.lora import lora_adapter, lora_artifact
from aufold.modeling import ModelSource, fingerprint, load_model
from aufold.recipe import Recipe
from aufold.safety.outputs import atomic_folder

AdapterBuilder = Callable[..., Adapter]  # (model, edit, *, base_model) -> Adapter
AdapterCard = Callable[[ExportRecord, Adapter], Artifact]
ADAPTERS: dict[str, tuple[AdapterBuilder, AdapterCard]] = {
    "lora": (lora_adapter, lora_artifact),
    "ia3": (ia3_adapter, ia3_artifact),
}


def export_format(
    format: str,
    source: ModelSource,
    recipe: Recipe,
    *,
    out: Path,
    dtype: str,
    force: bool,
    base_model: str,
    allow_pickle: bool = False,
    gguf_reencode: str = GGUF_REENCODE,
    location: str,
    cost_request: CostRequest | None = None,
) -> ExportResult:
    """Write the recipe's edit of ``source`` as ``format`` into the claimed folder ``out``;
    its card says to load it from ``location``. Adapters and GGUF block scales hold one
    factor per unit, so a composed edit is written with each unit's product of factors."""
    check_format(format)
    edit = recipe.edit()
    record = ExportRecord(base_model=base_model, recipe=recipe, dtype=dtype,
                          quantized_base=gguf_reference(source),
                          location=location)
    cost_request = cost_request or CostRequest(enabled=False)
    if format == "gguf":
        def measure() -> MeasuredCost:
            return measure_cost_unloaded(source, recipe, cost_request, dtype=dtype, force=force,
                                         allow_pickle=allow_pickle)

        _export_gguf(source, recipe, edit, record, out, force=force, reencode=gguf_reencode,
                     measure=measure)
    else:
        build, describe = ADAPTERS[format]  # a checkpoint is aufold.export's own job
        model, tokenizer, _ = load_model(source.ref, dtype=dtype, allow_pickle=allow_pickle)
        recipe.check_fingerprint(fingerprint(model), force=force)
        adapter = build(model, edit, base_model=base_model)
        record = replace(record, dtype=str(model.dtype).removeprefix("torch."),
                         cost=measure_cost(model, tokenizer, edit, cost_request))
        write_adapter(adapter, replace(record, artifact=describe(record, adapter)), out)
    return ExportResult(out, edit)


def _export_gguf(source: ModelSource, recipe: Recipe, edit: Edit, record: ExportRecord, out: Path,
                 *, force: bool, reencode: str, measure: Callable[[], MeasuredCost]) -> None:
    """Fold into a copy of the GGUF file; the cost is measured once every check of the file
    (its kind, fingerprint and tensor types, in the fold) has passed, before the card."""
    if not source.gguf_file:
        raise AufoldError(f"--format gguf folds into a GGUF file, but {source.ref} is not one; "
                          f"pass a .gguf MODEL (convert a checkpoint with llama.cpp's "
                          f"convert_hf_to_gguf.py first)")
    model = read_gguf_model(Path(source.path) / source.gguf_file)
    recipe.check_fingerprint(model.fingerprint, force=force)
    with atomic_folder(out, content="gguf") as staging:
        report = fold_gguf(model, edit, staging / source.gguf_file, reencode=reencode)
        record = replace(record, cost=measure())
        record = replace(record, dtype=", ".join(report.tensor_types),
                         artifact=gguf_artifact(record, source.gguf_file, report))
        for name, text in card_files(record).items():
            (staging / name).write_text(text)
