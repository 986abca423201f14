"""Every causal-LM model type transformers ships: the conformance suite (tests/conformance.py).

The suite runs once per session (a few minutes on 2 CPU cores); these tests read its
outcome. A site is either proven (fold == hooks in float32 and bfloat16, untouched
tensors bitwise, the export reloading as the same class) or absent with the reason the
sites module gives; anything else is a failure, unless the model type is listed in
``KNOWN_FAILURES`` with what fails, so that a fix or a regression both show here.
"""

from __future__ import annotations

import pytest
from conformance import (
    DOCS,
    FOLD_SITES,
    KNOWN_FAILURES,
    PASS,
    Outcome,
    check_real,
    markdown,
    model_types,
    run,
)

MIN_FULL = 60  # model types that pass head, mlp and mlp-out


@pytest.fixture(scope="session")
def outcomes() -> dict[str, Outcome]:
    return {outcome.model_type: outcome for outcome in run()}


def test_every_model_type_is_checked_or_listed_with_a_reason(outcomes: dict[str, Outcome]) -> None:
    assert list(outcomes) == model_types()
    for outcome in outcomes.values():
        assert outcome.reason or outcome.sites, outcome.model_type


def test_every_site_found_passes(outcomes: dict[str, Outcome]) -> None:
    failing = {}
    for model_type, outcome in outcomes.items():
        found = outcome.failures()
        if found:
            failing[model_type] = found
    unexpected = {t: f for t, f in failing.items() if t not in KNOWN_FAILURES}
    fixed = sorted(set(KNOWN_FAILURES) - set(failing))
    assert not unexpected, unexpected
    assert not fixed, f"now passing, remove from KNOWN_FAILURES: {fixed}"


def test_targets(outcomes: dict[str, Outcome]) -> None:
    full = [o for o in outcomes.values() if all(o.passes(site) for site in FOLD_SITES)]
    assert len(full) >= MIN_FULL, [o.model_type for o in full]
    for outcome in outcomes.values():
        if outcome.experts and outcome.model_type not in KNOWN_FAILURES:
            assert outcome.passes("mlp-out"), (outcome.model_type, outcome.sites)
            # The experts' neurons, wherever aufold reaches them (stacked experts).
            assert "mlp" in outcome.absent or outcome.passes("mlp"), outcome.model_type


def test_docs_say_what_the_suite_finds(outcomes: dict[str, Outcome]) -> None:
    expected = markdown(list(outcomes.values()))
    assert DOCS.read_text() == expected, (
        "docs/architectures.md is stale: run `python tests/conformance.py --write`")


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_real_weights_pass_the_same_checks(name: str, request: pytest.FixtureRequest) -> None:
    """SmolLM2-135M-Instruct (Llama) and Gemma 3 270M, dequantized from their GGUF files:
    every site localized on the same pairs, fold == hooks in float32 and bfloat16, untouched
    tensors bitwise, the streamed export of all sites reloading with the hooked logits."""
    outcome = check_real(name, request.getfixturevalue(f"{name}_dir"))
    assert not outcome.reason, outcome.reason
    assert {site: outcome.sites[site] for site in FOLD_SITES} == dict.fromkeys(FOLD_SITES, PASS)
    assert outcome.reloads == PASS
