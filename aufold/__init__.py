"""aufold: fine-grained activation steering (AUSteer) folded into the weights of a checkpoint.

    plan = aufold.localize(model, tokenizer, pairs, sites=["head"])
    edit = plan.select(k=32, alpha=5.0)
    with aufold.steer(model, edit):       # hook mode
        model.generate(...)
    aufold.fold_model(model, edit)        # or fold it into the weights
"""

from aufold.edit import Edit, SteeredUnit
from aufold.errors import AufoldError
from aufold.export import export
from aufold.fold import fold_model
from aufold.localize import localize
from aufold.modeling import load_model
from aufold.pairs import ContrastivePair, read_pairs
from aufold.plan import Plan
from aufold.sites import ARCHITECTURES, SITES
from aufold.steer import steer
from aufold.verify import verify
from aufold.version import __version__

__all__ = [
    "ARCHITECTURES", "SITES", "AufoldError", "ContrastivePair", "Edit", "Plan", "SteeredUnit",
    "__version__", "export", "fold_model", "load_model", "localize", "read_pairs", "steer", "verify",
]
