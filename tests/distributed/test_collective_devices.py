"""Collectives receive tensors on the platform's device (``tests/device_check.py``).

Two gloo ranks, one spawn: the harness itself (it rejects a tensor built without a device and
accepts one put on the platform's device), then one training step at DP=2 and one at PP=2
through ``train_step`` with the harness on. On a GPU these groups are NCCL, which takes device
tensors only; before the schedule's data-parallel loss average put its tensor on the platform's
device, the DP=2 step failed here with ``UnplacedTensorError`` (issue 15, defect 1).
"""

from __future__ import annotations

import pytest

from tests.distributed.harness import run_distributed


def _harness_checks() -> dict:
    import torch
    import torch.distributed as dist

    from megatron.early_exit import platform
    from tests.device_check import UnplacedTensorError, check_collective_devices

    out = {}
    with check_collective_devices():
        try:
            dist.all_reduce(torch.tensor([1.0]))
            out["bare_factory"] = "accepted"
        except UnplacedTensorError as error:
            out["bare_factory"] = str(error)
        try:
            dist.all_reduce(torch.zeros(2) * 3)  # computed from an unplaced tensor
            out["derived"] = "accepted"
        except UnplacedTensorError as error:
            out["derived"] = str(error)
        placed = torch.tensor([1.0], device=platform.device())
        dist.all_reduce(placed)
        moved = torch.zeros(2).to(platform.device()) + 1
        dist.all_reduce(moved)
        out["placed"] = (placed.item(), moved.tolist())
    dist.all_reduce(torch.tensor([1.0]))  # the harness is off again
    return out


def _train_step(pipeline_model_parallel_size: int) -> dict:
    from megatron.core import parallel_state

    from megatron.early_exit import platform
    from megatron.early_exit.model.builder import build_early_exit_model
    from megatron.early_exit.training.loop import TrainingConfig, setup_trainer, train_step
    from tests.device_check import UnplacedTensorError, check_collective_devices
    from tests.helpers import SEQ, VOCAB, make_batch, tiny_config

    pp = pipeline_model_parallel_size
    config = tiny_config(pipeline_model_parallel_size=pp)
    platform.initialize(1, pp, seed=3)
    model = build_early_exit_model(config, VOCAB, SEQ, seed=3)
    trainer = setup_trainer(model, TrainingConfig(train_iters=2))
    dp_rank = parallel_state.get_data_parallel_rank()
    batches = [make_batch(10 * dp_rank + i) for i in range(2)]
    batches = [{k: v.to(platform.device()) for k, v in b.items()} for b in batches]
    with check_collective_devices():
        try:
            metrics = train_step(trainer, batches)
        except UnplacedTensorError as error:
            return {"error": str(error)}
    return {"lm_loss": metrics.lm_loss, "exit_losses": metrics.exit_losses}


def _worker(rank: int, world_size: int) -> dict:
    from megatron.early_exit import platform

    platform.initialize(1, 1, seed=3)
    return {"harness": _harness_checks(), "dp2": _train_step(1), "pp2": _train_step(2)}


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_distributed(_worker, 2, timeout_s=300)


def test_harness_rejects_tensors_built_without_a_device(results):
    harness = results[0]["harness"]
    for case in ("bare_factory", "derived"):
        assert "received a" in harness[case] and "built without a device" in harness[case]
        assert "all_reduce" in harness[case] and "test_collective_devices.py" in harness[case]
    assert harness["placed"] == (2.0, [2.0, 2.0])


@pytest.mark.parametrize("layout", ["dp2", "pp2"])
def test_training_step_gives_collectives_device_tensors(results, layout):
    for rank_result in results:
        step = rank_result[layout]
        assert "error" not in step, step.get("error")
        assert step["lm_loss"] > 0 and set(step["exit_losses"]) == {1, 2, 3, 4}
    # the reported losses are averaged over the data-parallel replicas: equal on every rank
    assert results[0][layout]["lm_loss"] == pytest.approx(results[1][layout]["lm_loss"])
