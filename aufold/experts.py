"""The neurons inside stacked Mixture-of-Experts blocks, read and scaled at run time.

transformers 5 keeps a block's experts as stacked tensors ([E, out, in]) and computes
all of them inside one module, with no submodule per expert to hook. Neuron (e, n) of
such a block is input column n of expert e's slice of the stacked down projection. To
reach it, a hook runs the experts' eager forward (the per-expert loop that each of
transformers' experts implementations reproduces, see
``transformers.integrations.moe.use_experts_implementation``) under a torch function
mode that watches two operations:

- the gather of one expert's rows from the block input (``hidden_states[token_idx]``),
  which says which tokens the expert computes;
- the product of some rows with that expert's slice of the down projection
  (``F.linear(x, down_proj[e])`` or ``x @ down_proj[e]``): the rows of ``x`` are the
  expert's neurons at those tokens, and a hook may replace them.

The hooks of one experts module run in the order they were registered. A forward that
routed tokens but showed no down projection raises, so experts that compute another way
fail loudly instead of being read or steered in part.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from aufold.errors import AufoldError

if TYPE_CHECKING:
    from aufold.sites import FoldTensor


@dataclass(frozen=True)
class ExpertNeurons:
    """One expert's neurons during a forward: ``neurons[r]`` is computed for row
    ``tokens[r]`` of the experts' input (the block's tokens, flattened)."""

    expert: int
    tokens: torch.Tensor  # int64 [rows]
    neurons: torch.Tensor  # [rows, neurons per expert]


@dataclass(frozen=True)
class StackedExperts:
    """One layer's experts module in a loaded model and its stacked down projection
    ``module.<down>``, whose input columns are the experts' neurons."""

    path: str  # the experts module's name in the model
    module: nn.Module
    down: str
    units: int  # experts x neurons per expert
    per_expert: int

    @classmethod
    def of(cls, model: nn.Module, neurons: FoldTensor) -> StackedExperts:
        """Where the expert neurons that ``neurons`` (a layer's fold tensor) names are."""
        path, _, down = neurons.name.rpartition(".")
        shape = model.get_parameter(neurons.name).shape
        return cls(path, model.get_submodule(path), down, neurons.units(shape),
                   shape[neurons.axis])


# A hook sees one expert's neurons and returns the neurons to use instead, or None.
ExpertHook = Callable[[ExpertNeurons], "torch.Tensor | None"]

_HOOKS = "_aufold_expert_hooks"  # the hooks of one experts module, in order


class ExpertHookHandle:
    """Removes one expert hook; the experts' own forward returns with the last one."""

    def __init__(self, experts: nn.Module, hook: ExpertHook) -> None:
        self._experts, self._hook = experts, hook

    def remove(self) -> None:
        hooks: list[ExpertHook] = self._experts.__dict__.get(_HOOKS, [])
        if self._hook in hooks:
            hooks.remove(self._hook)
        if not hooks and _HOOKS in self._experts.__dict__:
            del self._experts.__dict__[_HOOKS]
            del self._experts.forward


def register_expert_hook(experts: nn.Module, down: str, hook: ExpertHook) -> ExpertHookHandle:
    """Call ``hook`` with each expert's neurons at the input of its slice of ``experts.<down>``
    (a stacked [E, ...] down projection), at every forward, until the handle is removed."""
    hooks: list[ExpertHook] | None = experts.__dict__.get(_HOOKS)
    if hooks is None:
        if hasattr(experts, "_hf_hook") or "forward" in experts.__dict__:
            raise AufoldError(
                f"the experts module {type(experts).__name__} has its forward replaced (accelerate "
                f"offloads it with device_map), so aufold cannot run their per-expert loop; load "
                f"the model without device_map offload to use the 'mlp' site of its experts")
        hooks = []
        eager = _eager_forward(type(experts))

        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden = args[0] if args else next(iter(kwargs.values()))
            # Looked up at each call: a streamed layer's weights are replaced when it loads.
            with _Tap(getattr(experts, down), hidden, hooks) as tap:
                output = eager(experts, *args, **kwargs)
            if hidden.shape[0] and not tap.seen:
                raise AufoldError(
                    f"aufold could not find the experts' down projection in the forward of "
                    f"{type(experts).__name__} (it looks for F.linear(x, {down}[e]) or "
                    f"x @ {down}[e]), so it cannot reach their neurons; use the 'mlp-out' or "
                    f"'head' site of this model")
            return output

        experts.__dict__[_HOOKS] = hooks
        experts.forward = forward
    hooks.append(hook)
    return ExpertHookHandle(experts, hook)


def _eager_forward(experts_class: type[nn.Module]) -> Callable[..., Any]:
    """The per-expert loop of an experts class: the forward that transformers' experts
    implementations wrap (and dispatch away from), else the class's own."""
    forward = experts_class.forward
    return getattr(forward, "__wrapped__", forward)


# Operations that give a copy or view of an expert's weight slice to multiply with.
_WEIGHT_VIEWS = (torch.Tensor.float, torch.Tensor.to, torch.Tensor.type_as,
                 torch.Tensor.contiguous)
# Products whose second operand may be an expert's down projection slice.
_PRODUCTS = (torch.nn.functional.linear, torch.matmul, torch.Tensor.__matmul__,
             torch.Tensor.matmul)


class _Tap(TorchFunctionMode):
    """Active during one experts forward: finds each expert's neurons and runs the hooks."""

    def __init__(self, weight: torch.Tensor, hidden: torch.Tensor,
                 hooks: list[ExpertHook]) -> None:
        super().__init__()
        self.weight, self.hidden, self.hooks = weight, hidden, hooks
        self.tokens: torch.Tensor | None = None
        self.slices: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}
        self.seen = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        expert = None
        if func is torch.Tensor.__getitem__ and args[0] is self.hidden:
            index = args[1]
            self.tokens = index if torch.is_tensor(index) and index.dim() == 1 \
                and not index.dtype.is_floating_point and index.dtype != torch.bool else None
        elif func is torch.Tensor.__getitem__ and args[0] is self.weight:
            expert = _single_index(args[1])
        elif func in _WEIGHT_VIEWS and args:
            expert = self._expert_of(args[0])
        elif func in _PRODUCTS and len(args) >= 2:
            found = self._expert_of(args[1])
            if found is not None:
                args = (self._run_hooks(found, args[0]), *args[1:])
        output = func(*args, **kwargs)
        if expert is not None and torch.is_tensor(output):
            self.slices[id(output)] = (weakref.ref(output), expert)
        return output

    def _expert_of(self, tensor: Any) -> int | None:
        entry = self.slices.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def _run_hooks(self, expert: int, neurons: torch.Tensor) -> torch.Tensor:
        tokens = self.tokens
        if tokens is None or neurons.dim() != 2 or tokens.shape[0] != neurons.shape[0]:
            raise AufoldError(
                "aufold could not tell which tokens an expert's neurons belong to (the experts' "
                "forward did not gather its rows as hidden_states[token_index]); use the "
                "'mlp-out' or 'head' site of this model")
        self.seen += 1
        for hook in self.hooks:
            replaced = hook(ExpertNeurons(expert, tokens, neurons))
            if replaced is not None:
                neurons = replaced
        return neurons


def _single_index(index: Any) -> int | None:
    """The expert number of ``weight[index]`` when it selects one expert's slice."""
    if isinstance(index, int):
        return index
    if torch.is_tensor(index) and index.dim() == 0 and not index.dtype.is_floating_point:
        return int(index)
    return None
