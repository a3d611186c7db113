"""EE-Tuning a saved checkpoint with ``--use-checkpoint-args``: the checkpoint gives the model,
the command line gives the objective. ``--exit-kl-weight`` and ``--exit-confidence-head`` must
reach the run (they were once silently dropped) and the tuned checkpoint keeps its confidence
heads when tuned again without the flag."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL = (
    "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--max-position-embeddings 32 --exit-layer-nums 1 3 --use-exit-norm"
)
COMMON = (
    "--micro-batch-size 2 --global-batch-size 2 --lr 1e-3 --log-interval 1 --mock-data "
    "--tokenizer-type ByteLevelTokenizer --seed 3"
)


def _run(work: Path, *flags: str) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "pretrain_early_exit_gpt.py"), *COMMON.split(), *flags],
        cwd=work, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if '"iteration"' in line]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("tune_flags")
    _run(work, *MODEL.split(), "--train-iters", "2", "--save", str(work / "base"))
    tune = ("--use-checkpoint-args", "--finetune", "--tune-exit", "--train-iters", "3")
    _run(work, "--load", str(work / "base"), *tune, "--exit-kl-weight", "2",
         "--exit-confidence-head", "--exit-confidence-hidden-size", "8",
         "--save", str(work / "tuned"), "--metrics-file", str(work / "tuned.jsonl"))  # fmt: skip
    _run(work, "--load", str(work / "tuned"), *tune, "--metrics-file", str(work / "again.jsonl"))
    return {name: _records(work / f"{name}.jsonl") for name in ("tuned", "again")}


def test_objective_flags_reach_a_checkpoint_args_run(runs):
    first = runs["tuned"][0]
    assert set(first["exit_kl_losses"]) == set(first["exit_confidence_losses"]) == {"1", "3"}
    assert all(v > 0 for v in first["exit_kl_losses"].values())


def test_confidence_heads_of_a_tuned_checkpoint_are_kept(runs):
    """Tuned again without the flags: the heads come from the checkpoint (and train), no KL."""
    first = runs["again"][0]
    assert set(first["exit_confidence_losses"]) == {"1", "3"}
    assert "exit_kl_losses" not in first
