"""aufold: fine-grained activation steering (AUSteer) folded into the weights of a checkpoint.

    plan = aufold.localize(model, tokenizer, pairs, sites=["head"])
    edit = plan.select(k=32, alpha=5.0)
    with aufold.steer(model, edit):       # hook mode
        model.generate(...)
    aufold.fold_model(model, edit)        # or fold it into the weights

The names below load on first use, so importing a light part of aufold (the command
line's option tables, for `aufold --help`) does not import torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

# Public name -> the module that defines it.
_API: dict[str, str] = {
    "architecture_of": "aufold.sites", "SITES": "aufold.sites", "AufoldError": "aufold.errors",
    "ContrastivePair": "aufold.pairs", "read_pairs": "aufold.pairs", "Edit": "aufold.edit",
    "SteeredUnit": "aufold.edit", "Plan": "aufold.plan", "Recipe": "aufold.recipe",
    "Component": "aufold.recipe",
    "export": "aufold.export",
    "fold_model": "aufold.fold", "load_model": "aufold.modeling", "localize": "aufold.localize",
    "steer": "aufold.steer", "verify": "aufold.verify", "__version__": "aufold.version",
}
__all__ = sorted(_API)


class _Package(types.ModuleType):
    """Resolves the public names on first use. Four of them (export, localize, steer, verify)
    are also submodules: importing one sets the package attribute to the module, which
    would hide the function, so that assignment is ignored for public names."""

    def __getattr__(self, name: str) -> Any:
        if name not in _API:
            raise AttributeError(f"module 'aufold' has no attribute {name!r}")
        value = getattr(importlib.import_module(_API[name]), name)
        self.__dict__[name] = value
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted({*super().__dir__(), *_API})


sys.modules[__name__].__class__ = _Package
