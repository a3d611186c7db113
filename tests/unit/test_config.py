"""Config validation and the exit loss-weight schedules (pure: no process group)."""

from __future__ import annotations

import math

import pytest

from megatron.early_exit.config import (
    EarlyExitTransformerConfig,
    ExitHeadConfig,
    make_exit_heads,
)
from megatron.early_exit.model.losses import exit_loss_weight, exit_loss_weights, masked_mean

BASE = dict(num_layers=4, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True)


def config(**overrides) -> EarlyExitTransformerConfig:
    return EarlyExitTransformerConfig(**{**BASE, **overrides})


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(layer_number=0), "layer_number"),
        (dict(layer_number=-2), "layer_number"),
        (dict(layer_number=1.5), "layer_number"),
        (dict(layer_number=2, structure="transformer"), "unknown value 'transformer'"),
        (dict(layer_number=2, loss_weight=-0.1), "loss_weight"),
        (dict(layer_number=2, loss_weight=math.nan), "loss_weight"),
        (dict(layer_number=2, loss_weight_init=-1.0), "loss_weight_init"),
        (dict(layer_number=2, temperature=0.0), "temperature"),
        (dict(layer_number=2, temperature=-1.0), "temperature"),
    ],
)
def test_exit_head_config_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExitHeadConfig(**kwargs)


def test_exit_layer_out_of_range_names_the_value():
    with pytest.raises(ValueError, match=r"exit layer number: 5 is out of range .*num_layers=4"):
        config(exit_heads=(ExitHeadConfig(5),))


def test_duplicate_exits_rejected_including_pre_post_aliases():
    with pytest.raises(ValueError, match="duplicate exits at depth 2"):
        config(exit_heads=(ExitHeadConfig(2), ExitHeadConfig(2)))
    # "post-exit at L" and "pre-exit at L+1" read the same hidden state.
    with pytest.raises(ValueError, match="duplicate exits at depth 2"):
        config(exit_heads=(ExitHeadConfig(2), ExitHeadConfig(3, pre_exit=True)))


def test_tied_exit_with_untied_model_rejected():
    with pytest.raises(ValueError, match="untie-exit-output-weights"):
        config(exit_heads=(ExitHeadConfig(2),), untie_embeddings_and_output_weights=True)
    config(exit_heads=(ExitHeadConfig(2, untied=True),), untie_embeddings_and_output_weights=True)


def test_full_recompute_needs_exits_at_chunk_boundaries():
    full = dict(recompute_granularity="full", recompute_method="uniform")
    exits = (ExitHeadConfig(1), ExitHeadConfig(3, pre_exit=True), ExitHeadConfig(4))
    with pytest.raises(ValueError, match=r"exits after layer 1 inside a chunk.*in \[1\]"):
        config(exit_heads=exits, recompute_num_layers=2, **full)
    with pytest.raises(ValueError, match=r"exits after layer 1, before layer 3 inside"):
        config(exit_heads=exits, recompute_num_layers=4, **full)
    with pytest.raises(ValueError, match=r"before layer 4 inside"):  # inside the last chunk
        config(exit_heads=(ExitHeadConfig(4, pre_exit=True),), recompute_num_layers=2, **full)
    config(exit_heads=exits[1:], recompute_num_layers=2, **full)  # chunks [1, 2], [3, 4]
    config(exit_heads=exits, recompute_num_layers=1, **full)
    config(exit_heads=exits, recompute_granularity="full", recompute_method="block",
           recompute_num_layers=3)  # fmt: skip


def test_schedule_fields_validated():
    with pytest.raises(ValueError, match="exit_loss_weight_warmup_iters"):
        config(exit_heads=(ExitHeadConfig(2),), exit_loss_weight_warmup_iters=-1)
    with pytest.raises(ValueError, match="exit_loss_weight_warmup_style: unknown value 'step'"):
        config(exit_heads=(ExitHeadConfig(2),), exit_loss_weight_warmup_style="step")
    with pytest.raises(ValueError, match="include_final_loss"):
        config(include_final_loss=False)


def test_exits_sorted_by_depth_and_keyed_by_depth():
    cfg = config(exit_heads=(ExitHeadConfig(3), ExitHeadConfig(2, pre_exit=True)))
    assert [e.depth for e in cfg.exit_heads] == [1, 3]
    assert [e.key for e in cfg.exit_heads] == ["1", "3"]
    assert cfg.exit_head(3).layer_number == 3
    with pytest.raises(KeyError):
        cfg.exit_head(2)


def test_make_exit_heads_checks_list_lengths():
    with pytest.raises(ValueError, match="loss_weights: got 1 values for 2 exit layers"):
        make_exit_heads([1, 2], loss_weights=[0.5])
    with pytest.raises(ValueError, match="temperatures: got 3 values for 2 exit layers"):
        make_exit_heads([1, 2], temperatures=[1.0, 1.0, 1.0])
    heads = make_exit_heads([1, 3], loss_weights=[0.25, 0.5], structure="norm", untied=True)
    assert [(h.layer_number, h.loss_weight, h.loss_weight_init) for h in heads] == [
        (1, 0.25, 0.0),
        (3, 0.5, 0.0),
    ]
    assert all(h.structure == "norm" and h.untied for h in heads)


def test_exit_head_config_is_frozen():
    head = ExitHeadConfig(2)
    with pytest.raises(AttributeError):
        head.layer_number = 3


# ------------------------------------------------------------------------- weight schedules


@pytest.mark.parametrize(
    ("style", "iteration", "expected"),
    [
        ("linear", 0, 0.2),
        ("linear", 5, 0.2 + 0.5 * 0.8),
        ("linear", 10, 1.0),
        ("linear", 50, 1.0),
        ("cosine", 0, 0.2),
        ("cosine", 5, 0.2 + 0.8 * 0.5),  # (1 - cos(pi/2)) / 2 = 0.5
        ("cosine", 2, 0.2 + 0.8 * (1 - math.cos(math.pi * 0.2)) / 2),
        ("cosine", 10, 1.0),
    ],
)
def test_warmup_schedule(style, iteration, expected):
    head = ExitHeadConfig(1, loss_weight=1.0, loss_weight_init=0.2)
    assert exit_loss_weight(head, iteration, warmup_iters=10, style=style) == pytest.approx(
        expected
    )


def test_cooldown_schedule_decreases():
    head = ExitHeadConfig(1, loss_weight=0.1, loss_weight_init=1.0)
    weights = [exit_loss_weight(head, t, 4, "linear") for t in range(6)]
    assert weights == pytest.approx([1.0, 0.775, 0.55, 0.325, 0.1, 0.1])


def test_no_warmup_means_target_weight():
    head = ExitHeadConfig(1, loss_weight=0.7, loss_weight_init=0.0)
    assert exit_loss_weight(head, 0, 0, "cosine") == 0.7


def test_weights_for_every_exit_keyed_by_depth():
    cfg = config(
        exit_heads=make_exit_heads([1, 3], loss_weights=[0.5, 1.0], loss_weights_init=[0.0, 0.5]),
        exit_loss_weight_warmup_iters=4,
    )
    assert exit_loss_weights(cfg, 2) == pytest.approx({1: 0.25, 3: 0.75})


def test_masked_mean_ignores_masked_tokens():
    import torch

    loss = torch.tensor([[1.0, 2.0], [3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert masked_mean(loss, mask).item() == pytest.approx(2.0)


def test_dynamic_weight_is_the_exit_max_probability_without_gradient():
    import torch

    from megatron.early_exit.model.losses import vocab_parallel_max_prob

    logits = torch.randn(5, 3, 11, requires_grad=True)  # [s, b, v], one TP rank
    max_prob = vocab_parallel_max_prob(logits, tp_group=None)
    expected = torch.softmax(logits.detach(), dim=-1).max(dim=-1).values
    assert torch.allclose(max_prob, expected, atol=1e-6)
    assert not max_prob.requires_grad
