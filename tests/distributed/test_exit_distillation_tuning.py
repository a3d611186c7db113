"""EE-Tuning with distillation and confidence heads, and their checkpoints (2 ranks, TP=2).

One spawn runs the EE-Tuning recipe end to end through the training loop and the pipeline
executor: a checkpoint without confidence heads (the pretrained model) is loaded with
``finetune`` into a model with ``exit_kl_weight`` and confidence heads (which keep their
initialisation); tuning steps with the frozen backbone (its forward runs to the final head,
without autograd, for the teacher) leave the backbone bit-identical and lower the exits' KL and
confidence losses; the tuned checkpoint reloads at TP=2 and at TP=1 with equal parameters, the
replicated confidence heads included.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.distributed.harness import run_distributed
from tests.helpers import SEQ, VOCAB, make_batch, position_embedding_type, tiny_config

FAMILY = "gpt"
STEPS = 12
KL_WEIGHT = 20.0  # the pretrained model is random: make the teacher, not the labels, dominate
MODEL_ARGS = {"tokenizer": {"type": "null", "vocab_size": VOCAB}}


def _config(tp: int, *, tune: bool):
    base = tiny_config(FAMILY, tensor_model_parallel_size=tp)
    if not tune:
        return base
    exits = tuple(dataclasses.replace(e, confidence_hidden_size=8) for e in base.exit_heads)
    return tiny_config(
        FAMILY,
        tensor_model_parallel_size=tp,
        exit_heads=exits,
        exit_kl_weight=KL_WEIGHT,
        include_final_loss=False,
    )


def _trainer(config, *, seed: int, mode: str):
    from megatron.early_exit.model.builder import build_early_exit_model
    from megatron.early_exit.training.loop import TrainingConfig, setup_trainer

    model = build_early_exit_model(
        config, VOCAB, SEQ, position_embedding_type=position_embedding_type(FAMILY), seed=seed
    )
    training = TrainingConfig(train_iters=STEPS, lr=1e-2, min_lr=1e-2, lr_decay_style="constant")
    return setup_trainer(model, training, mode=mode)


def _full_parameters(trainer) -> dict[str, torch.Tensor]:
    from megatron.core import parallel_state

    from megatron.early_exit.model.builder import unwrap_model
    from megatron.early_exit.model.sharding import gather

    group = parallel_state.get_tensor_model_parallel_group()
    model = unwrap_model(trainer.model)
    return {n: gather(p.detach().clone(), p, group) for n, p in model.named_parameters()}


@torch.no_grad()
def _terms(trainer, batches) -> dict[str, float]:
    """Mean KL and confidence loss over every exit and batch (forward with labels)."""
    from megatron.early_exit.model.builder import unwrap_model
    from megatron.early_exit.model.losses import masked_mean

    model = unwrap_model(trainer.model)
    model.eval()
    sums = {"kl": 0.0, "confidence": 0.0}
    for batch in batches:
        _, pending = model(
            batch["input_ids"], batch["position_ids"], batch["attention_mask"],
            labels=batch["labels"], defer_exits=True,
        )  # fmt: skip
        for exit_pending in pending.values():
            exit_pending.compute()
            for name in sums:
                value = masked_mean(exit_pending.components[name], batch["loss_mask"])
                sums[name] += value.item() / (len(batches) * len(pending))
    model.train()
    return sums


def _confidence_contract(trainer) -> dict:
    """``exit_head.confidence(states [m, b, h]) -> [m, b]``, the sigmoid of the head's logits."""
    from megatron.early_exit.model.builder import unwrap_model

    model = unwrap_model(trainer.model)
    head = model.exit_heads["2"]
    states = torch.randn(3, 2, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probability = head.confidence(states)
        logits = head.confidence_logits(states)
    return {
        "shape": tuple(probability.shape),
        "in_range": bool(((probability > 0) & (probability < 1)).all()),
        "is_sigmoid": torch.equal(probability, torch.sigmoid(logits.float())),
    }


def tune_worker(rank: int, world_size: int, tmp: str) -> dict:
    from pathlib import Path

    from megatron.early_exit import platform
    from megatron.early_exit.checkpoint import store as ckpt
    from megatron.early_exit.training.loop import train_step

    base_dir, tuned_dir = Path(tmp) / "base", Path(tmp) / "tuned"
    out: dict = {}
    platform.initialize(2, 1, seed=5)
    pretrained = _trainer(_config(2, tune=False), seed=11, mode="train")
    pretrained.save_checkpoint(base_dir, model_args=MODEL_ARGS)
    base = _full_parameters(pretrained)

    tuner = _trainer(_config(2, tune=True), seed=12, mode="tune")
    initial = _full_parameters(tuner)
    out["finetune_iteration"] = tuner.load_checkpoint(base_dir, finetune=True)
    loaded = _full_parameters(tuner)
    heads = [n for n in loaded if "confidence_head" in n]
    out["num_confidence_params"] = len(heads)
    out["backbone_loaded"] = all(torch.equal(loaded[n], v) for n, v in base.items())
    out["heads_kept_init"] = all(torch.equal(loaded[n], initial[n]) for n in heads)
    out["heads_trainable"] = all(
        p.requires_grad for n, p in tuner.model.module.named_parameters() if n in heads
    )

    held_out = [make_batch(seed=100), make_batch(seed=101)]
    out["before"] = _terms(tuner, held_out)
    history = [train_step(tuner, [make_batch(seed=step % 4)]) for step in range(STEPS)]
    out["after"] = _terms(tuner, held_out)
    out["exit_losses_finite"] = all(
        torch.isfinite(torch.tensor(list(m.exit_losses.values()))).all() for m in history
    )
    tuned = _full_parameters(tuner)
    out["backbone_bit_identical"] = all(
        torch.equal(tuned[n], v) for n, v in base.items() if not n.startswith("exit_heads.")
    )
    out["heads_changed"] = all(not torch.equal(tuned[n], loaded[n]) for n in heads)
    out["contract"] = _confidence_contract(tuner)

    tuner.save_checkpoint(tuned_dir, model_args=MODEL_ARGS)
    out["recorded_sizes"] = [
        e["confidence_hidden_size"]
        for e in ckpt.read_checkpoint_info(tuned_dir).model_config["exit_heads"]
    ]
    reloaded = _trainer(_config(2, tune=True), seed=13, mode="tune")
    reloaded.load_checkpoint(tuned_dir)
    again = _full_parameters(reloaded)
    out["tp2_round_trip"] = sorted(again) == sorted(tuned) and all(
        torch.equal(again[n], v) for n, v in tuned.items()
    )

    platform.initialize(1, 1, seed=5)  # TP=1, DP=2
    resharded = _trainer(_config(1, tune=True), seed=14, mode="tune")
    resharded.load_checkpoint(tuned_dir)
    at_tp1 = _full_parameters(resharded)
    out["tp1_round_trip"] = sorted(at_tp1) == sorted(tuned) and all(
        torch.equal(at_tp1[n], v) for n, v in tuned.items()
    )
    return out


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> dict:
    tmp = str(tmp_path_factory.mktemp("distill"))
    results = run_distributed(tune_worker, 2, tmp)
    assert results[0].keys() == results[1].keys()
    return results[0]


def test_finetune_load_adds_confidence_heads_to_a_checkpoint_without_them(tuned):
    assert tuned["finetune_iteration"] == 0
    assert tuned["num_confidence_params"] == 4 * 4
    assert tuned["backbone_loaded"] and tuned["heads_kept_init"] and tuned["heads_trainable"]


def test_tuning_keeps_the_backbone_and_lowers_kl_and_confidence_losses(tuned):
    assert tuned["exit_losses_finite"]
    assert tuned["backbone_bit_identical"]
    assert tuned["heads_changed"]
    before, after = tuned["before"], tuned["after"]
    assert after["kl"] < 0.8 * before["kl"], (before, after)
    assert after["confidence"] < 0.9 * before["confidence"], (before, after)


def test_confidence_method_contract(tuned):
    assert tuned["contract"] == {"shape": (3, 2), "in_range": True, "is_sigmoid": True}


def test_confidence_heads_round_trip_through_dist_checkpointing(tuned):
    assert tuned["recorded_sizes"] == [8, 8, 8, 8]
    assert tuned["tp2_round_trip"]
    assert tuned["tp1_round_trip"]
