"""Checkpoints written before the checkpoint code moved to ``checkpoint/`` still load after it.

``tests/assets/checkpoint_format_v1`` was written by ``training/checkpointing.py`` at commit
ee5c447 (its README has the script): a tiny llama-family model with all four exit structures,
after two Adam steps, with the final and exit logits it gave on a fixed batch. The checks load
it through today's inference loader (same logits, bit for bit up to 1e-6) and resume a trainer
from it (iteration, data position, optimizer state, one more step).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.harness import run_distributed
from tests.helpers import VOCAB, all_logits, make_batch, relative_error

FIXTURE = Path(__file__).resolve().parents[1] / "assets" / "checkpoint_format_v1"


def _worker(rank: int, world_size: int) -> dict:
    from megatron.early_exit import platform
    from megatron.early_exit.checkpoint.loading import load_model
    from megatron.early_exit.checkpoint.store import read_checkpoint_info
    from megatron.early_exit.training.loop import TrainingConfig, setup_trainer, train_step

    expected = torch.load(FIXTURE / "expected_logits.pt")
    batch = make_batch(seed=expected.pop("batch_seed"))
    platform.initialize(1, 1, seed=3)
    info, config, model = load_model(FIXTURE / "checkpoint", seed=99)
    got = all_logits(model, batch)
    out = {
        "heads": sorted(got),
        "expected_heads": sorted(expected),
        "logits_error": max(relative_error(got[k], v) for k, v in expected.items()),
        "iteration": info.iteration,
        "data_state": info.data_state,
        "optimizer": info.optimizer,
        "exit_structures": [e.structure for e in config.exit_heads],
    }
    trainer = setup_trainer(model, TrainingConfig(train_iters=4, lr=3e-3, min_lr=3e-4))
    out["resumed_iteration"] = trainer.load_checkpoint(FIXTURE / "checkpoint")
    out["resumed_logits_error"] = max(
        relative_error(v, expected[k]) for k, v in all_logits(trainer.model.module, batch).items()
    )
    trainer.model.train()
    metrics = train_step(trainer, [make_batch(seed=102)])
    out["step_loss"] = metrics.lm_loss
    out["iteration_after_step"] = trainer.iteration
    out["recorded_tokenizer"] = read_checkpoint_info(FIXTURE / "checkpoint").model_args
    platform.destroy()
    return out


@pytest.fixture(scope="module")
def loaded() -> dict:
    return run_distributed(_worker, 1)[0]


def test_old_checkpoint_gives_the_sameall_logits(loaded):
    assert loaded["heads"] == loaded["expected_heads"] == [
        "exit_1", "exit_2", "exit_3", "exit_4", "final"
    ]  # fmt: skip
    assert loaded["exit_structures"] == ["block", "mlp", "norm", "head"]
    assert loaded["logits_error"] < 1e-6


def test_old_checkpoint_resumes_training(loaded):
    assert loaded["iteration"] == loaded["resumed_iteration"] == 2
    assert loaded["data_state"] == {"consumed_samples": 4}
    assert loaded["optimizer"] == "plain"
    assert loaded["resumed_logits_error"] < 1e-6
    assert loaded["iteration_after_step"] == 3
    assert 0.0 < loaded["step_loss"] < 10.0
    assert loaded["recorded_tokenizer"] == {"tokenizer": {"type": "null", "vocab_size": VOCAB}}
