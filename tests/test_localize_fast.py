"""How localization saves work (shared prompts, full-text fallback, early stop).

Counts are checked against the simple batch-1 reference of ``test_localize``.
"""

from __future__ import annotations

import random

import pytest
import torch
from test_localize import _assert_close_counts, _varied_pairs, reference_counts
from tiny_models import tiny_model, tiny_tokenizer

from aufold.localize import encode_pairs, localize, prompt_cache_works
from aufold.modeling import site_module
from aufold.pairs import ContrastivePair

SITES = ("head", "mlp", "mlp-out", "residual")


def _merging_pairs() -> list[ContrastivePair]:
    """Pairs whose answer merges with the prompt's last characters into one token, and pairs
    whose answer starts a new token."""
    return [
        ContrastivePair("The quick brown fo", "x", "ur"),  # "fo" + "x" is one token: "fox"
        ContrastivePair("I love this mov", "ie.", "e."),  # " mov" + "ie" is one token
        ContrastivePair("The answer is", " yes", " no"),
        ContrastivePair("I love this movie. It was", " good", " bad"),
        ContrastivePair("Count with me: one, two,", " three", " four"),
    ]


def test_pairs_share_their_prompt_only_when_its_tokens_are_a_prefix() -> None:
    tokenizer = tiny_tokenizer()
    pairs = _merging_pairs()
    encoded, truncated = encode_pairs(tokenizer, pairs)
    assert truncated == 0
    for pair, item in zip(pairs, encoded):
        full = [tokenizer(pair.positive_text)["input_ids"], tokenizer(pair.negative_text)["input_ids"]]
        if item.prompt:
            assert [item.prompt + item.positive, item.prompt + item.negative] == full
            assert item.positive and item.negative
        else:
            assert [item.positive, item.negative] == full
    assert [bool(item.prompt) for item in encoded] == [False, False, True, True, True]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_mixed_shared_and_full_pairs_match_the_reference(arch: str) -> None:
    model, tokenizer = tiny_model(arch), tiny_tokenizer()
    pairs = _merging_pairs() + _varied_pairs(9, seed=5)
    plan = localize(model, tokenizer, pairs, SITES, batch_size=4, progress=False)
    assert plan.settings["full_text_pairs"] == 2
    _assert_close_counts(plan, reference_counts(model, tokenizer, pairs, SITES), tolerance=1)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
def test_sliding_window_with_prompts_longer_than_the_window(arch: str) -> None:
    """Prompts of many lengths around the 32-token window: padding must not shift the window."""
    rng = random.Random(7)
    words = "the cat dog sat on a mat and ran far away quickly to yes no".split()
    pairs = [ContrastivePair(" ".join(rng.choices(words, k=rng.randint(8, 30))), " yes", " no")
             for _ in range(12)]
    model, tokenizer = tiny_model(arch), tiny_tokenizer()
    lengths = {len(tokenizer(p.prompt)["input_ids"]) for p in pairs}
    assert min(lengths) < 32 < max(lengths) and len(lengths) > 4
    plan = localize(model, tokenizer, pairs, SITES, batch_size=6, progress=False)
    assert plan.settings["full_text_pairs"] == 0
    _assert_close_counts(plan, reference_counts(model, tokenizer, pairs, SITES), tolerance=1)


def test_prompt_runs_once_and_passes_stop_after_the_last_site_read() -> None:
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    pairs = _varied_pairs(8, seed=1)
    # The once-per-model probe that prompt sharing is exact for this model runs first.
    assert prompt_cache_works(model)
    rows: list[int] = []
    calls = {"last_mlp": 0, "norm": 0, "lm_head": 0}
    layers = model.config.num_hidden_layers
    handles = [
        model.get_input_embeddings().register_forward_hook(
            lambda _m, args, _o: rows.append(args[0].shape[0])),
        site_module(model, "mlp", layers - 1).register_forward_hook(
            lambda *_: calls.__setitem__("last_mlp", calls["last_mlp"] + 1)),
        model.model.norm.register_forward_hook(lambda *_: calls.__setitem__("norm", calls["norm"] + 1)),
        model.lm_head.register_forward_hook(lambda *_: calls.__setitem__("lm_head", calls["lm_head"] + 1)),
    ]
    try:
        plan = localize(model, tokenizer, pairs, ["head"], batch_size=8, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    assert plan.settings["full_text_pairs"] == 0
    assert rows == [8, 16]  # the 8 prompts once, then the 16 answers on their cache
    assert calls == {"last_mlp": 0, "norm": 0, "lm_head": 0}


def test_the_answers_really_run_on_the_prompt_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shared-prompt counts equal the full texts' only because the answers read the prompt's
    keys and values: answers run without their prompt count differently. A transformers
    that ignored the cache argument is refused instead of silently changing every count."""
    import importlib

    from transformers import DynamicCache

    from aufold.errors import AufoldError

    localize_module = importlib.import_module("aufold.localize")  # aufold.localize is also a function

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    pairs = _varied_pairs(12, seed=3)
    reference = reference_counts(model, tokenizer, pairs, SITES)
    plan = localize(model, tokenizer, pairs, SITES, batch_size=4, progress=False)
    assert plan.settings["full_text_pairs"] == 0
    _assert_close_counts(plan, reference, tolerance=1)

    without_prompt = [ContrastivePair("", p.positive, p.negative) for p in pairs]
    alone = localize(model, tokenizer, without_prompt, SITES, batch_size=4, progress=False)
    assert any(not torch.equal(alone.counts[s].positive, reference[s][0]) for s in SITES)

    run = localize_module._LastTokenReader.run

    def fill_another_cache(self, model, batch, *, cache=None, **options):  # type: ignore[no-untyped-def]
        ignored = DynamicCache(config=model.config) if cache is not None else None
        return run(self, model, batch, cache=ignored, **options)

    monkeypatch.setattr(localize_module._LastTokenReader, "run", fill_another_cache)
    with pytest.raises(AufoldError, match="did not use the prompt cache"):
        localize(model, tokenizer, pairs, SITES, batch_size=4, progress=False)


def test_localization_emits_no_deprecation_warning() -> None:
    import warnings

    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        localize(model, tokenizer, _varied_pairs(4, seed=1), SITES, batch_size=2, progress=False)


def test_prompt_sharing_is_probed_and_refused_where_it_differs() -> None:
    """A model whose cached answers do not match whole texts (here: positions ignored, as a
    model that places them its own way would) runs its pairs as whole texts, with the same
    counts as a plain reference."""
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    original = model.model.forward

    def forward(*args: object, position_ids: object = None, **kwargs: object) -> object:
        return original(*args, **kwargs)  # drops the answers' true positions

    model.model.forward = forward  # type: ignore[method-assign]
    assert not prompt_cache_works(model)
    pairs = _varied_pairs(8, seed=1)
    plan = localize(model, tokenizer, pairs, SITES, batch_size=8, progress=False)
    assert plan.settings["full_text_pairs"] == len(pairs)
    _assert_close_counts(plan, reference_counts(model, tokenizer, pairs, SITES), tolerance=1)
