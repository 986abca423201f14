"""The one guarded path of every command: what it reads, what it writes, claimed up front.

Each command of the command line declares, by the names of its arguments, which are
inputs (a model, a plan, pairs, a data folder, vectors, ...) and which are outputs
(``--out`` folders, ``--report`` files). :func:`guarded_outputs` claims every output
before any work starts (:func:`aufold.safety.outputs.claim_output`: refused if it
overlaps an input, locked against concurrent writers, replaced only if aufold wrote it)
and holds the claims until the command ends.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from aufold.safety.outputs import Inputs, OutputKind, claim_output
from aufold.source import resolve_source, smollm2_gguf_path


def _paths(value: Any) -> list[Path]:
    values = value if isinstance(value, (list, tuple)) else [value]
    return [Path(v) for v in values if v is not None]


def _model(value: Any) -> list[Path]:
    ref = value if value is not None else smollm2_gguf_path()  # demo's default model
    return list(resolve_source(ref).input_paths())


def _data_dir(value: Any) -> list[Path]:
    from aufold.tasks import default_data_dir

    folder = value if value is not None else default_data_dir()
    return _paths(folder)


def _tuned(value: Any) -> list[Path]:
    """Each tune.json and the plan it names (a damaged file is refused later, when read)."""
    paths = []
    for given in _paths(value):
        file = _expanded(given)
        file = file / "tune.json" if file.is_dir() else file
        paths.append(file)
        if file.is_file():  # a FIFO or device would block the read; read_tuned refuses it
            paths.extend(_named(file, lambda data: [data["plan"]]))
    return paths


def _recipe(value: Any) -> list[Path]:
    """The recipe file, the plans it names, and its tune results with the plans they name."""
    if value is None:
        return []
    file = _expanded(Path(value))
    if not file.is_file():
        return [file]
    plans = _named(file, lambda data: [c["plan"] for c in data["components"] if "plan" in c])
    tuned = _named(file, lambda data: [c["tuned"] for c in data["components"] if "tuned" in c])
    return [file, *plans, *_tuned(tuned)]


def _expanded(path: Path) -> Path:
    """``~`` expanded where it can be; otherwise the path as given (reading it says why)."""
    try:
        return path.expanduser()
    except RuntimeError:
        return path


def _named(file: Path, paths_in: Callable[[Any], list[Any]]) -> list[Path]:
    """The paths a JSON or YAML file names, relative to its folder; none if it is damaged."""
    try:
        text = file.read_text(encoding="utf-8")
        if file.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        named = [_expanded(Path(p)) for p in paths_in(data) if isinstance(p, str) and p]
    except Exception:  # any damage is reported when the command reads the file itself
        return []
    return [p if p.is_absolute() else file.parent / p for p in named]


# How each kind of input argument maps to the paths it reads, by the argument's name.
INPUT_ARGUMENTS: Mapping[str, Callable[[Any], list[Path]]] = {
    "model": _model,
    "plan_dir": _paths,
    "tuned": _tuned,
    "recipe": _recipe,
    "pairs_file": _paths,
    "data_dir": _data_dir,
    "vector_path": _paths,
    "parts": _paths,
    "folded": _paths,
    "neutral": _paths,
    "caa_pairs": _paths,
}


@contextmanager
def guarded_outputs(arguments: Mapping[str, Any], *, inputs: Sequence[str],
                    folders: Sequence[str] = (), files: Sequence[str] = ()) -> Iterator[None]:
    """Claim the command's output folders and files (by argument name) for its duration.

    ``arguments`` are the command's parsed arguments; ``arguments["overwrite"]`` allows
    replacing earlier aufold outputs. Under torchrun only rank 0 writes, so only it claims.
    """
    paths = Inputs.of(_input_paths(arguments, inputs))
    overwrite = bool(arguments.get("overwrite", False))
    from aufold.shards import is_main_process  # torchrun's other ranks compute but never write

    with ExitStack() as stack:
        if is_main_process():
            for names, kind in ((folders, OutputKind.FOLDER), (files, OutputKind.FILE)):
                for name in names:
                    if arguments.get(name) is not None:
                        stack.enter_context(claim_output(arguments[name], overwrite=overwrite,
                                                         inputs=paths, kind=kind))
        yield


def _input_paths(arguments: Mapping[str, Any], names: Iterable[str]) -> Iterator[Path]:
    for name in names:
        yield from INPUT_ARGUMENTS[name](arguments.get(name))

