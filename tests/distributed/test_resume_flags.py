"""Resuming and extending a run through ``pretrain_early_exit_gpt.py``'s ``main`` (issue 15,
defects 3-5), in one spawn of two gloo ranks that runs ``main`` several times:

* extending ``--train-iters 3`` to 6: refused with the differences named unless
  ``--override-opt_param-scheduler`` (the flags' schedule from the checkpoint's step; with a
  constant LR the extended run equals an uninterrupted 6-iteration run exactly, and with a
  cosine LR it follows the 6-iteration cosine) or ``--use-checkpoint-opt_param-scheduler`` (the
  checkpoint's: the LR stays at --min-lr);
* ``--use-checkpoint-args`` keeps the exit-objective flags given on the command line;
* a resume at another data-parallel size and global batch continues at the saved
  ``consumed_samples``.

Runs without ``--pipeline-model-parallel-size 2`` are DP=2 (two ranks), with it DP=1.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest

from tests.distributed.harness import run_distributed

FLAGS = (
    "--mock-data --seq-length 32 --num-layers 2 --hidden-size 32 --num-attention-heads 2 "
    "--exit-layer-nums 1 --use-exit-norm --exit-layer-weight 0.3 --micro-batch-size 2 "
    "--eval-iters 1 --eval-interval 100 --log-interval 1 --hidden-dropout 0 "
    "--attention-dropout 0 --lr 2e-3 --min-lr 2e-4 --seed 11"
).split()
DP1 = ["--pipeline-model-parallel-size", "2", "--global-batch-size", "4"]
LR, MIN_LR = 2e-3, 2e-4


def _main(work: Path, name: str, *flags: str) -> dict:
    """Run ``main``; ``{"metrics": {iteration: record}}`` or ``{"error": stderr}``."""
    from megatron.early_exit.training import run

    metrics = work / f"{name}.jsonl"
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            run.main([*FLAGS, *flags, "--metrics-file", str(metrics)])
    except SystemExit as stop:
        return {"error": stderr.getvalue(), "status": stop.code}
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {"metrics": {r["iteration"]: r for r in records if "lr" in r},
            "stderr": stderr.getvalue()}  # fmt: skip


def _worker(rank: int, world_size: int, work: str) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron.early_exit import platform
    from megatron.early_exit.checkpoint.store import read_checkpoint_info

    work = Path(work)
    # One process group for every run: main's final destroy keeps it (forming a new one per
    # run costs a rendezvous each time), the spawner's teardown destroys it.
    destroy = platform.destroy
    platform.destroy = parallel_state.destroy_model_parallel
    out = {}
    try:
        # Constant LR: extending 3 -> 6 iterations reproduces an uninterrupted 6-iteration run.
        const = ["--lr-decay-style", "constant", *DP1]
        out["straight"] = _main(work, "straight", *const, "--train-iters", "6")
        _main(work, "first3", *const, "--train-iters", "3", "--save", str(work / "c3"))
        extend = ["--train-iters", "6", "--load", str(work / "c3")]
        out["refused"] = _main(work, "refused", *const, *extend)
        out["extended"] = _main(
            work, "extended", *const, *extend, "--override-opt_param-scheduler"
        )
        # --load of a directory with no checkpoint yet: a fresh start (not with --finetune)
        (work / "empty").mkdir(exist_ok=True)
        empty = ["--train-iters", "2", "--load", str(work / "empty")]
        out["fresh"] = _main(work, "fresh", *const, *empty)
        out["fresh_finetune"] = _main(work, "fresh_ft", *const, *empty, "--finetune")
        # Cosine LR: the flags' schedule, or the checkpoint's (already at --min-lr).
        cosine = ["--lr-decay-style", "cosine", *DP1]
        _main(work, "cos3", *cosine, "--train-iters", "3", "--save", str(work / "k3"))
        extend = ["--train-iters", "6", "--load", str(work / "k3")]
        out["flags_schedule"] = _main(
            work, "flags", *cosine, *extend, "--override-opt_param-scheduler"
        )
        out["checkpoint_schedule"] = _main(
            work, "ckpt", *cosine, *extend, "--use-checkpoint-opt_param-scheduler",
            "--use-checkpoint-args",
            "--exit-layer-weight", "0.9", "--exit-layer-weight-init", "0.1",
            "--exit-layer-weight-warmup-iters", "10",
        )  # fmt: skip
        # DP=2 with a global batch of 8, from the DP=1 checkpoint with 4 x 3 = 12 samples read.
        out["dp2"] = _main(
            work, "dp2", "--lr-decay-style", "cosine", *extend, "--global-batch-size", "8",
            "--override-opt_param-scheduler", "--save", str(work / "d6"),
        )  # fmt: skip
        dist.barrier()
        out["dp2_saved"] = read_checkpoint_info(work / "d6").data_state
    finally:
        platform.destroy = destroy
    return out if rank == 0 else {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("resume_flags")
    return run_distributed(_worker, 2, str(work), timeout_s=600)[0]


def test_load_of_a_directory_without_a_checkpoint_starts_fresh(runs):
    assert sorted(runs["fresh"]["metrics"]) == [1, 2]
    assert "no checkpoint there" in runs["fresh"]["stderr"]
    assert "training starts from scratch" in runs["fresh"]["stderr"]
    refused = runs["fresh_finetune"]
    assert refused.get("status") == 2 and "which --finetune need" in refused["error"]


def test_extending_a_run_is_refused_without_a_scheduler_flag(runs):
    refused = runs["refused"]
    assert refused.get("status") == 2, refused
    message = refused["error"]
    assert "another learning-rate/weight-decay schedule" in message
    assert "lr_decay_steps (--train-iters): checkpoint 3, this run 6" in message
    assert "--override-opt_param-scheduler" in message
    assert "--use-checkpoint-opt_param-scheduler" in message


def test_override_reproduces_the_uninterrupted_run_exactly(runs):
    straight, extended = runs["straight"]["metrics"], runs["extended"]["metrics"]
    assert sorted(extended) == [4, 5, 6]
    for iteration in (4, 5, 6):
        for key in ("lm_loss", "exit_losses", "lr", "grad_norm"):
            assert extended[iteration][key] == straight[iteration][key], (iteration, key)


def test_override_follows_the_flags_schedule(runs):
    metrics = runs["flags_schedule"]["metrics"]
    for iteration in (4, 5, 6):  # cosine over 6 iterations at steps 3, 4, 5
        step = iteration - 1
        expected = MIN_LR + (LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * step / 6))
        assert metrics[iteration]["lr"] == pytest.approx(expected, rel=1e-9)


def test_checkpoint_schedule_and_exit_flags_under_use_checkpoint_args(runs):
    metrics = runs["checkpoint_schedule"]["metrics"]
    assert [metrics[i]["lr"] for i in (4, 5, 6)] == pytest.approx([MIN_LR] * 3)
    # --exit-layer-weight 0.9, init 0.1, linear warm-up over 10 iterations: the flags', not the
    # checkpoint's constant 0.3
    for iteration in (4, 5, 6):
        expected = 0.1 + (0.9 - 0.1) * (iteration - 1) / 10
        assert metrics[iteration]["exit_weights"]["1"] == pytest.approx(expected)


def test_resume_with_another_data_parallel_size_continues_at_consumed_samples(runs):
    assert sorted(runs["dp2"]["metrics"]) == [4, 5, 6]
    # 12 samples before the save (3 x 4), then 3 iterations of 8: 36 (not 6 x 8 = 48)
    assert runs["dp2_saved"] == {"consumed_samples": 36}
