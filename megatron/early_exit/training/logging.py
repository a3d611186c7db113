"""Run logging: console progress, TensorBoard and Weights & Biases scalars and a JSON-lines
metrics file. ``--log-timers-to-tracker`` adds each iteration's phase times to the trackers.

Losses arrive already averaged over microbatches, pipeline stages and data-parallel replicas, so
only global rank 0 writes.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch.distributed as dist

from megatron.early_exit.training.loop import IterationMetrics


def _is_writer() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class RunLogger:
    """Writes what the loop reports, at ``--log-interval``; every evaluation; the final table."""

    def __init__(self, args, config, tokens_per_iteration: int):
        self.args = args
        self.config = config
        self.tokens_per_iteration = tokens_per_iteration
        self.enabled = _is_writer()
        self._metrics = None
        if self.enabled and args.metrics_file:
            Path(args.metrics_file).parent.mkdir(parents=True, exist_ok=True)
            self._metrics = open(args.metrics_file, "a")
        self._board = None
        if self.enabled and args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._board = SummaryWriter(log_dir=args.tensorboard_dir)
        self._wandb = None
        if self.enabled and args.wandb_project:
            import wandb  # presence checked with the flags

            wandb.init(
                project=args.wandb_project,
                name=args.wandb_exp_name,
                dir=args.wandb_save_dir,
                config={k: v for k, v in vars(args).items() if _is_plain(v)},
            )
            self._wandb = wandb
        self._times: list[float] = []
        self._start_iteration = 0

    def start(self, iteration: int) -> None:
        self._start_iteration = iteration
        self._wall_start = time.perf_counter()
        if self.enabled:
            exits = ", ".join(str(e.depth) for e in self.config.exit_heads) or "none"
            print(f"training from iteration {iteration} to {self.args.train_iters}; exits after "
                  f"layers {exits} of {self.config.num_layers}", flush=True)  # fmt: skip

    def iteration(self, metrics: IterationMetrics, seconds: float) -> None:
        self._times.append(seconds)
        if not self.enabled:
            return
        record = _record(metrics, self.tokens_per_iteration / seconds)
        self._scalars("train", metrics.iteration, record)
        if self.args.log_timers_to_tracker:
            timers = {"iteration": seconds, **metrics.extra.get("timers", {})}
            self._scalars("timers", metrics.iteration, timers)
        if (
            metrics.iteration % self.args.log_interval
            and metrics.iteration != self.args.train_iters
        ):
            return
        if self._metrics:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()
        print(self._progress_line(metrics, record), flush=True)

    def evaluation(self, iteration: int, losses: dict) -> None:
        if not self.enabled:
            return
        self._scalars("valid", iteration, {k: v for k, v in losses.items() if v is not None})
        parts = [
            f"{_head_name(k)} {v:.3f} (ppl {_ppl(v):.1f})"
            for k, v in losses.items()
            if v is not None and _is_head_loss(k)
        ]
        parts += [
            f"{k} {v:.4f}" for k, v in losses.items() if v is not None and not _is_head_loss(k)
        ]
        print(f"validation at iteration {iteration}: " + " | ".join(parts), flush=True)

    def final(self, iteration: int, losses: dict) -> None:
        if not self.enabled:
            return
        if self._metrics:
            self._metrics.write(json.dumps({"evaluation": losses, "iteration": iteration}) + "\n")
        print(f"\n{'head':<22}{'validation loss':>16}{'perplexity':>12}")
        for key, value in losses.items():
            if value is not None and _is_head_loss(key):
                print(f"{_head_name(key):<22}{value:>16.3f}{_ppl(value):>12.2f}")
        for key, value in losses.items():
            if value is not None and not _is_head_loss(key):
                name, depth = key.rsplit("_", 1)
                print(f"{name + ' term, exit ' + depth:<22}{value:>16.4f}")
        wall = time.perf_counter() - self._wall_start
        print(f"\n{iteration - self._start_iteration} iterations in {wall:.1f} s", flush=True)

    def close(self) -> None:
        if self._metrics:
            self._metrics.close()
        if self._board:
            self._board.close()
        if self._wandb is not None:
            self._wandb.finish()

    def _progress_line(self, metrics: IterationMetrics, record: dict) -> str:
        recent = self._times[-self.args.log_interval :]
        eta = (self.args.train_iters - metrics.iteration) * sum(recent) / len(recent)
        exits = "  ".join(
            f"exit{d} {loss:.3f} (w {metrics.exit_weights.get(d, 0.0):.2f})"
            for d, loss in metrics.exit_losses.items()
        )
        terms = "  ".join(
            f"{name}{d} {v:.4f}" for name, values in metrics.exit_terms.items()
            for d, v in values.items()
        )  # fmt: skip
        if terms:
            exits = f"{exits} | {terms}"
        lm = f"lm {metrics.lm_loss:.3f} | " if metrics.lm_loss is not None else ""
        grad = f"{metrics.grad_norm:.2f}" if metrics.grad_norm is not None else "-"
        return (
            f"iter {metrics.iteration:6d}/{self.args.train_iters} | {lm}{exits} | "
            f"lr {metrics.lr:.2e} | grad {grad} | {record['tokens_per_second']:,.0f} tok/s | "
            f"ETA {eta:.0f} s"
        )

    def _scalars(self, prefix: str, step: int, values: dict) -> None:
        flat = {f"{prefix}/{name}": value for name, value in _flatten(values).items()}
        if self._board is not None:
            for name, value in flat.items():
                self._board.add_scalar(name, value, step)
        if self._wandb is not None:
            self._wandb.log(flat, step=step)


def _record(metrics: IterationMetrics, tokens_per_second: float) -> dict:
    return {
        "iteration": metrics.iteration,
        "lm_loss": metrics.lm_loss,
        "exit_losses": {str(d): v for d, v in metrics.exit_losses.items()},
        "exit_weights": {str(d): v for d, v in metrics.exit_weights.items()},
        **{
            f"exit_{name}_losses": {str(d): v for d, v in values.items()}
            for name, values in metrics.exit_terms.items()
        },
        "lr": metrics.lr,
        "grad_norm": metrics.grad_norm,
        "tokens_per_second": tokens_per_second,
    }


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and value is not None:
            flat[f"{prefix}{key}"] = value
    return flat


def _is_plain(value) -> bool:
    return value is None or isinstance(value, str | int | float | bool | list)


def _is_head_loss(key: str) -> bool:
    """``lm_loss`` and ``exit_<d>`` are heads' cross entropies; ``kl_<d>``/``confidence_<d>``
    are auxiliary terms (no perplexity)."""
    return key == "lm_loss" or key.startswith("exit_")


def _head_name(key: str) -> str:
    return "final head" if key == "lm_loss" else f"exit after layer {key.split('_')[1]}"


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))
