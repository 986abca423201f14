"""How localization saves work (shared prompts, full-text fallback, early stop) and device maps.

Counts are checked against the simple batch-1 reference of ``test_localize``.
"""

from __future__ import annotations

import random

import pytest
import torch
from click.testing import CliRunner
from test_localize import _assert_close_counts, _varied_pairs, reference_counts
from tiny_models import save_tiny_model, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

import cli
from aufold.localize import encode_pairs, localize
from aufold.modeling import site_module
from aufold.pairs import ContrastivePair
from aufold.steer import steer

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


def test_offloaded_model_gives_the_same_counts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """accelerate's device map, here with layers offloaded to disk, through the same hooks."""
    pytest.importorskip("accelerate")
    folder = save_tiny_model("llama", tmp_path / "model")
    tokenizer = tiny_tokenizer()
    pairs = _varied_pairs(6, seed=2)
    plain = localize(AutoModelForCausalLM.from_pretrained(folder).eval(), tokenizer, pairs, SITES,
                     progress=False)
    offloaded = AutoModelForCausalLM.from_pretrained(
        folder, device_map="auto", max_memory={"cpu": "450KB"}, offload_folder=tmp_path / "offload").eval()
    assert "disk" in set(offloaded.hf_device_map.values())
    plan = localize(offloaded, tokenizer, pairs, SITES, progress=False)
    for site in SITES:
        assert torch.equal(plan.counts[site].positive, plain.counts[site].positive)
        assert torch.equal(plan.counts[site].negative, plain.counts[site].negative)
    # Hook mode on the offloaded model computes what it computes on the plain one.
    edit = plan.select(6, 3.0, ["head", "mlp", "mlp-out"])
    ids = tokenizer(["the cat sat on a mat"], return_tensors="pt")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad(), steer(model, edit):
        want = model(ids).logits
    with torch.no_grad(), steer(offloaded, edit):
        got = offloaded(ids).logits
    assert torch.equal(got, want)


def test_generate_hook_mode_with_device_map_auto(tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("accelerate")
    folder = save_tiny_model("llama", tmp_path / "model")
    model = tiny_model("llama")
    localize(model, tiny_tokenizer(), _varied_pairs(6), ["head"], progress=False).save(tmp_path / "plan")
    result = CliRunner().invoke(cli.main, ["generate", str(folder), "--plan", str(tmp_path / "plan"),
                                           "--k", "4", "--alpha", "3", "--prompt", "the cat",
                                           "--max-new-tokens", "4", "--device-map", "auto"])
    assert result.exit_code == 0, result.output
    assert "--- steered (k=4, alpha=3) ---" in result.output
