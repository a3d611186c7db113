"""Checkpoints through dist_checkpointing: resume, resharding, crash safety, clear errors.

Two spawns, many checks each:

* 2 ranks, first at DP=2 in fp32 with dropout on (so the RNG restore matters): 20 iterations
  straight give the same losses as 10, save, a fresh model/optimizer/RNG state, load, 10 more;
  with the plain optimizer and with the distributed optimizer (which, without megatron-core
  0.16.1's checkpoint fix, silently diverges after the load). A save that dies after writing
  everything but before publishing, and one that dies after partial writes, leave the previous
  checkpoint loadable and the tracker unchanged; a different exit layout is refused unless
  ``finetune``; missing directory, missing tracker and a corrupted checkpoint give clear errors.
  Then resharding: a trained TP=2 checkpoint loads at TP=1 and at PP=2 with the same final and
  exit logits; a PP=2 checkpoint loads at PP=1; exit-head keys do not depend on the split and
  TP-sharded exit weights are saved as TP shards of the full tensor.
* 3 ranks, PP=3 with a tied exit on the middle stage: its embedding copy is saved as a replica
  of the word embedding, not as a tensor of its own, and reloads from it (PP=3 and PP=1).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from megatron.early_exit.config import ExitHeadConfig
from tests.distributed.harness import gather_dicts, run_distributed
from tests.helpers import (
    SEQ,
    VOCAB,
    all_logits,
    make_batch,
    position_embedding_type,
    relative_error,
    tiny_config,
)

HALF = 10
MODEL_ARGS = {"tokenizer": {"type": "null", "vocab_size": VOCAB}}
RESUME_CASES = (("plain", "llama", False), ("distributed", "gpt", True))
PP3_EXITS = (
    ExitHeadConfig(2, structure="head"),  # stage 0
    ExitHeadConfig(3, structure="norm"),  # stage 1 (middle), tied to the word embedding
    ExitHeadConfig(5, pre_exit=True, structure="mlp"),  # stage 2
    ExitHeadConfig(6, structure="block", untied=True),  # stage 2
)


# ------------------------------------------------------------------------------------------
# Shared helpers (run inside the spawned ranks)
# ------------------------------------------------------------------------------------------


def _trainer(config, family: str, *, seed: int, distributed_optimizer: bool = False):
    from megatron.early_exit.model.builder import build_early_exit_model
    from megatron.early_exit.training.loop import TrainingConfig, setup_trainer

    model = build_early_exit_model(
        config, VOCAB, SEQ, position_embedding_type=position_embedding_type(family), seed=seed
    )
    training = TrainingConfig(train_iters=2 * HALF, lr=3e-3, min_lr=3e-4, lr_warmup_iters=3)
    return setup_trainer(model, training, distributed_optimizer=distributed_optimizer)


def _microbatches(iteration: int) -> list[dict]:
    from megatron.core import parallel_state

    dp_rank = parallel_state.get_data_parallel_rank()
    return [make_batch(seed=1000 * iteration + 10 * dp_rank)]


def _train(trainer, stop: int) -> list[list[float]]:
    """Iterations up to ``stop``; each as [final loss, exit losses..., grad norm, lr]."""
    from megatron.early_exit.training.loop import train_step

    history = []
    trainer.model.train()
    while trainer.iteration < stop:
        m = train_step(trainer, _microbatches(trainer.iteration))
        history.append([m.lm_loss, *m.exit_losses.values(), m.grad_norm, m.lr])
    return history


def _max_relative_difference(a: list[list[float]], b: list[list[float]]) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return max(abs(x - y) / max(abs(y), 1e-12) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def _chained_logits(model, batch) -> dict:
    """PP>1: chain one forward through the stages with blocking p2p; all logits on every rank."""
    from megatron.core import parallel_state as ps

    group = ps.get_pipeline_model_parallel_group()
    stage, num_stages = (
        ps.get_pipeline_model_parallel_rank(),
        ps.get_pipeline_model_parallel_world_size(),
    )
    ranks = torch.distributed.get_process_group_ranks(group)
    model.eval()
    with torch.no_grad():
        if stage > 0:
            hidden = torch.empty(SEQ, batch["input_ids"].shape[0], model.config.hidden_size)
            torch.distributed.recv(hidden, src=ranks[stage - 1], group=group)
            model.set_input_tensor(hidden)
        output, exits = model(
            batch["input_ids"], batch["position_ids"], batch["attention_mask"],
            runtime_gather_output=True,
        )  # fmt: skip
        if stage < num_stages - 1:
            torch.distributed.send(output.contiguous(), dst=ranks[stage + 1], group=group)
    local = {f"exit_{d}": v for d, v in exits.items()}
    if stage == num_stages - 1:
        local["final"] = output
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, local)
    merged = {}
    for part in gathered:
        merged.update(part)
    return merged


def _logits_error(got: dict, expected: dict) -> tuple[float, list]:
    assert sorted(got) == sorted(expected), (sorted(got), sorted(expected))
    return max(relative_error(got[k], v) for k, v in expected.items()), sorted(expected)


def _error_message(fn) -> str:
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


# ------------------------------------------------------------------------------------------
# resume: 2 ranks, DP=2
# ------------------------------------------------------------------------------------------


def _resume_case(root: Path, family: str, distributed_optimizer: bool) -> tuple[dict, object]:
    from megatron.early_exit import platform
    from megatron.early_exit.checkpoint import record
    from megatron.early_exit.checkpoint import store as ckpt

    config = tiny_config(family, hidden_dropout=0.1, attention_dropout=0.1)
    platform.initialize(1, 1, seed=5)
    straight = _trainer(config, family, seed=11, distributed_optimizer=distributed_optimizer)
    expected = _train(straight, 2 * HALF)

    platform.initialize(1, 1, seed=5)
    first = _trainer(config, family, seed=11, distributed_optimizer=distributed_optimizer)
    resumed_history = _train(first, HALF)
    first.save_checkpoint(root, data_state={"consumed_samples": 40}, model_args=MODEL_ARGS)

    platform.initialize(1, 1, seed=77)  # other RNG states; other weights below
    resumed = _trainer(config, family, seed=12, distributed_optimizer=distributed_optimizer)
    iteration = resumed.load_checkpoint(root)
    resumed_history += _train(resumed, 2 * HALF)
    info = ckpt.read_checkpoint_info(root)
    rebuilt = record.config_from_checkpoint(info)
    out = {
        "iteration": iteration,
        "data_state": info.data_state,
        "model_args": info.model_args,
        "model": info.model,
        "optimizer": info.optimizer,
        "layout": info.layout,
        "config_round_trip": record.config_to_dict(rebuilt) == record.config_to_dict(config),
        "resume_error": _max_relative_difference(resumed_history, expected),
        "num_iterations": len(resumed_history),
    }
    return out, first


def _crash_checks(root: Path, trainer) -> dict:
    """``trainer`` is at iteration HALF and was just saved into ``root``."""
    from unittest import mock

    from megatron.early_exit.checkpoint import store as ckpt

    batch = make_batch(seed=4242)
    saved = all_logits(trainer.model.module, batch)
    _train(trainer, HALF + 2)  # now differs from the checkpoint
    out = {}

    def fail_publish(*args):
        raise OSError("simulated crash before publishing")

    with mock.patch.object(ckpt, "_publish", fail_publish):
        out["publish_crash"] = _error_message(
            lambda: trainer.save_checkpoint(root, model_args=MODEL_ARGS)
        )
    staging = root / (ckpt.iteration_dir_name(HALF + 2) + ckpt.INCOMPLETE_SUFFIX)
    out["publish_crash_left_staging"] = (staging / "metadata.json").is_file()

    def partial_save(state, directory, **kwargs):
        (Path(directory) / f"__{torch.distributed.get_rank()}_0.distcp").write_bytes(b"partial")
        raise RuntimeError("simulated kill during the write")

    with mock.patch.object(ckpt.dist_checkpointing, "save", partial_save):
        out["partial_write_crash"] = _error_message(
            lambda: trainer.save_checkpoint(root, model_args=MODEL_ARGS)
        )
    torch.distributed.barrier()
    out["tracker_after_crashes"] = (root / ckpt.TRACKER_FILENAME).read_text()
    out["published_after_crashes"] = sorted(p.name for p in root.iterdir())

    trainer.iteration = 999  # load must reset it
    out["reloaded_iteration"] = trainer.load_checkpoint(root)
    out["reloaded_logits_error"] = _logits_error(all_logits(trainer.model.module, batch), saved)[0]
    return out


def _error_checks(root: Path, tmp: Path, family: str) -> dict:
    """Errors naming the problem; finetune with another exit layout."""
    from megatron.early_exit.checkpoint import store as ckpt

    out = {}
    config = tiny_config(family)
    trainer = _trainer(config, family, seed=3)
    out["missing_dir"] = _error_message(lambda: trainer.load_checkpoint(tmp / "nowhere"))
    empty = tmp / "empty"
    empty.mkdir(exist_ok=True)
    out["no_tracker"] = _error_message(lambda: trainer.load_checkpoint(empty))

    corrupted = tmp / "corrupted"
    if torch.distributed.get_rank() == 0:
        shutil.copytree(root, corrupted, ignore=shutil.ignore_patterns("*.incomplete"))
        iteration_dir = ckpt.read_checkpoint_info(corrupted).path
        for shard in iteration_dir.glob("*.distcp"):
            shard.write_bytes(shard.read_bytes()[:100])  # truncated by a full disk, say
    torch.distributed.barrier()
    out["corrupted"] = _error_message(lambda: trainer.load_checkpoint(corrupted))
    if torch.distributed.get_rank() == 0:
        (ckpt.read_checkpoint_info(corrupted).path / "metadata.json").unlink()
    torch.distributed.barrier()
    out["incomplete"] = _error_message(lambda: trainer.load_checkpoint(corrupted))

    other_exits = (ExitHeadConfig(2, structure="norm", untied=True),)
    other = _trainer(tiny_config(family, exit_heads=other_exits), family, seed=3)
    out["exit_mismatch"] = _error_message(lambda: other.load_checkpoint(root))
    out["finetune_iteration"] = other.load_checkpoint(root, finetune=True)
    trained = _trainer(config, family, seed=3)
    trained.load_checkpoint(root)
    shared = {n: p for n, p in trained.model.module.named_parameters()}
    errors = [
        relative_error(p.detach(), shared[n].detach())
        for n, p in other.model.module.named_parameters()
        if not n.startswith("exit_heads.")
    ]
    out["finetune_backbone_error"] = max(errors)
    distopt = _trainer(config, family, seed=3, distributed_optimizer=True)
    out["optimizer_mismatch"] = _error_message(lambda: distopt.load_checkpoint(root))
    return out


def _resume_checks(tmp_path: Path) -> dict:
    out = {}
    for name, family, distributed_optimizer in RESUME_CASES:
        out[name], first = _resume_case(tmp_path / name, family, distributed_optimizer)
        if name == "plain":
            out["crash"] = _crash_checks(tmp_path / name, first)
            out["errors"] = _error_checks(tmp_path / name, tmp_path, family)
    return out


def pair_worker(rank: int, world_size: int, tmp: str) -> dict:
    """Every 2-rank check: resume (DP=2), crash safety and errors, then resharding."""
    return {
        "resume": _resume_checks(Path(tmp) / "resume"),
        "reshard": _reshard_checks(Path(tmp) / "reshard"),
    }


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict:
    return run_distributed(pair_worker, 2, str(tmp_path_factory.mktemp("pair")))[0]


@pytest.fixture(scope="module")
def resume(pair) -> dict:
    return pair["resume"]


@pytest.fixture(scope="module")
def reshard(pair) -> dict:
    return pair["reshard"]


@pytest.mark.parametrize("name", [case[0] for case in RESUME_CASES])
def test_resume_equals_uninterrupted_run(resume, name):
    result = resume[name]
    assert result["iteration"] == HALF
    assert result["num_iterations"] == 2 * HALF
    assert result["resume_error"] <= 1e-7, result["resume_error"]


@pytest.mark.parametrize("name", [case[0] for case in RESUME_CASES])
def test_checkpoint_records_what_rebuilding_the_model_needs(resume, name):
    result = resume[name]
    assert result["data_state"] == {"consumed_samples": 40}
    assert result["model_args"] == MODEL_ARGS
    assert result["model"]["vocab_size"] == VOCAB
    assert result["model"]["max_sequence_length"] == SEQ
    assert result["optimizer"] == name
    assert result["layout"]["data_parallel_size"] == 2
    assert result["config_round_trip"]


def test_crash_before_publishing_keeps_previous_checkpoint(resume):
    crash = resume["crash"]
    assert "simulated crash before publishing" in crash["publish_crash"]
    assert crash["publish_crash_left_staging"]  # everything was written, nothing published
    assert crash["tracker_after_crashes"] == str(HALF)
    assert crash["reloaded_iteration"] == HALF
    assert crash["reloaded_logits_error"] == 0.0


def test_crash_during_write_keeps_previous_checkpoint(resume):
    crash = resume["crash"]
    assert "simulated kill during the write" in crash["partial_write_crash"]
    assert "iter_0000010" in crash["published_after_crashes"]
    assert "iter_0000012" not in crash["published_after_crashes"]


def test_errors_name_the_problem(resume):
    errors = resume["errors"]
    assert "CheckpointError" in errors["missing_dir"] and "does not exist" in errors["missing_dir"]
    assert "latest_checkpointed_iteration.txt" in errors["no_tracker"]
    assert "could not be loaded" in errors["corrupted"]
    assert "metadata.json missing" in errors["incomplete"]
    assert "distributed optimizer" in errors["optimizer_mismatch"]


def test_exit_mismatch_refused_unless_finetune(resume):
    errors = resume["errors"]
    assert "different model" in errors["exit_mismatch"] and "exit heads" in errors["exit_mismatch"]
    assert errors["finetune_iteration"] == 0
    assert errors["finetune_backbone_error"] == 0.0


# ------------------------------------------------------------------------------------------
# reshard: 2 ranks, TP=2 <-> TP=1 <-> PP=2
# ------------------------------------------------------------------------------------------


def _exit_head_shards(model) -> dict:
    """{checkpoint key: (global shape, TP-sharded)} of every exit-head tensor of this rank."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    shards = {}
    for key, value in model.sharded_state_dict().items():
        if key.startswith("exit_heads.") and isinstance(value, ShardedTensor):
            shards[value.key] = (
                tuple(value.global_shape),
                value.axis_fragmentations != (1,) * len(value.global_shape),
            )
    return shards


def _reshard_checks(root: Path) -> dict:
    from megatron.early_exit import platform
    from megatron.early_exit.model.builder import reproducible_init_

    out, family = {}, "gpt"
    batch = make_batch(seed=31)

    platform.initialize(2, 1, seed=5)
    trainer = _trainer(tiny_config(family, tensor_model_parallel_size=2), family, seed=21)
    _train(trainer, 3)  # trained weights and optimizer state
    expected_tp2 = all_logits(trainer.model.module, batch)
    out["tp2_shards"] = gather_dicts(_exit_head_shards(trainer.model.module))
    trainer.save_checkpoint(root / "tp2", model_args=MODEL_ARGS)

    platform.initialize(1, 2, seed=5)
    pp2 = _trainer(tiny_config(family, pipeline_model_parallel_size=2), family, seed=41)
    out["pp2_shards"] = gather_dicts(_exit_head_shards(pp2.model.module))
    expected_pp2 = _chained_logits(pp2.model.module, batch)
    pp2.save_checkpoint(root / "pp2", model_args=MODEL_ARGS)
    pp2.load_checkpoint(root / "tp2")  # TP=2 -> PP=2
    out["tp2_to_pp2"] = _logits_error(_chained_logits(pp2.model.module, batch), expected_tp2)

    platform.initialize(1, 1, seed=5)
    tp1 = _trainer(tiny_config(family), family, seed=99)
    out["tp1_shards"] = gather_dicts(_exit_head_shards(tp1.model.module))
    out["tp2_to_tp1_iteration"] = tp1.load_checkpoint(root / "tp2")
    out["tp2_to_tp1"] = _logits_error(all_logits(tp1.model.module, batch), expected_tp2)
    tp1.load_checkpoint(root / "pp2")  # PP=2 -> PP=1
    out["pp2_to_pp1"] = _logits_error(all_logits(tp1.model.module, batch), expected_pp2)
    reproducible_init_(tp1.model.module, seed=41)  # the PP=2 run's weights, built at PP=1
    out["pp2_reference"] = _logits_error(all_logits(tp1.model.module, batch), expected_pp2)
    return out


def test_tp2_checkpoint_loads_at_tp1_with_equalall_logits(reshard):
    error, keys = reshard["tp2_to_tp1"]
    assert keys == ["exit_1", "exit_2", "exit_3", "exit_4", "final"]
    assert error < 1e-5, error
    assert reshard["tp2_to_tp1_iteration"] == 3


def test_tp2_checkpoint_loads_at_pp2_with_equalall_logits(reshard):
    error, _ = reshard["tp2_to_pp2"]
    assert error < 1e-5, error


def test_pp2_checkpoint_loads_at_pp1_with_equalall_logits(reshard):
    assert reshard["pp2_reference"][0] < 1e-5  # the oracle itself holds
    error, keys = reshard["pp2_to_pp1"]
    assert keys == ["exit_1", "exit_2", "exit_3", "exit_4", "final"]
    assert error < 1e-5, error


def test_exit_head_keys_are_split_independent_and_tp_sharded(reshard):
    tp1, tp2, pp2 = reshard["tp1_shards"], reshard["tp2_shards"], reshard["pp2_shards"]
    assert tp1.keys() == tp2.keys() == pp2.keys()
    assert any(k.startswith("exit_heads.4.layer.") for k in tp1)  # the block exit's layer
    for key, (shape, _) in tp1.items():
        assert tp2[key][0] == shape, key  # TP shards of the full tensor, not one rank's shard
    sharded = {k for k, (_, is_sharded) in tp2.items() if is_sharded}
    assert "exit_heads.4.output_layer.weight" in sharded
    assert "exit_heads.4.layer.self_attention.linear_qkv.weight" in sharded
    assert "exit_heads.4.layer.mlp.linear_fc2.weight" in sharded
    assert "exit_heads.3.mlp.linear_fc1.weight" in sharded


# ------------------------------------------------------------------------------------------
# middle: 3 ranks, PP=3 with a tied exit on the middle stage
# ------------------------------------------------------------------------------------------


def middle_worker(rank: int, world_size: int, tmp: str) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron.early_exit import platform
    from megatron.early_exit.placement import tied_exit_stages

    root, out, family = Path(tmp), {}, "gpt"
    batch = make_batch(seed=37)
    config = tiny_config(family, num_layers=6, exit_heads=PP3_EXITS, pipeline_model_parallel_size=3)
    platform.initialize(1, 3, seed=5, embedding_stages=tied_exit_stages(config))
    pp3 = _trainer(config, family, seed=51)
    model = pp3.model.module
    if model.early_exit_word_embeddings is not None:
        entry = model.sharded_state_dict()["early_exit_word_embeddings"]
        assert isinstance(entry, ShardedTensor)
        out["copy_entry"] = (entry.key, entry.replica_id)
    expected = _chained_logits(model, batch)
    pp3.save_checkpoint(root / "pp3", model_args=MODEL_ARGS)
    with torch.no_grad():
        model.shared_embedding_or_output_weight().zero_()  # the load must restore every copy
    pp3.load_checkpoint(root / "pp3")
    out["pp3_to_pp3"] = _logits_error(_chained_logits(model, batch), expected)

    platform.initialize(1, 1, seed=5)
    pp1 = _trainer(tiny_config(family, num_layers=6, exit_heads=PP3_EXITS), family, seed=52)
    pp1.load_checkpoint(root / "pp3")
    out["pp3_to_pp1"] = _logits_error(all_logits(pp1.model.module, batch), expected)
    return out


@pytest.fixture(scope="module")
def middle(tmp_path_factory) -> list[dict]:
    return run_distributed(middle_worker, 3, str(tmp_path_factory.mktemp("middle")))


def test_middle_stage_copy_is_a_replica_of_the_word_embedding(middle):
    assert "copy_entry" not in middle[0] and "copy_entry" not in middle[2]
    key, replica_id = middle[1]["copy_entry"]
    assert key == "embedding.word_embeddings.weight"
    assert replica_id[0] == 2  # not the first stage's 0 nor the last stage's 1


def test_pp3_checkpoint_restores_the_middle_copy_and_loads_at_pp1(middle):
    for name in ("pp3_to_pp3", "pp3_to_pp1"):
        error, keys = middle[0][name]
        assert keys == ["exit_2", "exit_3", "exit_4", "exit_6", "final"], name
        assert error < 1e-5, (name, error)
