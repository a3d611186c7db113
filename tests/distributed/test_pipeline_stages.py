"""Pipeline stage slices (PP=3, 3 gloo ranks): exits on the first, a middle and the last stage.

Checks that each stage builds exactly its exits under split-independent keys, that tied exits on
the middle stage hold a copy of the word embedding that starts equal to it and whose gradient is
all-reduced with the first/last stage by megatron-core's ``finalize_model_grads``, and that a
forward chained across the stages gives the PP=1 losses for the final head and every exit.
"""

from __future__ import annotations

import pytest
import torch

from megatron.early_exit.config import ExitHeadConfig
from tests.distributed.harness import gather_dicts, run_distributed
from tests.helpers import SEQ, VOCAB, make_batch, relative_error, tiny_config

EXITS = (
    ExitHeadConfig(2, structure="head"),  # stage 0
    ExitHeadConfig(3, structure="norm"),  # stage 1 (a middle stage), tied
    ExitHeadConfig(5, pre_exit=True, structure="mlp"),  # stage 2, depth 4
    ExitHeadConfig(6, structure="block", untied=True),  # stage 2, after the last layer
)
EXPECTED_KEYS = {0: ["2"], 1: ["3"], 2: ["4", "6"]}


def _config(pp: int):
    return tiny_config("gpt", num_layers=6, exit_heads=EXITS, pipeline_model_parallel_size=pp)


def _init(pp: int):
    from megatron.early_exit import platform
    from megatron.early_exit.placement import tied_exit_stages

    platform.initialize(1, pp, seed=3, embedding_stages=tied_exit_stages(_config(pp)))


def _stage_losses(model, batch, pp: int) -> dict:
    """Chain the forward through the stages with blocking p2p; every stage returns its losses."""
    from megatron.core import parallel_state as ps

    from megatron.early_exit.model.losses import masked_mean

    group = ps.get_pipeline_model_parallel_group()
    stage = ps.get_pipeline_model_parallel_rank()
    ranks = torch.distributed.get_process_group_ranks(group)
    if stage > 0:
        hidden = torch.empty(SEQ, batch["input_ids"].shape[0], model.config.hidden_size)
        torch.distributed.recv(hidden, src=ranks[stage - 1], group=group)
        model.set_input_tensor(hidden)
    output, exits = model(
        batch["input_ids"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"]
    )
    if stage < pp - 1:
        torch.distributed.send(output.detach().contiguous(), dst=ranks[stage + 1], group=group)
    losses = {f"exit_{d}": masked_mean(v, batch["loss_mask"]).item() for d, v in exits.items()}
    if stage == pp - 1:
        losses["final"] = masked_mean(output, batch["loss_mask"]).item()
    return losses


def _embedding_copies_in_sync(model) -> dict:
    """Megatron's own init on every stage: the tied copies must equal the stage-0 embedding."""
    weight = model.shared_embedding_or_output_weight()
    copies = [torch.empty_like(weight) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(copies, weight.detach().contiguous())
    return {"copy_error": max(relative_error(c, copies[0]) for c in copies)}


def _grads_all_reduced(model) -> dict:
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    stage = torch.distributed.get_rank()
    weight = model.shared_embedding_or_output_weight()
    weight.main_grad.fill_(float(stage + 1))
    finalize_model_grads([ddp])
    return {"reduced_grad": weight.main_grad.mean().item()}


def stages_worker(rank: int, world_size: int) -> dict:
    from megatron.early_exit.model.builder import build_early_exit_model, reproducible_init_

    _init(1)
    batch = make_batch(seed=9)
    reference = build_early_exit_model(_config(1), VOCAB, SEQ, seed=21)
    expected = _stage_losses(reference, batch, pp=1)

    _init(3)
    model = build_early_exit_model(_config(3), VOCAB, SEQ)  # megatron-core's own init
    out = {f"keys/{rank}": sorted(model.exit_heads.keys())}
    out.update(_embedding_copies_in_sync(model))
    reproducible_init_(model, seed=21)
    got = gather_dicts(_stage_losses(model, batch, pp=3))
    out["losses"] = {k: (got.get(k), v) for k, v in expected.items()}
    out.update(_grads_all_reduced(model))
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_distributed(stages_worker, 3)


def test_each_stage_builds_its_exits_under_split_independent_keys(results):
    for stage, keys in EXPECTED_KEYS.items():
        assert results[stage][f"keys/{stage}"] == keys


def test_tied_copies_start_equal_to_the_embedding(results):
    for result in results:
        assert result["copy_error"] == 0.0


def test_tied_exit_grads_all_reduced_across_first_middle_last(results):
    for result in results:
        assert result["reduced_grad"] == pytest.approx(1.0 + 2.0 + 3.0)


def test_chained_stage_losses_match_single_stage(results):
    losses = results[0]["losses"]
    assert sorted(losses) == ["exit_2", "exit_3", "exit_4", "exit_6", "final"]
    for key, (got, expected) in losses.items():
        assert got is not None, key
        assert abs(got - expected) / expected < 1e-5, (key, got, expected)
