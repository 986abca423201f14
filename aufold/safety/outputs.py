"""Every file aufold writes goes through here: claimed, checked against the inputs, then
written atomically.

The promises this module keeps, for every command:

- **Inputs are never touched.** An output that is an input, contains one or lies inside
  one is refused, with or without ``--overwrite``.
- **``--overwrite`` only replaces aufold's own outputs.** A folder is recognised by the
  marker file :data:`MARKER` that :func:`atomic_folder` writes into it; a file by its
  ``"format": "aufold-..."`` key. Anything else is refused, and the message says why.
- **One writer per output.** :func:`claim_output` takes an exclusive, non-blocking lock
  (``.NAME.aufold-lock`` beside the output) for as long as the command runs, so a second
  process writing the same output fails at once instead of silently replacing the first.
- **Complete or absent.** Outputs are written into ``.NAME.aufold-partial-*`` beside the
  target and renamed into place at the end. Whoever holds the lock knows that any such
  folder is left by a writer that died (``kill -9``, a power cut) and removes it.
- **Ordinary permissions.** Temporary folders and files get the mode the umask gives an
  ordinary ``mkdir`` or ``open``, not ``mkdtemp``'s private 0700.

Only the standard library is imported, so the command line can check its outputs
before it loads torch.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from aufold.errors import AufoldError, expanded
from aufold.version import __version__

MARKER = ".aufold-output"  # inside every folder aufold writes; never uploaded or copied
MARKER_FORMAT = "aufold-output"
PNG_SOFTWARE = "aufold"  # the Software text of the PNG figures aufold writes
# The formats of files a file output may replace: JSON reports, and vector files whose
# safetensors metadata names them under SAFETENSORS_MARKER.
REPLACEABLE_REPORTS = frozenset({"aufold-eval", "aufold-caa-vectors"})
SAFETENSORS_MARKER = "aufold_format"
LOCK_SUFFIX = ".aufold-lock"
PARTIAL_TAG = "aufold-partial-"
RETIRED_TAG = "aufold-old-"
_MAX_REPORT_BYTES = 1 << 30
# Errors of the file system that are the user's to fix (space, permissions), not bugs.
_FULL_OR_READ_ONLY = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
_USER_FS_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                   errno.ENAMETOOLONG, errno.ENOTDIR, errno.EISDIR)

log = logging.getLogger("aufold")


class OutputKind(Enum):
    FOLDER = "folder"
    FILE = "file"


@dataclass
class _Claim:
    lock_fd: int
    lock_path: Path
    created_parents: list[Path]
    depth: int = 1


_HELD: dict[Path, _Claim] = {}  # outputs this process has claimed, by resolved path


@dataclass(frozen=True)
class Inputs:
    """The paths a command reads, resolved: an output may not overlap any of them."""

    paths: tuple[Path, ...] = field(default_factory=tuple)

    @classmethod
    def of(cls, paths: Iterable[str | Path | None]) -> Inputs:
        """The paths, resolved, and where every symbolic link inside an input folder points:
        a model whose shard is a link into --out is read from --out."""
        resolved = [_resolved(p) for p in paths if p is not None]
        return cls(tuple(dict.fromkeys([*resolved, *_link_targets(resolved)])))

    def overlapping(self, out: Path) -> Path | None:
        """The first input that ``out`` is, contains, or lies inside; None if there is none."""
        for source in self.paths:
            if out == source or source in out.parents or out in source.parents:
                return source
        return None


def _link_targets(folders: list[Path]) -> Iterator[Path]:
    for folder in folders:
        if folder.is_dir():
            for entry in folder.rglob("*"):
                if entry.is_symlink():
                    yield _resolved(entry)


@contextmanager
def claim_output(out: str | Path, *, overwrite: bool = False,
                 inputs: Inputs | Iterable[str | Path | None] = (),
                 kind: OutputKind = OutputKind.FOLDER) -> Iterator[Path]:
    """Check ``out`` against the inputs and what is already there, lock it, and yield it
    resolved; the lock is released (and its file removed) when the block ends.

    A process may claim an output it already holds (the command line claims every output
    before loading a model, and the library claims it again before writing): the checks
    run again, the lock is shared.
    """
    if not str(out).strip():
        raise AufoldError("the output path is empty; give a file or folder name")
    path = _resolved(out)
    inputs = inputs if isinstance(inputs, Inputs) else Inputs.of(inputs)
    source = inputs.overlapping(path)
    if source is not None:
        raise AufoldError(_overlap_message(path, source))
    claim = _HELD.get(path)
    if claim is None:
        claim = _lock(path)
        _HELD[path] = claim
    else:
        claim.depth += 1
    try:
        first = claim.depth == 1
        if first:
            _remove_leftovers(path)
        if _check_existing(path, kind, overwrite=overwrite) and first:
            log.info("replacing the earlier aufold output %s", path)
        yield path
    finally:
        claim.depth -= 1
        if claim.depth == 0:
            del _HELD[path]
            _unlock(claim)


@contextmanager
def atomic_folder(out: Path, *, content: str = "") -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out``; on success mark it as aufold's and
    rename it to ``out`` (replacing an earlier output), on any error remove it.

    An ``out`` that the caller has not claimed (:func:`claim_output`) is claimed here with
    the strictest rules: no input to check, nothing to overwrite. The rename is atomic on
    one file system.
    """
    out = _resolved(out)
    with _claimed(out), _write_errors(out):
        with _signals_deferred():  # a stop signal must not fall between creating and guarding
            staging = _mkdtemp(out, PARTIAL_TAG)
        try:
            yield staging
            _finish(staging, out, content)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def write_file(out: Path, data: bytes) -> Path:
    """Write a file output through a temporary file and a rename (claimed as
    :func:`atomic_folder` claims a folder)."""
    out = _resolved(out)
    with _claimed(out, OutputKind.FILE), _write_errors(out):
        handle, staging = tempfile.mkstemp(prefix=f".{out.name}.{PARTIAL_TAG}", dir=out.parent)
        try:
            with os.fdopen(handle, "wb") as stream:
                stream.write(data)
            os.chmod(staging, 0o666 & ~_umask())
            os.replace(staging, out)
        except BaseException:
            Path(staging).unlink(missing_ok=True)
            raise
    return out


def is_aufold_output(path: Path) -> bool:
    """Whether ``path`` is an output aufold wrote and may replace: a folder with the marker,
    a JSON report (an evaluation's; not a plan's plan.json or a marker, which belong to
    their folders), or a PNG figure aufold made."""
    if path.is_dir():
        return _json_format(path / MARKER) == MARKER_FORMAT
    if path.suffix.lower() == ".png":
        return _png_software(path) == PNG_SOFTWARE
    if path.suffix.lower() == ".safetensors":
        return _safetensors_marker(path) in REPLACEABLE_REPORTS
    return _json_format(path) in REPLACEABLE_REPORTS


def marker_ignore_patterns() -> list[str]:
    """What an upload of an output folder leaves out: the marker is local bookkeeping."""
    return [MARKER]


# --- locking -------------------------------------------------------------------------------

def _lock(out: Path) -> _Claim:
    created = _make_parents(out.parent)
    lock_path = out.parent / f".{out.name}{LOCK_SUFFIX}"
    try:
        while True:
            try:
                # O_NOFOLLOW: a link planted at the lock's name must not lead the lock (or its
                # removal) to another file.
                fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o666 & ~_umask())
            except OSError as error:
                if error.errno == errno.ELOOP:
                    raise AufoldError(f"{lock_path} is a symbolic link, not aufold's lock file; "
                                      f"remove it, then run again") from None
                if error.errno == errno.EISDIR:
                    raise AufoldError(f"{lock_path} is a folder, not aufold's lock file; remove "
                                      f"it, then run again") from None
                raise _fs_error(out, error) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise AufoldError(f"another aufold process is writing {out} (it holds "
                                  f"{lock_path.name}); wait for it to finish or choose another "
                                  f"output") from None
            # The previous holder unlinks the lock file as it releases it: a lock taken on a
            # file that is no longer at lock_path protects nothing, so take it again.
            try:
                same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return _Claim(fd, lock_path, created)
            os.close(fd)
    except BaseException:
        _remove_empty(created)
        raise


def _unlock(claim: _Claim) -> None:
    try:
        claim.lock_path.unlink(missing_ok=True)
    finally:
        os.close(claim.lock_fd)
        _remove_empty(claim.created_parents)


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return the ones created, deepest last."""
    missing = [folder, *folder.parents]
    missing = [p for p in missing if not p.exists()][::-1]
    for parent in missing:
        try:
            parent.mkdir()
        except FileExistsError:
            pass
        except OSError as error:
            _remove_empty(missing[:missing.index(parent)])
            raise _fs_error(folder, error) from None
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (the output landed there) or already gone


def _claimed(out: Path, kind: OutputKind = OutputKind.FOLDER) -> AbstractContextManager[Any]:
    """The caller's claim on ``out`` if it holds one, else a new claim that replaces nothing."""
    return nullcontext() if out in _HELD else claim_output(out, kind=kind)


# --- checks --------------------------------------------------------------------------------

def _check_existing(out: Path, kind: OutputKind, *, overwrite: bool) -> bool:
    """Refuse what may not be replaced; return whether an earlier aufold output will be."""
    if not out.exists() and not out.is_symlink():
        return False
    if kind is OutputKind.FOLDER:
        if not out.is_dir():
            raise AufoldError(f"output {out} exists and is not a folder; choose another output "
                              f"folder")
        if not any(out.iterdir()):
            return False
    elif out.is_dir():
        raise AufoldError(f"output {out} is a folder; give a file name such as report.json")
    if not overwrite:
        raise AufoldError(f"output {out} already exists; choose another output or pass "
                          f"--overwrite to replace an earlier aufold output")
    if not is_aufold_output(out):
        what = f"has no {MARKER} marker" if kind is OutputKind.FOLDER else "is not an aufold report"
        raise AufoldError(f"--overwrite only replaces outputs that aufold wrote, and {out} {what}; "
                          f"choose another output, or move it away yourself if you are sure")
    return True


def _overlap_message(out: Path, source: Path) -> str:
    if out == source:
        relation = "is an input of this command"
    elif source in out.parents:
        relation = f"lies inside the input {source}"
    else:
        relation = f"contains the input {source}"
    return (f"output {out} {relation}; aufold never writes over its inputs, with or without "
            f"--overwrite: choose an output outside them")


def _remove_leftovers(out: Path) -> None:
    """Remove the partial outputs of writers that died; only the lock holder may."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:{PARTIAL_TAG}|{RETIRED_TAG})\w+$")
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return
    for leftover in siblings:
        earlier = leftover / out.name
        if (leftover.name.startswith(f".{out.name}.{RETIRED_TAG}") and pattern.match(leftover.name)
                and not out.exists() and earlier.is_dir() and is_aufold_output(earlier)):
            # Killed between the two renames of a replacement: the earlier output is whole.
            log.info("restoring %s from %s, left by an interrupted aufold run", out, leftover)
            os.rename(earlier, out)
        if pattern.match(leftover.name):
            log.info("removing %s, left by an interrupted aufold run", leftover)
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


# --- writing -------------------------------------------------------------------------------

def _finish(staging: Path, out: Path, content: str) -> None:
    marker = {"format": MARKER_FORMAT, "aufold_version": __version__, "content": content}
    (staging / MARKER).write_text(json.dumps(marker) + "\n")
    # Replacing takes two renames; Ctrl-C or SIGTERM between them would leave no output, so
    # they wait until both are done. (After a kill -9 there, the next claim restores the
    # earlier output: see _remove_leftovers.)
    with _signals_deferred():
        if out.exists() or out.is_symlink():
            retired = _mkdtemp(out, RETIRED_TAG)
            os.rename(out, retired / out.name)
            os.rename(staging, out)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, out)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back for the block; they are delivered right after.

    Python runs signal handlers in the main thread whichever thread the kernel picked (torch
    has several), so the handlers are swapped for ones that only take note. Outside the
    main thread, where handlers cannot be set, the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {signum: signal.signal(signum, lambda number, _frame: pending.append(number))
                for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in pending:
            signal.raise_signal(signum)


def _mkdtemp(out: Path, tag: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.{tag}", dir=out.parent))
    os.chmod(folder, 0o777 & ~_umask())
    return folder


@contextmanager
def _write_errors(out: Path) -> Iterator[None]:
    """Turn a full disk, a read-only file system or a refused permission while writing
    ``out`` into one line; a refused read of an input elsewhere stays what it is."""
    try:
        yield
    except OSError as error:
        written = error.filename is None or out.parent in Path(error.filename).resolve().parents
        if error.errno in _FULL_OR_READ_ONLY or (error.errno in _USER_FS_ERRORS and written):
            raise _fs_error(out, error) from None
        raise
    except Exception as error:
        # safetensors reports a full disk as its own error type, with the OS's words inside.
        if "No space left on device" in str(error):
            raise _fs_error(out, OSError(errno.ENOSPC, "No space left on device")) from None
        raise


def _fs_error(out: Path, error: OSError) -> AufoldError:
    reason = error.strerror or type(error).__name__
    hint = ("free some space or write elsewhere" if error.errno in (errno.ENOSPC, errno.EDQUOT)
            else "choose an output you can write to")
    return AufoldError(f"cannot write {out}: {reason}; nothing was written; {hint}")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _resolved(path: str | Path) -> Path:
    expanded_path = expanded(Path(path))
    try:
        return expanded_path.resolve()
    except RuntimeError:  # Python 3.11 and 3.12 raise it for a loop of symbolic links
        raise AufoldError(f"{path} leads into a loop of symbolic links; fix the links") from None


def _png_software(path: Path) -> str | None:
    """The Software text chunk of a PNG file (matplotlib writes it before the image data)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(1 << 16)
    except OSError:
        return None
    start = head.find(b"tEXtSoftware\0")
    if not head.startswith(b"\x89PNG") or start < 0:
        return None
    length = int.from_bytes(head[start - 4:start], "big") - len("Software") - 1
    begin = start + len(b"tEXtSoftware\0")
    return head[begin:begin + length].decode("latin-1")


def _safetensors_marker(path: Path) -> str | None:
    """The aufold format a safetensors file's metadata names, read from its header alone."""
    try:
        with path.open("rb") as stream:
            size = int.from_bytes(stream.read(8), "little")
            if not 0 < size <= 1 << 24:
                return None
            header = json.loads(stream.read(size))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return str(metadata.get(SAFETENSORS_MARKER)) if isinstance(metadata, dict) else None


def _json_format(path: Path) -> str | None:
    try:
        if path.stat().st_size > _MAX_REPORT_BYTES:
            return None  # not a report of ours; do not read a whole weight file to see that
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return str(data.get("format")) if isinstance(data, dict) else None
