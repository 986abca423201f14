"""Writing output folders atomically: complete, or not there at all."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from aufold.errors import AufoldError


def check_output_folder(out: str | Path, *, overwrite: bool, inputs: tuple[Path | None, ...] = ()) -> Path:
    """Refuse an output that would clobber data or land inside an input; return it resolved."""
    out = Path(out).expanduser().resolve()
    for source in inputs:
        if source is not None and (out == source or source in out.parents):
            raise AufoldError(f"output folder {out} is inside the input folder {source}; "
                              f"write the output somewhere else so the input stays untouched")
    if out.exists() and not out.is_dir():
        raise AufoldError(f"output {out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise AufoldError(f"output folder {out} exists and is not empty; choose another --out "
                          f"or pass --overwrite")
    return out


@contextmanager
def atomic_folder(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; rename it to ``out`` only on success.

    The temporary folder sits in the same parent so the final rename is atomic on
    one file system. On any error it is removed and an existing ``out`` is kept.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield staging
        if out.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            out.rename(retired / out.name)
            staging.rename(out)
            shutil.rmtree(retired)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

