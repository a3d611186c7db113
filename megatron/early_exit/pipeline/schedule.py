"""One iteration of early-exit pipeline training (or evaluation, or EE-Tuning) on this stage.

The entry point the training loop calls: it builds this stage's plan, hands the executor its
communicator (group-relative p2p on the pipeline group) and the activation shape, runs it, and
merges every stage's reported losses over the pipeline group for logging.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron.early_exit import platform
from megatron.early_exit.config import EarlyExitTransformerConfig
from megatron.early_exit.pipeline.bubble_fill import FillConfig
from megatron.early_exit.pipeline.comm import StageCommunicator
from megatron.early_exit.pipeline.executor import ExecutionOptions, StageExecutor
from megatron.early_exit.pipeline.plan import build_plan
from megatron.early_exit.placement import stages_with_exits


def activation_shape(config: EarlyExitTransformerConfig, batch: dict) -> tuple[int, int, int]:
    """Shape of the tensor passed between stages: ``[s(/tp under SP), b, h]``."""
    micro_batch_size, seq_length = batch["input_ids"].shape
    if config.sequence_parallel:
        seq_length //= config.tensor_model_parallel_size
    return (seq_length, micro_batch_size, config.hidden_size)


def run_pipeline(
    model,
    config: EarlyExitTransformerConfig,
    microbatches: list[dict],
    options: ExecutionOptions,
    *,
    mode: str = "train",
    fill: FillConfig | None = None,
    fill_microbatches: list[dict] = (),
) -> dict[str, float]:
    """Run this stage's part of one iteration; returns the mean of every loss any stage computed
    (``final`` and ``exit_<depth>``) over microbatches and data-parallel replicas, identical on
    every rank."""
    if mode in ("train", "tune"):
        config.check_trainable_final_head_targets()
    num_stages = parallel_state.get_pipeline_model_parallel_world_size()
    stage = parallel_state.get_pipeline_model_parallel_rank()
    plan = build_plan(
        num_stages, stage, len(microbatches), stages_with_exits(config), fill=fill, mode=mode
    )
    communicator = None
    if num_stages > 1:
        communicator = StageCommunicator(
            parallel_state.get_pipeline_model_parallel_group(), stage, num_stages, platform.device()
        )
    dtype = config.pipeline_dtype or config.params_dtype or torch.float32
    executor = StageExecutor(
        model, communicator, activation_shape(config, microbatches[0]), dtype, options
    )
    losses = executor.run(plan, microbatches, list(fill_microbatches))
    return _average_over_data_parallel(_merge_over_pipeline(losses.means(), num_stages))


def _average_over_data_parallel(losses: dict[str, float]) -> dict[str, float]:
    """Mean of each reported loss over the data-parallel replicas (for logging)."""
    group = parallel_state.get_data_parallel_group()
    if not dist.is_initialized() or dist.get_world_size(group) == 1 or not losses:
        return losses
    names = sorted(losses)
    # On the device: on a GPU this group is NCCL, which takes no CPU tensors.
    values = torch.tensor([losses[n] for n in names], dtype=torch.float64, device=platform.device())
    dist.all_reduce(values, group=group)
    values /= dist.get_world_size(group)
    return dict(zip(names, values.tolist()))


def _merge_over_pipeline(local: dict[str, float], num_stages: int) -> dict[str, float]:
    if num_stages == 1:
        return local
    gathered = [None] * num_stages
    dist.all_gather_object(
        gathered, local, group=parallel_state.get_pipeline_model_parallel_group()
    )
    merged: dict[str, float] = {}
    for part in gathered:
        merged.update(part)
    return merged
