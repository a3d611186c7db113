"""The trackers honour --wandb-* and --log-timers-to-tracker (wandb itself is optional: a fake
module stands in for it here; without it the flags stop at parsing, see test_arguments)."""

from __future__ import annotations

import importlib.machinery
import sys
import types

from megatron.early_exit.training import arguments
from megatron.early_exit.training.logging import RunLogger
from megatron.early_exit.training.loop import IterationMetrics


class _FakeWandb(types.ModuleType):
    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # find_spec sees it
        self.inits, self.logged, self.finished = [], [], False

    def init(self, **kwargs):
        self.inits.append(kwargs)

    def log(self, values, step):
        self.logged.append((step, dict(values)))

    def finish(self):
        self.finished = True


def _metrics(iteration: int) -> IterationMetrics:
    return IterationMetrics(
        iteration=iteration, lm_loss=3.0, exit_losses={1: 3.5}, exit_weights={1: 0.3}, lr=1e-3,
        grad_norm=1.0, tokens_per_second=100.0,
        extra={"timers": {"forward-backward": 0.25, "grads-reduce-and-optimizer": 0.05}},
    )  # fmt: skip


def test_wandb_and_timers(monkeypatch, tmp_path):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    args = arguments.parse_args(
        f"--wandb-project proj --wandb-exp-name run1 --wandb-save-dir {tmp_path} "
        "--log-timers-to-tracker --log-interval 1 --train-iters 2".split()
    )
    logger = RunLogger(args, config=None, tokens_per_iteration=64)
    logger.iteration(_metrics(1), seconds=0.5)
    logger.close()
    (init,) = fake.inits
    assert (init["project"], init["name"], init["dir"]) == ("proj", "run1", str(tmp_path))
    assert init["config"]["train_iters"] == 2
    logged = {name: value for step, values in fake.logged if step == 1
              for name, value in values.items()}  # fmt: skip
    assert logged["train/lm_loss"] == 3.0 and logged["train/exit_losses/1"] == 3.5
    assert logged["timers/iteration"] == 0.5 and logged["timers/forward-backward"] == 0.25
    assert fake.finished


def test_no_timers_without_the_flag(monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    args = arguments.parse_args("--wandb-project proj --log-interval 1".split())
    logger = RunLogger(args, config=None, tokens_per_iteration=64)
    logger.iteration(_metrics(1), seconds=0.5)
    logger.close()
    assert not any(k.startswith("timers/") for _, values in fake.logged for k in values)
