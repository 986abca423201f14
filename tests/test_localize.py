"""Localization against a deliberately simple implementation: batch 1, no padding, a loop.

The reference finds its modules by name and reads activations with hooks of its
own; it shares no code with aufold.localize beyond the model itself.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
import torch
from tiny_models import ARCHITECTURES, tiny_model, tiny_tokenizer
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from aufold.errors import AufoldError
from aufold.localize import DEFAULT_TIE_TOLERANCE, localize, signs
from aufold.pairs import ContrastivePair
from aufold.tasks import default_data_dir, get_task

# The reference's own map of where sites are: (module-name suffix, input or output).
REFERENCE_SITES = {
    "head": (("self_attn.o_proj", "attn.c_proj"), "input"),
    "mlp": (("mlp.down_proj", "mlp.c_proj"), "input"),
    "mlp-out": (("mlp.down_proj", "mlp.c_proj"), "output"),
}


def _site_modules(model: PreTrainedModel, site: str) -> list[torch.nn.Module]:
    if site == "residual":
        return list(model.base_model.layers if hasattr(model.base_model, "layers") else model.base_model.h)
    suffixes, _ = REFERENCE_SITES[site]
    return [m for name, m in model.named_modules() if name.endswith(suffixes)]


def reference_counts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                     pairs: Sequence[ContrastivePair], sites: Sequence[str], max_length: int = 512,
                     tie_tolerance: float = DEFAULT_TIE_TOLERANCE
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Two full-model forwards per pair, one text at a time, reading the last token.

    A difference within ``tie_tolerance`` times the larger of the two texts' RMS over
    the layer's units counts for neither sign, as documented for aufold.localize.
    """
    seen: dict[str, list[torch.Tensor]] = {site: [] for site in sites}
    handles = []
    for site in sites:
        placement = "output" if site == "residual" else REFERENCE_SITES[site][1]
        for module in _site_modules(model, site):
            if placement == "input":
                hook = (lambda s: lambda _m, a: seen[s].append(a[0][0, -1]))(site)
                handles.append(module.register_forward_pre_hook(hook))
            else:
                hook = (lambda s: lambda _m, _a, o: seen[s].append(
                    (o[0] if isinstance(o, tuple) else o)[0, -1]))(site)
                handles.append(module.register_forward_hook(hook))
    counts = {}
    try:
        for pair in pairs:
            last = []
            for text in (pair.positive_text, pair.negative_text):
                ids = tokenizer(text, return_tensors="pt")["input_ids"][:, -max_length:]
                with torch.no_grad():
                    model(input_ids=ids)
                last.append({s: torch.stack(seen[s]) for s in sites})
                for site in sites:
                    seen[site].clear()
            for site in sites:
                x_pos, x_neg = last[0][site].double(), last[1][site].double()  # (layers, units)
                m = x_pos - x_neg
                width = m.shape[-1]
                scale = torch.stack([torch.linalg.vector_norm(x, dim=-1) for x in (x_pos, x_neg)]).amax(0)
                tie = (tie_tolerance * scale / width ** 0.5)[:, None]
                positive, negative = counts.setdefault(
                    site, (torch.zeros(m.shape, dtype=torch.long), torch.zeros(m.shape, dtype=torch.long)))
                positive += (m > tie).long()
                negative += (m < -tie).long()
    finally:
        for handle in handles:
            handle.remove()
    return counts


def _assert_close_counts(plan, reference, tolerance: int) -> None:  # type: ignore[no-untyped-def]
    for site, (positive, negative) in reference.items():
        assert (plan.counts[site].positive - positive).abs().max() <= tolerance, site
        assert (plan.counts[site].negative - negative).abs().max() <= tolerance, site


def _varied_pairs(count: int, seed: int = 0) -> list[ContrastivePair]:
    rng = random.Random(seed)
    words = "the cat dog sat on a mat and ran far away quickly to 12 34 yes no".split()
    pairs = []
    for _ in range(count):
        prompt = " ".join(rng.choices(words, k=rng.randint(2, 12)))
        positive, negative = rng.sample(words, 2)
        pairs.append(ContrastivePair(prompt, " " + positive, " " + negative + " " * rng.randint(0, 1)))
    return pairs


def test_rounding_level_differences_are_ties() -> None:
    # Row RMS about 0.9: a difference of 1e-7 (about 1.2e-7 once rounded to float32) is a
    # tie, even where the unit itself is near zero; 1e-4 is a sign. Tolerance 0 is strict.
    x_neg = torch.tensor([[1.0, -1.0, 1.0, 1e-6, 1.0, -1.0]])
    x_pos = x_neg + torch.tensor([[1e-7, -1e-7, 1e-4, 1e-7, -1e-4, 0.0]])
    above, below = signs(x_pos, x_neg)
    assert above.tolist() == [[False, False, True, False, False, False]]
    assert below.tolist() == [[False, False, False, False, True, False]]
    above, below = signs(x_pos, x_neg, tie_tolerance=0)
    assert above.tolist() == [[True, False, True, True, False, False]]
    assert below.tolist() == [[False, True, False, False, True, False]]
    # The scale is the larger row of the two, and bfloat16 rows are compared in float32.
    above, below = signs(torch.zeros(1, 4, dtype=torch.bfloat16), torch.tensor([[4.0, 0, 0, 1e-6]]).bfloat16(),
                         tie_tolerance=1e-3)
    assert below.tolist() == [[True, False, False, False]] and not above.any()


def test_tie_tolerance_is_recorded_and_zero_is_strict() -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    pairs = _varied_pairs(8, seed=1)
    strict = localize(model, tokenizer, pairs, ["head"], tie_tolerance=0, progress=False)
    assert strict.settings["tie_tolerance"] == 0
    _assert_close_counts(strict, reference_counts(model, tokenizer, pairs, ["head"], tie_tolerance=0), 1)
    # A wider tolerance only turns signs into ties.
    loose = localize(model, tokenizer, pairs, ["head"], tie_tolerance=0.5, progress=False)
    for strict_count, loose_count in ((strict.counts["head"].positive, loose.counts["head"].positive),
                                      (strict.counts["head"].negative, loose.counts["head"].negative)):
        assert (loose_count <= strict_count).all() and loose_count.sum() < strict_count.sum()
    with pytest.raises(AufoldError, match=r"tie tolerance must be in \[0, 1\)"):
        localize(model, tokenizer, pairs, ["head"], tie_tolerance=1.0, progress=False)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tiny_models_match_the_reference(arch: str) -> None:
    model, tokenizer = tiny_model(arch), tiny_tokenizer()
    pairs = _varied_pairs(12)
    sites = ("head", "mlp", "mlp-out", "residual")
    plan = localize(model, tokenizer, pairs, sites, batch_size=5, progress=False)
    _assert_close_counts(plan, reference_counts(model, tokenizer, pairs, sites), tolerance=1)
    assert plan.num_pairs == 12 and plan.sites == sites


def test_left_truncation_keeps_the_answer_and_is_reported() -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    pairs = _varied_pairs(8, seed=3)
    plan = localize(model, tokenizer, pairs, ["mlp"], max_length=6, progress=False)
    lengths = [len(tokenizer(t)["input_ids"]) for p in pairs for t in (p.positive_text, p.negative_text)]
    assert plan.settings["truncated_texts"] == sum(n > 6 for n in lengths) > 0
    _assert_close_counts(plan, reference_counts(model, tokenizer, pairs, ["mlp"], max_length=6), 1)


def test_chat_template_wraps_the_prompt() -> None:
    model, tokenizer = tiny_model("qwen2"), tiny_tokenizer()
    pairs = _varied_pairs(6, seed=4)
    wrapped = [ContrastivePair(tokenizer.apply_chat_template([{"role": "user", "content": p.prompt}],
                                                             tokenize=False, add_generation_prompt=True),
                               p.positive, p.negative) for p in pairs]
    plan = localize(model, tokenizer, pairs, ["head"], chat_template=True, progress=False)
    assert plan.settings["chat_template"] is True
    _assert_close_counts(plan, reference_counts(model, tokenizer, wrapped, ["head"]), 1)


@pytest.mark.slow
def test_smollm2_on_64_copa_pairs_matches_the_reference(smollm2) -> None:  # type: ignore[no-untyped-def]
    data_dir = default_data_dir()
    if data_dir is None:
        pytest.skip("../shared/data is not present")
    task = get_task("copa")
    pairs = task.contrastive_pairs(task.load("pairs", data_dir)[:64])
    model, tokenizer = smollm2
    sites = ("head", "mlp")
    plan = localize(model, tokenizer, pairs, sites, batch_size=16, progress=False)
    reference = reference_counts(model, tokenizer, pairs, sites)
    _assert_close_counts(plan, reference, tolerance=1)

    # The same top-k: rank the reference's counts by the documented rule, independently.
    keyed = []
    for order, site in enumerate(sites):
        positive, negative = reference[site]
        for layer in range(positive.shape[0]):
            for unit in range(positive.shape[1]):
                score = max(int(positive[layer, unit]), int(negative[layer, unit]))
                keyed.append((-score, layer, order, unit, site))
    keyed.sort()
    top = [(site, layer, unit) for _, layer, _, unit, site in keyed[:100]]
    ours = [(u.site, u.layer, u.unit) for u in plan.ranking(k=100)]
    differing = set(top) ^ set(ours)
    assert ours == top, differing
