"""30 Adam steps of a tiny early-exit model on real English text: every loss goes down.

Runs in a spawned single rank (the platform layer patches torch process-wide), with megatron-core's
DDP, optimizer and LR scheduler, on the bundled Brown corpus sample with byte-level tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.harness import run_distributed

SAMPLE = Path(__file__).resolve().parents[1] / "assets" / "brown_sample.txt"
STEPS = 30


def smoke_worker(rank: int, world_size: int) -> dict:
    import torch

    from megatron.early_exit import platform
    from megatron.early_exit.config import EarlyExitTransformerConfig, make_exit_heads
    from megatron.early_exit.model.builder import build_early_exit_model
    from megatron.early_exit.training.batches import random_window_batches
    from megatron.early_exit.training.loop import TrainingConfig, setup_trainer, train_step

    platform.initialize(1, 1, seed=5)
    config = EarlyExitTransformerConfig(
        num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
        hidden_dropout=0.0, attention_dropout=0.0, normalization="RMSNorm",
        exit_heads=make_exit_heads([1, 2], structure="norm", loss_weights=[0.5, 0.5])
        + make_exit_heads([3], structure="mlp", loss_weights=[0.5]),
        **platform.config_overrides(),
    )  # fmt: skip
    model = build_early_exit_model(config, 256, 64, position_embedding_type="rope", seed=5)
    tokens = torch.tensor(list(SAMPLE.read_bytes()), dtype=torch.long)
    batches = random_window_batches(tokens, 64, micro_batch_size=4, num_microbatches=2, seed=5)
    trainer = setup_trainer(model, TrainingConfig(train_iters=STEPS, lr=3e-3, min_lr=3e-4))
    trainer.model.train()
    history = [train_step(trainer, next(batches)) for _ in range(STEPS)]
    return {
        "lm": [m.lm_loss for m in history],
        "exits": {d: [m.exit_losses[d] for m in history] for d in history[0].exit_losses},
        "grad_norms": [m.grad_norm for m in history],
    }


@pytest.fixture(scope="module")
def history() -> dict:
    return run_distributed(smoke_worker, 1)[0]


def _decreased(losses: list[float]) -> bool:
    start, end = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    return end < 0.8 * start


def test_final_loss_decreases(history):
    assert len(history["lm"]) == STEPS
    assert _decreased(history["lm"]), history["lm"]


def test_every_exit_loss_decreases(history):
    assert sorted(history["exits"]) == [1, 2, 3]
    for depth, losses in history["exits"].items():
        assert _decreased(losses), (depth, losses)


def test_gradient_norms_are_reported_and_finite(history):
    assert all(g is not None and 0.0 < g < float("inf") for g in history["grad_norms"])
