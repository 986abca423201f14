"""Sites: where a model's atomic units live, derived from the model itself.

- :mod:`aufold.sites.kinds`: what a site is (head, mlp, mlp-out, residual), in
  architecture-independent terms, and where additive vectors apply;
- :mod:`aufold.sites.architecture`: where a given model's sites are, layer by layer,
  and which tensors a fold scales;
- :mod:`aufold.sites.derive`: how that is found, from transformers' tensor-parallel
  plan checked against the modules;
- :mod:`aufold.sites.overrides`: the few facts transformers does not state.
"""

from aufold.sites.architecture import (
    BUILT_IN_BIAS,
    GGUF_LAYERS,
    Architecture,
    FoldTensor,
    LayerSites,
    VectorBias,
    WeightLayout,
)
from aufold.sites.kinds import (
    SITE_ORDER,
    SITES,
    VECTOR_SITES,
    Placement,
    SiteKind,
    VectorSite,
    check_foldable,
    site_kind,
    vector_target,
)
from aufold.sites.overrides import OVERRIDES



def __getattr__(name: str) -> object:
    # The derivation imports torch; the option tables of the command line need only the
    # site kinds, so it loads on first use.
    if name in ("architecture_for", "architecture_of"):
        from aufold.sites import derive

        return getattr(derive, name)
    raise AttributeError(f"module 'aufold.sites' has no attribute {name!r}")


__all__ = [
    "BUILT_IN_BIAS", "GGUF_LAYERS", "OVERRIDES", "SITES", "SITE_ORDER", "VECTOR_SITES",
    "Architecture", "FoldTensor", "LayerSites", "Placement", "SiteKind", "VectorBias",
    "VectorSite", "WeightLayout", "architecture_for", "architecture_of", "check_foldable",
    "site_kind", "vector_target",
]
