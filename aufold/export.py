"""Export: fold a plan's top-k units into a model and write a complete standard checkpoint."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import PreTrainedTokenizerBase

from aufold.atomic import atomic_folder, check_output_folder
from aufold.card import PROVENANCE_FILE, ExportRecord, model_card
from aufold.edit import Edit
from aufold.fold import fold_model
from aufold.formats import CHECKPOINT, check_format
from aufold.hub import push_folder_to_hub
from aufold.modeling import ModelSource, fingerprint, load_model, resolve_source
from aufold.plan import Plan
from aufold.sites import check_foldable
from aufold.streaming import StreamReport, export_streamed, streamable_folder

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass(frozen=True)
class ExportResult:
    out: Path
    edit: Edit
    url: str | None = None
    streamed: StreamReport | None = None  # None when the model was loaded in memory


def export(
    model_ref: str | Path,
    plan: Plan | str | Path,
    *,
    k: int,
    alpha: float,
    out: str | Path,
    sites: Sequence[str] | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
    force: bool = False,
    base_model_id: str | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    link_unchanged: bool = False,
    allow_pickle: bool = False,
    format: str = CHECKPOINT,
) -> ExportResult:
    """Fold the top-k units of ``plan`` into ``model_ref`` and write the result to ``out``.

    Every check that can fail runs before anything is written; the folder appears
    only when complete, and the input checkpoint is only ever read. A local (or
    hub-cached) safetensors checkpoint is folded tensor by tensor without loading
    the model (:mod:`aufold.streaming`); ``link_unchanged`` hard-links its shards
    that hold no edit. Pickle weights load only with ``allow_pickle``. ``format``
    "lora", "ia3" or "gguf" writes the edit as an adapter or a GGUF file instead
    (:mod:`aufold.formats`).
    """
    check_format(format)
    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    chosen_sites = plan.sites if sites is None else tuple(sites)
    check_foldable(chosen_sites)
    plan.select(k, alpha, chosen_sites)  # k, alpha and sites fail here, before any loading
    source = resolve_source(model_ref)
    if format != CHECKPOINT:
        from aufold.formats.export import export_format  # loads peft and gguf only when asked

        out_dir = check_output_folder(out, overwrite=overwrite, inputs=(source.local_dir,))
        return export_format(format, source, plan, k=k, alpha=alpha, out=out_dir,
                             sites=chosen_sites, dtype=dtype, force=force,
                             base_model=base_model_id or base_model_name(source),
                             push_to_hub=push_to_hub, private=private)
    folder = streamable_folder(source, dtype=dtype, allow_pickle=allow_pickle)
    out_dir = check_output_folder(out, overwrite=overwrite, inputs=(source.local_dir, folder))
    if folder is not None:
        edit, report = export_streamed(folder, plan, k=k, alpha=alpha, out=out_dir,
                                       sites=chosen_sites, force=force, link_unchanged=link_unchanged,
                                       base_model=base_model_id or base_model_name(source))
        url = push_folder_to_hub(out_dir, push_to_hub, private=private) if push_to_hub else None
        return ExportResult(out_dir, edit, url, report)

    model, tokenizer, _ = load_model(model_ref, dtype=dtype, sites=chosen_sites)
    plan.check_fingerprint(fingerprint(model), force=force)
    return export_loaded(model, tokenizer, plan, k=k, alpha=alpha, out=out_dir, sites=chosen_sites,
                         base_model=base_model_id or base_model_name(source),
                         push_to_hub=push_to_hub, private=private)


def export_loaded(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    plan: Plan,
    *,
    k: int,
    alpha: float,
    out: Path,
    sites: Sequence[str],
    base_model: str,
    push_to_hub: str | None = None,
    private: bool = False,
) -> ExportResult:
    """Fold into an already loaded model (in place) and write it; inputs already checked."""
    edit = plan.select(k, alpha, sites)
    fold_model(model, edit)
    record = ExportRecord(base_model=base_model, plan=plan, units=plan.ranking(sites, k), k=k,
                          alpha=alpha, sites=tuple(sites),
                          dtype=str(model.dtype).removeprefix("torch."))
    write_checkpoint(model, tokenizer, record, out)
    url = push_folder_to_hub(out, push_to_hub, private=private) if push_to_hub else None
    return ExportResult(out, edit, url)


def write_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                     record: ExportRecord, out: Path) -> None:
    """Weights, config, generation config, tokenizer, card and provenance, atomically."""
    with atomic_folder(out) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "README.md").write_text(model_card(record))
        (staging / PROVENANCE_FILE).write_text(json.dumps(record.provenance(), indent=2) + "\n")


def base_model_name(source: ModelSource) -> str:
    # A hub id names the base model on the Hub; a local path is all we know otherwise.
    if source.local_dir is None and not source.gguf_file:
        return source.ref
    return Path(source.ref).name
