"""EE-Tuning on part of the model: ``--tune-exit-pipeline-parallel-size K``.

The entry script's ``main`` runs in spawned ranks, several times per spawn, each time with a
fresh rendezvous port. Everything is fp32 with dropout off, on 4-layer models with exits after
layers 1 and 2, so a partial run builds layers 1-2 only (no final norm, no output layer) and
reads only those from the checkpoint.

* One rank, a Llama-style model (untied embeddings, untied MLP exits): 3 pre-training steps
  and a save. Then EE-Tuning for 6 iterations with the full model, and with K=1 stopped at
  iteration 4 (saving at 2 and 4). The K=1 run is then resumed from its own checkpoint to 6.
* Two ranks, a GPT-style model (tied embeddings, tied norm exits): pre-training at PP=2, and
  EE-Tuning with the full model at PP=2, with K=2 (one layer per stage, the second stage
  holding a synchronised copy of the embedding for its tied exit), with K=1 at DP=2 and the
  distributed optimizer (the untouched layers are read and saved by both data-parallel ranks),
  and with K=1 at TP=2.

Checked: the partial runs' losses equal the full-model run's, since the frozen backbone gives the
exits the same inputs. Every partial save is a complete checkpoint: loaded as a full model, its
backbone and final head are bit-identical to the pre-trained checkpoint's, and its exits equal
the full-model tuning's. Bad values stop with a message that names the flag.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron.early_exit.launch import free_port
from tests.distributed.harness import run_distributed

FLAG = "--tune-exit-pipeline-parallel-size"
COMMON = (
    "--num-layers 4 --hidden-size 32 --num-attention-heads 4 --seq-length 32 "
    "--hidden-dropout 0 --attention-dropout 0 --exit-layer-nums 1 2 --use-exit-norm "
    "--mock-data --micro-batch-size 2 --global-batch-size 4 --lr 3e-3 --min-lr 3e-4 "
    "--log-interval 1 --eval-interval 100 --eval-iters 1 --seed 5"
).split()
LLAMA = (
    "--ffn-hidden-size 64 --group-query-attention --num-query-groups 2 --normalization RMSNorm "
    "--swiglu --position-embedding-type rope --disable-bias-linear "
    "--untie-embeddings-and-output-weights --use-exit-mlp --untie-exit-output-weights"
).split()


def _fresh_port(tmp: Path) -> None:
    """A rendezvous port for the next ``main`` (each ends by destroying the process group):
    rank 0 picks a free one right before use and hands it to the others through a file, so
    that no other process on the machine takes it in between."""
    rank = int(os.environ["RANK"])
    ports = tmp / "ports"
    ports.mkdir(exist_ok=True)
    count = int(os.environ.get("TUNE_PARTIAL_TEST_RUNS", "0")) + 1
    os.environ["TUNE_PARTIAL_TEST_RUNS"] = str(count)
    path = ports / str(count)
    if rank == 0:
        (ports / "tmp").write_text(str(free_port()))
        os.replace(ports / "tmp", path)
    deadline = time.monotonic() + 120
    while not path.is_file():
        assert time.monotonic() < deadline, f"no port from rank 0 for run {count}"
        time.sleep(0.05)
    os.environ["MASTER_PORT"] = path.read_text()


def _main(argv: list[str], tmp: Path) -> None:
    from megatron.early_exit.training.run import main

    _fresh_port(tmp)
    main(argv)


def _pretrain(save: Path, *extra: str) -> None:
    _main([*COMMON, *extra, "--train-iters", "3", "--save", str(save)], save.parent)


def _tune(load: Path, name: str, iters: int, *extra: str) -> None:
    """EE-Tune ``load`` into ``<load's parent>/<name>``, metrics in ``<name>.jsonl``."""
    root = load.parent
    flags = [
        *COMMON, "--load", str(load), "--use-checkpoint-args", "--tune-exit",
        "--train-iters", str(iters), "--save", str(root / name),
        "--metrics-file", str(root / f"{name}.jsonl"), *extra,
    ]  # fmt: skip
    _main(flags, root)


def _complete_model(load: Path) -> dict:
    """The complete model of a checkpoint as generation loads it (TP=1, PP=1), with its record."""
    from megatron.early_exit import platform
    from megatron.early_exit.checkpoint import store as ckpt
    from megatron.early_exit.checkpoint.record import config_from_checkpoint
    from megatron.early_exit.model.builder import build_early_exit_model

    _fresh_port(load.parent)
    info = ckpt.read_checkpoint_info(load)
    config = config_from_checkpoint(info, include_final_loss=True)
    platform.initialize(1, 1, seed=1)
    model = build_early_exit_model(
        config,
        info.model["vocab_size"],
        info.model["max_sequence_length"],
        position_embedding_type=info.model["position_embedding_type"],
        seed=99,  # values no load replaces would show up as a mismatch
    )
    ckpt.load_checkpoint(load, model)
    # numpy: torch tensors would travel to the parent through shared memory of a finished rank
    state = {
        k: v.detach().numpy().copy() for k, v in model.state_dict().items() if torch.is_tensor(v)
    }
    platform.destroy()
    return {
        "state": state,
        "iteration": info.iteration,
        "num_layers": info.model_config["num_layers"],
        "layout": info.layout,
    }


def one_rank_worker(rank: int, world_size: int, tmp: str) -> dict:
    pretrained = Path(tmp) / "pretrained"
    _pretrain(pretrained, *LLAMA)
    _tune(pretrained, "full", 6, "--finetune")
    _tune(pretrained, "k1", 6, "--finetune", FLAG, "1",
          "--exit-interval", "4", "--save-interval", "2")  # fmt: skip
    _tune(Path(tmp) / "k1", "k1_resumed", 6, FLAG, "1")
    names = ("pretrained", "full", "k1", "k1_resumed")
    return {name: _complete_model(Path(tmp) / name) for name in names}


def two_rank_worker(rank: int, world_size: int, tmp: str) -> dict:
    pretrained = Path(tmp) / "pretrained"
    _pretrain(pretrained, "--pipeline-model-parallel-size", "2")
    _tune(pretrained, "full", 4, "--finetune", "--pipeline-model-parallel-size", "2")
    _tune(pretrained, "k2", 4, "--finetune", FLAG, "2")
    _tune(pretrained, "k1_dp2", 4, "--finetune", FLAG, "1", "--use-distributed-optimizer")
    _tune(pretrained, "k1_tp2", 4, "--finetune", FLAG, "1",
          "--tensor-model-parallel-size", "2")  # fmt: skip
    names = ("pretrained", "full", "k2", "k1_dp2", "k1_tp2")
    return {name: _complete_model(Path(tmp) / name) for name in names}


def read_losses(path: Path) -> dict[int, dict[str, float]]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["iteration"]: r["exit_losses"] for r in records if "exit_losses" in r}


def _max_relative_error(a: np.ndarray, b: np.ndarray) -> float:
    scale = float(np.abs(b).max()) or 1.0
    return float(np.abs(a.astype(np.float64) - b).max()) / scale


def _spawn(worker, world_size: int, tmp: Path) -> dict:
    return {**run_distributed(worker, world_size, str(tmp))[0], "tmp": tmp}


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> dict:
    return _spawn(one_rank_worker, 1, tmp_path_factory.mktemp("tune_partial_1"))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    return _spawn(two_rank_worker, 2, tmp_path_factory.mktemp("tune_partial_2"))


def _assert_losses_equal(
    got: dict, expected: dict, iterations: list[int], tolerance: float = 1e-6
) -> None:
    assert sorted(got) == iterations, sorted(got)
    for iteration in iterations:
        assert set(expected[iteration]) == {"1", "2"}
        for depth, value in expected[iteration].items():
            assert got[iteration][depth] == pytest.approx(value, rel=tolerance), iteration


def _assert_complete(
    run: dict, pretrained: dict, tuned_exits: dict, tolerance: float = 1e-6
) -> None:
    """``run`` is the complete model: the pre-trained backbone and head, ``tuned_exits``'s exits."""
    assert run["num_layers"] == 4
    assert set(run["state"]) == set(pretrained["state"])
    for name, value in run["state"].items():
        if name.startswith("exit_heads."):
            error = _max_relative_error(value, tuned_exits["state"][name])
            assert error <= tolerance, (name, error)
        else:
            assert np.array_equal(value, pretrained["state"][name]), name
    changed = [n for n, v in run["state"].items() if not np.array_equal(v, pretrained["state"][n])]
    assert changed and all(n.startswith("exit_heads.") for n in changed)


def test_k1_losses_equal_full_model_tuning_and_resume(one_rank):
    full = read_losses(one_rank["tmp"] / "full.jsonl")
    _assert_losses_equal(read_losses(one_rank["tmp"] / "k1.jsonl"), full, [1, 2, 3, 4])
    _assert_losses_equal(read_losses(one_rank["tmp"] / "k1_resumed.jsonl"), full, [5, 6])


def test_k1_saves_are_complete_checkpoints(one_rank):
    pretrained, full = one_rank["pretrained"], one_rank["full"]
    assert {"decoder.final_layernorm.weight", "output_layer.weight"} <= set(pretrained["state"])
    assert (one_rank["k1"]["iteration"], one_rank["k1_resumed"]["iteration"]) == (4, 6)
    assert one_rank["k1"]["layout"]["pipeline_model_parallel_size"] == 1
    assert sorted(p.name for p in (one_rank["tmp"] / "k1").iterdir()) == [
        "iter_0000002", "iter_0000004", "latest_checkpointed_iteration.txt",
    ]  # fmt: skip
    _assert_complete(one_rank["k1_resumed"], pretrained, full)
    _assert_complete(one_rank["k1"], pretrained, one_rank["k1"])  # (exits changed)


@pytest.mark.parametrize(("name", "layout"), [("k2", (1, 2, 1)), ("k1_dp2", (1, 1, 2)),
                                              ("k1_tp2", (2, 1, 1))])  # fmt: skip
def test_k2_dp2_tp2_equal_full_model_tuning_at_pp2(two_ranks, name, layout):
    full = read_losses(two_ranks["tmp"] / "full.jsonl")
    tolerance = 1e-5 if name == "k1_tp2" else 1e-6  # TP=2 sums in another order
    got = read_losses(two_ranks["tmp"] / f"{name}.jsonl")
    _assert_losses_equal(got, full, [1, 2, 3, 4], tolerance)
    _assert_complete(two_ranks[name], two_ranks["pretrained"], two_ranks["full"], tolerance)
    assert tuple(two_ranks[name]["layout"].values()) == layout


def _error(argv: list[str], capsys) -> str:
    from megatron.early_exit.training.run import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("stages", "with_load", "with_tune", "message"),
    [
        ("0", True, True, "--tune-exit-pipeline-parallel-size must be >= 1, got 0"),
        (
            "3",
            True,
            True,
            "--tune-exit-pipeline-parallel-size 3: the 2 layers up to the deepest "
            "exit cannot be split over 3 stages",
        ),  # fmt: skip
        (
            "2",
            True,
            True,
            "--tune-exit-pipeline-parallel-size 2: the world size 1 is not a "
            "multiple of --tensor-model-parallel-size x 2 stages",
        ),  # fmt: skip
        ("1", False, True, "--tune-exit-pipeline-parallel-size needs --load"),
        ("1", True, False, "--tune-exit-pipeline-parallel-size needs --tune-exit"),
    ],
)
def test_bad_values_name_the_flag(one_rank, stages, with_load, with_tune, message, capsys,
                                  monkeypatch):  # fmt: skip
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = [*COMMON, FLAG, stages]
    if with_load:
        argv += ["--load", str(one_rank["tmp"] / "pretrained"), "--use-checkpoint-args"]
    if with_tune:
        argv.append("--tune-exit")
    assert message in _error(argv, capsys)
