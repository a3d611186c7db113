"""Shortlist decisions against the full projection (``decide``'s measures on all logits)."""

from __future__ import annotations

import pytest
import torch

from megatron.early_exit.inference.decide import ExitPolicy, confidence, exit_mask
from megatron.early_exit.inference.shortlist import (
    previous_top_k,
    shortlist_decide,
    shortlist_logits,
)

B, H, V, K = 64, 32, 500, 12


@pytest.fixture(scope="module")
def case():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(V, H, generator=generator)
    states = torch.randn(B, H, generator=generator) * 0.6
    full = states @ weight.t()  # [b, V]
    # "Previous step" logits: the current ones perturbed, so that the shortlist holds the full
    # top token in most rows but not all.
    previous = full + torch.randn(B, V, generator=generator) * 1.5
    candidates = previous_top_k(previous, K)
    hit = (candidates == full.argmax(-1, keepdim=True)).any(-1)
    assert 0 < int((~hit).sum()) < B // 2  # both kinds of rows occur
    learned = torch.rand(B, generator=generator)
    return weight, states, full, candidates, hit, learned


def test_shortlist_logits_are_the_full_logits_of_the_candidates(case):
    weight, states, full, candidates, _, _ = case
    torch.testing.assert_close(
        shortlist_logits(states, weight, candidates),
        full.gather(1, candidates),
        rtol=1e-6,
        atol=1e-5,
    )


@pytest.mark.parametrize("threshold", [0.05, 0.2, 0.5])
def test_same_token_and_decision_as_the_full_projection_when_the_top_token_is_listed(
    case, threshold
):
    weight, states, full, candidates, hit, learned = case
    policy = ExitPolicy(threshold=threshold, measure="learned")
    full_token = full.argmax(-1)
    decision = shortlist_decide(states, weight, candidates, threshold, "learned", learned)
    assert torch.equal(decision.token[hit], full_token[hit])
    assert torch.equal(decision.exit_mask, exit_mask(4, learned, policy))  # learned: every row
    for measure in ("max_prob", "margin"):
        decision = shortlist_decide(states, weight, candidates, threshold, measure)
        full_confidence = confidence(full, measure)
        assert torch.equal(decision.token[hit], full_token[hit])
        # Upper bound of the full confidence, so "do not exit" is always the full decision.
        assert bool((decision.confidence[hit] >= full_confidence[hit] - 1e-6).all())
        stays = hit & ~decision.exit_mask
        assert not bool((full_confidence[stays] >= threshold).any())


def test_max_prob_exit_can_differ_when_mass_sits_outside_the_shortlist():
    # Top token listed, a flat tail of 998 tokens outside: the shortlist sees p = 0.73, the
    # full softmax 0.0027.
    states = torch.ones(1, 1)
    weight = torch.zeros(1000, 1)
    weight[0, 0], weight[1, 0] = 1.0, 0.0
    candidates = torch.tensor([[0, 1]])
    decision = shortlist_decide(states, weight, candidates, 0.5, "max_prob")
    full = confidence((states @ weight.t()), "max_prob")
    assert bool(decision.exit_mask[0]) and float(full[0]) < 0.5


def test_whole_vocabulary_shortlist_equals_the_full_decision(case):
    weight, states, full, _, _, _ = case
    everything = torch.arange(V).expand(B, -1)
    for measure in ("max_prob", "margin"):
        decision = shortlist_decide(states, weight, everything, 0.1, measure)
        torch.testing.assert_close(
            decision.confidence, confidence(full, measure), rtol=1e-5, atol=1e-6
        )
        assert torch.equal(decision.token, full.argmax(-1))


def test_bad_inputs_are_named(case):
    weight, states, _, candidates, _, _ = case
    with pytest.raises(ValueError, match=r"candidate ids \[500\] are outside"):
        shortlist_logits(states, weight, candidates.clone().fill_(V))
    with pytest.raises(ValueError, match="states must be"):
        shortlist_logits(states[0], weight, candidates)
    with pytest.raises(ValueError, match="candidates must be"):
        shortlist_logits(states, weight, candidates[:3])
    with pytest.raises(ValueError, match="learned_confidence"):
        shortlist_decide(states, weight, candidates, 0.5, "learned")
    with pytest.raises(ValueError, match="measure must be one of"):
        shortlist_decide(states, weight, candidates, 0.5, "entropy")
    with pytest.raises(ValueError, match="k must be"):
        previous_top_k(torch.zeros(2, 5), 6)


def test_timing_script_times_every_variant(capsys):
    from megatron.early_exit.bench.shortlist import main

    timings = main(
        ["--hidden", "8", "--vocab", "64", "--ks", "4", "16", "--rounds", "2", "--calls", "1"]
    )
    assert list(timings) == ["full", "shortlist k=4", "shortlist k=16"]
    assert all(t["wall_s"] > 0 for t in timings.values())
    assert "wall/full" in capsys.readouterr().out
