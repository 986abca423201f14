"""The streaming fold: a safetensors checkpoint folded tensor by tensor, without building the model.

For each shard that holds an edited tensor, the new shard is the old one with
only the edited tensors' bytes replaced: the header and every other tensor are
copied file to file by the kernel, and each edited tensor is read alone, scaled
in place by :func:`aufold.fold.fold_tensor_` (the in-memory fold's own
arithmetic, so the two agree bitwise) and written back at the same offset.
Shards without edits are copied whole, or hard-linked with ``link_unchanged``.
The index, config, tokenizer and generation files are copied as they are.

Peak memory is the largest edited tensor plus the interpreter, whatever the
model size; nothing is memory-mapped, so reading does not grow resident memory.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from aufold.card import PROVENANCE_FILE, ExportRecord, model_card
from aufold.checkpoint import (
    COPY_CHUNK,
    DTYPE_NAMES,
    FLOAT_DTYPES,
    PICKLE_SUFFIXES,
    Checkpoint,
    ShardHeader,
    TensorEntry,
    copy_range,
    header_bytes,
    local_checkpoint,
    open_checkpoint,
    read_tensor,
    safetensors_writer,
    stored_name,
    tensor_bytes,
    write_all,
)
from aufold.edit import Edit
from aufold.errors import AufoldError
from aufold.evaluate.cost import MeasuredCost
from aufold.fold import TensorEdit, check_edit_fits, fold_tensor_, weight_edits
from aufold.stored_experts import per_expert_names, split_by_expert
from aufold.modeling import DTYPES, ModelSource, fingerprint_from
from aufold.recipe import Recipe
from aufold.progress import bar as progress_bar
from aufold.safety.outputs import atomic_folder
from aufold.sites import Architecture, architecture_for

# Files of a model folder that the streamed output never copies: weights in other
# formats (a repo may hold the same weights several times) and what export writes itself.
_SKIPPED_SUFFIXES = (*PICKLE_SUFFIXES, ".safetensors", ".gguf", ".h5", ".msgpack", ".onnx")
_WRITTEN_BY_EXPORT = ("README.md", PROVENANCE_FILE)
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class StreamReport:
    """What the streaming fold did with each weight file of the checkpoint."""

    folded: tuple[str, ...]  # shards rewritten with edited tensors
    copied: tuple[str, ...]  # unchanged shards copied
    linked: tuple[str, ...]  # unchanged shards hard-linked
    edited_tensors: int
    bytes_written: int
    converted: tuple[str, ...] = ()  # shards without edits rewritten in another dtype
    dtype: str | None = None  # the dtype float tensors were converted to, if any

    def summary(self) -> str:
        shards = len(self.folded) + len(self.copied) + len(self.linked) + len(self.converted)
        conversion = (f", {len(self.converted)} converted; float tensors converted to {self.dtype}"
                      if self.dtype else "")
        return (f"streamed {shards} shard(s): {len(self.folded)} folded ({self.edited_tensors} "
                f"tensors), {len(self.copied)} copied, {len(self.linked)} hard-linked{conversion}")


def streamable_folder(source: ModelSource, *, allow_pickle: bool = False) -> Path | None:
    """The safetensors folder to fold without loading the model, or None to load it in memory.

    A local folder or a hub id already complete in the local cache streams, with a
    dtype conversion too (it is per tensor); a GGUF file, a hub id that is not cached,
    or pickle weights with ``allow_pickle`` go through transformers. Pickle weights
    without it are refused.
    """
    if source.gguf_file:
        return None
    folder = source.local_dir
    if folder is None:
        return cached_snapshot(source.path)
    checkpoint = local_checkpoint(folder, allow_pickle=allow_pickle)  # refuses what is wrong
    if checkpoint is None:
        return None  # pickle weights, allowed: transformers loads them
    return folder


def cached_snapshot(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
        open_checkpoint(folder)
    except (OSError, ValueError, AufoldError):
        return None  # not (completely) cached: transformers downloads it
    return folder


def conversion_dtype(checkpoint: Checkpoint, dtype: str) -> torch.dtype | None:
    """The dtype to convert floating-point tensors to, or None when they all are stored so."""
    if dtype == "auto":
        return None
    wanted = DTYPES[dtype]
    assert isinstance(wanted, torch.dtype)
    stored = {FLOAT_DTYPES[entry.dtype] for entry in checkpoint.entries() if entry.dtype in FLOAT_DTYPES}
    return None if stored <= {wanted} else wanted


def checkpoint_architecture(folder: Path) -> tuple[dict[str, object], Architecture]:
    """The config (as transformers completes it) and where the sites of a folder's model are (aufold.sites)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as error:
        raise AufoldError(f"could not read the config of {folder}: "
                          f"{str(error).splitlines()[0] if str(error) else error!r}") from None
    return config.to_dict(), architecture_for(config)


class TensorNotStored(AufoldError):
    """A tensor the fold scales is not stored under its in-memory name: a plan for another
    model, or experts that transformers fuses into one [E, ...] tensor only when loading."""


def checkpoint_fingerprint(checkpoint: Checkpoint, config: Mapping[str, object],
                           architecture: Architecture) -> str:
    """The fingerprint that :func:`aufold.modeling.fingerprint` gives the loaded model."""
    def shape_of(name: str) -> tuple[int, ...]:
        stored = stored_name(name, checkpoint.weight_map)
        if stored is None:
            raise TensorNotStored(f"{checkpoint.folder} has no tensor {name}; it is not a "
                                  f"complete {config.get('model_type')} checkpoint, or it names "
                                  f"its tensors otherwise than the loaded model does")
        return checkpoint.entry(stored).shape

    return fingerprint_from(config, architecture, architecture.num_layers, shape_of)


def export_streamed(
    folder: Path,
    recipe: Recipe,
    *,
    out: Path,
    base_model: str,
    force: bool = False,
    link_unchanged: bool = False,
    location: str | None = None,
    dtype: str = "auto",
    measure_cost: Callable[[], MeasuredCost] | None = None,
) -> tuple[Edit, StreamReport]:
    """Fold the recipe's edit into the checkpoint in ``folder`` and write ``out``
    (whose card says to load it from ``location``, ``out`` when None), its floating-point
    tensors converted to ``dtype`` unless "auto"."""
    checkpoint = open_checkpoint(folder)
    config, architecture = checkpoint_architecture(folder)
    architecture.check_sites(recipe.sites)
    recipe.check_fingerprint(checkpoint_fingerprint(checkpoint, config, architecture), force=force)
    edit = recipe.edit()
    edits = stored_edits(checkpoint, weight_edits(edit, architecture), config)
    # Measured once the edit is known to fit the stored tensors, before anything is written.
    cost = measure_cost() if measure_cost is not None else None
    convert = conversion_dtype(checkpoint, dtype)
    first = next(entry for shard in edits.values() for entry in shard)
    record = ExportRecord(base_model=base_model, recipe=recipe, cost=cost,
                          dtype=str(convert or FLOAT_DTYPES[first.dtype]).removeprefix("torch."),
                          location=location or str(out.resolve()))
    texts = {"README.md": model_card(record),
             PROVENANCE_FILE: _json(record.provenance())}
    report = fold_checkpoint(checkpoint, edits, out, link_unchanged=link_unchanged, texts=texts,
                             dtype=convert)
    return edit, report


def stored_edits(checkpoint: Checkpoint, edits: Mapping[str, TensorEdit],
                 config: Mapping[str, object]) -> dict[str, dict[TensorEntry, TensorEdit]]:
    """The edits by shard file and stored tensor, each checked against the stored shape. A
    stacked experts tensor that the checkpoint stores one expert at a time is edited in its
    stored experts (:mod:`aufold.stored_experts`)."""
    by_stored: dict[str, TensorEdit] = {}
    for name, tensor_edit in edits.items():
        stored = stored_name(name, checkpoint.weight_map)
        if stored is not None:
            by_stored[stored] = tensor_edit
            continue
        experts = per_expert_names(name, str(config["model_type"]), checkpoint.weight_map,
                                   _num_experts(config))
        if experts is not None:
            split = split_by_expert(tensor_edit, len(experts),
                                    lambda number: checkpoint.entry(experts[number]).shape, name)
            by_stored.update({experts[number]: part for number, part in split.items()})
        elif not tensor_edit.optional:
            raise TensorNotStored(f"the checkpoint stores no tensor {name} under that name "
                                  f"(transformers may build it from other tensors when loading, "
                                  f"or the plan may be for another model)")
    by_shard: dict[str, dict[TensorEntry, TensorEdit]] = {}
    for stored, tensor_edit in by_stored.items():
        entry = checkpoint.entry(stored)
        check_edit_fits(tuple(entry.shape), tensor_edit, f"tensor {stored}")
        if entry.dtype not in FLOAT_DTYPES:
            raise AufoldError(f"tensor {stored} is stored as {entry.dtype}; aufold folds "
                              f"floating-point weights only, not quantized ones")
        by_shard.setdefault(checkpoint.weight_map[stored], {})[entry] = tensor_edit
    return by_shard


def _num_experts(config: Mapping[str, object]) -> int | None:
    """The routed experts per block, under whichever name the config gives them."""
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fold_checkpoint(
    checkpoint: Checkpoint,
    edits: Mapping[str, Mapping[TensorEntry, TensorEdit]],
    out: Path,
    *,
    link_unchanged: bool = False,
    texts: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> StreamReport:
    """Write the folded checkpoint into ``out`` atomically: complete, or not there at all.

    With ``dtype``, floating-point tensors are converted to it one at a time (each
    edited one converted first, then folded, as the in-memory fold of a model loaded
    in that dtype does), and the config and index say so.

    On a full disk the partial output is removed, the input is untouched, and the
    error says how much space the output needs.
    """
    texts = dict(texts or {})
    converted_shards = {file: _converted_size(shard, dtype) for file, shard in checkpoint.shards.items()
                        if dtype is not None and _converted_size(shard, dtype) is not None}
    if converted_shards:
        texts.update(_converted_texts(checkpoint, dtype))  # type: ignore[arg-type]
    extras = [path for path in _extra_files(checkpoint) if path.name not in texts]
    linking = link_unchanged and _same_device(checkpoint.folder, out.parent)
    needed = sum(converted_shards.get(file) or shard.size for file, shard in checkpoint.shards.items()
                 if file in edits or file in converted_shards or not linking)
    needed += sum(path.stat().st_size for path in extras)
    _check_free_space(out, needed)
    folded, copied, linked, converted = [], [], [], []
    with atomic_folder(out, content="checkpoint") as staging, _needs(out, needed):
        shards = progress_bar(checkpoint.shards.items(), desc="export", unit="shard",
                              total=len(checkpoint.shards))
        for file, shard in shards:
            target = staging / file
            if file in converted_shards:
                assert dtype is not None
                _convert_shard(shard, edits.get(file, {}), target, dtype)
                (folded if file in edits else converted).append(file)
            elif file in edits:
                _fold_shard(shard.path, shard.size, edits[file], target)
                folded.append(file)
            elif linking and _link(shard.path, target):
                linked.append(file)
            else:
                shutil.copyfile(shard.path, target)
                copied.append(file)
        if checkpoint.index_file and checkpoint.index_file not in texts:
            shutil.copyfile(checkpoint.folder / checkpoint.index_file,
                            staging / checkpoint.index_file)
        for path in extras:
            shutil.copyfile(path, staging / path.name)
        for name, text in texts.items():
            (staging / name).write_text(text)
    return StreamReport(tuple(folded), tuple(copied), tuple(linked),
                        sum(len(shard) for shard in edits.values()), needed, tuple(converted),
                        str(dtype).removeprefix("torch.") if converted_shards else None)


def _converted_size(shard: ShardHeader, dtype: torch.dtype | None) -> int | None:
    """The shard's file size once its floating-point tensors are ``dtype``; None if unchanged."""
    if dtype is None or all(FLOAT_DTYPES.get(e.dtype, dtype) == dtype for e in shard.tensors.values()):
        return None
    layout = _converted_layout(shard, dtype)
    return len(header_bytes(layout, shard.metadata)) + sum(entry[3] for entry in layout)


def _converted_layout(shard: ShardHeader, dtype: torch.dtype) -> list[tuple[str, str, tuple[int, ...], int]]:
    """(name, dtype name, shape, bytes) of the converted shard's tensors, in file order."""
    return [(e.name, DTYPE_NAMES[dtype] if e.dtype in FLOAT_DTYPES else e.dtype, e.shape,
             _converted_bytes(e, dtype))
            for e in sorted(shard.tensors.values(), key=lambda entry: entry.begin)]


def _converted_bytes(entry: TensorEntry, dtype: torch.dtype) -> int:
    stored = FLOAT_DTYPES.get(entry.dtype)
    return entry.nbytes if stored is None else entry.nbytes // stored.itemsize * dtype.itemsize


def _converted_texts(checkpoint: Checkpoint, dtype: torch.dtype) -> dict[str, str]:
    """config.json (and the index) as a checkpoint saved in ``dtype`` has them."""
    name = str(dtype).removeprefix("torch.")
    texts = {}
    config = json.loads((checkpoint.folder / "config.json").read_text(encoding="utf-8"))
    for key in ("dtype", "torch_dtype"):
        if key in config or key == "dtype":
            config[key] = name
    texts["config.json"] = _json(config)
    if checkpoint.index_file:
        index = json.loads((checkpoint.folder / checkpoint.index_file).read_text(encoding="utf-8"))
        index.setdefault("metadata", {})["total_size"] = sum(
            _converted_bytes(entry, dtype) for shard in checkpoint.shards.values()
            for entry in shard.tensors.values())
        texts[checkpoint.index_file] = _json(index)
    return texts


def _convert_shard(shard: ShardHeader, edits: Mapping[TensorEntry, TensorEdit], target: Path,
                   dtype: torch.dtype) -> None:
    """The shard with every floating-point tensor converted (and folded where edited)."""
    entries = sorted(shard.tensors.values(), key=lambda entry: entry.begin)
    layout = _converted_layout(shard, dtype)
    with shard.path.open("rb") as source, safetensors_writer(target, layout, shard.metadata) as writer:
        for entry in entries:
            if entry.dtype not in FLOAT_DTYPES:  # integer buffers and the like, as bytes
                for start in range(entry.begin, entry.end, COPY_CHUNK):
                    source.seek(start)
                    writer.write(entry.name, source.read(min(COPY_CHUNK, entry.end - start)))
                if entry.nbytes == 0:
                    writer.write(entry.name, b"")
                continue
            tensor = read_tensor(source, entry).to(dtype)
            if entry in edits:
                fold_tensor_(tensor, edits[entry], entry.name)
            writer.write(entry.name, tensor_bytes(tensor))
            del tensor


def _fold_shard(source_path: Path, size: int, edits: Mapping[TensorEntry, TensorEdit],
                target: Path) -> None:
    """The shard with each edited tensor's bytes replaced; every other byte copied as is."""
    with source_path.open("rb") as source, target.open("wb") as output:
        position = 0
        for entry in sorted(edits, key=lambda entry: entry.begin):
            copy_range(source.fileno(), output.fileno(), position, entry.begin - position, position)
            tensor = fold_tensor_(read_tensor(source, entry), edits[entry], entry.name)
            write_all(output.fileno(), tensor_bytes(tensor), entry.begin)
            del tensor
            position = entry.end
        copy_range(source.fileno(), output.fileno(), position, size - position, position)


def _extra_files(checkpoint: Checkpoint) -> list[Path]:
    """Config, tokenizer, generation and other small top-level files to copy as they are."""
    skip = set(checkpoint.weight_files) | set(_WRITTEN_BY_EXPORT)
    return sorted(path for path in checkpoint.folder.iterdir()
                  if path.is_file() and not path.name.startswith(".") and path.name not in skip
                  and not path.name.endswith(_SKIPPED_SUFFIXES))


def _same_device(source: Path, target_parent: Path) -> bool:
    target_parent.mkdir(parents=True, exist_ok=True)
    return os.stat(source).st_dev == os.stat(target_parent).st_dev


@contextmanager
def _needs(out: Path, needed: int) -> Iterator[None]:
    """A disk that fills up while writing ``out`` is one line saying how much space it needs."""
    try:
        yield
    except OSError as error:
        if error.errno in _NO_SPACE:
            raise AufoldError(f"the disk filled up while writing {out}; the partial output was "
                              f"removed and the input is untouched. The output needs about "
                              f"{_gb(needed)} free (hard-linking unchanged shards with "
                              f"--link-unchanged needs less)") from None
        raise


def _link(source: Path, target: Path) -> bool:
    try:
        os.link(source, target)  # follows a hub cache symlink to its blob
    except OSError as error:
        if error.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            return False
        raise
    return True


def _check_free_space(out: Path, needed: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if needed > free:
        raise AufoldError(f"not enough disk space for {out}: the output needs about "
                          f"{_gb(needed)} and {_gb(free)} is free; free some space, write "
                          f"elsewhere, or hard-link unchanged shards with --link-unchanged")


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


def _json(value: object) -> str:
    return json.dumps(value, indent=2) + "\n"
