"""A training loop on megatron-core's DDP, optimizer and LR scheduler.

Per iteration with ``M`` microbatches the loop minimises

    (1/M) * sum_j [ include_final * L_final_j + sum_i w_i(t) * L_i_j ]

with masked-mean token losses and the exit weights of :mod:`megatron.early_exit.model.losses`.
It runs on any TP/DP/PP layout: :func:`forward_backward` hands each iteration to the
early-exit pipeline schedule (``pipeline/schedule.py``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from megatron.early_exit.checkpoint import store
from megatron.early_exit.config import EarlyExitTransformerConfig
from megatron.early_exit.model.gpt_model import EarlyExitGPTModel
from megatron.early_exit.model.losses import exit_loss_weights
from megatron.early_exit.pipeline.bubble_fill import FillConfig
from megatron.early_exit.pipeline.executor import ExecutionOptions
from megatron.early_exit.pipeline.schedule import run_pipeline


@dataclass(frozen=True)
class TrainingConfig:
    """Optimisation settings (Megatron flag names in the comments)."""

    train_iters: int  # --train-iters
    num_microbatches: int = 1  # --global-batch-size / (--micro-batch-size * DP)
    lr: float = 1e-3  # --lr
    min_lr: float = 1e-4  # --min-lr
    lr_warmup_iters: int = 0  # --lr-warmup-iters
    lr_decay_style: str = "cosine"  # --lr-decay-style
    weight_decay: float = 0.01  # --weight-decay
    clip_grad: float = 1.0  # --clip-grad
    adam_beta1: float = 0.9  # --adam-beta1
    adam_beta2: float = 0.95  # --adam-beta2
    adam_eps: float = 1e-8  # --adam-eps
    log_interval: int = 10  # --log-interval
    loss_scale: float | None = None  # --loss-scale (fp16: constant; None = dynamic)
    initial_loss_scale: float = 2.0**32  # --initial-loss-scale (fp16 dynamic scaling)
    scheduler_source: str = "check"
    """On load, the LR/WD schedule: ``"check"`` (the checkpoint's must equal this config's, or
    the load stops naming the differences), ``"flags"`` (this config's, continued from the
    checkpoint's step: --override-opt_param-scheduler) or ``"checkpoint"`` (the checkpoint's:
    --use-checkpoint-opt_param-scheduler)."""

    def __post_init__(self) -> None:
        if self.scheduler_source not in ("check", "flags", "checkpoint"):
            raise ValueError(
                f"scheduler_source: expected 'check', 'flags' or 'checkpoint', got "
                f"{self.scheduler_source!r}"
            )


@dataclass
class IterationMetrics:
    """What one iteration reports (the ``--metrics-file`` record)."""

    iteration: int
    lm_loss: float | None
    exit_losses: dict[int, float]
    exit_weights: dict[int, float]
    lr: float
    grad_norm: float | None
    tokens_per_second: float
    extra: dict = field(default_factory=dict)
    exit_terms: dict[str, dict[int, float]] = field(default_factory=dict)
    """Auxiliary exit terms by name and exit depth (``kl``: distillation, ``confidence``: the
    confidence head's BCE), when the model has them."""


@dataclass
class Trainer:
    """Model (DDP-wrapped), optimizer and LR scheduler of one training run."""

    model: DistributedDataParallel
    optimizer: object
    scheduler: OptimizerParamScheduler
    config: EarlyExitTransformerConfig
    training: TrainingConfig
    iteration: int = 0
    mode: str = "train"  # "tune" for EE-Tuning (frozen backbone)
    fill: FillConfig | None = None
    defer_exits: bool = True

    def save_checkpoint(self, save_dir: str | os.PathLike, **kwargs) -> Path:
        """Save model, optimizer, scheduler and iteration; ``kwargs`` as
        :func:`megatron.early_exit.checkpoint.store.save_checkpoint` takes them."""
        return store.save_checkpoint(
            save_dir, self.model, self.optimizer, self.scheduler, iteration=self.iteration, **kwargs
        )

    def load_checkpoint(self, load_dir: str | os.PathLike, **kwargs) -> int:
        """Load into model, optimizer and scheduler and continue from the checkpoint's iteration
        (0 with ``finetune``); returns it. ``kwargs`` as
        :func:`megatron.early_exit.checkpoint.store.load_checkpoint` takes them."""
        self.iteration = store.load_checkpoint(
            load_dir, self.model, self.optimizer, self.scheduler, **kwargs
        )
        return self.iteration


def freeze_backbone(model: EarlyExitGPTModel) -> list[str]:
    """EE-Tuning: only exit-head parameters stay trainable. Returns their names.

    Tied exit heads project with the (frozen) word embedding; only their norm/MLP/layer train.
    """
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith("exit_heads."))
        if param.requires_grad:
            trainable.append(name)
    return trainable


def setup_trainer(
    model: EarlyExitGPTModel,
    training: TrainingConfig,
    *,
    mode: str = "train",
    fill: FillConfig | None = None,
    defer_exits: bool = True,
    distributed_optimizer: bool = False,
) -> Trainer:
    """Wrap ``model`` in megatron-core's DDP and build its Adam optimizer and LR scheduler.

    ``mode="tune"`` is EE-Tuning: the backbone is frozen before DDP sees it (no gradient buffers,
    no optimizer state for it), the final loss must be off, and the pipeline runs the tuning plan.
    """
    config = model.config
    if mode not in ("train", "tune"):
        raise ValueError(f"mode: expected 'train' or 'tune', got {mode!r}")
    if mode == "tune":
        if config.include_final_loss:
            raise ValueError("include_final_loss: EE-Tuning trains exits only; set it to False")
        if fill is not None:
            raise ValueError("fill: bubble filling applies to full training, not EE-Tuning")
        freeze_backbone(model)  # a stage without exits has nothing to train, which is fine
    if config.fp16 or config.bf16:  # half-precision weights, fp32 main params in the optimizer
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=distributed_optimizer)
    ddp = DistributedDataParallel(config, ddp_config, model)
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=training.lr,
            min_lr=training.min_lr,
            weight_decay=training.weight_decay,
            adam_beta1=training.adam_beta1,
            adam_beta2=training.adam_beta2,
            adam_eps=training.adam_eps,
            clip_grad=training.clip_grad,
            use_distributed_optimizer=distributed_optimizer,
            loss_scale=training.loss_scale,
            initial_loss_scale=training.initial_loss_scale,
            bf16=config.bf16,
            fp16=config.fp16,
            params_dtype=config.params_dtype,
        ),
        [ddp],
    )
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if training.lr_warmup_iters else training.lr,
        max_lr=training.lr,
        min_lr=training.min_lr,
        lr_warmup_steps=training.lr_warmup_iters,
        lr_decay_steps=training.train_iters,
        lr_decay_style=training.lr_decay_style,
        start_wd=training.weight_decay,
        end_wd=training.weight_decay,
        wd_incr_steps=training.train_iters,
        wd_incr_style="constant",
        override_opt_param_scheduler=training.scheduler_source == "flags",
        use_checkpoint_opt_param_scheduler=training.scheduler_source == "checkpoint",
    )
    return Trainer(ddp, optimizer, scheduler, config, training, 0, mode, fill, defer_exits)


def forward_backward(
    trainer: Trainer, microbatches: list[dict], fill_microbatches: list[dict] = ()
) -> tuple[float | None, dict[int, float], dict]:
    """Forward and backward of one iteration through the early-exit pipeline schedule (any PP).

    Returns the mean final loss, the mean loss of every exit over the pipeline and the
    auxiliary exit terms (see :func:`_split_losses`).
    """
    options = ExecutionOptions(
        exit_weights=exit_loss_weights(trainer.config, trainer.iteration),
        include_final_loss=trainer.config.include_final_loss,
        loss_scale=float(trainer.optimizer.get_loss_scale()),
        defer_exits=trainer.defer_exits,
        num_microbatches=len(microbatches),
    )
    means = run_pipeline(
        trainer.model,
        trainer.config,
        microbatches,
        options,
        mode=trainer.mode,
        fill=trainer.fill,
        fill_microbatches=fill_microbatches,
    )
    return _split_losses(means)


AUXILIARY_TERMS = ("kl", "confidence")


def _split_losses(means: dict[str, float]) -> tuple[float | None, dict[int, float], dict]:
    """``(final, {depth: exit loss}, {term: {depth: value}})`` from the executor's keys."""
    exits = {int(k[len("exit_") :]): v for k, v in means.items() if k.startswith("exit_")}
    terms = {}
    for name in AUXILIARY_TERMS:
        prefix = f"{name}_"
        values = {int(k[len(prefix) :]): v for k, v in means.items() if k.startswith(prefix)}
        if values:
            terms[name] = dict(sorted(values.items()))
    return means.get("final"), dict(sorted(exits.items())), terms


def train_step(
    trainer: Trainer, microbatches: list[dict], fill_microbatches: list[dict] = ()
) -> IterationMetrics:
    """One optimizer step: zero grads, forward/backward, reduce grads, clip, update, schedule."""
    start = time.perf_counter()
    trainer.model.zero_grad_buffer()
    trainer.optimizer.zero_grad()
    lm_loss, exit_losses, exit_terms = forward_backward(trainer, microbatches, fill_microbatches)
    forward_backward_done = time.perf_counter()
    finalize_model_grads([trainer.model])
    update_successful, grad_norm, _ = trainer.optimizer.step()
    optimizer_done = time.perf_counter()
    weights = exit_loss_weights(trainer.config, trainer.iteration)
    lr = trainer.optimizer.param_groups[0]["lr"]
    if update_successful:  # an fp16 overflow skips the update and the schedule step
        trainer.scheduler.step(increment=1)
    trainer.iteration += 1
    tokens = sum(b["input_ids"].numel() for b in [*microbatches, *fill_microbatches])
    return IterationMetrics(
        iteration=trainer.iteration,
        lm_loss=lm_loss if trainer.config.include_final_loss else None,
        exit_losses=exit_losses,
        exit_weights=weights,
        lr=lr,
        grad_norm=None if grad_norm is None else float(grad_norm),
        tokens_per_second=tokens / (time.perf_counter() - start),
        extra={
            "timers": {  # seconds (--log-timers-to-tracker)
                "forward-backward": forward_backward_done - start,
                "grads-reduce-and-optimizer": optimizer_done - forward_backward_done,
            }
        },
        exit_terms=exit_terms,
    )


@torch.no_grad()
def evaluate(trainer: Trainer, microbatches: list[dict]) -> dict[str, float]:
    """Mean final loss and every exit's loss on held-out microbatches (forward only, any PP)."""
    trainer.model.eval()
    options = ExecutionOptions(exit_weights={}, num_microbatches=len(microbatches))
    means = run_pipeline(trainer.model, trainer.config, microbatches, options, mode="eval")
    trainer.model.train()
    final, exits, terms = _split_losses(means)
    out = {"lm_loss": final, **{f"exit_{d}": v for d, v in exits.items()}}
    for name, values in terms.items():
        out.update({f"{name}_{d}": v for d, v in values.items()})
    return out
