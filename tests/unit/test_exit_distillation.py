"""Learning from the final head, pure parts: the KL term, the global argmax, the confidence BCE,
the loss attachment, config validation and flags (no process group: TP size 1)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron.early_exit.config import EarlyExitTransformerConfig, ExitHeadConfig
from megatron.early_exit.model.losses import (
    attach_auxiliary_loss,
    confidence_loss,
    final_head_targets,
    vocab_parallel_argmax,
    vocab_parallel_kl_divergence,
    vocab_parallel_log_softmax,
)
from megatron.early_exit.training import arguments

BASE = dict(num_layers=4, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True)

# Hand-made logits [s=2, b=1, v=4]: the teacher (final head) and the student (an exit).
TEACHER = torch.tensor([[[2.0, 0.0, -1.0, 0.5]], [[0.0, 0.0, 3.0, -2.0]]])
STUDENT = torch.tensor([[[1.0, 1.0, 0.0, 0.0]], [[-1.0, 0.5, 2.0, 0.0]]])


def _reference_kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p_v log(p_v / q_v), written out in float64."""
    p = teacher.double().exp() / teacher.double().exp().sum(-1, keepdim=True)
    q = student.double().exp() / student.double().exp().sum(-1, keepdim=True)
    return (p * (p / q).log()).sum(-1)


def _kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    return vocab_parallel_kl_divergence(vocab_parallel_log_softmax(teacher), student)


# ------------------------------------------------------------------------------ KL term


def test_kl_matches_the_reference_formula():
    kl = _kl(TEACHER, STUDENT)
    assert kl.shape == (2, 1)
    torch.testing.assert_close(kl.double(), _reference_kl(TEACHER, STUDENT), rtol=1e-6, atol=0)
    # The first position by hand: p = softmax(2, 0, -1, .5), q = (e, e, 1, 1) / (2e + 2).
    p = [math.exp(x) for x in (2.0, 0.0, -1.0, 0.5)]
    p = [x / sum(p) for x in p]
    q = [math.e, math.e, 1.0, 1.0]
    q = [x / sum(q) for x in q]
    by_hand = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert kl[0, 0].item() == pytest.approx(by_hand, rel=1e-6)


def test_kl_is_zero_when_the_exit_equals_the_final_head():
    assert torch.equal(_kl(TEACHER, TEACHER.clone()), torch.zeros(2, 1))


def test_kl_gradient_is_student_softmax_minus_teacher():
    student = STUDENT.clone().requires_grad_(True)
    upstream = torch.tensor([[0.5], [2.0]])
    (_kl(TEACHER, student) * upstream).sum().backward()
    expected = (torch.softmax(STUDENT, -1) - torch.softmax(TEACHER, -1)) * upstream.unsqueeze(-1)
    torch.testing.assert_close(student.grad, expected, rtol=1e-6, atol=1e-7)


def test_kl_with_a_temperature_scaled_student():
    """The exit's temperature divides the student logits, as in its cross entropy."""
    student = STUDENT / 1.5
    torch.testing.assert_close(
        _kl(TEACHER, student).double(), _reference_kl(TEACHER, student), rtol=1e-6, atol=0
    )


# ------------------------------------------------------------------- argmax and confidence


def test_argmax_picks_the_first_maximum():
    logits = torch.tensor([[[1.0, 3.0, 3.0, 0.0]], [[5.0, 5.0, 5.0, 5.0]], [[0.0, 0.0, 0.0, 1.0]]])
    assert vocab_parallel_argmax(logits).tolist() == [[1], [0], [3]]


def test_final_head_targets_hold_only_what_is_asked():
    targets = final_head_targets(TEACHER, log_probs=False, top1=True)
    assert targets.log_probs is None and targets.top1.tolist() == [[0], [2]]
    targets = final_head_targets(TEACHER, log_probs=True, top1=False)
    assert targets.top1 is None
    torch.testing.assert_close(targets.log_probs, torch.log_softmax(TEACHER, -1))


def test_confidence_target_and_bce_match_a_hand_computation():
    exit_logits = torch.tensor([[[0.0, 2.0, 1.0]], [[4.0, 1.0, 1.0]], [[0.0, 0.0, 1.0]]])
    final_logits = torch.tensor([[[0.0, 5.0, 1.0]], [[0.0, 1.0, 4.0]], [[0.0, 0.0, 2.0]]])
    head_logits = torch.tensor([[0.3], [-1.2], [2.0]])
    bce = confidence_loss(
        head_logits, vocab_parallel_argmax(exit_logits), vocab_parallel_argmax(final_logits)
    )
    targets = [1.0, 0.0, 1.0]  # top-1: 1 == 1, 0 != 2, 2 == 2
    for position, (x, t) in enumerate(zip(head_logits.flatten().tolist(), targets)):
        sigmoid = 1.0 / (1.0 + math.exp(-x))
        by_hand = -(t * math.log(sigmoid) + (1.0 - t) * math.log(1.0 - sigmoid))
        assert bce[position, 0].item() == pytest.approx(by_hand, rel=1e-6)


def test_attached_loss_keeps_the_value_and_adds_the_gradient():
    main = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    aux_input = torch.tensor([0.5, -1.0, 4.0], requires_grad=True)
    aux = aux_input**2
    combined = attach_auxiliary_loss(main * 1.0, aux)
    assert torch.equal(combined, main.detach())
    weights = torch.tensor([0.2, 0.3, 0.5])
    (weights * combined).sum().backward()
    assert torch.equal(main.grad, weights)
    torch.testing.assert_close(aux_input.grad, weights * 2 * aux_input.detach())


# --------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(exit_kl_weight=-0.1), "exit_kl_weight: must be a finite number >= 0, got -0.1"),
        (dict(exit_kl_weight=math.inf), "exit_kl_weight"),
        (dict(exit_confidence_loss_weight=math.nan), "exit_confidence_loss_weight"),
    ],
)
def test_config_rejects_bad_weights(overrides, message):
    with pytest.raises(ValueError, match=message):
        EarlyExitTransformerConfig(**BASE, exit_heads=(ExitHeadConfig(2),), **overrides)


@pytest.mark.parametrize("size", [-1, 1.5, True])
def test_exit_head_config_rejects_bad_confidence_sizes(size):
    with pytest.raises(ValueError, match=f"confidence_hidden_size: .*got {size!r}"):
        ExitHeadConfig(2, confidence_hidden_size=size)


def _pp2(**overrides) -> EarlyExitTransformerConfig:
    return EarlyExitTransformerConfig(
        **BASE, pipeline_model_parallel_size=2, pipeline_dtype=torch.float32, **overrides
    )


def test_exits_learning_from_the_final_head_must_be_on_the_last_stage():
    """A training-time rule: such a model can be built (and decoded) at any PP, not trained."""
    kl = _pp2(exit_heads=(ExitHeadConfig(1), ExitHeadConfig(3)), exit_kl_weight=1.0)
    with pytest.raises(ValueError, match=r"--exit-kl-weight.*layer 1 is not on the last of 2"):
        kl.check_trainable_final_head_targets()
    confidence = _pp2(exit_heads=(ExitHeadConfig(2, confidence_hidden_size=8),))
    with pytest.raises(ValueError, match="--exit-confidence-head"):
        confidence.check_trainable_final_head_targets()
    # Exits on the last stage (layers 3-4), or neither feature: fine.
    last = _pp2(exit_heads=(ExitHeadConfig(3, confidence_hidden_size=8),), exit_kl_weight=1.0)
    last.check_trainable_final_head_targets()
    _pp2(exit_heads=(ExitHeadConfig(1),))


# ---------------------------------------------------------------------------------- flags


def _parse(flags: str):
    return arguments.parse_args(flags.split())


def test_flags_reach_the_config():
    config = arguments.model_config(
        _parse(
            "--exit-layer-nums 1 3 --exit-kl-weight 0.5 --exit-confidence-head "
            "--exit-confidence-hidden-size 16 --exit-confidence-loss-weight 0.25"
        ),
        256,
    )
    assert config.exit_kl_weight == 0.5 and config.exit_confidence_loss_weight == 0.25
    assert [e.confidence_hidden_size for e in config.exit_heads] == [16, 16]
    defaults = arguments.model_config(_parse("--exit-layer-nums 2 --exit-confidence-head"), 256)
    assert defaults.exit_heads[0].confidence_hidden_size == 64
    assert defaults.exit_confidence_loss_weight == 1.0 and defaults.exit_kl_weight == 0.0
    off = arguments.model_config(_parse("--exit-layer-nums 2"), 256)
    assert off.exit_heads[0].confidence_hidden_size == 0 and not off.exits_use_final_logits


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ("--exit-kl-weight 1", "--exit-kl-weight given without --exit-layer-nums"),
        ("--exit-confidence-head", "--exit-confidence-head given without --exit-layer-nums"),
        ("--exit-layer-nums 1 --exit-kl-weight -1", "--exit-kl-weight must be a finite number"),
        ("--exit-layer-nums 1 --exit-kl-weight nan", "--exit-kl-weight must be a finite number"),
        (
            "--exit-layer-nums 1 --exit-confidence-hidden-size 8",
            "--exit-confidence-hidden-size need --exit-confidence-head",
        ),
        (
            "--exit-layer-nums 1 --exit-confidence-loss-weight 2",
            "--exit-confidence-loss-weight need --exit-confidence-head",
        ),
        (
            "--exit-layer-nums 1 --exit-confidence-head --exit-confidence-hidden-size 0",
            "--exit-confidence-hidden-size must be >= 1",
        ),
        (
            "--exit-layer-nums 1 --exit-confidence-head --exit-confidence-loss-weight -2",
            "--exit-confidence-loss-weight must be a finite number >= 0",
        ),
        (
            "--load ckpt --exit-layer-nums 1 --tune-exit --tune-exit-pipeline-parallel-size 1 "
            "--exit-kl-weight 1 --exit-confidence-head",
            "--exit-kl-weight, --exit-confidence-head: the exits learn from the final head",
        ),
    ],
)
def test_bad_flags_stop_with_their_name(flags, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        _parse(flags)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_pipeline_placement_error_names_the_flag():
    args = _parse("--pipeline-model-parallel-size 2 --exit-layer-nums 1 --exit-kl-weight 1")
    config = arguments.model_config(args, 256)  # buildable (e.g. to decode), not trainable
    with pytest.raises(ValueError, match="--exit-kl-weight"):
        config.check_trainable_final_head_targets()
