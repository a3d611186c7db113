"""Resume bookkeeping without a training run: the data position is the count of consumed
samples (issue 15, defect 5), and the LR scheduler's values are checked against the
checkpoint's the way Megatron-LM does (defect 4)."""

from __future__ import annotations

import pytest
import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron.early_exit.checkpoint.record import CheckpointError, CheckpointInfo
from megatron.early_exit.checkpoint.store import _load_scheduler
from megatron.early_exit.training.run import DataSource


class _Numbered:
    """Sample i is the sequence [i, i]."""

    def __len__(self):
        return 1000

    def __getitem__(self, i):
        row = torch.full((2,), i)
        return {"tokens": row, "labels": row, "loss_mask": torch.ones(2), "position_ids": row}


def _first_tokens(microbatches):
    return [int(t) for b in microbatches for t in b["input_ids"][:, 0]]


def test_data_position_continues_at_consumed_samples_with_another_data_parallel_size():
    # saved at DP=1 after 12 samples; resumed at DP=2, 2 microbatches of 2 per replica
    ranks = [DataSource(_Numbered(), None, 2, 2, 0, rank, 2, consumed_samples=12)
             for rank in (0, 1)]  # fmt: skip
    first = [_first_tokens(r.next_iteration()[0]) for r in ranks]
    assert first == [[12, 13, 14, 15], [16, 17, 18, 19]]
    assert [r.consumed_samples for r in ranks] == [20, 20]
    second = [_first_tokens(r.next_iteration()[0]) for r in ranks]
    assert second == [[20, 21, 22, 23], [24, 25, 26, 27]]


def _scheduler(train_iters: int, **flags) -> OptimizerParamScheduler:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return OptimizerParamScheduler(
        optimizer, init_lr=1e-3, max_lr=1e-3, min_lr=1e-4, lr_warmup_steps=0,
        lr_decay_steps=train_iters, lr_decay_style="cosine", start_wd=0.01, end_wd=0.01,
        wd_incr_steps=train_iters, wd_incr_style="constant",
        override_opt_param_scheduler=flags.get("override", False),
        use_checkpoint_opt_param_scheduler=flags.get("use_checkpoint", False),
    )  # fmt: skip


def _info() -> CheckpointInfo:
    return CheckpointInfo("ck/iter_0000003", 3, {}, {}, {}, None, {}, None)


def _saved_after_three_of_three() -> dict:
    saved = _scheduler(3)
    saved.step(increment=3)
    return saved.state_dict()


def test_scheduler_mismatch_is_refused_naming_the_values_and_the_two_flags():
    with pytest.raises(CheckpointError) as error:
        _load_scheduler(_scheduler(6), _saved_after_three_of_three(), _info())
    message = str(error.value)
    assert "lr_decay_steps (--train-iters): checkpoint 3, this run 6" in message
    assert "wd_incr_steps (--train-iters): checkpoint 3, this run 6" in message
    assert "--override-opt_param-scheduler" in message
    assert "--use-checkpoint-opt_param-scheduler" in message


def test_override_takes_the_flags_and_use_checkpoint_the_checkpoint():
    flags = _scheduler(6, override=True)
    _load_scheduler(flags, _saved_after_three_of_three(), _info())
    assert flags.lr_decay_steps == 6 and flags.num_steps == 3
    group = flags.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(flags.get_lr(group))
    assert flags.optimizer.param_groups[0]["lr"] > 5e-4  # halfway down a 6-step cosine
    checkpoint = _scheduler(6, use_checkpoint=True)
    _load_scheduler(checkpoint, _saved_after_three_of_three(), _info())
    assert checkpoint.lr_decay_steps == 3
    assert checkpoint.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)  # at --min-lr


def test_equal_schedules_load_without_a_flag():
    same = _scheduler(3)
    _load_scheduler(same, _saved_after_three_of_three(), _info())
    assert same.num_steps == 3
