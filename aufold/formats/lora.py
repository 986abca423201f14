"""The edit as an exact LoRA adapter: scaling |S| columns or rows of W is a rank-|S| update.

With ``g = (1 + gamma) - 1`` (from the same float32 factor the fold multiplies by):

- columns (``head``, ``mlp``: the units are inputs of ``W``):
  ``W' = W + W[:, S] diag(g) E_S^T``, so ``B = W[:, S] * g`` (out x |S|) and
  ``A = E_S^T``, one-hot rows (|S| x in);
- rows (``mlp-out``): ``W' = W + E_S diag(g) W[S, :]``, so ``B = E_S`` one-hot and
  ``A = diag(g) W[S, :]``;
- both on one projection (``mlp`` and ``mlp-out`` in one layer, ``W' = D_r W D_c``):
  ``W' - W = E_R diag(g_R) (W D_c)[R, :] + W[:, C] diag(g_C) E_C^T``, the two stacked.

A row scaling also scales the bias (``b' = D_r b``); only PEFT's ``lora_bias`` (a
bias on ``lora_B``) holds that, so it is switched on only when some edited bias
is non-zero. Factors are float32, which PEFT computes adapters in anyway; every
module is zero-padded to one rank from ADAPTER_RANKS, since serving engines take
one rank for all modules and only these values, and ``lora_alpha = r`` makes
PEFT's scaling exactly 1.
"""

from __future__ import annotations

import json
import shlex

from dataclasses import dataclass

import torch
from peft import LoraConfig
from torch import nn
from transformers import PreTrainedModel

from aufold.card import Artifact, ExportRecord, units_sentence
from aufold.edit import Edit, UnitGroup
from aufold.errors import AufoldError
from aufold.formats.adapter import Adapter, adapter_key, check_adapter_targets
from aufold.modeling import check_site_exists, model_architecture
from aufold.sites import Architecture, check_foldable, site_kind

ADAPTER_RANKS: tuple[int, ...] = (8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class LoraFactors:
    """One projection's exact update ``W' - W = b @ a`` and the change of its bias, unpadded."""

    module: str
    b: torch.Tensor  # [out, n] float32
    a: torch.Tensor  # [n, in] float32
    bias: torch.Tensor | None  # [out] float32, None where the bias does not change

    @property
    def units(self) -> int:
        return int(self.a.shape[0])


@torch.no_grad()
def lora_factors(model: PreTrainedModel, edit: Edit) -> list[LoraFactors]:
    """The exact factors of every projection the edit touches, in the edit's order."""
    check_foldable(edit.sites)
    for site in edit.sites:
        check_site_exists(model, site)
    architecture = model_architecture(model)
    check_adapter_targets(architecture, edit, "LoRA")
    by_module: dict[str, dict[str, UnitGroup]] = {}
    for group in edit.groups():
        module = architecture.module_path(group.site, group.layer)
        by_module.setdefault(module, {})[site_kind(group.site).placement] = group
    return [_factors(name, model.get_submodule(name), architecture, groups)
            for name, groups in by_module.items()]


def _factors(name: str, module: nn.Module, architecture: Architecture,
             groups: dict[str, UnitGroup]) -> LoraFactors:
    weight = architecture.out_in(module.weight).float().cpu()  # adapters are written from CPU
    columns, rows = groups.get("input"), groups.get("output")
    b_parts, a_parts, bias = [], [], None
    column_scaled = weight
    if columns is not None:
        _check_fits(columns, weight.shape[1], name)
        column_scaled = weight.clone()
        column_scaled[:, columns.index] = weight[:, columns.index] * columns.scale
    if rows is not None:
        _check_fits(rows, weight.shape[0], name)
        gain = rows.scale - 1
        b_parts.append(_one_hot(rows.index, weight.shape[0]).T)
        a_parts.append(column_scaled[rows.index] * gain[:, None])
        if getattr(module, "bias", None) is not None:
            change = torch.zeros(weight.shape[0])
            change[rows.index] = module.bias.float().cpu()[rows.index] * gain
            bias = change if bool(change.any()) else None
    if columns is not None:
        b_parts.append(weight[:, columns.index] * (columns.scale - 1))
        a_parts.append(_one_hot(columns.index, weight.shape[1]))
    return LoraFactors(name, torch.cat(b_parts, dim=1), torch.cat(a_parts, dim=0), bias)


def adapter_rank(factors: list[LoraFactors]) -> int:
    """The one rank for every module: the smallest of ADAPTER_RANKS that holds the largest."""
    largest = max(factors, key=lambda f: f.units)
    for rank in ADAPTER_RANKS:
        if largest.units <= rank:
            return rank
    raise AufoldError(f"the edit puts {largest.units} units on {largest.module}, more than "
                      f"{ADAPTER_RANKS[-1]}, the largest adapter rank serving engines take; "
                      f"choose a smaller k or export the full checkpoint (--format checkpoint)")


def lora_adapter(model: PreTrainedModel, edit: Edit, *, base_model: str) -> Adapter:
    """The edit as a PEFT LoRA adapter with one rank for every module it touches."""
    factors = lora_factors(model, edit)
    rank = adapter_rank(factors)
    lora_bias = any(f.bias is not None for f in factors)
    if lora_bias:
        _check_biases(model, factors)
    tensors: dict[str, torch.Tensor] = {}
    for f in factors:
        a = torch.zeros(rank, f.a.shape[1])
        a[: f.units] = f.a
        b = torch.zeros(f.b.shape[0], rank)
        b[:, : f.units] = f.b
        tensors[adapter_key(f.module, "lora_A.weight")] = a
        tensors[adapter_key(f.module, "lora_B.weight")] = b
        if lora_bias:
            tensors[adapter_key(f.module, "lora_B.bias")] = (
                f.bias if f.bias is not None else torch.zeros(f.b.shape[0]))
    config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=[f.module for f in factors], lora_dropout=0.0,
        bias="none", use_rslora=False, use_dora=False, lora_bias=lora_bias, modules_to_save=None,
        fan_in_fan_out=model_architecture(model).layout == "conv1d", task_type="CAUSAL_LM",
        base_model_name_or_path=base_model, inference_mode=True)
    return Adapter(config, tensors)


def lora_artifact(record: ExportRecord, adapter: Adapter) -> Artifact:
    """The card texts of a LoRA adapter."""
    config = adapter.config
    assert isinstance(config, LoraConfig)
    rank, base = config.r, record.base_model
    bias_note = (" It also changes biases (`lora_bias`, PEFT >= 0.14), which some serving "
                 "engines do not load: check yours, or export the full checkpoint."
                 if config.lora_bias else "")
    return Artifact(
        format="lora",
        library_name="peft",
        summary=f"""This is an exact LoRA adapter for `{base}` that applies fine-grained activation
steering (AUSteer, arXiv 2602.04428). {units_sentence(record)} Scaling the
inputs S of a projection W is the rank-|S| update `W[:, S] diag(gamma_S) E_S^T`, and
scaling its outputs is `E_S diag(gamma_S) W[S, :]`; this adapter stores exactly those
factors, zero-padded to rank {rank} in every module, with `lora_alpha = r` so that the
LoRA scaling is 1. Base model + adapter computes what the folded checkpoint computes,
up to float rounding.{bias_note}""",
        usage=f"""With PEFT:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained({record.base_arguments()})
model = PeftModel.from_pretrained(base, {json.dumps(record.location)})
tokenizer = AutoTokenizer.from_pretrained({record.base_arguments()})
merged = model.merge_and_unload()  # optional: the folded checkpoint, up to rounding
```

With vLLM's LoRA support (rank {rank}):

```bash
vllm serve {base} --enable-lora --max-lora-rank {rank} --lora-modules aufold={shlex.quote(record.location)}
```

```python
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

llm = LLM(model="{base}", enable_lora=True, max_lora_rank={rank})
outputs = llm.generate(["Hello"], SamplingParams(max_tokens=64),
                       lora_request=LoRARequest("aufold", 1, {json.dumps(record.location)}))
```""",
        written=f"""`aufold export --format lora`: the exact low-rank factors of the scaled weight
   slices, computed in float32 and padded with zeros to rank {rank}.""",
        settings=(("format", "LoRA adapter (PEFT)"), ("rank", str(rank)),
                  ("target modules", str(len(config.target_modules or ())))),
    )


def _check_biases(model: PreTrainedModel, factors: list[LoraFactors]) -> None:
    # PEFT's lora_bias holds for all targets at once, and merging it needs a base bias.
    for f in factors:
        if getattr(model.get_submodule(f.module), "bias", None) is None:
            raise AufoldError(f"the edit scales a bias, which a LoRA adapter holds only with "
                              f"lora_bias on every module, but {f.module} has no bias; export "
                              f"the bias-carrying sites alone, or use --format ia3 or checkpoint")


def _check_fits(group: UnitGroup, width: int, module: str) -> None:
    if int(group.index.max()) >= width:
        raise AufoldError(f"unit {int(group.index.max())} of site {group.site!r} does not fit "
                          f"{module} ({width} units); the plan was made for another model")


def _one_hot(index: torch.Tensor, width: int) -> torch.Tensor:
    rows = torch.zeros(len(index), width)
    rows[torch.arange(len(index)), index] = 1.0
    return rows
