"""Exit decision: confidence measures, per-row decisions, first-qualifying-exit rule."""

import math

import pytest
import torch

from megatron.early_exit.inference.decide import (
    ExitPolicy,
    confidence,
    decide_step,
    entropy_confidence,
    first_exit,
    margin_confidence,
    max_prob_confidence,
    should_exit,
    top_prediction,
)

PROBS = (0.5, 0.3, 0.2)
HAND_LOGITS = torch.tensor([[math.log(p) for p in PROBS]])  # softmax gives PROBS exactly


def _logits_with_max_prob(max_prob: float, vocab_size: int = 4) -> torch.Tensor:
    """A row whose softmax has ``max_prob`` on token 0 and the rest spread evenly."""
    rest = (1.0 - max_prob) / (vocab_size - 1)
    return torch.tensor([math.log(max_prob)] + [math.log(rest)] * (vocab_size - 1))


def test_max_prob_margin_entropy_on_hand_computed_logits():
    entropy = -sum(p * math.log(p) for p in PROBS)
    assert max_prob_confidence(HAND_LOGITS).item() == pytest.approx(0.5, abs=1e-6)
    assert margin_confidence(HAND_LOGITS).item() == pytest.approx(0.2, abs=1e-6)
    expected = 1 - entropy / math.log(3)  # 0.0627...
    assert entropy_confidence(HAND_LOGITS).item() == pytest.approx(expected, abs=1e-6)


def test_confidence_extremes_and_dtype():
    uniform = torch.zeros(1, 8)
    peaked = torch.tensor([[50.0, 0.0, 0.0, 0.0]])
    assert confidence(uniform, "max_prob").item() == pytest.approx(1 / 8)
    assert confidence(uniform, "margin").item() == pytest.approx(0.0, abs=1e-7)
    assert confidence(uniform, "entropy").item() == pytest.approx(0.0, abs=1e-6)
    for measure in ("max_prob", "margin", "entropy"):
        assert confidence(peaked, measure).item() == pytest.approx(1.0, abs=1e-6)
    low_precision = confidence(HAND_LOGITS.to(torch.bfloat16), "max_prob")
    assert low_precision.dtype == torch.float32
    with pytest.raises(ValueError, match="measure"):
        confidence(uniform, "top2")
    with pytest.raises(ValueError, match="batch, vocab"):
        confidence(torch.zeros(8), "max_prob")


def test_masked_vocabulary_entries_do_not_produce_nan():
    logits = torch.tensor([[2.0, 1.0, float("-inf"), float("-inf")]])
    for measure in ("max_prob", "margin", "entropy"):
        assert torch.isfinite(confidence(logits, measure)).all()


def test_decisions_are_per_row_not_from_the_last_row():
    # Row 0 is confident, the last row is not: the original decided for all rows from the last.
    logits = torch.stack([_logits_with_max_prob(0.9), _logits_with_max_prob(0.4)])
    policy = ExitPolicy(threshold=0.6)
    assert should_exit(2, logits, policy).tolist() == [True, False]
    reversed_rows = should_exit(2, logits.flip(0), policy)
    assert reversed_rows.tolist() == [False, True]


def test_threshold_is_inclusive_and_uses_untempered_confidence():
    logits = torch.stack([_logits_with_max_prob(0.75), _logits_with_max_prob(0.7)])
    assert should_exit(1, logits, ExitPolicy(threshold=0.7)).tolist() == [True, True]
    assert should_exit(1, logits, ExitPolicy(threshold=0.72)).tolist() == [True, False]


def test_threshold_zero_always_exits_and_one_needs_certainty():
    uniform = torch.zeros(3, 16)
    assert should_exit(1, uniform, ExitPolicy(threshold=0.0)).all()
    for measure in ("margin", "entropy"):
        assert should_exit(1, uniform, ExitPolicy(threshold=0, measure=measure)).all()
    confident = _logits_with_max_prob(0.999).unsqueeze(0)
    assert not should_exit(1, confident, ExitPolicy(threshold=1.0)).any()
    # A float32 softmax that rounds to exactly 1.0 counts as certain.
    certain = torch.tensor([[100.0, 0.0, 0.0]])
    assert should_exit(1, certain, ExitPolicy(threshold=1.0)).all()


def test_disallowed_layer_never_exits():
    logits = torch.tensor([[100.0, 0.0], [100.0, 0.0]])
    policy = ExitPolicy(threshold=0.0, depths=[4])
    assert not should_exit(2, logits, policy).any()
    assert should_exit(4, logits, policy).all()
    assert ExitPolicy(depths=[]).depths is None  # empty means all exits
    assert ExitPolicy(depths=None).allows(7)


def test_inactive_rows_never_exit():
    logits = torch.full((3, 4), 0.0)
    logits[:, 0] = 100.0
    active = torch.tensor([True, False, True])
    assert should_exit(1, logits, ExitPolicy(threshold=0.0), active).tolist() == [
        True,
        False,
        True,
    ]
    assert should_exit(1, logits, ExitPolicy(threshold=0.5), active).tolist() == [
        True,
        False,
        True,
    ]
    with pytest.raises(ValueError, match="active_mask"):
        should_exit(1, logits, ExitPolicy(), torch.ones(2, dtype=torch.bool))


@pytest.mark.parametrize("threshold", [-0.1, 1.01, float("nan"), True, "0.5"])
def test_policy_rejects_bad_thresholds(threshold):
    with pytest.raises(ValueError, match="threshold"):
        ExitPolicy(threshold=threshold)


def test_policy_validation_and_normalisation():
    assert ExitPolicy(threshold=1).threshold == 1.0
    assert isinstance(ExitPolicy(threshold=0).threshold, float)
    assert ExitPolicy(depths=[2, 4, 2]).depths == frozenset({2, 4})
    with pytest.raises(ValueError, match="measure"):
        ExitPolicy(measure="perplexity")
    with pytest.raises(ValueError, match="positive"):
        ExitPolicy(depths=[0, 2])
    with pytest.raises(ValueError, match=r"\[6\]"):
        ExitPolicy(depths=[2, 6]).check_model_exits([2, 4])
    ExitPolicy(depths=[2]).check_model_exits([2, 4])
    with pytest.raises(AttributeError):
        ExitPolicy().threshold = 0.5  # frozen


def test_first_exit_wins_per_row():
    fired_at_2 = torch.tensor([True, False, False, True])
    fired_at_4 = torch.tensor([True, True, False, False])
    result = first_exit([2, 4], [fired_at_2, fired_at_4], final_depth=8)
    assert result.depth.tolist() == [2, 4, 8, 2]
    assert result.index.tolist() == [0, 1, 2, 0]
    with pytest.raises(ValueError, match="increasing"):
        first_exit([4, 2], [fired_at_2, fired_at_4], final_depth=8)
    with pytest.raises(ValueError, match="fired masks"):
        first_exit([2, 4], [fired_at_2], final_depth=8)


def test_decide_step_exits_each_row_once_at_its_first_qualifying_exit():
    row_confident_early = torch.tensor([10.0, 0.0, 0.0])
    row_confident_late = torch.tensor([0.0, 0.1, 0.0])
    row_finished = torch.tensor([10.0, 0.0, 0.0])
    shallow = torch.stack([row_confident_early, row_confident_late, row_finished])
    deep = torch.stack([row_confident_early, torch.tensor([10.0, 0.0, 0.0]), row_finished])
    active = torch.tensor([True, True, False])
    result = decide_step([(2, shallow), (4, deep)], ExitPolicy(threshold=0.9), 6, active)
    assert result.depth.tolist() == [2, 4, 6]
    restricted = ExitPolicy(threshold=0.9, depths=[4])
    assert decide_step([(2, shallow), (4, deep)], restricted, 6).depth.tolist() == [4, 4, 4]


def test_top_prediction():
    tokens, probs = top_prediction(HAND_LOGITS)
    assert tokens.tolist() == [0]
    assert probs.item() == pytest.approx(0.5, abs=1e-6)
