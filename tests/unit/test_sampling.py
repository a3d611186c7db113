"""Sampling, stop detection and the speculative acceptance rule."""

import math

import pytest
import torch

from megatron.early_exit.inference.sampling import (
    StopChecker,
    find_stop_string,
    greedy_verify,
    sample,
    sampling_logprobs,
    speculative_accept,
    token_logprobs,
)

NUM_SAMPLES = 200_000
TV_TOLERANCE = 0.01  # the sampling noise of the TV estimate here is ~0.002


def _generator(seed: int = 1234) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _total_variation(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    return 0.5 * (counts / counts.sum() - probs.double()).abs().sum().item()


def _logits_from_probs(*probs: float) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in probs]])


def test_greedy_is_argmax_with_model_logprob():
    logits = torch.randn(16, 50, generator=_generator())
    tokens, logprobs = sample(logits, temperature=0.0, generator=_generator(7))
    assert torch.equal(tokens, logits.argmax(-1))
    expected = torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(logprobs, expected)
    # Top-k/top-p do not change greedy rows.
    assert torch.equal(sample(logits, 0.0, top_k=3, top_p=0.5)[0], tokens)


def test_per_row_settings():
    logits = torch.zeros(2, 1000)
    logits[:, 10] = 1.0
    temperature = torch.tensor([0.0, 1.0])
    draws = torch.stack(
        [sample(logits, temperature, generator=_generator(s))[0] for s in range(20)]
    )
    assert (draws[:, 0] == 10).all()  # the greedy row
    assert draws[:, 1].unique().numel() > 10  # the sampled row, near uniform over 1000 tokens
    distinct = torch.randn(1, 50, generator=_generator()).expand(4000, -1)
    top_k = torch.tensor([1, 3]).repeat(2000)
    tokens, _ = sample(distinct, 1.0, top_k, generator=_generator())
    assert set(tokens[0::2].tolist()) == {distinct[0].argmax().item()}
    assert set(tokens[1::2].tolist()) == set(distinct[0].topk(3).indices.tolist())


def test_top_k_never_returns_outside_top_k():
    logits = torch.randn(1, 100, generator=_generator()).expand(5000, -1)
    tokens, _ = sample(logits, temperature=3.0, top_k=5, generator=_generator())
    allowed = set(logits[0].topk(5).indices.tolist())
    assert set(tokens.tolist()) == allowed


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = _logits_from_probs(0.5, 0.3, 0.15, 0.05)
    kept = sampling_logprobs(logits, temperature=1.0, top_p=0.7).exp()[0]
    torch.testing.assert_close(kept, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    first_only = sampling_logprobs(logits, temperature=1.0, top_p=0.4).exp()[0]
    torch.testing.assert_close(first_only, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    everything = sampling_logprobs(logits, temperature=1.0, top_p=1.0).exp()[0]
    torch.testing.assert_close(everything, torch.tensor([0.5, 0.3, 0.15, 0.05]))
    # top-k then top-p, on the renormalised top-k distribution: (0.5, 0.3) -> 0.625 >= 0.6
    both = sampling_logprobs(logits, temperature=1.0, top_k=2, top_p=0.6).exp()[0]
    torch.testing.assert_close(both, torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_seed_reproducibility():
    logits = torch.zeros(256, 1000)
    first = sample(logits, 1.0, generator=_generator(1234))[0]
    again = sample(logits, 1.0, generator=_generator(1234))[0]
    other = sample(logits, 1.0, generator=_generator(1235))[0]
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_logprob_is_that_of_the_distribution_sampled_from():
    logits = torch.randn(1, 20, generator=_generator()).expand(64, -1)
    tokens, logprobs = sample(logits, temperature=0.7, top_k=3, generator=_generator())
    top = logits[0].topk(3)
    filtered = torch.log_softmax(top.values / 0.7, -1)
    expected = {token: lp for token, lp in zip(top.indices.tolist(), filtered.tolist())}
    for token, logprob in zip(tokens.tolist(), logprobs.tolist()):
        assert logprob == pytest.approx(expected[token], abs=1e-5)
    tokens, logprobs = sample(logits, temperature=1.0, generator=_generator())
    torch.testing.assert_close(logprobs, token_logprobs(logits, tokens))


def test_sampled_frequencies_follow_the_tempered_distribution():
    logits = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0, 2.0]])
    tokens, _ = sample(logits.expand(NUM_SAMPLES, -1), 0.5, generator=_generator())
    assert _total_variation(tokens, torch.softmax(logits[0] / 0.5, -1)) < TV_TOLERANCE


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"temperature": torch.ones(3)}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": torch.tensor([1.0, 2.0])}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": torch.tensor([0.5, -0.1])}, "top_p"),
    ],
)
def test_validation_errors_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sample(torch.zeros(2, 5), **kwargs)


def test_find_stop_string_earliest_match():
    assert find_stop_string("a\n\nb###", ["###", "\n\n"]) == 1
    assert find_stop_string("abc", ["x"]) is None
    assert find_stop_string("ab ab", ["ab"], start=1) == 3


def test_stop_checker_eos_and_stop_strings_across_tokens():
    checker = StopChecker(3, eos_token_ids=[0], stop_strings=["world", "\n\n"])
    steps = [
        ([5, 5, 5], ["Hello", "Hi", "x"]),
        ([6, 0, 6], ["Hello wor", "Hi", "x y"]),
        ([7, 8, 7], ["Hello world\n\nBye", "Hi!!", "x y z"]),
    ]
    for new_tokens, texts in steps:
        finished = checker.update(torch.tensor(new_tokens), texts)
    assert finished.tolist() == [True, True, False]
    assert checker.reason == ["stop", "eos", None]
    # "world" started in the previous token: it is cut out, the completing token kept.
    assert checker.truncate_at[0] == len("Hello ") and checker.num_tokens[0] == 3
    # EOS: text before the EOS token, the EOS token dropped; later steps do not change it.
    assert checker.truncate_at[1] == len("Hi") and checker.num_tokens[1] == 1
    assert checker.truncate_at[2] is None


def test_stop_checker_matches_on_the_first_token_and_rejects_empty_strings():
    checker = StopChecker(1, stop_strings=["END"])
    assert checker.update(torch.tensor([3]), ["xEND"]).tolist() == [True]
    assert checker.truncate_at == [1] and checker.num_tokens == [1]
    with pytest.raises(ValueError, match="empty"):
        StopChecker(1, stop_strings=[""])


def test_greedy_verify_longest_agreeing_prefix():
    target_tokens = torch.tensor([[5, 7, 9, 3], [5, 7, 9, 3], [2, 7, 9, 3]])
    target_logits = torch.nn.functional.one_hot(target_tokens, 10).float()  # [b, k + 1, V]
    draft = torch.tensor([[5, 7, 9], [5, 1, 9], [5, 7, 9]])
    result = greedy_verify(draft, target_logits)
    assert result.num_accepted.tolist() == [3, 1, 0]
    assert result.next_tokens.tolist() == [3, 7, 2]
    # Greedy speculative sampling (one-hot p and q) reduces to greedy verification.
    draft_probs = torch.nn.functional.one_hot(draft, 10).float()
    lossless = speculative_accept(draft, draft_probs, target_logits, generator=_generator())
    assert lossless.num_accepted.tolist() == [3, 1, 0]
    assert lossless.next_tokens.tolist() == [3, 7, 2]


def test_speculative_acceptance_reproduces_the_target_distribution():
    p = torch.tensor([0.05, 0.40, 0.10, 0.25, 0.20])  # target
    q = torch.tensor([0.30, 0.10, 0.30, 0.10, 0.20])  # draft, very different
    bonus = torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1])
    generator = _generator()
    draft = torch.multinomial(q.expand(NUM_SAMPLES, -1), 1, True, generator=generator)  # [n, 1]
    target = torch.stack([p, bonus]).expand(NUM_SAMPLES, -1, -1)  # [n, k + 1, V]
    result = speculative_accept(draft, q.expand(NUM_SAMPLES, 1, -1), target, generator)
    emitted = torch.where(result.num_accepted == 1, draft[:, 0], result.next_tokens)
    assert _total_variation(emitted, p) < TV_TOLERANCE
    acceptance_rate = result.num_accepted.double().mean().item()
    assert acceptance_rate == pytest.approx(torch.minimum(p, q).sum().item(), abs=0.005)
    bonus_tokens = result.next_tokens[result.num_accepted == 1]
    assert _total_variation(bonus_tokens, bonus) < 2 * TV_TOLERANCE  # ~ n/2 samples


def test_speculative_shapes_are_checked():
    draft = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="target_probs"):
        speculative_accept(draft, torch.ones(2, 3, 4) / 4, torch.ones(2, 3, 4) / 4)
    with pytest.raises(ValueError, match="draft_probs"):
        speculative_accept(draft, torch.ones(2, 2, 4) / 4, torch.ones(2, 4, 4) / 4)
