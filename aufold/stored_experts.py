"""Stacked experts in a checkpoint that stores each expert apart, for the streaming fold.

transformers 5 holds a block's experts as one [E, ...] tensor in memory, but most
checkpoints (Mixtral's and Qwen-MoE's on the Hub, and ``save_pretrained``'s own output)
store one 2D tensor per expert, under names of their own. transformers states how the
two correspond, as data: its checkpoint conversion mapping
(``transformers.conversion_mapping``) has, per model type, renamings (Mixtral's
``.block_sparse_moe.`` is ``.mlp.`` in memory) and converters (``.experts.*.w2.weight``
stacked along dim 0 is ``.experts.down_proj``). Where a converter says that a tensor is
a plain stack of per-expert tensors, slice e of the in-memory tensor *is* stored tensor
e, so an edit of the stack splits into one edit per stored expert, and the fold streams.
Any other conversion (a concatenation, a transpose) is left to loading the model whole.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Mapping, Sequence

from aufold.checkpoint import stored_name
from aufold.errors import AufoldError
from aufold.fold import TensorEdit

_PLAIN = re.compile(r"^[\w.*]+$")  # a pattern that is a name with one wildcard, not a regex


def per_expert_names(name: str, model_type: str, stored: Mapping[str, str],
                     experts: int | None = None) -> list[str] | None:
    """The stored names of experts 0, 1, ... whose stack along dim 0 is the in-memory tensor
    ``name``, as transformers' conversion mapping for ``model_type`` states it; None where
    it states no plain stack for ``name`` or the checkpoint lacks expert 0."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import MergeModulelist, WeightConverter, WeightRenaming

    transforms = get_checkpoint_conversion_mapping(model_type) or []
    renamings = [(source, target) for transform in transforms
                 if isinstance(transform, WeightRenaming)
                 for source, target in zip(transform.source_patterns, transform.target_patterns)
                 if _PLAIN.match(source) and _PLAIN.match(target)]
    for transform in transforms:
        if not isinstance(transform, WeightConverter) or len(transform.source_patterns) != 1 \
                or len(transform.target_patterns) != 1:
            continue
        operations = transform.operations
        if len(operations) != 1 or not isinstance(operations[0], MergeModulelist) \
                or operations[0].dim != 0:
            continue
        source, target = transform.source_patterns[0], transform.target_patterns[0]
        if not name.endswith(target) or source.count("*") != 1 or not _PLAIN.match(source):
            continue
        for template in _stored_templates(name[:-len(target)] + source, renamings):
            names = []
            for expert in itertools.count():
                found = stored_name(template.replace("*", str(expert)), stored)
                if found is None:
                    break
                names.append(found)
            if names:
                if experts is not None and len(names) != experts:
                    raise AufoldError(f"the checkpoint stores {len(names)} experts for {name} "
                                      f"({names[0]}, ...), but the model has {experts}; the "
                                      f"checkpoint is incomplete or belongs to another model")
                return names
    return None


def _stored_templates(template: str, renamings: Sequence[tuple[str, str]]) -> list[str]:
    """A stored name (``*`` for the expert) as the in-memory names read, then the same with
    each renaming undone (in-memory -> stored)."""
    templates = [template]
    for source, target in renamings:
        templates += [each.replace(target, source) for each in templates if target in each]
    return templates


def split_by_expert(tensor_edit: TensorEdit, experts: int,
                    stored_shape: Callable[[int], Sequence[int]], name: str
                    ) -> dict[int, TensorEdit]:
    """The edit of a stacked [E, ...] tensor as edits of its E slices, by expert, each
    slice's axes one lower; experts the edit leaves alone are left out.

    A scaling on a stacked axis scales the same slices of every expert; the (expert, axis)
    units of expert neurons scale their own expert's slice only. ``stored_shape(e)`` is
    the shape of expert e's stored tensor; ``name`` names the stacked tensor in errors.
    """
    split: dict[int, TensorEdit] = {}
    for number, axes in enumerate(tensor_edit.steps):
        for axis, (index, scale) in axes.items():
            if isinstance(axis, int):
                if axis == 0:
                    raise AufoldError(f"the edit scales whole experts of {name}, which cannot "
                                      f"be split into per-expert tensors; aufold's sites never "
                                      f"do this, so the edit was not made by aufold")
                for expert in range(experts):
                    edit = split.setdefault(expert, TensorEdit(optional=tensor_edit.optional))
                    edit.step(number)[axis - 1] = (index, scale)
                continue
            expert_axis, inner = axis
            if expert_axis != 0:
                raise AufoldError(f"the expert neurons of {name} are indexed by axis "
                                  f"{expert_axis}, but only a stack on axis 0 can be split into "
                                  f"per-expert tensors; load the model whole to fold it")
            width = stored_shape(0)[inner - 1]
            owners = index // width
            if int(owners.max()) >= experts:
                raise AufoldError(f"the edit steers expert {int(owners.max())} of {name}, but "
                                  f"the checkpoint stores {experts} experts; the plan was made "
                                  f"for another model: localize again on this one")
            for expert in owners.unique().tolist():
                mine = owners == expert
                edit = split.setdefault(expert, TensorEdit(optional=tensor_edit.optional))
                edit.step(number)[inner - 1] = (index[mine] % width, scale[mine])
    return split
