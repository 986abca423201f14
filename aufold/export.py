"""Export: fold a plan's top-k units into a model and write a complete standard checkpoint."""

from __future__ import annotations

import gc
import json
import logging
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedTokenizerBase

from aufold.card import PROVENANCE_FILE, ExportRecord, model_card
from aufold.defaults import GGUF_REENCODE
from aufold.edit import Edit
from aufold.errors import AufoldError
from aufold.evaluate.cost import CostRequest, MeasuredCost, measure_cost
from aufold.fold import fold_model
from aufold.formats import CHECKPOINT, check_format, check_gguf_reencode
from aufold.hub import check_push_target, push_folder_to_hub
from aufold.modeling import ModelSource, fingerprint, is_layerwise, load_model, resolve_source
from aufold.plan import Plan
from aufold.progress import status
from aufold.recipe import Recipe, as_recipe
from aufold.safety.outputs import Inputs, atomic_folder, claim_output
from aufold.sites import check_foldable
from aufold.source import hub_cache_repo
from aufold.streaming import (
    StreamReport,
    TensorNotStored,
    export_streamed,
    streamable_folder,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger("aufold")


@dataclass(frozen=True)
class ExportResult:
    out: Path
    edit: Edit
    url: str | None = None
    streamed: StreamReport | None = None  # None when the model was loaded in memory


def export(
    model_ref: str | Path,
    plan: Plan | str | Path | Recipe,
    *,
    k: int | None = None,
    alpha: float | None = None,
    out: str | Path | None,
    sites: Sequence[str] | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
    force: bool = False,
    base_model_id: str | None = None,
    push_to_hub: str | None = None,
    private: bool = False,
    link_unchanged: bool = False,
    allow_pickle: bool = False,
    allow_extreme: bool = False,
    format: str = CHECKPOINT,
    gguf_reencode: str | None = None,
    cost: bool = True,
    neutral: str | Path | None = None,
    data_dir: str | Path | None = None,
) -> ExportResult:
    """Fold the top-k units of ``plan`` (or a composed :class:`Recipe`, without k, alpha and
    sites) into ``model_ref`` and write the result to ``out``.

    Every check that can fail runs before anything is written (the push target too);
    the folder appears only when complete, and the input checkpoint is only ever read.
    A local (or hub-cached) safetensors checkpoint is folded tensor by tensor without
    loading the model (:mod:`aufold.streaming`); ``link_unchanged`` hard-links its shards
    that hold no edit. Pickle weights load only with ``allow_pickle``. ``format``
    "lora", "ia3" or "gguf" writes the edit as an adapter or a GGUF file instead
    (:mod:`aufold.formats`); ``gguf_reencode`` is the type a GGUF tensor with steered
    columns becomes (:data:`aufold.defaults.GGUF_REENCODE` when None). With ``cost`` the
    card states the edit's KL and perplexity ratio on neutral text (``neutral``, or the
    BoolQ test passages of ``data_dir`` or ../shared/data), measured with hooks on the
    model before the export is written; a path that does not load the model loads it for
    that when it fits in memory, and the card says why when it is not measured. With
    ``push_to_hub`` and no ``out``, the export is written to a temporary folder that is
    removed after the upload, whether it succeeds or not.
    """
    check_format(format)
    if gguf_reencode is not None and format != "gguf":
        raise AufoldError(f"--gguf-reencode applies to --format gguf only, not {format}; "
                          f"drop it or pass --format gguf")
    if gguf_reencode is not None:
        check_gguf_reencode(gguf_reencode)
    recipe = as_recipe(plan, k, alpha, sites, allow_extreme=allow_extreme)
    cost_request = CostRequest(cost, Path(neutral) if neutral is not None else None,
                               Path(data_dir) if data_dir is not None else None)
    cost_request.check()
    check_foldable(recipe.sites)
    # k, alpha, sites and the size of the scale factors fail here, before any loading.
    recipe.edit()
    source = resolve_source(model_ref)
    inferred = inferred_base_model(source) if base_model_id is None else base_model_id
    if format in ("lora", "ia3") and source.gguf_file and inferred is None:
        raise AufoldError(f"a {format} adapter names its base model in adapter_config.json, and "
                          f"{source.gguf_file} does not say which model it was converted from; "
                          f"pass --base-model-id ORG/NAME (the card still loads the dequantized "
                          f"file, on which the adapter is exact)")
    if push_to_hub is not None:
        check_push_target(push_to_hub)
        if inferred is None:
            raise AufoldError(f"--push-to-hub needs the base model's hub id for the card and "
                              f"the adapter config, and {source.ref} does not say it; pass "
                              f"--base-model-id ORG/NAME")
    options = dict(dtype=dtype, force=force, base_model=inferred or local_base_name(source),
                   link_unchanged=link_unchanged, allow_pickle=allow_pickle, format=format,
                   cost_request=cost_request,
                   gguf_reencode=gguf_reencode or GGUF_REENCODE,
                   location=push_to_hub or str(Path(out or ".").expanduser().resolve()))
    inputs = Inputs.of([*source.input_paths(), *recipe.plan_dirs, cost_request.neutral])
    if out is None:
        if push_to_hub is None:
            raise AufoldError("nowhere to write the export; give --out (or --push-to-hub to "
                              "upload it without keeping a local copy)")
        with tempfile.TemporaryDirectory(prefix="aufold-push-") as scratch:
            with claim_output(Path(scratch) / "export", inputs=inputs) as out_dir:
                result = _write_export(source, recipe, out_dir, **options)  # type: ignore[arg-type]
            return push_export(result, push_to_hub, private=private, kept=False)
    with claim_output(out, overwrite=overwrite, inputs=inputs) as out_dir:
        result = _write_export(source, recipe, out_dir, **options)  # type: ignore[arg-type]
    if push_to_hub is None:
        return result
    return push_export(result, push_to_hub, private=private, kept=True)


def _write_export(source: ModelSource, recipe: Recipe, out: Path, *, dtype: str, force: bool,
                  base_model: str, link_unchanged: bool, allow_pickle: bool, format: str,
                  gguf_reencode: str, location: str, cost_request: CostRequest) -> ExportResult:
    """Write one export into the claimed folder ``out``: streamed, loaded, or another format."""
    if format != CHECKPOINT:
        from aufold.formats.export import export_format  # loads peft and gguf only when asked

        return export_format(format, source, recipe, out=out, dtype=dtype, force=force,
                             base_model=base_model, allow_pickle=allow_pickle,
                             gguf_reencode=gguf_reencode, location=location,
                             cost_request=cost_request)
    folder = streamable_folder(source, allow_pickle=allow_pickle)
    if folder is not None:
        def measure() -> MeasuredCost:
            return measure_cost_unloaded(source, recipe, cost_request, dtype=dtype, force=force,
                                         allow_pickle=allow_pickle, folder=folder)

        try:
            edit, report = export_streamed(folder, recipe, out=out, force=force,
                                           link_unchanged=link_unchanged, base_model=base_model,
                                           location=location, dtype=dtype, measure_cost=measure)
            return ExportResult(out, edit, None, report)
        except TensorNotStored as error:
            # The checkpoint names or shapes some tensor otherwise than the loaded model: the
            # experts that transformers stacks into one tensor only when loading, or a family
            # whose files transformers renames on load. Loading it whole folds it exactly;
            # a checkpoint that is really incomplete is refused by loading.
            log.warning("%s; loading the model whole to fold it (it must fit in memory)", error)
    if source.gguf_path is not None:
        log.info("%s", gguf_dequantization_note(source.gguf_path, dtype))
    model, tokenizer, _ = load_model(source.ref, dtype=dtype, sites=recipe.sites,
                                     allow_pickle=allow_pickle)
    recipe.check_fingerprint(fingerprint(model), force=force)
    measured = measure_cost(model, tokenizer, recipe.edit(), cost_request)
    return export_loaded(model, tokenizer, recipe, out=out, base_model=base_model,
                         quantized_base=gguf_reference(source), location=location,
                         cost=measured)


def measure_cost_unloaded(source: ModelSource, recipe: Recipe, request: CostRequest, *,
                          dtype: str, force: bool, allow_pickle: bool,
                          folder: Path | None = None) -> MeasuredCost:
    """The cost for an export that does not load the model (streamed checkpoint, GGUF file):
    the model is loaded for it (from ``folder``, the checkpoint's local folder, when given:
    a hub id would ask the network), one layer at a time when its weights do not fit in
    memory (:func:`aufold.layerwise.load_for_run`), measured with hooks, and freed before
    anything is written."""
    from aufold.layerwise import load_for_run
    from aufold.layerwise.hidden import HiddenStatesDoNotFit

    reason = request.unmeasured()
    if reason is None and source.gguf_path is not None:
        reason = _gguf_does_not_fit(source.gguf_path, dtype)
    if reason is not None:
        return MeasuredCost(None, reason)
    status("export: measuring the edit's cost on neutral text (KL, perplexity ratio; "
           "--no-cost skips it)")
    try:
        model, tokenizer, _ = load_for_run(str(folder) if folder else source.ref, dtype=dtype,
                                           allow_pickle=allow_pickle)
    except AufoldError as error:  # the export itself does not need transformers to load it
        return MeasuredCost(None, f"the model or its tokenizer could not be loaded ({error})")
    try:
        recipe.check_fingerprint(fingerprint(model), force=force)
        if not is_layerwise(model):
            return measure_cost(model, tokenizer, recipe.edit(), request)
        try:
            return measure_cost(model, tokenizer, recipe.edit(), request)
        except HiddenStatesDoNotFit as error:  # export has no --work-dir to spill them to
            return MeasuredCost(None, f"the hidden states of layer streaming do not fit in "
                                      f"memory ({error.needed}); measure it with `aufold eval "
                                      f"--layer-streaming --work-dir DIR`")
    finally:
        del model
        gc.collect()


def _gguf_does_not_fit(path: Path, dtype: str) -> str | None:
    """Why a GGUF model cannot be dequantized in memory to measure the cost, or None. (A GGUF
    file cannot stream layer by layer: transformers dequantizes it whole.)"""
    from aufold.layerwise.hidden import MARGIN_BYTES, available_memory, size_text

    needed = _dequantized_bytes(path, dtype)[0] + MARGIN_BYTES
    if needed <= available_memory():
        return None
    return (f"the dequantized model does not fit in memory ({size_text(needed)}), and a GGUF "
            f"file cannot stream layer by layer")


def _dequantized_bytes(path: Path, dtype: str, tensors: dict[str, Any] | None = None
                       ) -> tuple[int, str]:
    """The size of a GGUF file's weights once dequantized to ``dtype`` (float32 for auto), from
    its tensor table (``tensors``, read here when not given)."""
    from aufold.formats.gguf import gguf_tensors

    tensors = gguf_tensors(path) if tensors is None else tensors
    values = sum(int(math.prod(int(n) for n in tensor.shape)) for tensor in tensors.values())
    written = "float32" if dtype == "auto" else dtype
    return values * (4 if written == "float32" else 2), written


def gguf_dequantization_note(path: Path, dtype: str) -> str:
    """What a GGUF file becomes when exported as a checkpoint: several times its size, said
    (with how to halve it) before the minutes of dequantizing."""
    from aufold.formats.gguf import gguf_tensors

    tensors = gguf_tensors(path)
    size, written = _dequantized_bytes(path, dtype, tensors)
    types = ", ".join(sorted({tensor.tensor_type.name for tensor in tensors.values()}))
    hint = "; pass --dtype bfloat16 to halve it" if written == "float32" else ""
    file_size = path.stat().st_size
    return (f"{path.name} ({types}, {file_size / 1e6:.0f} MB) is dequantized: the checkpoint is "
            f"written in {written}, about {size / 1e6:.0f} MB ({size / file_size:.1f}x the "
            f"file){hint}")


def push_export(result: ExportResult, repo_id: str, *, private: bool, kept: bool) -> ExportResult:
    """Upload a written export; a failure says whether the local copy was kept."""
    try:
        url = push_folder_to_hub(result.out, repo_id, private=private)
    except AufoldError as error:
        where = (f"the export stays in {result.out}, since --out was given; push it later with "
                 f"`hf upload {repo_id} {result.out}`" if kept else
                 "no local copy was kept, since no --out was given; pass --out to keep one")
        raise AufoldError(f"{error}; {where}") from None
    return replace(result, url=url)


def export_loaded(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    plan: Plan | Recipe,
    *,
    k: int | None = None,
    alpha: float | None = None,
    out: Path,
    sites: Sequence[str] | None = None,
    base_model: str,
    allow_extreme: bool = False,
    quantized_base: str | None = None,
    location: str | None = None,
    cost: MeasuredCost | None = None,
) -> ExportResult:
    """Fold into an already loaded model (in place) and write it to the claimed ``out``;
    ``quantized_base`` names the GGUF file the model was dequantized from, if it was,
    ``location`` where the card says to load it from (``out`` when None), and ``cost`` what
    the card says about the edit's cost (:func:`aufold.evaluate.cost.measure_cost`)."""
    recipe = as_recipe(plan, k, alpha, sites, allow_extreme=allow_extreme)
    edit = recipe.edit()
    fold_model(model, edit)
    record = ExportRecord(base_model=base_model, recipe=recipe,
                          dtype=str(model.dtype).removeprefix("torch."),
                          quantized_base=quantized_base, cost=cost,
                          location=location or str(out.resolve()))
    write_checkpoint(model, tokenizer, record, out)
    return ExportResult(out, edit)


def write_checkpoint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                     record: ExportRecord, out: Path) -> None:
    """Weights, config, generation config, tokenizer, card and provenance, atomically."""
    with atomic_folder(out, content="checkpoint") as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "README.md").write_text(model_card(record))
        (staging / PROVENANCE_FILE).write_text(json.dumps(record.provenance(), indent=2) + "\n")


def gguf_reference(source: ModelSource) -> str | None:
    """A GGUF source as the card names it: its path, with the file's own name (a hub-cache
    path is a link to a blob named by its hash, so it is not resolved)."""
    if not source.gguf_file:
        return None
    return str(Path(source.path).expanduser().absolute() / source.gguf_file)


def inferred_base_model(source: ModelSource) -> str | None:
    """The base model's hub id, where it can be known: a hub id, the repo of a hub-cache
    path, or for a GGUF file the model its metadata says it was converted from (else the
    GGUF's own repo in the hub cache)."""
    if source.local_dir is None and not source.gguf_file:
        return source.ref
    if source.gguf_path is not None:
        from aufold.formats.gguf.file import gguf_source_repo

        converted_from = gguf_source_repo(source.gguf_path)
        if converted_from is not None:
            return converted_from
    local = source.gguf_path or source.local_dir
    assert local is not None
    return hub_cache_repo(local)


def base_model_name(source: ModelSource) -> str:
    """What the card and adapter config call the base model, when --base-model-id is not given:
    its hub id where it can be known, else :func:`local_base_name`."""
    return inferred_base_model(source) or local_base_name(source)


def local_base_name(source: ModelSource) -> str:
    """A base without a known hub id: a local folder's absolute path (which loads as written
    on this machine), else a GGUF file's name."""
    if source.local_dir is not None:
        return str(source.local_dir.resolve())
    return Path(source.ref).name
