"""Limits on what an edit may write: finite numbers, and no absurd scale without consent.

A fold multiplies weights by ``1 + gamma``. With a typo'd ``--alpha 1e30`` the result
is a model of huge or infinite weights that still loads, and in float32 even verifies
against its hooks (both are equally wrong). So every scale factor beyond
:data:`MAX_SCALE` in size needs ``allow_extreme`` (``--allow-extreme``) and is then warned
about, and every tensor is checked finite in its stored dtype before it is written.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from aufold.errors import AufoldError

# |1 + gamma| above this is refused without --allow-extreme. AUSteer's alphas are at most
# a few tens (scores are at most 1), so honest edits stay two orders of magnitude below it.
MAX_SCALE = 1e3
ALLOW_HINT = "pass --allow-extreme if you really mean it"

log = logging.getLogger("aufold")
_warned: set[str] = set()


def check_scale_factors(factors: Iterable[tuple[str, float]], *, allow_extreme: bool,
                        what: str = "scale factor |1 + gamma|", fix: str = "lower --alpha") -> None:
    """Refuse (or, allowed, warn about) factors whose size exceeds :data:`MAX_SCALE`.

    ``factors`` are (label, value) pairs, e.g. ("head layer 3 unit 7", 1 + gamma).
    """
    worst_label, worst = max(factors, key=lambda item: abs(item[1]), default=("", 0.0))
    if abs(worst) <= MAX_SCALE:
        return
    message = (f"the largest {what} is {abs(worst):.6g} ({worst_label}), beyond {MAX_SCALE:g}: "
               f"the edited model would be meaningless")
    if not allow_extreme:
        raise AufoldError(f"{message}; {fix}, or {ALLOW_HINT}")
    if message not in _warned:  # the same edit is checked again on its way to the file
        _warned.add(message)
        log.warning("%s; going on because --allow-extreme was given", message)


def forget_warnings() -> None:
    """Warn again about edits already warned about (each command starts afresh)."""
    _warned.clear()


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Refuse to write a tensor that holds inf or NaN in its stored dtype."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise AufoldError(f"{name} would hold {bad} non-finite value(s) in "
                          f"{str(tensor.dtype).removeprefix('torch.')} after the edit (it "
                          f"overflows); nothing was written: use a smaller --alpha or --scale")
