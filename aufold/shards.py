"""Data-parallel localization: count disjoint parts of the pairs apart, then add the counts.

The counters are sums over pairs, so any split of the pairs can be counted in
separate processes (or machines) and added. Two ways:

- ``aufold localize --shard I/N`` writes the partial counts of part I (0-based)
  of N; ``aufold merge-counts`` adds the N parts into one plan, and refuses parts
  of different models, sites, settings or pair files, or a missing or repeated part.
- under ``torchrun``, each rank counts its part and the counters are summed with
  ``torch.distributed.all_reduce``; every rank ends with the whole plan.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from aufold.errors import AufoldError
from aufold.localize import localize
from aufold.pairs import ContrastivePair, validate_pairs
from aufold.plan import Plan, SiteCounts

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from aufold.layerwise import LayerwiseModel

SHARD_KEY = "shard"
# Settings that count something per pair: added when parts merge; all others must agree.
ADDITIVE_SETTINGS = ("truncated_texts", "full_text_pairs")


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N), with 0 <= I < N."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise AufoldError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if count < 1 or not 0 <= index < count:
        raise AufoldError(f"--shard {text}: need 0 <= I < N (parts are numbered from 0)")
    return index, count


def shard_pairs(pairs: Sequence[ContrastivePair], index: int, count: int) -> list[ContrastivePair]:
    """Part ``index`` of ``count`` contiguous, near-equal parts of the pairs."""
    n = len(pairs)
    return list(pairs[index * n // count:(index + 1) * n // count])


def pairs_digest(pairs: Sequence[ContrastivePair]) -> str:
    """A hash of the pairs, in order, so parts of different pair files cannot merge."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(json.dumps([pair.prompt, pair.positive, pair.negative]).encode())
        digest.update(b"\n")
    return f"sha256:{digest.hexdigest()[:32]}"


def localize_shard(model: PreTrainedModel | LayerwiseModel, tokenizer: PreTrainedTokenizerBase,
                   pairs: Sequence[ContrastivePair], sites: Sequence[str], *, index: int, count: int,
                   **options: Any) -> Plan:
    """The partial counts of part ``index`` of ``count``, marked so that merge-counts can check them."""
    pairs = validate_pairs(pairs)
    if count > len(pairs):
        raise AufoldError(f"cannot split {len(pairs)} pairs into {count} parts; use fewer parts")
    plan = localize_any(model, tokenizer, shard_pairs(pairs, index, count), sites, **options)
    plan.settings[SHARD_KEY] = {"index": index, "count": count, "total_pairs": len(pairs),
                                "pairs": pairs_digest(pairs)}
    return plan


def merge_counts(parts: Sequence[Plan]) -> Plan:
    """Add the partial counts of every part into one plan, after checking that they belong together."""
    if not parts:
        raise AufoldError("merge-counts needs the partial plans of every part")
    shards = []
    for number, part in enumerate(parts):
        shard = part.settings.get(SHARD_KEY)
        if not isinstance(shard, dict):
            raise AufoldError(f"plan #{number + 1} ({part.model}) holds no partial counts; "
                              f"make each part with `aufold localize --shard I/N`")
        _check_part(number, shard, part.settings)
        shards.append(shard)
    first, first_shard = parts[0], shards[0]
    common = _common_settings(first)
    for part, shard in zip(parts[1:], shards[1:]):
        if (part.model, part.fingerprint) != (first.model, first.fingerprint):
            raise AufoldError(f"the parts come from different models ({first.model}, "
                              f"{first.fingerprint} and {part.model}, {part.fingerprint}); "
                              f"localize every part with the same model")
        if part.sites != first.sites or any(part.counts[s].positive.shape != first.counts[s].positive.shape
                                            for s in first.sites):
            raise AufoldError(f"the parts have different sites ({', '.join(first.sites)} and "
                              f"{', '.join(part.sites)}); localize every part with the same --site")
        if _common_settings(part) != common:
            raise AufoldError(f"the parts were made with different settings ({common} and "
                              f"{_common_settings(part)}); use the same options for every part")
        if (shard["count"], shard["pairs"]) != (first_shard["count"], first_shard["pairs"]):
            raise AufoldError("the parts split different pair files or into different numbers of "
                              "parts; localize every part from the same --pairs with the same N")
    count = first_shard["count"]
    indices = sorted(shard["index"] for shard in shards)
    if indices != list(range(count)):
        missing = sorted(set(range(count)) - set(indices))
        repeated = sorted({i for i in indices if indices.count(i) > 1})
        raise AufoldError(f"merge-counts needs each of the {count} parts exactly once"
                          f"{f'; missing: {missing}' if missing else ''}"
                          f"{f'; repeated: {repeated}' if repeated else ''}")
    counts = {site: SiteCounts(sum(p.counts[site].positive for p in parts),  # type: ignore[misc]
                               sum(p.counts[site].negative for p in parts))  # type: ignore[misc]
              for site in first.sites}
    settings = {**common, **{key: sum(int(p.settings.get(key, 0)) for p in parts)
                             for key in ADDITIVE_SETTINGS}}
    return Plan(model=first.model, fingerprint=first.fingerprint,
                num_pairs=sum(p.num_pairs for p in parts), counts=counts, settings=settings,
                aufold_version=first.aufold_version)


def _check_part(number: int, shard: dict[str, Any], settings: dict[str, Any]) -> None:
    """A part's shard record and additive settings, as `localize --shard` writes them."""
    fields = {"index": shard.get("index"), "count": shard.get("count"), "pairs": shard.get("pairs")}
    valid = (all(type(fields[key]) is int for key in ("index", "count"))
             and isinstance(fields["pairs"], str) and 0 <= fields["index"] < fields["count"]
             and all(type(settings.get(key, 0)) is int and settings.get(key, 0) >= 0
                     for key in ADDITIVE_SETTINGS))
    if not valid:
        raise AufoldError(f"plan #{number + 1} is damaged: its {SHARD_KEY!r} or counted settings "
                          f"are not what `aufold localize --shard I/N` writes; localize that part "
                          f"again")


def _common_settings(plan: Plan) -> dict[str, Any]:
    return {key: value for key, value in plan.settings.items()
            if key not in ADDITIVE_SETTINGS and key != SHARD_KEY}


def localize_pairs(model: PreTrainedModel | LayerwiseModel, tokenizer: PreTrainedTokenizerBase,
                   pairs: Sequence[ContrastivePair], sites: Sequence[str], *,
                   shard: str | None = None, **options: Any) -> Plan:
    """Localize all pairs, one part of them (``shard="I/N"``), or this torchrun rank's part,
    summed over ranks: what ``aufold localize`` runs."""
    if shard is not None:
        if distributed_world() is not None:
            raise AufoldError("use either --shard or torchrun, not both: under torchrun the "
                              "ranks split the pairs themselves")
        index, count = parse_shard(shard)
        return localize_shard(model, tokenizer, pairs, sites, index=index, count=count, **options)
    if distributed_world() is not None:
        return localize_distributed(model, tokenizer, pairs, sites, **options)
    return localize_any(model, tokenizer, pairs, sites, **options)


def localize_any(model: PreTrainedModel | LayerwiseModel, tokenizer: PreTrainedTokenizerBase,
                 pairs: Sequence[ContrastivePair], sites: Sequence[str], **options: Any) -> Plan:
    """Localize a model loaded whole, or one that streams layer by layer."""
    from aufold.layerwise import LayerwiseModel
    from aufold.layerwise.localize import localize_layerwise

    if isinstance(model, LayerwiseModel):
        return localize_layerwise(model, tokenizer, pairs, sites, **options)
    return localize(model, tokenizer, pairs, sites, **options)


def is_main_process() -> bool:
    """False on every torchrun rank but the first, which alone writes the plan."""
    world = distributed_world()
    return world is None or world[0] == 0


# --- torchrun ---------------------------------------------------------------------------------


def distributed_world() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when started by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(device: str | None) -> str | None:
    """Under torchrun, ``cuda`` means this rank's own GPU."""
    world = distributed_world()
    if world is not None and device == "cuda":
        return f"cuda:{world[2]}"
    return device


def localize_distributed(model: PreTrainedModel | LayerwiseModel, tokenizer: PreTrainedTokenizerBase,
                         pairs: Sequence[ContrastivePair], sites: Sequence[str],
                         **options: Any) -> Plan:
    """Each torchrun rank counts its part of the pairs; the counters are summed across ranks.

    Uses the process group if one is set up, else starts one from torchrun's
    environment (NCCL for a model on a GPU, gloo otherwise). Every rank returns
    the same whole plan.
    """
    import torch.distributed as dist

    world = distributed_world()
    if world is None:
        raise AufoldError("localize_distributed runs under torchrun with more than one process")
    rank, size, _ = world
    device = model.device
    started_group = not dist.is_initialized()
    if started_group:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        return _localize_and_reduce(model, tokenizer, pairs, sites, rank, size, device, **options)
    finally:
        # A group left running aborts its process at exit now and then ("terminate called
        # without an active exception" from gloo's threads), failing a finished run.
        if started_group:
            dist.destroy_process_group()


def _localize_and_reduce(model: PreTrainedModel | LayerwiseModel, tokenizer: PreTrainedTokenizerBase,
                         pairs: Sequence[ContrastivePair], sites: Sequence[str], rank: int,
                         size: int, device: torch.device, **options: Any) -> Plan:
    """This rank's part of the pairs, localized, with the counts summed over every rank."""
    import torch.distributed as dist

    pairs = validate_pairs(pairs)
    if size > len(pairs):
        raise AufoldError(f"cannot split {len(pairs)} pairs over {size} processes")
    part = localize_any(model, tokenizer, shard_pairs(pairs, rank, size), sites, **options)
    reduce_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    scalars = torch.tensor([part.num_pairs, *(int(part.settings.get(k, 0)) for k in ADDITIVE_SETTINGS)],
                           dtype=torch.long, device=reduce_device)
    dist.all_reduce(scalars)
    counts = {}
    for site in part.sites:
        both = torch.stack([part.counts[site].positive, part.counts[site].negative]).to(reduce_device)
        dist.all_reduce(both)
        counts[site] = SiteCounts(both[0].cpu(), both[1].cpu())
    totals = scalars.tolist()
    settings = {**part.settings, **dict(zip(ADDITIVE_SETTINGS, totals[1:]))}
    return Plan(model=part.model, fingerprint=part.fingerprint, num_pairs=totals[0], counts=counts,
                settings=settings)
