"""``pretrain_early_exit_gpt.py`` end to end under torchrun (2 processes, PP=2) on real text.

The resume also exercises ``--use-checkpoint-args``.

Three runs of a small model on the default corpus (Brown where fetched, else the bundled
excerpt): 20 iterations straight; 10 iterations saved; a resume of that to 20. The straight run's
losses decrease; the resumed iterations 11-20 equal the straight run's in fp32 (model, optimizer,
scheduler, RNG with dropout on, and the data position all restored).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.distributed.harness import torchrun_command

ROOT = Path(__file__).resolve().parents[2]
FLAGS = (
    "--pipeline-model-parallel-size 2 --num-layers 4 --hidden-size 64 --num-attention-heads 4 "
    "--seq-length 64 --normalization RMSNorm --swiglu --position-embedding-type rope "
    "--exit-layer-nums 1 3 --use-exit-norm --exit-layer-weight 0.5 0.5 "
    "--micro-batch-size 2 --global-batch-size 4 --lr 3e-3 --min-lr 3e-4 --log-interval 1 "
    "--eval-interval 10 --eval-iters 2 --seed 7"
).split()


def torchrun(*flags: str, cwd: Path) -> None:
    command = [*torchrun_command(2), str(ROOT / "pretrain_early_exit_gpt.py"), *FLAGS, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def read_metrics(path: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["iteration"]: r for r in records if "lm_loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("pretrain")
    torchrun("--train-iters", "20", "--metrics-file", str(work / "straight.jsonl"), cwd=work)
    torchrun("--train-iters", "20", "--exit-interval", "10", "--save", str(work / "ckpt"), cwd=work)
    # --use-checkpoint-args: the wrong shape and exits given here must be replaced by the
    # checkpoint's (otherwise the load fails, or the exits/losses differ).
    torchrun("--train-iters", "20", "--load", str(work / "ckpt"), "--use-checkpoint-args",
             "--hidden-size", "32", "--exit-layer-nums", "2",
             "--metrics-file", str(work / "resumed.jsonl"), cwd=work)  # fmt: skip
    return {
        "straight": read_metrics(work / "straight.jsonl"),
        "resumed": read_metrics(work / "resumed.jsonl"),
        "final": [json.loads(line) for line in (work / "straight.jsonl").read_text().splitlines()][
            -1
        ],
        "checkpoint": work / "ckpt",
    }


def test_losses_decrease_on_real_text(runs):
    straight = runs["straight"]
    assert sorted(straight) == list(range(1, 21))
    for key in ("lm_loss", "exit_losses"):
        first = [straight[i][key] for i in (1, 2, 3)]
        last = [straight[i][key] for i in (18, 19, 20)]
        if key == "exit_losses":
            assert set(first[0]) == {"1", "3"}
            for depth in ("1", "3"):
                assert sum(r[depth] for r in last) < 0.9 * sum(r[depth] for r in first)
        else:
            assert sum(last) < 0.9 * sum(first)


def test_resume_reproduces_the_uninterrupted_run(runs):
    straight, resumed = runs["straight"], runs["resumed"]
    assert sorted(resumed) == list(range(11, 21))
    for iteration in range(11, 21):
        assert resumed[iteration]["lm_loss"] == pytest.approx(
            straight[iteration]["lm_loss"], rel=1e-6
        )
        for depth, value in straight[iteration]["exit_losses"].items():
            assert resumed[iteration]["exit_losses"][depth] == pytest.approx(value, rel=1e-6)


def test_checkpoint_published_and_final_evaluation_reported(runs):
    assert (runs["checkpoint"] / "latest_checkpointed_iteration.txt").read_text().strip() == "10"
    assert (runs["checkpoint"] / "iter_0000010").is_dir()
    final = runs["final"]["evaluation"]
    assert set(final) == {"lm_loss", "exit_1", "exit_3"}


@pytest.mark.parametrize("precision", ["--bf16", "--fp16 --initial-loss-scale 4096"])
def test_half_precision_training_runs_and_learns(precision, tmp_path):
    """bf16 (Float16Module + fp32 main params) and fp16 (dynamic loss scaling) on CPU, PP=2."""
    metrics = tmp_path / "metrics.jsonl"
    torchrun(
        *precision.split(), "--train-iters", "12", "--metrics-file", str(metrics), cwd=tmp_path
    )
    records = read_metrics(metrics)
    first, last = records[1], records[12]
    assert last["lm_loss"] < first["lm_loss"]
    for depth in ("1", "3"):
        assert last["exit_losses"][depth] < first["exit_losses"][depth]
